"""Page allocator: reference counts, a FIFO free queue and an LRU of evictable cached pages.

Every page id in ``0..num_pages-1`` is in exactly one of three states:

- **free**: ref count 0, no hash, in the free queue. Nobody owns it; its contents are garbage.
- **cached & evictable**: ref count 0, has a prefix-cache hash, in the LRU. Nobody owns it, but
  its contents are valid KV for its hash. A prefix hit revives it (:meth:`PageAllocator.touch`);
  :meth:`PageAllocator.allocate` may evict it (dropping its hash) when the free queue is empty.
- **in use**: ref count > 0. Owned by the holders of those references (requests' page tables
  and pinned sessions, tracked by :class:`splitserve.core.cache.manager.KVCacheManager`). It may
  also have a hash, in which case other requests may share it read-only. An in-use page is
  never handed out by :meth:`PageAllocator.allocate`, so a page being written is never reused.

Handing pages out, step by step (both paths are all or nothing and give each page ref count 1):

1. :meth:`PageAllocator.allocate` (requests computing their own KV) takes free pages in queue
   order: a fresh pool gives ``0, 1, 2, ...``, released unhashed pages join the back.
2. :meth:`PageAllocator.allocate_contiguous` (pages an incoming KV transfer will fill) takes
   free pages as the fewest maximal runs of consecutive ids that cover the request, returned
   ascending, so a transfer needs one descriptor per run instead of one per page. The free
   pages it leaves keep their queue order, so step 1 is unaffected.
3. Either path evicts cached-evictable pages, least recently released first, only once every
   free page is taken; an evicted page loses its hash (a ``removed`` cache event).

Pure Python: no torch, no numpy.
"""

from __future__ import annotations

import collections
import logging
import re
from typing import Iterable, Iterator, Mapping, Sequence

logger = logging.getLogger(__name__)


class CacheIntegrityError(RuntimeError):
    """The allocator's bookkeeping disagrees with itself or with the owners' page tables."""


