"""60-second soak on real processes (the 10-minute one: ``python -m splitserve.benchmarks.soak``).

1. A router (``--max-queued-requests 8``) and one prefill and one decode worker on stories260K, each with a
   64-page KV pool, so pages churn and requests wait and are preempted.
2. :func:`splitserve.benchmarks.soak.soak`: a few warm-up requests, RSS of each process, then 60 s of the seeded,
   bounded load generator (streaming and non-streaming requests, mixed prompt lengths and ``max_tokens``, clients
   closing streams mid-way, bursts of 16 client loops above the router's limit of 8), then KV pages and RSS again.
3. Every request succeeded, got an intended 429, or was closed by its own client; each of the three happened; no
   process died or logged a traceback; every worker's KV pages are back to zero; each process's RSS at the end is
   within :func:`~splitserve.benchmarks.soak.rss_bound_mb` of its warm value (1.5x + 50 MB: allocator arenas and
   caches grow in steps and are kept, a leak per request or per page grows past it over thousands); and a fresh
   request still returns stories260K's reference text.
"""

from __future__ import annotations

import pytest

from splitserve.benchmarks.soak import LoadConfig, format_table, problems, soak
from test_e2e_chaos import assert_clean, model_id, start, still_serves

DURATION_S = 60.0


@pytest.mark.slow
def test_60_second_soak_ends_with_no_error_no_leak_and_flat_memory(tmp_path_factory):
    c = start(tmp_path_factory, "soak", prefill=1, decode=1, router_args=["--max-queued-requests", "8"],
              worker_args=["--page-size", "8", "--num-pages", "64", "--max-num-seqs", "16"])
    try:
        cfg = LoadConfig(duration_s=DURATION_S, seed=12, concurrency=6, burst_concurrency=16)
        summary, rss, pages = soak(c.url, cfg, {name: p.pid for name, p in c.procs.items()})
        print(format_table(summary, rss, pages))  # in the test's output (pytest -s, or on failure)
        outcomes = summary["outcomes"]
        assert outcomes["error"] == 0, summary["errors"]
        assert outcomes["ok"] and outcomes["rejected"] and outcomes["disconnected"], outcomes  # each path ran
        assert all(p.poll() is None for p in c.procs.values()), {k: p.poll() for k, p in c.procs.items()}
        assert problems(summary, rss, pages) == [], (rss, pages)
        assert_clean(c)
        assert still_serves(c, model_id(c))
    finally:
        c.stop()
