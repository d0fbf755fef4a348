"""Agent sessions a decode worker holds: the conversation's KV kept (pinned) between turns, and what to let go first.

1. A turn with a :class:`~splitserve.core.messages.SessionHint` finishes with its pages pinned under the session id
   (the engine's ``session_key``); the next turn of that session, routed here by the router, prefills locally and
   hits those pages in the prefix cache, so only the new suffix is computed.
2. :meth:`SessionKeeper.touch` records when each session was used and when its agent expects to return
   (``expected_return_s``, else :data:`DEFAULT_RETURN_S`).
3. Held pages are bounded (``max_fraction`` of the pool, :meth:`SessionKeeper.enforce_cap`), and a reservation
   that does not fit releases sessions first (:meth:`SessionKeeper.release_one`). Victims: the session expected back
   last, then the least recently used. A released session's pages stay in the prefix cache as evictable pages, so a
   quick return may still hit them; a later turn never fails because of a session, it only recomputes more.
4. :meth:`SessionKeeper.end` releases a session whose agent said it has ended.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from splitserve.core.cache.manager import KVCacheManager
from splitserve.core.messages import SessionHint

logger = logging.getLogger(__name__)

DEFAULT_RETURN_S = 60.0
"""When a session without a hint is expected back, for ordering victims."""
FORGET_S = 3600.0
"""Bookkeeping of a session that holds no pages here is dropped after this long without a turn."""


@dataclass
class _Held:
    last_use: float
    expected_back: float


class SessionKeeper:
    """Pure bookkeeping over the KV manager's pinned keys (the source of truth); ``release`` unpins one session."""

    def __init__(self, kv: KVCacheManager, release: Callable[[str], None], max_fraction: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kv, self._release, self.max_fraction, self._clock = kv, release, max_fraction, clock
        self._held: dict[str, _Held] = {}

    def holds(self, session_id: str) -> bool:
        """Whether this worker still pins pages of ``session_id``."""
        return session_id in self.kv.pinned_keys()

    def touch(self, hint: SessionHint) -> None:
        now = self._clock()
        back = hint.expected_return_s if hint.expected_return_s is not None else DEFAULT_RETURN_S
        self._held[hint.session_id] = _Held(now, now + back)

    def end(self, session_id: str) -> None:
        self._held.pop(session_id, None)
        if self.holds(session_id):
            self._release(session_id)
            logger.info("session %s ended: its pages are released", session_id)

    def victims(self) -> list[str]:
        """Sessions to release, first to last: expected back last first, then least recently used."""
        pinned = self.kv.pinned_keys()
        known = {s: h for s, h in self._held.items() if s in pinned}
        unknown = [s for s in pinned if s not in known]  # pinned but never touched here: first to go
        return unknown + sorted(known, key=lambda s: (-known[s].expected_back, known[s].last_use))

    def release_one(self, reason: str) -> bool:
        """Release the first victim; ``False`` when no session holds pages."""
        victims = self.victims()
        if not victims:
            return False
        session = victims[0]
        self._held.pop(session, None)
        self._release(session)
        logger.info("session %s released (%s)", session, reason)
        return True

    def enforce_cap(self) -> None:
        """Release sessions while they pin more than ``max_fraction`` of the pool; forget stale bookkeeping."""
        now, pinned = self._clock(), set(self.kv.pinned_keys())
        self._held = {s: h for s, h in self._held.items() if s in pinned or now - h.last_use < FORGET_S}
        limit = self.max_fraction * self.kv.num_pages
        while self.kv.usage().pinned > limit and self.release_one(f"sessions pin more than {self.max_fraction:.0%} of the pool"):
            pass
