"""The installed package's version (``/version``, ``splitserve --version``)."""

from __future__ import annotations

from importlib import metadata


def package_version() -> str:
    """The version of the installed ``splitserve`` distribution, ``"unknown"`` when it is not installed."""
    try:
        return metadata.version("splitserve")
    except metadata.PackageNotFoundError:
        return "unknown"
