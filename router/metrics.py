"""Prometheus metrics of one router app, in its own ``CollectorRegistry`` (no global state).

Request-level histograms (TTFT, TPOT, ITL, end to end) and counters are observed by the request
path. Worker-level numbers (running/waiting, KV pages, transfer totals, health) are read from the
worker registry at scrape time by :class:`_WorkerCollector`, so a deregistered worker disappears
from the output instead of leaving stale gauges behind. Control-plane messages refused for a worker id's key
(router/control.py) are read the same way (:meth:`RouterMetrics.watch_refusals`). A short in-memory history of
TTFT/TPOT feeds the status page's charts.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from splitserve.core.messages import RequestTiming
from splitserve.router.pools import WorkerRegistry

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


_WORKER_COUNTERS = (
    ("transfer_bytes", "KV bytes transferred"),
    ("transfer_seconds", "seconds spent transferring KV"),
    ("transfers_failed", "KV transfers into this worker that failed (recomputed or failed per the failure policy)"),
    ("preemptions", "requests that lost their KV pages to make room (recomputed)"),
    ("prefill_tokens", "prompt tokens this worker prefilled"),
    ("decode_tokens", "tokens this worker generated"),
    ("session_hits", "agent-session turns that found their conversation's KV held on this worker"),
    ("session_tokens_reused", "prompt tokens of those turns that were not recomputed"),
)
"""Cumulative worker counters: ``splitserve_worker_<name>_total`` from ``Heartbeat.<name>_total``."""


class _WorkerCollector(Collector):
    def __init__(self, workers: WorkerRegistry) -> None:
        self._workers = workers

    def collect(self) -> Iterator:
        gauges = {
            name: GaugeMetricFamily(f"splitserve_worker_{name}", doc, labels=["worker", "role"])
            for name, doc in (
                ("healthy", "1 while the worker heartbeats in time"),
                ("draining", "1 while the worker finishes in-flight work and accepts none"),
                ("inflight", "requests the router routed to this worker that have not finished"),
                ("running", "running requests (last heartbeat)"),
                ("waiting", "waiting requests (last heartbeat)"),
                ("queued_tokens", "queued prompt tokens (last heartbeat)"),
                ("kv_pages_used", "KV pages in use (last heartbeat)"),
                ("kv_pages_free", "free KV pages (last heartbeat)"),
                ("kv_pages_cached", "evictable prefix-cached KV pages (last heartbeat)"),
            )
        }
        counters = {
            name: CounterMetricFamily(f"splitserve_worker_{name}", doc, labels=["worker", "role"])
            for name, doc in _WORKER_COUNTERS
        }
        restarts = CounterMetricFamily("splitserve_worker_restarts", "times this worker id registered again (a "
                                       "restarted process, e.g. by the splitserve up supervisor)", labels=["worker", "role"])
        for w in self._workers.all():
            labels = [w.worker_id, w.role]
            hb = w.heartbeat
            values = {
                "healthy": float(w.healthy), "draining": float(w.draining), "inflight": w.inflight,
                "running": hb.running if hb else 0, "waiting": hb.waiting if hb else 0,
                "queued_tokens": hb.queued_tokens if hb else 0, "kv_pages_used": hb.kv_pages_used if hb else 0,
                "kv_pages_free": hb.kv_pages_free if hb else w.num_pages,
                "kv_pages_cached": hb.kv_pages_cached if hb else 0,
            }
            for name, value in values.items():
                gauges[name].add_metric(labels, value)
            for name, family in counters.items():
                family.add_metric(labels, getattr(hb, f"{name}_total") if hb else 0)
            restarts.add_metric(labels, w.restarts)
        yield from gauges.values()
        yield from counters.values()
        yield restarts
        yield from _session_families(self._workers)


def _session_families(workers: WorkerRegistry) -> Iterator:
    """Agent-session metrics from ``Heartbeat.sessions`` (decode/sessions.py), per worker."""
    labels = ["worker", "role"]
    live = GaugeMetricFamily("splitserve_worker_sessions", "agent sessions whose KV this worker holds (any tier)",
                             labels=labels)
    pages = GaugeMetricFamily("splitserve_worker_session_pages", "KV pages held for agent sessions, per tier",
                              labels=[*labels, "tier"])
    hit_rate = GaugeMetricFamily("splitserve_worker_session_hit_ratio",
                                 "session turns that found their KV here, over all session turns", labels=labels)
    counters = {
        name: CounterMetricFamily(f"splitserve_worker_session_{name}", doc, labels=labels)
        for name, doc in (("turns", "turns that came with a session id"),
                          ("restores", "sessions brought back into the KV pool from host memory or disk"),
                          ("restore_bytes", "KV bytes copied back into the pool by restores"),
                          ("restore_seconds", "seconds spent restoring sessions (host work)"))
    }
    evictions = CounterMetricFamily("splitserve_worker_session_evictions",
                                    "sessions let go from a tier, by reason (to_host, to_disk, dropped, ttl, "
                                    "restore_failed, drained, role_change)", labels=[*labels, "reason"])
    for w in workers.all():
        stats = w.heartbeat.sessions if w.heartbeat is not None else None
        if stats is None:
            continue
        lv = [w.worker_id, w.role]
        live.add_metric(lv, stats.live)
        for tier in ("gpu", "host", "disk"):
            pages.add_metric([*lv, tier], getattr(stats, f"pages_{tier}"))
        hit_rate.add_metric(lv, w.heartbeat.session_hits_total / stats.turns_total if stats.turns_total else 0.0)
        for name, family in counters.items():
            family.add_metric(lv, getattr(stats, f"{name}_total"))
        for reason, count in stats.evictions:
            evictions.add_metric([*lv, reason], count)
    yield from (live, pages, hit_rate, *counters.values(), evictions)


_BREAKDOWN = (
    ("prefill_queue", "prefill_queue_s", "disaggregated requests: waiting on the prefill worker before its first step"),
    ("prefill_compute", "prefill_compute_s", "disaggregated requests: prefill compute up to the first token"),
    ("kv_transfer", "transfer_s",
     "disaggregated requests: KV transfer time left after the prefill compute (not hidden)"),
    ("kv_join", "join_s", "disaggregated requests: from the KV landing to the first decode step"),
    ("local_prefill", "local_prefill_s",
     "requests prefilled on the decode worker (short prompts, session turns): arrival to first token"),
)
"""``splitserve_<name>_seconds`` histograms, each from one ``RequestTiming`` field of ``TokenOut.timing``."""
BREAKDOWN_STAGES = tuple(name for name, _field, _doc in _BREAKDOWN)
"""The stages of the per-request time breakdown, as named in ``/metrics`` (what ``bench serve`` reads)."""


class _RefusalCollector(Collector):
    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator:
        family = CounterMetricFamily("splitserve_control_refused", "control-plane messages refused because the "
                                     "client key is not the one bound to the worker id", labels=["kind"])
        for kind, n in sorted(self._counts().items()):
            family.add_metric([kind], n)
        yield family


class RouterMetrics:
    """All metrics of one router; ``render()`` gives the Prometheus text exposition."""

    def __init__(self, workers: WorkerRegistry, history: int = 600) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("splitserve_requests", "finished HTTP requests", ["endpoint", "status"], registry=r)
        self.ttft = Histogram("splitserve_ttft_seconds", "time to first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("splitserve_tpot_seconds", "time per output token after the first (per request)",
                              buckets=_TOKEN_BUCKETS, registry=r)
        self.itl = Histogram("splitserve_itl_seconds", "inter-token latency between streamed outputs",
                             buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("splitserve_e2e_seconds", "end-to-end request latency", buckets=_LATENCY_BUCKETS,
                             registry=r)
        self.breakdown = {
            name: Histogram(f"splitserve_{name}_seconds", doc, buckets=_LATENCY_BUCKETS, registry=r)
            for name, _field, doc in _BREAKDOWN
        }
        self.transfer_bytes = Histogram("splitserve_kv_transfer_bytes", "KV bytes of one request's transfer",
                                        buckets=tuple(2.0 ** k for k in range(16, 36, 2)), registry=r)
        self.sessions = Gauge("splitserve_sessions", "agent sessions the router routes to the worker holding their KV",
                              registry=r)
        self.inflight = Gauge("splitserve_requests_inflight", "requests in flight in the router", registry=r)
        self.prompt_tokens = Counter("splitserve_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("splitserve_generation_tokens", "generated tokens", registry=r)
        r.register(_WorkerCollector(workers))
        self.history: deque[dict] = deque(maxlen=history)
        """Recent finished requests: {"t", "ttft", "tpot"} (status page charts)."""

    def observe_request(self, ttft: float | None, tpot: float | None, e2e: float, prompt_tokens: int,
                        completion_tokens: int) -> None:
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)
        self.e2e.observe(e2e)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.history.append({"t": time.time(), "ttft": ttft, "tpot": tpot})

    def observe_timing(self, timing: RequestTiming) -> None:
        """One request's time breakdown (core/messages.py ``RequestTiming``), as the workers measured it."""
        for name, field, _doc in _BREAKDOWN:
            value = getattr(timing, field)
            if value is not None:
                self.breakdown[name].observe(value)
        if timing.transfer_bytes is not None:
            self.transfer_bytes.observe(timing.transfer_bytes)

    def watch_refusals(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """Export ``counts()`` (message kind -> messages refused for a worker id's key) at every scrape."""
        self.registry.register(_RefusalCollector(counts))

    def render(self) -> bytes:
        return generate_latest(self.registry)
