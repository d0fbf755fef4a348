"""The router's worker registry: who is registered, in which role, how loaded, and whether alive.

Workers register over the control socket (:class:`~splitserve.core.messages.Register`) and send a
:class:`~splitserve.core.messages.Heartbeat` about every second. A worker whose last heartbeat is
older than ``heartbeat_timeout_s`` is marked unhealthy and leaves routing until it heartbeats again; one silent for
``forget_after_s`` is forgotten (it leaves ``/metrics`` and ``/status``; if it comes back it registers again). At
most ``max_workers`` ids are registered at once: a registration beyond that is refused (:class:`RegistryFull`).
Load seen by the policies combines what the router itself tracks (requests it sent and that have not
finished, prompt tokens not yet prefilled) with what the last heartbeat reported.

Torch-free, asyncio-free: pure bookkeeping, unit-tested with an injected clock.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Iterable, Literal, Mapping

from splitserve.core.messages import Heartbeat, Register, Role

logger = logging.getLogger(__name__)

Pool = Literal["prefill", "decode"]


class RegistryFull(ValueError):
    """No room for another worker id (``max_workers``)."""

_CAPABLE: Mapping[Pool, tuple[str, ...]] = MappingProxyType(
    {"prefill": ("prefill", "both"), "decode": ("decode", "both")}
)


@dataclass(eq=False)
class WorkerState:
    """Everything the router knows about one worker."""

    worker_id: str
    identity: bytes
    role: Role
    model_id: str
    peer_addr: str
    transfer_addr: str
    num_pages: int
    page_size: int
    max_model_len: int
    last_heartbeat: float
    vocab_size: int = 0
    heartbeat: Heartbeat | None = None
    healthy: bool = True
    draining: bool = False
    inflight: int = 0
    """Requests routed here (either pool) that have not finished."""
    pending_prefill_tokens: int = 0
    """Prompt tokens routed here for prefill whose first token has not come back yet."""
    cached_hashes: set[int] = field(default_factory=set)
    """Prefix-cache page hashes this worker published (``cache_events``)."""
    curve_key: str | None = None
    """The CurveZMQ public key (z85) this worker id registered with; ``None`` without keys (never a secret)."""
    external: bool = False
    """Registered through the admin API rather than by the worker itself."""
    role_epoch: int = 0
    """Role switches sent to this worker; a heartbeat from before the latest one does not reset ``role``."""
    restarts: int = 0
    """Times a worker registered again under this id (a restarted process: its in-flight work was lost)."""

    def capable(self, pool: Pool) -> bool:
        return self.role in _CAPABLE[pool]

    @property
    def routable(self) -> bool:
        return self.healthy and not self.draining

    def requests_load(self) -> int:
        """Running + waiting requests: the larger of the router's count and the worker's report."""
        hb = self.heartbeat
        reported = hb.running + hb.waiting if hb is not None else 0
        return max(self.inflight, reported)

    def tokens_load(self) -> int:
        """Queued prompt tokens: the larger of the router's count and the worker's report."""
        reported = self.heartbeat.queued_tokens if self.heartbeat is not None else 0
        return max(self.pending_prefill_tokens, reported)

    def load_key(self, pool: Pool) -> tuple[int, int, str]:
        """Smaller is less loaded. Prefill pools weigh queued tokens first, decode pools requests."""
        if pool == "prefill":
            return (self.tokens_load(), self.requests_load(), self.worker_id)
        return (self.requests_load(), self.tokens_load(), self.worker_id)

    def kv_free_pages(self) -> int:
        """Pages a new request could use: free plus evictable cached pages (all pages before a heartbeat)."""
        hb = self.heartbeat
        if hb is None:
            return self.num_pages
        return hb.kv_pages_free + hb.kv_pages_cached

    def apply_cache_events(self, events: Iterable[tuple[str, tuple[int, ...]]]) -> None:
        for kind, hashes in events:
            if kind == "stored":
                self.cached_hashes.update(hashes)
            elif kind == "removed":
                self.cached_hashes.difference_update(hashes)
            else:
                logger.warning("worker %s: unknown cache event kind %r ignored", self.worker_id, kind)

    def to_json(self, now: float, addresses: bool = True) -> dict:
        """Plain-JSON view for the admin API and (``addresses=False``: no internal endpoints) the status page."""
        hb = self.heartbeat
        view = {
            "worker_id": self.worker_id,
            "role": self.role,
            "model_id": self.model_id,
            "healthy": self.healthy,
            "draining": self.draining,
            "external": self.external,
            "heartbeat_age_s": round(now - self.last_heartbeat, 3),
            "inflight": self.inflight,
            "pending_prefill_tokens": self.pending_prefill_tokens,
            "running": hb.running if hb else 0,
            "waiting": hb.waiting if hb else 0,
            "queued_tokens": hb.queued_tokens if hb else 0,
            "kv_pages_total": self.num_pages,
            "kv_pages_used": hb.kv_pages_used if hb else 0,
            "kv_pages_free": hb.kv_pages_free if hb else self.num_pages,
            "kv_pages_cached": hb.kv_pages_cached if hb else 0,
            "page_size": self.page_size,
            "max_model_len": self.max_model_len,
        }
        if addresses:
            view.update(peer_addr=self.peer_addr, transfer_addr=self.transfer_addr)
        return view


class WorkerRegistry:
    """Registered workers by id. ``clock`` is injectable (tests); it defaults to ``time.monotonic``."""

    def __init__(self, heartbeat_timeout_s: float, clock: Callable[[], float] = time.monotonic,
                 max_workers: int = 1024, forget_after_s: float = 300.0) -> None:
        if heartbeat_timeout_s <= 0:
            raise ValueError(f"heartbeat_timeout_s must be > 0, got {heartbeat_timeout_s}")
        self._timeout = heartbeat_timeout_s
        self._max_workers = max_workers
        self._forget_after = max(forget_after_s, heartbeat_timeout_s)
        self._clock = clock
        self._workers: dict[str, WorkerState] = {}

    def now(self) -> float:
        return self._clock()

    def register(self, identity: bytes, msg: Register, external: bool = False,
                 curve_key: str | None = None) -> WorkerState | None:
        """Add or replace a worker; returns the replaced entry (its in-flight work is gone) or ``None``.

        Raises :class:`RegistryFull` for a new id when ``max_workers`` are registered already.
        """
        old = self._workers.get(msg.worker_id)
        if old is None and len(self._workers) >= self._max_workers:
            raise RegistryFull(f"{len(self._workers)} workers registered already (the limit); {msg.worker_id} refused")
        self._workers[msg.worker_id] = WorkerState(
            worker_id=msg.worker_id,
            identity=identity,
            role=msg.role,
            model_id=msg.model_id,
            peer_addr=msg.peer_addr,
            transfer_addr=msg.transfer_addr,
            num_pages=msg.num_pages,
            page_size=msg.page_size,
            max_model_len=msg.max_model_len,
            vocab_size=msg.vocab_size,
            last_heartbeat=self._clock(),
            external=external,
            restarts=0 if old is None else old.restarts + 1,
            curve_key=curve_key,
        )
        logger.info("worker %s registered: role=%s model=%s%s", msg.worker_id, msg.role, msg.model_id,
                    " (replaces previous entry)" if old else "")
        return old

    def heartbeat(self, msg: Heartbeat) -> WorkerState | None:
        """Record a heartbeat; ``None`` when the worker is not registered."""
        w = self._workers.get(msg.worker_id)
        if w is None:
            return None
        if not w.healthy:
            logger.info("worker %s is healthy again", w.worker_id)
        w.heartbeat = msg
        if msg.role_epoch >= w.role_epoch:  # a heartbeat sent before the last SetRole carries the old role
            w.role = msg.role
        w.last_heartbeat = self._clock()
        w.healthy = True
        w.draining = w.draining or msg.draining
        w.apply_cache_events(msg.cache_events)
        return w

    def expire(self) -> list[WorkerState]:
        """Mark workers whose heartbeat is older than the timeout unhealthy; return the newly expired."""
        now = self._clock()
        expired = [w for w in self._workers.values() if w.healthy and now - w.last_heartbeat > self._timeout]
        for w in expired:
            w.healthy = False
            logger.warning("worker %s missed heartbeats for %.1f s: out of routing", w.worker_id,
                           now - w.last_heartbeat)
        return expired

    def forget_stale(self) -> list[WorkerState]:
        """Forget workers (not admin-registered ones) silent for ``forget_after_s``; returns them."""
        now = self._clock()
        stale = [w for w in self._workers.values()
                 if not w.external and now - w.last_heartbeat > self._forget_after]
        for w in stale:
            del self._workers[w.worker_id]
            logger.info("worker %s forgotten after %.0f s without a heartbeat", w.worker_id, now - w.last_heartbeat)
        return stale

    def remove(self, worker_id: str) -> WorkerState | None:
        w = self._workers.pop(worker_id, None)
        if w is not None:
            logger.info("worker %s deregistered", worker_id)
        return w

    def get(self, worker_id: str) -> WorkerState | None:
        return self._workers.get(worker_id)

    def all(self) -> list[WorkerState]:
        return sorted(self._workers.values(), key=lambda w: w.worker_id)

    def candidates(self, pool: Pool) -> list[WorkerState]:
        """Healthy, non-draining workers able to serve ``pool``, sorted by id (stable order)."""
        return [w for w in self.all() if w.routable and w.capable(pool)]

    def has_healthy(self, pool: Pool) -> bool:
        """A worker that can take new work for ``pool``: healthy and not draining."""
        return any(w.routable and w.capable(pool) for w in self._workers.values())
