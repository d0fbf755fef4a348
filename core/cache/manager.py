"""KV cache manager: per-request page tables on top of :class:`PageAllocator`, prefix caching,
pinned sessions and the hooks that KV transfer uses.

Page ownership, step by step (every reference is held by exactly one of these owners):

1. :meth:`KVCacheManager.get_computed_pages` finds prefix-cache hits. It takes no reference:
   the hit pages still belong to whoever held them (other requests, pinned sessions, or nobody
   if they are cached-evictable).
2. :meth:`KVCacheManager.allocate_slots` (first call) adopts those hits, taking one reference
   each (an evictable page is revived and can no longer be evicted), then allocates fresh
   pages (ref 1) for the rest. From here the request co-owns the shared prefix read-only and
   solely owns its fresh pages; only it writes KV into them. Later calls add fresh pages.
3. :meth:`KVCacheManager.cache_pages` publishes the request's full, written pages in the
   prefix cache. Ownership does not change; other requests may now share them read-only.
4. :meth:`KVCacheManager.pin` adds one more reference per page under a session key, so the
   pages outlive the request; :meth:`KVCacheManager.release_pinned` drops those references.
   The session's trailing partial page (KV for fewer than ``page_size`` tokens, never in the
   prefix cache) can be claimed once, by the session's next request whose prompt continues
   those tokens (:meth:`KVCacheManager.session_tail_hit`): it adopts the page like a hit and
   writes the rest of it; nobody else reads past the claimed tokens.
5. :meth:`KVCacheManager.free` drops the request's references, last page first. Pages nobody
   references any more become cached-evictable (if hashed) or free. The caller must not read
   or write the request's pages after this.

Transfer: the decode side calls :meth:`KVCacheManager.reserve`; the reserving request owns the
destination pages (nobody else can be handed them) until it is freed, so an incoming transfer
never writes into a reused page. Unlike :meth:`KVCacheManager.allocate_slots`, reserve takes its
pages as few ascending runs of consecutive ids as possible
(:meth:`PageAllocator.allocate_contiguous`), so the transfer needs few descriptors; it succeeds
exactly when allocate_slots would, and evicts cached pages in the same LRU order. The prefill
side reads :meth:`KVCacheManager.export_pages` while its request is live and frees the request
only after the send completed or failed.

Pure Python: no torch, no numpy.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Callable, Iterator, Sequence

from .allocator import CacheIntegrityError, PageAllocator
from .prefix import iter_page_hashes

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class KVCacheBlocks:
    """An ordered run of page ids handed across the manager's API (the allocator stays hidden).

    ``page_hashes`` holds the chained prefix-cache hashes of the leading full pages when known
    (``len(page_hashes) <= len(page_ids)``); it is empty for freshly allocated pages.
    """

    page_ids: tuple[int, ...]
    page_hashes: tuple[int, ...] = ()
    tail_tokens: int = 0
    """Tokens of KV in a trailing partial page (the last of ``page_ids``, unhashed), claimed from a pinned
    session by :meth:`KVCacheManager.session_tail_hit`; 0 when every page is a full prefix-cache hit."""

    def __len__(self) -> int:
        return len(self.page_ids)


_EMPTY = KVCacheBlocks(())


@dataclasses.dataclass(frozen=True)
class CacheUsage:
    """Page counts of one pool; ``used + free == num_pages``."""

    num_pages: int
    used: int
    """Pages with at least one owner (live requests or pinned sessions)."""
    free: int
    """Pages an allocation can take: truly free plus cached-evictable."""
    cached: int
    """Pages carrying a prefix-cache hash (in use or evictable)."""
    pinned: int
    """Distinct pages held by pinned sessions."""
    evictable: int = 0
    """Cached pages with no owner (part of ``free``)."""


@dataclasses.dataclass
class _RequestPages:
    """A live request's page table and the chained hashes of its leading full pages."""

    page_ids: list[int]
    hashes: list[int]


