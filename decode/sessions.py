"""Agent sessions a decode worker holds: the conversation's KV kept between turns, in the pool, host memory or disk.

1. A turn with a :class:`~splitserve.core.messages.SessionHint` finishes with its pages pinned under the session id
   (the engine's ``session_key``); the next turn of that session, routed here by the router, prefills locally and
   hits those pages in the prefix cache, so only the new suffix is computed.
2. :meth:`SessionKeeper.touch` records when each session was used and when its agent expects to return
   (``expected_return_s``, else :data:`DEFAULT_RETURN_S`).
3. Pinned pages are bounded (``max_fraction`` of the pool, :meth:`SessionKeeper.enforce_cap`), and a reservation
   that does not fit makes room first (:meth:`SessionKeeper.make_room`). Victims (:meth:`SessionKeeper.order`):
   with policy ``expected_return`` the session expected back last (to the second), then the larger, then the least
   recently used; with ``lru`` the least recently used. A victim's hashed pages go to the host tier when there are
   tiers (decode/tiers.py; on CUDA its pool pages stay pinned until the copy is done, :meth:`SessionKeeper.poll`),
   else they are released. Released pool pages stay in the prefix cache as evictable pages, so a quick return may
   still hit them without a restore.
4. The tiers keep their budgets (host victims move to disk or are dropped, in the same order); sessions idle past
   ``ttl_s`` are dropped from every tier.
5. A turn of a session held in a tier restores it first (:meth:`SessionKeeper.restore`): pages the prefix cache
   still holds are taken as they are, the others are allocated, filled from host memory or disk and registered under
   their hashes, then pinned, so the turn gets its prefix hit. While the pool lacks the room only because copies to
   host memory are still in flight (their pages are released when they finish), :meth:`SessionKeeper.claim` says
   ``wait`` and keeps the copy: the decode worker asks again after its next poll instead of recomputing. No room
   otherwise: the stored copy is dropped and the turn recomputes; a turn never fails because of a session.
6. :meth:`SessionKeeper.end` drops a session everywhere (its agent said it ended, or an admin did);
   :meth:`SessionKeeper.drop_all` drops every session of a worker that drains or stops decoding (the router sends
   their next turns elsewhere, prefilled in full), each one logged and counted by reason.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Literal

from splitserve.core.cache.manager import KVCacheManager
from splitserve.core.messages import SessionHint, SessionReport, SessionStats
from splitserve.decode.tiers import SessionTiers

logger = logging.getLogger(__name__)

DEFAULT_RETURN_S = 60.0
"""When a session without a hint is expected back, for ordering victims."""
FORGET_S = 3600.0
"""Bookkeeping of a session that holds no pages here is dropped after this long without a turn."""
MAX_REPORTED = 256
"""Sessions listed per heartbeat (the most recently used first); counts cover all of them."""
Policy = Literal["expected_return", "lru"]
Claim = Literal["hit", "miss", "wait"]
"""What :meth:`SessionKeeper.claim` found: the KV in the pool, not here, or in a tier behind copies still in flight."""


@dataclass
class _Held:
    last_use: float
    expected_back: float


@dataclass
class SessionCounters:
    turns: int = 0
    restores: int = 0
    restore_bytes: int = 0
    restore_seconds: float = 0.0


class SessionKeeper:
    """Bookkeeping over the KV manager's pinned keys and the tiers; ``release`` unpins one session."""

    def __init__(self, kv: KVCacheManager, release: Callable[[str], None], max_fraction: float,
                 clock: Callable[[], float] = time.monotonic, tiers: SessionTiers | None = None,
                 policy: Policy = "expected_return", ttl_s: float = 3600.0) -> None:
        if policy not in ("expected_return", "lru"):
            raise ValueError(f"unknown session policy {policy!r}")
        self.kv, self._release, self.max_fraction, self._clock = kv, release, max_fraction, clock
        self.tiers = tiers if tiers is not None and tiers.enabled else None
        self.policy, self.ttl_s = policy, ttl_s
        self._held: dict[str, _Held] = {}
        self._offloading: set[str] = set()
        """Sessions whose pages are being copied to the host tier (still pinned until the copy is done)."""
        self.counters = SessionCounters()
        self._next_ttl_check = 0.0
        self.evictions: Counter[str] = Counter()

    # --- queries ---------------------------------------------------------------------------------------------

    def holds(self, session_id: str) -> bool:
        """Whether this worker still pins pages of ``session_id`` in its pool."""
        return self.kv.has_pinned(session_id)

    def order(self, sessions: list[str]) -> list[str]:
        """``sessions`` ordered victims first (sessions never touched here go first)."""
        now = self._clock()

        def key(s: str) -> tuple:
            h = self._held.get(s)
            if h is None:
                return (0,)
            if self.policy == "lru":
                return (1, h.last_use)
            return (1, -round(abs(h.expected_back - now)), -self._size(s), h.last_use)

        return sorted(sessions, key=key)

    def _size(self, session_id: str) -> int:
        if self.holds(session_id):
            return len(self.kv.pinned_pages(session_id))
        entry = self.tiers.stored.get(session_id) if self.tiers is not None else None
        return len(entry.hashes) if entry is not None else 0

    def victims(self) -> list[str]:
        """Sessions pinned in the pool that may be let go, first to last (not those already being offloaded)."""
        return self.order([s for s in self.kv.pinned_keys() if s not in self._offloading])

    # --- turns -----------------------------------------------------------------------------------------------

    def touch(self, hint: SessionHint) -> None:
        now = self._clock()
        back = hint.expected_return_s if hint.expected_return_s is not None else DEFAULT_RETURN_S
        self._held[hint.session_id] = _Held(now, now + back)
        self.counters.turns += 1
        if hint.session_id in self._offloading:  # back before its copy finished: it stays in the pool
            self._offloading.discard(hint.session_id)
            if self.tiers is not None:
                self.tiers.drop(hint.session_id)

    def claim(self, session_id: str) -> Claim:
        """A turn of the session starts here: ``hit`` when its KV is in the pool (restored if need be) as prefix hits;
        ``wait`` when it is in a tier and the pool has room for it only once copies in flight finish (ask again after
        :meth:`poll`; nothing changed); ``miss`` otherwise."""
        if self.holds(session_id):
            self.kv.publish_pinned(session_id)
            return "hit"
        if self._must_wait(session_id):
            return "wait"
        return "hit" if self.restore(session_id) else "miss"

    def _must_wait(self, session_id: str) -> bool:
        entry = self.tiers.stored.get(session_id) if self.tiers is not None else None
        return entry is not None and bool(self._offloading) and not self.kv.fits_hashed(entry.hashes)

    def restore(self, session_id: str) -> bool:
        """Bring a session held in a tier back into the pool, pinned; ``False`` (copy dropped) when it cannot."""
        entry = self.tiers.stored.get(session_id) if self.tiers is not None else None
        if entry is None or self.holds(session_id):
            return False
        t0, copied = time.perf_counter(), 0

        def fill(pages: list[int], indices: list[int]) -> None:
            nonlocal copied
            copied = self.tiers.restore_into(session_id, pages, indices)

        why = "no room"
        try:  # a failed read (a file gone or cut short) is this session's loss only: its turn recomputes
            pages = self.kv.pin_hashed(session_id, entry.hashes, fill)
            while pages is None and self.make_room("a session's restore needs the pages"):
                pages = self.kv.pin_hashed(session_id, entry.hashes, fill)
        except OSError as exc:
            pages, why = None, f"reading it failed ({exc})"
        self.tiers.drop(session_id)
        if pages is None:
            self.evictions["restore_failed"] += 1
            logger.info("session %s: %s to restore its %d pages from %s; the turn recomputes", session_id,
                        why, len(entry.hashes), entry.tier)
            return False
        c = self.counters
        c.restores, c.restore_bytes = c.restores + 1, c.restore_bytes + copied
        c.restore_seconds += time.perf_counter() - t0
        logger.info("session %s: %d pages restored from %s (%d of them copied, the others still cached)", session_id,
                    len(pages), entry.tier, copied // max(1, self.tiers.page_bytes))
        return True

    def end(self, session_id: str) -> None:
        self._held.pop(session_id, None)
        self._drop(session_id, None)
        logger.info("session %s ended: everything it held here is released", session_id)

    def drop_all(self, reason: str) -> list[str]:
        """Drop every session held here (the worker drains or stops decoding); returns their ids."""
        dropped = sorted(self.where())
        for session in dropped:
            self._held.pop(session, None)
            self._drop(session, reason)
            logger.info("session %s dropped: %s", session, reason.replace("_", " "))
        return dropped

    def _drop(self, session_id: str, reason: str | None) -> None:
        """Release the session's pool pages and tier copies; counted as an eviction when ``reason`` is given."""
        self._offloading.discard(session_id)
        held = self.holds(session_id)
        if held:
            self._release(session_id)
        stored = self.tiers.drop(session_id) if self.tiers is not None else None
        if reason is not None and (held or stored is not None):
            self.evictions[reason] += 1

    # --- pressure ----------------------------------------------------------------------------------------------

    def make_room(self, reason: str) -> bool:
        """Let the first victim go (to the host tier, or released); ``True`` when pool pages were freed now.

        ``False`` when no session can be let go, or while a copy to host memory is in flight (CUDA): then the caller
        retries after :meth:`poll` has released its pages, and no further victim is taken meanwhile.
        """
        if self._offloading:
            return self._finish_offloads() > 0
        return self._let_go(reason) == "released"

    def _let_go(self, reason: str) -> str | None:
        """Move the first victim out of the pool: ``released``, ``offloading`` (copy in flight) or ``None`` (none)."""
        victims = self.victims()
        if not victims:
            return None
        session = victims[0]
        hashed = self.kv.pinned_hashes(session)
        if self.tiers is None or not hashed or not self.tiers.fits(len(hashed)):
            self._drop(session, "dropped")
            logger.info("session %s released (%s)", session, reason)
            return "released"
        self.tiers.offload(session, [p for p, _ in hashed], [h for _, h in hashed])
        self._offloading.add(session)
        self.evictions["to_host"] += 1
        logger.info("session %s offloading (%s)", session, reason)
        return "released" if self._finish_offloads() > 0 else "offloading"

    def release_one(self, reason: str) -> bool:
        """Release the first victim outright (no tier); ``False`` when no session holds pages."""
        victims = self.victims()
        if not victims:
            return False
        self._drop(victims[0], "dropped")
        logger.info("session %s released (%s)", victims[0], reason)
        return True

    def _finish_offloads(self) -> int:
        """Release the pool pages of sessions whose copy to host memory is done; returns how many."""
        done = [s for s in self._offloading if self.tiers.offloaded(s)]
        for session in done:
            self._offloading.discard(session)
            if self.holds(session):
                self._release(session)
        if done:
            for session, why in self.tiers.settle(self.order):
                self.evictions[why] += 1
                logger.info("session %s: %s (host tier over budget)", session, why.replace("_", " "))
        return len(done)

    def enforce_cap(self) -> None:
        """Let sessions go while they pin more than ``max_fraction`` of the pool; forget stale bookkeeping."""
        now, pinned = self._clock(), set(self.kv.pinned_keys())
        keep = pinned | (set(self.tiers.stored) if self.tiers is not None else set())
        self._held = {s: h for s, h in self._held.items() if s in keep or now - h.last_use < FORGET_S}
        limit = self.max_fraction * self.kv.num_pages
        while self._pinned_not_leaving() > limit and self._let_go(
                f"sessions pin more than {self.max_fraction:.0%} of the pool") is not None:
            pass

    def _pinned_not_leaving(self) -> int:
        leaving = {p for s in self._offloading if self.holds(s) for p in self.kv.pinned_pages(s)}
        return self.kv.usage().pinned - len(leaving)

    def poll(self) -> None:
        """Between steps: finish offloads, free restore buffers, drop sessions idle past the TTL."""
        if self.tiers is not None:
            self.tiers.copier.poll()
            self.evictions["dropped"] += len(self.tiers.poll())  # disk writes that failed
            if self._offloading:
                self._finish_offloads()
        now = self._clock()
        if now < self._next_ttl_check:
            return
        self._next_ttl_check = now + min(1.0, self.ttl_s / 10)
        expired = [s for s, h in self._held.items() if now - h.last_use > self.ttl_s]
        for session in expired:
            self._held.pop(session, None)
            self._drop(session, "ttl")
            logger.info("session %s dropped: idle past the %.0f s TTL", session, self.ttl_s)

    # --- reports ------------------------------------------------------------------------------------------------

    def where(self) -> dict[str, str]:
        """session id -> ``gpu`` | ``host`` | ``disk`` for every session held here."""
        out = {s: "gpu" for s in self.kv.pinned_keys()}
        if self.tiers is not None:
            for s, entry in self.tiers.stored.items():
                out.setdefault(s, entry.tier)
        return out

    def stats(self, hits: int = 0, tokens_reused: int = 0) -> SessionStats:
        """What the heartbeat carries: counts per tier, cumulative counters, the most recently used sessions."""
        now, where = self._clock(), self.where()
        recent = sorted(where, key=lambda s: -(self._held[s].last_use if s in self._held else 0.0))[:MAX_REPORTED]
        reports = tuple(
            SessionReport(s, self._size(s) * self.kv.page_size, where[s],
                          round(now - self._held[s].last_use, 3) if s in self._held else 0.0)
            for s in recent
        )
        gpu = {p for s in self.kv.pinned_keys() for p in self.kv.pinned_pages(s)}
        c = self.counters
        return SessionStats(
            live=len(where), turns_total=c.turns, pages_gpu=len(gpu),
            pages_host=self.tiers.pages("host") if self.tiers is not None else 0,
            pages_disk=self.tiers.pages("disk") if self.tiers is not None else 0,
            restores_total=c.restores, restore_bytes_total=c.restore_bytes,
            restore_seconds_total=round(c.restore_seconds, 6),
            evictions=tuple(sorted(self.evictions.items())), sessions=reports,
        )

    def close(self) -> None:
        if self.tiers is not None:
            self.tiers.close()


def build_keeper(kv: KVCacheManager, kv_cache, release: Callable[[str], None], cfg,
                 order_steps: Callable[[Any], None] | None = None) -> SessionKeeper:
    """The keeper of a decode worker from its ``WorkerConfig`` (``session_*`` fields), tiers included when set;
    ``order_steps``: see :class:`~splitserve.decode.tiers.PageCopier`."""
    from splitserve.decode.tiers import PageCopier

    gib = 1 << 30
    tiers = None
    if cfg.session_host_gib > 0 or (cfg.session_disk_gib > 0 and cfg.session_disk_dir):
        tiers = SessionTiers(PageCopier(kv_cache, order_steps), int(cfg.session_host_gib * gib), cfg.session_disk_dir,
                             int(cfg.session_disk_gib * gib))
    return SessionKeeper(kv, release, cfg.session_kv_fraction, tiers=tiers, policy=cfg.session_policy,
                         ttl_s=cfg.session_ttl_s)
