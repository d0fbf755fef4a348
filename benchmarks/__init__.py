"""SplitServe."""