class KVCacheManager:
    """Page tables for live requests over one pool of ``num_pages`` pages of ``page_size`` tokens.

    Allocation never raises when the pool is full: it returns ``None`` and changes nothing, and
    the scheduler waits or preempts. Misuse (unknown request id, adopting hits twice, ...)
    raises ``ValueError``.
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._allocator = PageAllocator(num_pages)
        self._requests: dict[str, _RequestPages] = {}
        self._pinned: dict[str, tuple[int, ...]] = {}
        self._pinned_tail: dict[str, tuple[int, tuple[int, ...]]] = {}
        """(page, token ids) of a pinned key's trailing partial page: KV for exactly those tokens, claimable once."""
        self._pinned_chain: dict[str, tuple[int, ...]] = {}
        """Chained hashes of each pinned key's leading full pages (known even where the page itself stayed
        unpublished because another page already held its content)."""
        self._pinned_tokens: dict[str, tuple[int, ...]] = {}
        """The token ids behind each ``_pinned_chain`` pinned from a request (:meth:`pin`): a lookup of a prompt that
        begins with them takes the chain instead of hashing a session's whole context again."""
        self._last_lookup: tuple[tuple[int, ...], tuple, list[int]] | None = None
        """(tokens, extra, their page hashes as far as computed) of the last :meth:`get_computed_pages`: a decode
        worker looks a session turn's prompt up to route it, then its scheduler looks the same prompt up again."""

    @property
    def num_pages(self) -> int:
        return self._allocator.num_pages

    @property
    def num_free_pages(self) -> int:
        """Pages an allocation can still take (free plus cached-evictable)."""
        return self._allocator.num_free

    def num_pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold ``num_tokens`` tokens."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.page_size)

    def has(self, request_id: str) -> bool:
        return request_id in self._requests

    def page_table(self, request_id: str) -> list[int]:
        """A copy of the request's page table (page ``i`` holds tokens ``i*page_size ..``)."""
        return list(self._get(request_id).page_ids)

    # ---- prefix hits and allocation -----------------------------------------------------------
    def get_computed_pages(self, token_ids: Sequence[int], extra: tuple = (),
                           session: str | None = None) -> tuple[KVCacheBlocks, int]:
        """Longest chain of full-page prefix-cache hits for ``token_ids`` and its token count. ``session``: a pinned
        key whose tokens the prompt may begin with (an agent session's next turn): their hashes are not recomputed.

        At least one token is always left to compute, so a prompt whose every page hits loses
        its last page. Takes no reference: pass the result straight to :meth:`allocate_slots`
        before any other allocation, or the hit pages may be evicted in between.
        """
        if not self.enable_prefix_caching:
            return _EMPTY, 0
        max_pages = max(0, (len(token_ids) - 1) // self.page_size)
        pages: list[int] = []
        hashes: list[int] = []
        for page_hash in self._lookup_hashes(token_ids[: max_pages * self.page_size], extra, session):
            page = self._allocator.lookup(page_hash)
            if page is None:
                break
            pages.append(page)
            hashes.append(page_hash)
        return KVCacheBlocks(tuple(pages), tuple(hashes)), len(pages) * self.page_size

    def _lookup_hashes(self, tokens: Sequence[int], extra: tuple, session: str | None) -> Iterator[int]:
        """The page hashes of ``tokens``: those the last lookup of the same tokens computed (else the chain pinned
        under ``session`` when ``tokens`` begin with its tokens), then the rest, kept for the next lookup. Hashes
        depend on the tokens alone, so what is kept never goes stale."""
        key = tuple(tokens)
        memo = self._last_lookup
        if memo is None or memo[0] != key or memo[1] != extra:
            pinned = self._pinned_tokens.get(session) if session is not None and not extra else None
            seed = list(self._pinned_chain[session]) if pinned and key[: len(pinned)] == pinned else []
            memo = self._last_lookup = (key, extra, seed)
        known = memo[2]
        yield from known
        parent = known[-1] if known else None
        for page_hash in iter_page_hashes(key[len(known) * self.page_size:], self.page_size, extra, parent):
            known.append(page_hash)
            yield page_hash

    def allocate_slots(
        self, request_id: str, num_tokens: int, computed: KVCacheBlocks | None = None
    ) -> KVCacheBlocks | None:
        """Grow the request's page table to cover ``num_tokens`` tokens in total.

        On the request's first call, ``computed`` (from :meth:`get_computed_pages`) is adopted
        first, one reference per page; later calls must not pass it. Returns only the pages this
        call allocated (the request owns them alone, ref 1), possibly none; or ``None`` when the
        pool is short, in which case nothing changed and no reference was taken.
        """
        return self._grow(request_id, num_tokens, computed, self._allocator.allocate)

    def _grow(
        self, request_id: str, num_tokens: int, computed: KVCacheBlocks | None,
        take: Callable[[int], list[int] | None],
    ) -> KVCacheBlocks | None:
        """:meth:`allocate_slots` with fresh pages from ``take`` (an allocator method, all or nothing)."""
        num_pages = self.num_pages_for(num_tokens)
        state = self._requests.get(request_id)
        if state is None:
            return self._allocate_first(request_id, num_pages, computed or _EMPTY, take)
        if computed is not None and computed.page_ids:
            raise ValueError(f"request {request_id}: prefix hits can only be adopted on the first allocation")
        need = num_pages - len(state.page_ids)
        if need <= 0:
            return _EMPTY
        fresh = take(need)
        if fresh is None:
            logger.debug("request %s: %d more pages needed, %d free", request_id, need, self.num_free_pages)
            return None
        state.page_ids.extend(fresh)
        return KVCacheBlocks(tuple(fresh))

    def _allocate_first(
        self, request_id: str, num_pages: int, computed: KVCacheBlocks, take: Callable[[int], list[int] | None]
    ) -> KVCacheBlocks | None:
        """Adopt ``computed`` and allocate the rest for a new request, all or nothing."""
        hashes = self._validated_hashes(request_id, computed)
        if num_pages < len(computed):
            raise ValueError(f"request {request_id}: {len(computed)} cached pages exceed {num_pages} needed")
        need = num_pages - len(computed)
        # Reviving an evictable hit takes it out of the pool that fresh pages come from.
        revived = self._allocator.count_evictable(set(computed.page_ids))
        if self._allocator.num_free < need + revived:
            logger.debug("request %s: %d pages needed, %d free", request_id, need + revived,
                         self.num_free_pages)
            return None
        self._allocator.touch(computed.page_ids)
        fresh = take(need)
        if fresh is None:  # unreachable: capacity was checked above
            self._allocator.decref(computed.page_ids)
            raise CacheIntegrityError(f"request {request_id}: allocator refused {need} pages it had free")
        self._requests[request_id] = _RequestPages(list(computed.page_ids) + fresh, hashes)
        return KVCacheBlocks(tuple(fresh))

    def _validated_hashes(self, request_id: str, computed: KVCacheBlocks) -> list[int]:
        """Hashes of ``computed``'s full pages; ``ValueError`` if any page no longer holds its hit (or a claimed
        partial tail page has no owner left)."""
        full = computed.page_ids[:len(computed.page_ids) - 1] if computed.tail_tokens else computed.page_ids
        if computed.tail_tokens and self._allocator.ref_count(computed.page_ids[-1]) == 0:
            raise ValueError(f"request {request_id}: the session page it claimed was released since")
        hashes = self._allocator.hashes_of(full)
        stale = any(h is None for h in hashes) or (
            computed.page_hashes and tuple(hashes) != computed.page_hashes
        )
        if stale:
            raise ValueError(f"request {request_id}: prefix hits are stale (pages were evicted since lookup)")
        return [h for h in hashes if h is not None]

    def reserve(self, request_id: str, num_tokens: int, held: KVCacheBlocks | None = None) -> KVCacheBlocks | None:
        """Decode side of a transfer: pages an incoming transfer will fill.

        Same contract as :meth:`allocate_slots`: for a new request the result is the pages this call allocated,
        which it owns alone until :meth:`free`; ``None`` when short (exactly when allocate_slots would be).
        ``held`` (full-page hits from :meth:`get_computed_pages`, an agent session's prefix) is adopted first, one
        reference per page, and is not part of the result. Only which fresh pages differs: the fewest runs of
        consecutive free ids, ascending, then evictable cached pages in LRU order once free pages run out (see
        :meth:`PageAllocator.allocate_contiguous`), so the transfer needs few descriptors.
        """
        return self._grow(request_id, num_tokens, held, self._allocator.allocate_contiguous)

    def export_pages(self, request_id: str) -> KVCacheBlocks:
        """Sender side of a transfer: the request's page table (and known full-page hashes).

        The pages stay owned by the request; keep it live until the send has finished.
        """
        state = self._get(request_id)
        return KVCacheBlocks(tuple(state.page_ids), tuple(state.hashes))

    # ---- prefix cache -----------------------------------------------------------------------------
    def num_hashed_pages(self, request_id: str) -> int:
        """The request's leading pages hashed so far (hits it adopted, and pages :meth:`cache_pages` published):
        :meth:`cache_pages` has nothing to do until ``num_computed_tokens // page_size`` exceeds it."""
        return len(self._get(request_id).hashes)

    def cache_pages(
        self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int, extra: tuple = ()
    ) -> int:
        """Publish the request's newly full pages once KV for ``num_computed_tokens`` is written.

        ``token_ids`` are the request's tokens (prompt then outputs) from position 0. Pages are
        hashed in a chain and registered incrementally; the request keeps owning them. A page
        whose content another page already holds stays unpublished. Returns pages hashed now.
        """
        state = self._get(request_id)
        capacity = len(state.page_ids) * self.page_size
        if not 0 <= num_computed_tokens <= min(len(token_ids), capacity):
            raise ValueError(
                f"request {request_id}: {num_computed_tokens} computed tokens, but {len(token_ids)} "
                f"tokens and room for {capacity}"
            )
        if not self.enable_prefix_caching:
            return 0
        num_full = num_computed_tokens // self.page_size
        start = len(state.hashes)
        if num_full <= start:
            return 0
        new = token_ids[start * self.page_size : num_full * self.page_size]
        parent = state.hashes[-1] if state.hashes else None
        for i, page_hash in enumerate(iter_page_hashes(new, self.page_size, extra, parent), start):
            self._allocator.register(state.page_ids[i], page_hash)
            state.hashes.append(page_hash)
        return num_full - start

    def record_cache_events(self) -> None:
        """Start recording prefix-cache changes (workers publish them for prefix-aware routing)."""
        self._allocator.record_events()

    def take_cache_events(self) -> list[tuple[str, tuple[int, ...]]]:
        """Prefix-cache changes since the last call, in order: ``[("stored" | "removed", page hashes)]``."""
        return self._allocator.take_events()

    def reset_prefix_cache(self) -> int:
        """Forget every unowned cached page (they become free); returns how many."""
        return self._allocator.reset_prefix_cache()

    # ---- release and sessions ---------------------------------------------------------------------
    def free(self, request_id: str) -> None:
        """Drop the request's references, last page first, and forget the request.

        Freeing tail first puts a shared prefix's head last in the LRU, so it is evicted last.
        """
        state = self._requests.pop(request_id, None)
        if state is None:
            raise ValueError(f"unknown request {request_id}")
        self._allocator.decref(reversed(state.page_ids))
        logger.debug("request %s: freed %d pages", request_id, len(state.page_ids))

    def rename(self, request_id: str, new_id: str) -> None:
        """Move the request's pages, unchanged, under ``new_id`` (e.g. to hold them until a transfer settles)."""
        state = self._get(request_id)
        if new_id in self._requests:
            raise ValueError(f"request {new_id} already holds pages")
        self._requests[new_id] = state
        del self._requests[request_id]

    def pin(self, request_id: str, key: str, token_ids: Sequence[int] = (), num_computed_tokens: int = 0) -> None:
        """Keep the request's current pages alive under ``key`` (one extra reference each).

        Pinning an existing key replaces its pages (the new ones are referenced before the old
        ones are released, so shared pages never drop to zero in between). With the request's
        ``token_ids`` and the count whose KV is written, a trailing partial page is recorded for
        :meth:`session_tail_hit`.
        """
        state = self._get(request_id)
        self._pinned_tail.pop(key, None)
        full, rest = divmod(min(num_computed_tokens, len(token_ids)), self.page_size)
        if rest and len(state.page_ids) > full:
            start = full * self.page_size
            self._pinned_tail[key] = (state.page_ids[full], tuple(token_ids[start:start + rest]))
        pages = tuple(state.page_ids)
        self._allocator.incref(pages)
        old = self._pinned.get(key)
        self._pinned[key] = pages
        self._pinned_chain[key] = tuple(state.hashes)
        hashed = len(state.hashes) * self.page_size
        if len(token_ids) >= hashed:
            self._pinned_tokens[key] = tuple(token_ids[:hashed])
        else:
            self._pinned_tokens.pop(key, None)
        if old is not None:
            self._allocator.decref(reversed(old))
        logger.debug("request %s: pinned %d pages", request_id, len(pages))

    def release_pinned(self, key: str) -> None:
        """Drop the references held under ``key``, last page first."""
        pages = self._pinned.pop(key, None)
        if pages is None:
            raise ValueError(f"unknown pinned key {key!r}")
        self._pinned_chain.pop(key, None)
        self._pinned_tokens.pop(key, None)
        self._pinned_tail.pop(key, None)
        self._allocator.decref(reversed(pages))

    def session_tail_hit(
        self, key: str, token_ids: Sequence[int], hits: KVCacheBlocks, num_hit: int
    ) -> tuple[KVCacheBlocks, int]:
        """``hits`` / ``num_hit`` (from :meth:`get_computed_pages`) extended by the session's partial last page when
        the hits hold the same content as every full page of the session (same chained hashes, whichever pages hold
        it) and ``token_ids`` continue with that page's tokens (at least one token still left to compute). The page
        is claimed: no later call gets it (its claimer writes the rest of it). Otherwise the hits come back
        unchanged."""
        tail = self._pinned_tail.get(key)
        if tail is None:
            return hits, num_hit
        page, tokens = tail
        pinned, m = self._pinned.get(key, ()), len(hits.page_ids)
        if (num_hit != m * self.page_size or hits.page_hashes != self._pinned_chain.get(key) or len(pinned) <= m
                or pinned[m] != page or num_hit + len(tokens) >= len(token_ids)
                or tuple(token_ids[num_hit:num_hit + len(tokens)]) != tokens):
            return hits, num_hit
        del self._pinned_tail[key]
        return KVCacheBlocks((*hits.page_ids, page), hits.page_hashes, len(tokens)), num_hit + len(tokens)

    def pinned_keys(self) -> list[str]:
        return list(self._pinned)

    def has_pinned(self, key: str) -> bool:
        """Whether ``key`` holds pinned pages (O(1))."""
        return key in self._pinned

    def pinned_hashes(self, key: str) -> list[tuple[int, int]]:
        """``(page, chained hash of its content)`` of the full pages pinned under ``key``, in order.

        What a session tier must keep to give those pages back as prefix hits later. A page may hold its hash's
        content without carrying the hash in the prefix cache (another page already held it when it was published).
        """
        pages = self.pinned_pages(key)
        return list(zip(pages, self._pinned_chain.get(key, ())))

    def publish_pinned(self, key: str) -> int:
        """Publish the full pages pinned under ``key`` whose content no page holds in the prefix cache any more.

        A pinned page stays unpublished when another page held its content at publish time; once that other page is
        evicted, this makes the pinned copy a prefix hit again. Returns how many pages were published.
        """
        published = 0
        for page, page_hash in self.pinned_hashes(key):
            if self._allocator.hash_of(page) is None and self._allocator.lookup(page_hash) is None:
                published += self._allocator.register(page, page_hash)
        return published

    def pin_hashed(
        self, key: str, page_hashes: Sequence[int], fill: Callable[[list[int], list[int]], None]
    ) -> list[int] | None:
        """Pin under ``key`` one page per hash, in order: the page that still holds the hash, else a fresh one.

        1. Pages the prefix cache still holds (in use or evictable) are taken as they are (one reference each).
        2. Fresh pages are allocated for the other hashes; ``fill(fresh_pages, indices)`` must write their content
           (``indices[i]``: the position in ``page_hashes`` of ``fresh_pages[i]``) before they are registered under
           their hashes, so no lookup can find a page before it holds its KV.
        3. The pages are pinned under ``key`` (which must not be pinned yet).

        All or nothing: ``None`` and no change when the pool is short; if ``fill`` raises, every reference taken is
        dropped (fresh pages go back to the free queue unhashed) and the exception propagates.
        """
        if key in self._pinned:
            raise ValueError(f"pinned key {key!r} already holds pages")
        pages = self._take_hashed(key, page_hashes, fill)
        if pages is not None:
            self._pinned[key] = pages
            self._pinned_chain[key] = tuple(page_hashes)
            self._pinned_tokens.pop(key, None)
        return None if pages is None else list(pages)

    def hold_hashed(
        self, request_id: str, page_hashes: Sequence[int], fill: Callable[[list[int], list[int]], None]
    ) -> list[int] | None:
        """:meth:`pin_hashed`, but the pages are held as the pages of ``request_id`` (a new id), freed by :meth:`free`:
        a prefill worker keeps the session pages it copied in from a decode worker until its request has taken them.
        """
        if request_id in self._requests:
            raise ValueError(f"request {request_id} already holds pages")
        pages = self._take_hashed(request_id, page_hashes, fill)
        if pages is not None:
            self._requests[request_id] = _RequestPages(list(pages), list(page_hashes))
        return None if pages is None else list(pages)

    def _take_hashed(
        self, key: str, page_hashes: Sequence[int], fill: Callable[[list[int], list[int]], None]
    ) -> tuple[int, ...] | None:
        """One reference to a page per hash (cached, else fresh, filled, then registered); see :meth:`pin_hashed`."""
        found = [self._allocator.lookup(h) for h in page_hashes]
        kept = [p for p in found if p is not None]
        need = len(found) - len(kept)
        if not self._room_for(found):
            return None
        self._allocator.touch(kept)
        fresh = self._allocator.allocate(need)
        if fresh is None:  # unreachable: capacity was checked above
            self._allocator.decref(kept)
            raise CacheIntegrityError(f"pinned key {key!r}: allocator refused {need} pages it had free")
        indices = [i for i, p in enumerate(found) if p is None]
        try:
            fill(fresh, indices)
        except BaseException:
            self._allocator.decref(list(reversed(fresh)) + kept)
            raise
        for page, i in zip(fresh, indices):
            self._allocator.register(page, page_hashes[i])
        it = iter(fresh)
        return tuple(p if p is not None else next(it) for p in found)

    def fits_hashed(self, page_hashes: Sequence[int]) -> bool:
        """Whether :meth:`pin_hashed` of ``page_hashes`` would find the room now (it changes nothing)."""
        return self._room_for([self._allocator.lookup(h) for h in page_hashes])

    def _room_for(self, found: list[int | None]) -> bool:
        """Room for fresh pages where ``found`` has none, and for reviving the evictable pages it found."""
        kept = {p for p in found if p is not None}
        revived = self._allocator.count_evictable(kept)
        return self._allocator.num_free >= sum(1 for p in found if p is None) + revived

    def pinned_pages(self, key: str) -> list[int]:
        if key not in self._pinned:
            raise ValueError(f"unknown pinned key {key!r}")
        return list(self._pinned[key])

    # ---- accounting -------------------------------------------------------------------------------
    def usage(self) -> CacheUsage:
        pinned = {page for pages in self._pinned.values() for page in pages}
        alloc = self._allocator
        return CacheUsage(
            num_pages=alloc.num_pages,
            used=alloc.num_used,
            free=alloc.num_free,
            cached=alloc.num_cached,
            pinned=len(pinned),
            evictable=alloc.num_evictable,
        )

    def check_integrity(self) -> None:
        """Raise :class:`CacheIntegrityError` unless every page is free, cached-evictable, or
        referenced exactly once per live request and pinned session that holds it."""
        expected: collections.Counter[int] = collections.Counter()
        for request_id, state in self._requests.items():
            if len(state.hashes) > len(state.page_ids):
                raise CacheIntegrityError(f"request {request_id}: more hashes than pages")
            expected.update(state.page_ids)
        for pages in self._pinned.values():
            expected.update(pages)
        for key, (page, tokens) in self._pinned_tail.items():
            if page not in self._pinned.get(key, ()) or not 0 < len(tokens) < self.page_size:
                raise CacheIntegrityError(f"pinned key {key!r}: its partial page record does not match its pages")
        self._allocator.check_integrity(expected)

    def _get(self, request_id: str) -> _RequestPages:
        state = self._requests.get(request_id)
        if state is None:
            raise ValueError(f"unknown request {request_id}")
        return state