def _fewest_runs(runs: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """``(start, count)`` pieces of ``runs`` (``(start, length)``, ascending starts) covering ``n`` pages.

    The fewest runs that can: the longest first (lower start on ties) until one run holds the
    remainder, which then comes from the shortest run that holds it (lower start on ties).
    Needs ``n <= sum of lengths``. Sorting only the distinct lengths (at most about
    ``sqrt(2 * pages)`` of them) keeps this linear in the number of runs.
    """
    by_length: dict[int, list[int]] = collections.defaultdict(list)
    for start, length in runs:
        by_length[length].append(start)
    longest_first = [(start, length) for length in sorted(by_length, reverse=True) for start in by_length[length]]
    picked: list[tuple[int, int]] = []
    remaining = n
    for i, (start, length) in enumerate(longest_first):
        if length >= remaining:
            best_start, _ = min((run for run in longest_first[i:] if run[1] >= remaining),
                                key=lambda run: (run[1], run[0]))
            picked.append((best_start, remaining))
            return picked
        picked.append((start, length))
        remaining -= length
    raise ValueError(f"{n} pages asked of runs holding {n - remaining}")


class FreeQueue:
    """The free pages: a FIFO queue that also removes any page in O(1) and keeps a byte map of who is free.

    :meth:`PageAllocator.allocate_contiguous` finds runs of consecutive free ids in :attr:`flags` (one C-level scan)
    and takes pages from the middle of the queue; a taken page leaves a stale entry behind (its generation moved
    on), skipped when it reaches the front and dropped when stale entries outnumber live ones. The live pages keep
    exactly the order they would have had if the taken ones were deleted from a plain deque, at O(1) per page
    instead of O(pool) per transfer (a 50,000-page pool cost the decode loop about 7 ms per reservation).
    """

    def __init__(self, num_pages: int) -> None:
        self.flags = bytearray(b"\x01") * num_pages
        """``flags[page] == 1`` exactly when the page is in the queue."""
        self._gen = [0] * num_pages
        self._queue: collections.deque[tuple[int, int]] = collections.deque((p, 0) for p in range(num_pages))
        self._count = num_pages
        self._stale = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        """Live pages, front first."""
        return (page for page, gen in self._queue if gen == self._gen[page])

    def append(self, page: int) -> None:
        if self.flags[page]:
            raise CacheIntegrityError(f"page {page} is already in the free queue")
        self.flags[page] = 1
        self._queue.append((page, self._gen[page]))
        self._count += 1

    def popleft(self) -> int:
        while True:
            page, gen = self._queue.popleft()  # IndexError when empty, like a deque
            if gen == self._gen[page]:
                self._gen[page] += 1
                self.flags[page] = 0
                self._count -= 1
                return page
            self._stale -= 1

    def remove(self, page: int) -> None:
        """Take ``page`` (which must be free) out of the queue wherever it is."""
        if not self.flags[page]:
            raise CacheIntegrityError(f"page {page} is not in the free queue")
        self.flags[page] = 0
        self._gen[page] += 1
        self._count -= 1
        self._stale += 1
        if self._stale > max(64, self._count):
            self._queue = collections.deque((p, g) for p, g in self._queue if g == self._gen[p])
            self._stale = 0

    def entries(self) -> int:
        """Queue entries, stale ones included (for integrity checks)."""
        return len(self._queue)


class PageAllocator:
    """Hands out page ids with reference counts and keeps the prefix cache (hash <-> page).

    Allocation order is deterministic: a fresh pool hands out ``0, 1, 2, ...``; freed unhashed
    pages go to the back of the free queue; evictable cached pages are evicted least recently
    released first, and only once the free queue is empty. :meth:`allocate_contiguous` picks
    free pages by runs of consecutive ids instead of queue order (see the module docstring).
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self._refs = [0] * num_pages
        self._free = FreeQueue(num_pages)
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._hash_to_page: dict[int, int] = {}
        self._page_to_hash: dict[int, int] = {}
        self._num_used = 0
        self._events: list[tuple[str, int]] | None = None
        """Prefix-cache changes ("stored" | "removed", hash) since the last :meth:`take_events`; off until
        :meth:`record_events` (an engine without a router to publish to would only accumulate them)."""

    # ---- counters ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Pages :meth:`allocate` can hand out: free plus cached-evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Pages with ref count > 0."""
        return self._num_used

    @property
    def num_cached(self) -> int:
        """Pages that carry a prefix-cache hash (in use or evictable)."""
        return len(self._page_to_hash)

    @property
    def num_evictable(self) -> int:
        """Cached pages with ref count 0 (reusable by a prefix hit until evicted)."""
        return len(self._evictable)

    # ---- queries ----------------------------------------------------------------------------
    def ref_count(self, page_id: int) -> int:
        self._check_id(page_id)
        return self._refs[page_id]

    def is_evictable(self, page_id: int) -> bool:
        self._check_id(page_id)
        return page_id in self._evictable

    def hash_of(self, page_id: int) -> int | None:
        """The page's prefix-cache hash, or ``None`` if it has none."""
        self._check_id(page_id)
        return self._page_to_hash.get(page_id)

    def hashes_of(self, ids: Sequence[int]) -> list[int | None]:
        """:meth:`hash_of` of each listed id (a session's prefix is hundreds of pages: one id check for all)."""
        self._check_ids(ids)
        return list(map(self._page_to_hash.get, ids))

    def count_evictable(self, ids: Iterable[int]) -> int:
        """How many of the listed (distinct) ids are cached-evictable."""
        ids = list(ids)
        self._check_ids(ids)
        return sum(map(self._evictable.__contains__, ids))

    def lookup(self, page_hash: int) -> int | None:
        """The page holding ``page_hash`` (in use or evictable), or ``None``. Takes no reference."""
        return self._hash_to_page.get(page_hash)

    # ---- ownership changes ------------------------------------------------------------------
    def allocate(self, n: int) -> list[int] | None:
        """Take ``n`` pages, each returned with ref count 1 and owned by the caller.

        Free pages come first (queue order), then evictable cached pages, least recently
        released first; an evicted page loses its hash. All or nothing: returns ``None`` and
        changes nothing when fewer than ``n`` pages are available.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages: {n}")
        if n > self.num_free:
            return None
        pages = [self._take_one() for _ in range(n)]
        self._num_used += n
        return pages

    def _take_one(self) -> int:
        page = self._free.popleft() if self._free else self._evict_lru()
        self._refs[page] = 1
        return page

    def _evict_lru(self) -> int:
        """Remove the least recently released evictable page from the LRU, dropping its hash."""
        page, _ = self._evictable.popitem(last=False)
        self._drop_hash(page)
        return page

    def allocate_contiguous(self, n: int) -> list[int] | None:
        """Take ``n`` pages like :meth:`allocate`, as few runs of consecutive page ids as possible.

        For KV transfers, which post one descriptor per contiguous run. Which pages:

        1. Free pages only while there are enough: among the maximal runs of consecutive free
           ids, the fewest that cover ``n``. If one run holds all ``n``, the shortest such run
           (best fit, so long runs stay whole for later transfers); otherwise the longest runs
           first, then the shortest run that holds the remainder. Ties go to the lower id and
           each run is taken from its lowest id. The pages come back in ascending id order.
        2. Fewer than ``n`` free pages: all of them (ascending), then evictable cached pages,
           least recently released first, exactly as :meth:`allocate` would evict them.

        Free pages not taken keep their queue order. All or nothing: ``None`` and no change
        when fewer than ``n`` pages are available. One C-level scan of the free map, then O(runs + n).
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages: {n}")
        if n > self.num_free:
            return None
        pages = self._take_free_runs(min(n, len(self._free)))
        pages += [self._evict_lru() for _ in range(n - len(pages))]
        for page in pages:
            self._refs[page] = 1
        self._num_used += n
        return pages

    def _take_free_runs(self, n: int) -> list[int]:
        """Remove ``n`` free pages, chosen as :meth:`allocate_contiguous` step 1 says, from the queue."""
        if n == 0:
            return []
        runs = [(m.start(), m.end() - m.start()) for m in re.finditer(rb"\x01+", self._free.flags)]
        pages = [p for start, count in sorted(_fewest_runs(runs, n)) for p in range(start, start + count)]
        for page in pages:
            self._free.remove(page)
        return pages

    def incref(self, ids: Iterable[int]) -> None:
        """Add one reference per listed id (ids may repeat); the caller becomes a co-owner.

        Each page must be in use or cached-evictable; an evictable page is revived (leaves the
        LRU, so it can no longer be evicted). A free page raises ``ValueError``: obtain pages
        through :meth:`allocate`. All ids are validated before anything changes.
        """
        ids = list(ids)
        self._check_ids(ids)
        for page in ids:
            if self._refs[page] == 0 and page not in self._evictable:
                raise ValueError(f"page {page} is free; allocate it instead of incref")
        for page in ids:
            if self._refs[page] == 0:
                del self._evictable[page]
                self._num_used += 1
            self._refs[page] += 1

    def touch(self, ids: Iterable[int]) -> None:
        """Take references on prefix-cache hit pages (same contract as :meth:`incref`)."""
        self.incref(ids)

    def decref(self, ids: Iterable[int]) -> None:
        """Drop one reference per listed id, in order (ids may repeat).

        A page whose count reaches 0 has no owner any more: with a hash it joins the back of
        the LRU (evicted after pages released earlier); without one it joins the back of the
        free queue. Dropping more references than a page has raises ``ValueError`` before
        anything changes.
        """
        ids = list(ids)
        drops = collections.Counter(ids)
        for page, count in drops.items():
            self._check_id(page)
            if self._refs[page] < count:
                raise ValueError(f"page {page} has {self._refs[page]} refs, cannot drop {count}")
        for page in ids:
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._num_used -= 1
                if page in self._page_to_hash:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    # ---- prefix cache -----------------------------------------------------------------------
    def register(self, page_id: int, page_hash: int) -> bool:
        """Mark an in-use, full page as holding the content ``page_hash``.

        Returns ``True`` when the page now carries that hash. If another page already holds
        ``page_hash``, the existing mapping wins and this page stays unhashed (``False``); it
        will go back to the free queue when released. Re-registering the same pair is a no-op.
        """
        self._check_id(page_id)
        if self._refs[page_id] == 0:
            raise ValueError(f"page {page_id} is not in use; only owned pages can be registered")
        current = self._page_to_hash.get(page_id)
        if current is not None:
            if current != page_hash:
                raise ValueError(f"page {page_id} already holds hash {current:#x}, not {page_hash:#x}")
            return True
        if page_hash in self._hash_to_page:
            return False
        self._hash_to_page[page_hash] = page_id
        self._page_to_hash[page_id] = page_hash
        if self._events is not None:
            self._events.append(("stored", page_hash))
        return True

    def _drop_hash(self, page: int) -> None:
        page_hash = self._page_to_hash.pop(page)
        del self._hash_to_page[page_hash]
        if self._events is not None:
            self._events.append(("removed", page_hash))

    def record_events(self) -> None:
        """Start recording prefix-cache changes for :meth:`take_events`."""
        if self._events is None:
            self._events = []

    def take_events(self) -> list[tuple[str, tuple[int, ...]]]:
        """Changes since the last call, in order, consecutive ones of a kind grouped: ``[(kind, hashes)]``."""
        if not self._events:
            return []
        events, self._events = self._events, []
        grouped: list[tuple[str, list[int]]] = []
        for kind, page_hash in events:
            if grouped and grouped[-1][0] == kind:
                grouped[-1][1].append(page_hash)
            else:
                grouped.append((kind, [page_hash]))
        return [(kind, tuple(hashes)) for kind, hashes in grouped]

    def reset_prefix_cache(self) -> int:
        """Forget every evictable cached page (they become free, in LRU order); returns how many.

        In-use pages keep their hashes: their owners still rely on them.
        """
        dropped = 0
        while self._evictable:
            page, _ = self._evictable.popitem(last=False)
            self._drop_hash(page)
            self._free.append(page)
            dropped += 1
        return dropped

    # ---- checks -----------------------------------------------------------------------------
    def check_integrity(self, expected_refs: Mapping[int, int]) -> None:
        """Raise :class:`CacheIntegrityError` unless every page is in exactly one valid state.

        ``expected_refs`` maps each in-use page to the number of references its owners hold
        (pages absent from it must have ref count 0).
        """
        problems = self._structure_problems()
        free = set(self._free)
        for page in range(self.num_pages):
            problems.extend(self._page_problems(page, expected_refs.get(page, 0), page in free))
        unknown = [p for p in expected_refs if not (isinstance(p, int) and 0 <= p < self.num_pages)]
        if unknown:
            problems.append(f"expected refs name unknown pages {unknown}")
        if problems:
            raise CacheIntegrityError("; ".join(problems[:20]))

    def _structure_problems(self) -> list[str]:
        problems = []
        live = list(self._free)
        if len(set(live)) != len(live) or len(live) != len(self._free):
            problems.append("free queue holds a page twice or miscounts its pages")
        if sum(self._free.flags) != len(live) or any(not self._free.flags[p] for p in live):
            problems.append("free map disagrees with the free queue")
        if set(self._free) & set(self._evictable):
            problems.append("a page is both free and evictable")
        if len(self._hash_to_page) != len(self._page_to_hash):
            problems.append("hash maps differ in size")
        for page_hash, page in self._hash_to_page.items():
            if self._page_to_hash.get(page) != page_hash:
                problems.append(f"hash {page_hash:#x} -> page {page} is not mirrored")
        used = sum(1 for ref in self._refs if ref > 0)
        if used != self._num_used:
            problems.append(f"num_used counter {self._num_used} != {used} pages in use")
        return problems

    def _page_problems(self, page: int, expected: int, in_free: bool) -> list[str]:
        ref = self._refs[page]
        in_lru = page in self._evictable
        hashed = page in self._page_to_hash
        if ref != expected:
            return [f"page {page} has ref {ref}, owners hold {expected}"]
        if ref > 0:
            return [f"in-use page {page} is in a free list"] if in_free or in_lru else []
        if hashed:
            return [] if in_lru and not in_free else [f"cached page {page} (ref 0) is not only in the LRU"]
        return [] if in_free and not in_lru else [f"free page {page} is not only in the free queue"]

    def _check_id(self, page_id: int) -> None:
        if isinstance(page_id, bool) or not isinstance(page_id, int) or not 0 <= page_id < self.num_pages:
            raise ValueError(f"unknown page id {page_id!r} (pool has {self.num_pages} pages)")

    def _check_ids(self, ids: Sequence[int]) -> None:
        """:meth:`_check_id` of every listed id, in C when they are all ints (else one by one, for the message)."""
        if not ids:
            return
        if set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) < self.num_pages:
            return
        for page in ids:
            self._check_id(page)
