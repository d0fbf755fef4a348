"""KVCacheManager: page tables, prefix hits, eviction order, sessions, transfer hooks, and a
hypothesis state machine that checks integrity after every random operation.

Pure Python (no torch).
"""

from __future__ import annotations

import collections
import copy

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from splitserve.core.cache.manager import CacheUsage, KVCacheBlocks, KVCacheManager
from splitserve.core.cache.prefix import page_hashes
from test_allocator import count_runs, fewest_runs

PAGE = 4


def _admit(mgr: KVCacheManager, rid: str, tokens: list[int]) -> tuple[KVCacheBlocks | None, int]:
    """Admit a prompt the way the scheduler does: prefix lookup, then allocation for all of it."""
    computed, num_cached = mgr.get_computed_pages(tokens)
    return mgr.allocate_slots(rid, len(tokens), computed), num_cached


def _prefill(mgr: KVCacheManager, rid: str, tokens: list[int]) -> None:
    """Admit and pretend the whole prompt was computed, publishing its full pages."""
    assert _admit(mgr, rid, tokens)[0] is not None
    mgr.cache_pages(rid, tokens, len(tokens))


# ---- allocation ---------------------------------------------------------------------------------


def test_fresh_pool_page_tables_and_growth():
    mgr = KVCacheManager(num_pages=8, page_size=PAGE)
    assert mgr.num_pages_for(0) == 0 and mgr.num_pages_for(4) == 1 and mgr.num_pages_for(5) == 2
    assert mgr.allocate_slots("a", 6) == KVCacheBlocks((0, 1))
    assert mgr.allocate_slots("b", 3) == KVCacheBlocks((2,))
    assert mgr.allocate_slots("a", 8) == KVCacheBlocks(())  # still fits in two pages
    assert mgr.allocate_slots("a", 9) == KVCacheBlocks((3,))
    assert mgr.page_table("a") == [0, 1, 3] and mgr.page_table("b") == [2]
    assert mgr.usage() == CacheUsage(num_pages=8, used=4, free=4, cached=0, pinned=0, evictable=0)
    mgr.check_integrity()
    mgr.free("a")
    assert not mgr.has("a") and mgr.has("b")
    # Freed last page first: the free queue is now 4..7 then 3, 1, 0.
    assert mgr.allocate_slots("c", 28) == KVCacheBlocks((4, 5, 6, 7, 3, 1, 0))
    mgr.check_integrity()


def test_allocation_returns_none_when_full_and_changes_nothing():
    mgr = KVCacheManager(num_pages=3, page_size=PAGE)
    assert mgr.allocate_slots("a", 8) == KVCacheBlocks((0, 1))
    assert mgr.allocate_slots("b", 12) is None
    assert not mgr.has("b")
    assert mgr.allocate_slots("a", 16) is None  # needs 2 more, 1 free
    assert mgr.page_table("a") == [0, 1]
    assert mgr.usage().free == 1
    mgr.check_integrity()


def test_rename_moves_exact_pages_and_frees_them_under_the_new_id():
    """A cancelled one-sided transfer's pages are held under another id until the sender stops writing."""
    mgr = KVCacheManager(num_pages=6, page_size=PAGE)
    assert mgr.reserve("a", 9) == KVCacheBlocks((0, 1, 2))
    mgr.allocate_slots("b", 2)
    mgr.rename("a", "a#settling")
    assert not mgr.has("a") and mgr.page_table("a#settling") == [0, 1, 2]
    assert mgr.reserve("a", 4) == KVCacheBlocks((4,))  # the old id is free for a new request
    with pytest.raises(ValueError):
        mgr.rename("a", "b")  # taken
    with pytest.raises(ValueError):
        mgr.rename("nope", "c")
    mgr.check_integrity()
    mgr.free("a#settling")
    assert mgr.usage().used == 2  # only a (page 4) and b (page 3) left
    mgr.check_integrity()


def test_misuse_raises_value_error():
    mgr = KVCacheManager(num_pages=4, page_size=PAGE)
    with pytest.raises(ValueError):
        mgr.free("nope")
    with pytest.raises(ValueError):
        mgr.page_table("nope")
    with pytest.raises(ValueError):
        mgr.allocate_slots("a", -1)
    with pytest.raises(ValueError):
        mgr.release_pinned("nope")
    with pytest.raises(ValueError):
        KVCacheManager(num_pages=4, page_size=0)
    mgr.allocate_slots("a", 4)
    with pytest.raises(ValueError):
        mgr.cache_pages("a", [1, 2, 3, 4, 5], 5)  # more computed tokens than pages hold
    with pytest.raises(ValueError):
        mgr.cache_pages("a", [1, 2], 3)  # more computed tokens than tokens
    mgr.free("a")
    with pytest.raises(ValueError):
        mgr.free("a")  # double free
    mgr.check_integrity()


# ---- prefix caching -----------------------------------------------------------------------------


def test_prefix_hit_reuses_exact_pages_and_partial_tail_is_not_cached():
    mgr = KVCacheManager(num_pages=8, page_size=PAGE)
    prompt = list(range(10))  # pages: [0..3] [4..7] [8, 9] (partial)
    _prefill(mgr, "a", prompt)
    assert mgr.page_table("a") == [0, 1, 2]
    assert mgr.usage().cached == 2  # the partial tail page is not published
    computed, num_cached = mgr.get_computed_pages(prompt + [10, 11])
    assert computed.page_ids == (0, 1) and num_cached == 8
    assert mgr.get_computed_pages([0, 1, 2, 3, 99])[0].page_ids == (0,)
    assert mgr.get_computed_pages([7] + prompt[1:])[1] == 0  # chain breaks at the first page
    assert mgr.allocate_slots("b", 12, computed) == KVCacheBlocks((3,))
    assert mgr.page_table("b") == [0, 1, 3]
    mgr.check_integrity()


def test_hit_never_covers_the_whole_prompt():
    mgr = KVCacheManager(num_pages=8, page_size=PAGE)
    prompt = list(range(8))
    _prefill(mgr, "a", prompt)
    computed, num_cached = mgr.get_computed_pages(prompt)
    assert computed.page_ids == (0,) and num_cached == 4  # last page dropped: 1+ token to compute
    assert mgr.get_computed_pages(prompt[:4]) == (KVCacheBlocks(()), 0)
    assert mgr.get_computed_pages([])[1] == 0


def test_shared_prefix_ref_counts_and_release():
    mgr = KVCacheManager(num_pages=8, page_size=PAGE)
    prefix = [5, 6, 7, 8, 9, 10, 11, 12]
    _prefill(mgr, "a", prefix + [1])
    _prefill(mgr, "b", prefix + [2, 3])
    assert mgr.page_table("a") == [0, 1, 2] and mgr.page_table("b") == [0, 1, 3]
    assert mgr._allocator.ref_count(0) == 2 and mgr._allocator.ref_count(1) == 2
    assert mgr.usage().used == 4
    mgr.check_integrity()
    mgr.free("a")
    assert mgr._allocator.ref_count(0) == 1 and mgr.usage().used == 3
    mgr.free("b")
    assert mgr.usage() == CacheUsage(num_pages=8, used=0, free=8, cached=2, pinned=0, evictable=2)
    mgr.check_integrity()


def test_eviction_is_lru_with_tail_first_freeing():
    mgr = KVCacheManager(num_pages=4, page_size=PAGE)
    _prefill(mgr, "a", list(range(12)) + [99])  # pages 0, 1, 2 cached, 3 partial
    mgr.free("a")  # freed 3, 2, 1, 0: page 3 (unhashed) -> free queue; LRU 2, 1, 0
    assert mgr.allocate_slots("x", 8) == KVCacheBlocks((3, 2))  # free page, then LRU tail
    # The head of the prefix survives eviction; the evicted third page breaks the chain there.
    computed, num_cached = mgr.get_computed_pages(list(range(12)) + [99])
    assert computed.page_ids == (0, 1) and num_cached == 8
    mgr.check_integrity()


def test_adopting_evictable_hits_counts_against_free_pages():
    mgr = KVCacheManager(num_pages=3, page_size=PAGE)
    _prefill(mgr, "a", list(range(8)) + [50])
    mgr.free("a")  # pages 0, 1 evictable, page 2 free
    computed, _ = mgr.get_computed_pages(list(range(8)) + [60, 61, 62, 63, 64])
    assert computed.page_ids == (0, 1)
    # 13 tokens need 4 pages: 2 hits + 2 fresh, but only 1 page is left once the hits are revived.
    assert mgr.allocate_slots("b", 13, computed) is None
    assert mgr.usage().evictable == 2 and not mgr.has("b")
    assert mgr.allocate_slots("b", 12, computed) == KVCacheBlocks((2,))
    assert mgr.usage().evictable == 0
    mgr.check_integrity()


def test_stale_hits_and_second_adoption_are_rejected():
    mgr = KVCacheManager(num_pages=2, page_size=PAGE)
    _prefill(mgr, "a", list(range(5)))
    mgr.free("a")
    computed, _ = mgr.get_computed_pages(list(range(5)))
    assert mgr.allocate_slots("x", 8) == KVCacheBlocks((1, 0))  # evicts the hit page
    with pytest.raises(ValueError):
        mgr.allocate_slots("b", 5, computed)
    with pytest.raises(ValueError):
        mgr.allocate_slots("x", 8, KVCacheBlocks((0,)))
    mgr.check_integrity()


def test_cache_pages_is_incremental_across_decode_and_duplicates_stay_private():
    mgr = KVCacheManager(num_pages=8, page_size=PAGE)
    tokens = [1, 2, 3]
    mgr.allocate_slots("a", 3)
    assert mgr.cache_pages("a", tokens, 3) == 0
    for tok in range(4, 10):  # decode one token at a time
        tokens.append(tok)
        mgr.allocate_slots("a", len(tokens))
        mgr.cache_pages("a", tokens, len(tokens))
    assert mgr.usage().cached == 2
    assert mgr.export_pages("a").page_hashes == tuple(mgr.get_computed_pages(tokens)[0].page_hashes)
    # Same content computed without a hit (prefix caching raced): the existing pages stay canonical.
    mgr.allocate_slots("b", 9)
    assert mgr.cache_pages("b", tokens, 9) == 2
    assert mgr.usage().cached == 2
    mgr.free("b")
    assert mgr.usage().evictable == 0  # b's duplicate pages went straight back to the free queue
    mgr.check_integrity()


def test_prefix_caching_disabled_never_hits():
    mgr = KVCacheManager(num_pages=4, page_size=PAGE, enable_prefix_caching=False)
    _prefill(mgr, "a", list(range(9)))
    assert mgr.get_computed_pages(list(range(9))) == (KVCacheBlocks(()), 0)
    assert mgr.usage().cached == 0
    mgr.free("a")
    mgr.check_integrity()


def test_reset_prefix_cache():
    mgr = KVCacheManager(num_pages=6, page_size=PAGE)
    _prefill(mgr, "a", list(range(9)))
    _prefill(mgr, "b", [7] * 5)
    mgr.free("a")
    assert mgr.reset_prefix_cache() == 2
    assert mgr.get_computed_pages(list(range(9)))[1] == 0
    assert mgr.get_computed_pages([7] * 5)[1] == 4  # b still owns its cached page
    mgr.check_integrity()


# ---- sessions and transfer hooks ----------------------------------------------------------------


def test_pin_keeps_pages_after_free_and_release_makes_them_evictable():
    mgr = KVCacheManager(num_pages=4, page_size=PAGE)
    turn1 = list(range(6))
    _prefill(mgr, "t1", turn1)
    mgr.pin("t1", "session-1")
    mgr.free("t1")
    assert mgr.pinned_keys() == ["session-1"] and mgr.pinned_pages("session-1") == [0, 1]
    assert mgr.usage().used == 2 and mgr.usage().pinned == 2
    # Pinned pages cannot be evicted by pressure from others.
    assert mgr.allocate_slots("other", 12) is None
    computed, num_cached = mgr.get_computed_pages(turn1 + [6, 7, 8])
    assert computed.page_ids == (0,) and num_cached == 4
    mgr.check_integrity()
    mgr.release_pinned("session-1")
    assert mgr.pinned_keys() == [] and mgr.usage().used == 0 and mgr.usage().evictable == 1
    mgr.check_integrity()


def test_repinning_a_key_replaces_its_pages():
    mgr = KVCacheManager(num_pages=6, page_size=PAGE)
    _prefill(mgr, "t1", list(range(5)))
    mgr.pin("t1", "s")
    mgr.free("t1")
    _prefill(mgr, "t2", list(range(9)))  # hits page 0, adds 2 fresh pages
    mgr.pin("t2", "s")
    mgr.free("t2")
    assert mgr.pinned_pages("s") == [0, 2, 3]
    assert mgr._allocator.ref_count(0) == 1 and mgr._allocator.ref_count(1) == 0
    mgr.check_integrity()


def test_a_session_partial_last_page_is_taken_over_once_by_the_turn_that_continues_it():
    mgr = KVCacheManager(num_pages=8, page_size=PAGE)
    turn1 = list(range(10))  # KV for 10 tokens: pages 0, 1 full, page 2 holds 8, 9
    _prefill(mgr, "t1", turn1)
    mgr.pin("t1", "s", turn1, 10)
    mgr.free("t1")
    turn2 = turn1 + [50, 51, 52]
    hits, n = mgr.get_computed_pages(turn2)
    assert hits.page_ids == (0, 1) and n == 8
    assert mgr.session_tail_hit("s", turn1[:9] + [99, 98], hits, n) == (hits, n)  # continues 8 but not 9: no
    assert mgr.session_tail_hit("s", turn1, *mgr.get_computed_pages(turn1)) == mgr.get_computed_pages(turn1)  # nothing left to compute
    blocks, n2 = mgr.session_tail_hit("s", turn2, hits, n)
    assert blocks.page_ids == (0, 1, 2) and blocks.tail_tokens == 2 and n2 == 10
    assert mgr.session_tail_hit("s", turn2, hits, n) == (hits, n)  # claimed: a second request does not get it
    assert mgr.allocate_slots("t2", len(turn2), blocks) == KVCacheBlocks((3,))  # 13 tokens: one fresh page
    assert mgr.page_table("t2") == [0, 1, 2, 3] and mgr._allocator.ref_count(2) == 2  # page 2: the pin and t2
    mgr.check_integrity()
    mgr.cache_pages("t2", turn2, 12)  # the page fills up: now published like any full page
    assert mgr.get_computed_pages(turn2 + [7])[0].page_ids == (0, 1, 2)
    mgr.pin("t2", "s", turn2, 13)  # replaces the pin; the next turn's record: page 3, holding token 12
    mgr.free("t2")
    assert mgr.pinned_pages("s") == [0, 1, 2, 3] and mgr._pinned_tail == {"s": (3, (52,))}
    mgr.check_integrity()
    mgr.release_pinned("s")
    assert mgr.usage().used == 0 and mgr._pinned_tail == {}
    mgr.check_integrity()


def _counting_hasher(monkeypatch) -> list[int]:
    """Patch the manager's page hasher to count the pages it hashes; returns the counter (one slot)."""
    import splitserve.core.cache.manager as manager_module

    hashed, real = [0], manager_module.iter_page_hashes

    def counted(*args, **kwargs):
        for h in real(*args, **kwargs):
            hashed[0] += 1
            yield h

    monkeypatch.setattr(manager_module, "iter_page_hashes", counted)
    return hashed


def test_a_session_turn_lookup_takes_the_pinned_chain_and_a_repeat_lookup_hashes_nothing(monkeypatch):
    """The hits are the same with the session named or not; only the pages past the pinned ones are hashed, and a
    second lookup of the same prompt (the worker's, then the scheduler's) hashes nothing."""
    mgr = KVCacheManager(num_pages=16, page_size=PAGE)
    turn1 = list(range(100, 122))  # 5 full pages and 2 tokens
    _prefill(mgr, "t1", turn1)
    mgr.pin("t1", "s", turn1, 22)
    mgr.free("t1")
    turn2 = turn1 + list(range(7, 17))  # 32 tokens: 7 pages looked up (the last token is left to compute)
    plain = mgr.get_computed_pages(turn2)
    hashed = _counting_hasher(monkeypatch)
    mgr._last_lookup = None
    assert mgr.get_computed_pages(turn2, session="s") == plain == (KVCacheBlocks((0, 1, 2, 3, 4), tuple(
        page_hashes(turn2, PAGE)[:5])), 20)
    assert hashed[0] == 1  # page 5 (tokens 20..23): the first after the 5 pinned pages, a miss
    assert mgr.get_computed_pages(turn2, session="s") == plain and hashed[0] == 1
    diverged = turn1[:9] + [0] + turn1[10:] + [7, 8, 9]  # differs inside page 2: the pinned chain does not apply
    mgr._last_lookup = None
    assert mgr.get_computed_pages(diverged, session="s") == (KVCacheBlocks((0, 1), tuple(page_hashes(turn2, PAGE)[:2])), 8)
    assert hashed[0] == 1 + 3  # pages 0, 1 hit, page 2 missed
    short = turn1[:10]  # shorter than the pinned tokens
    assert mgr.get_computed_pages(short, session="s") == (KVCacheBlocks((0, 1), tuple(page_hashes(turn2, PAGE)[:2])), 8)
    mgr.release_pinned("s")
    assert mgr._pinned_tokens == {}
    mgr.check_integrity()


def test_a_session_tail_needs_the_sessions_whole_chain_and_its_page_still_owned():
    mgr = KVCacheManager(num_pages=8, page_size=PAGE)
    turn1 = list(range(6))  # page 0 full, page 1 holds 4, 5
    _prefill(mgr, "t1", turn1)
    mgr.pin("t1", "s", turn1, 6)
    mgr.free("t1")
    diverged = [0, 1, 2, 99, 4, 5, 6]  # no full-page hit: the session's first page is not matched
    assert mgr.session_tail_hit("s", diverged, *mgr.get_computed_pages(diverged)) == (KVCacheBlocks(()), 0)
    hits, n = mgr.get_computed_pages(turn1 + [9])
    blocks, n2 = mgr.session_tail_hit("s", turn1 + [9], hits, n)
    assert blocks.page_ids == (0, 1) and n2 == 6
    mgr.release_pinned("s")  # released between the claim and the allocation: page 1 has no owner left
    with pytest.raises(ValueError, match="released"):
        mgr.allocate_slots("t2", 7, blocks)
    assert not mgr.has("t2")
    mgr.check_integrity()


def test_reserve_and_export():
    sender = KVCacheManager(num_pages=8, page_size=PAGE)
    receiver = KVCacheManager(num_pages=8, page_size=PAGE)
    receiver.allocate_slots("other", 4)
    _prefill(sender, "r", list(range(10)))
    exported = sender.export_pages("r")
    assert exported.page_ids == (0, 1, 2) and len(exported.page_hashes) == 2
    reserved = receiver.reserve("r", 10)
    assert reserved == KVCacheBlocks((1, 2, 3))
    assert receiver.export_pages("r").page_ids == reserved.page_ids
    assert receiver.reserve("big", 100) is None and not receiver.has("big")
    receiver.free("r")
    sender.free("r")
    sender.check_integrity()
    receiver.check_integrity()


def test_reserve_on_a_fresh_pool_is_one_run_and_grows_contiguously():
    mgr = KVCacheManager(num_pages=16, page_size=PAGE)
    assert mgr.reserve("r", 37) == KVCacheBlocks(tuple(range(10)))
    assert mgr.reserve("r", 44) == KVCacheBlocks((10,))  # growing an existing request: same contract
    assert mgr.allocate_slots("s", 8) == KVCacheBlocks((11, 12))  # allocation order is unchanged
    assert mgr.usage().used == 13
    mgr.check_integrity()


def test_reserve_prefers_contiguous_runs_where_allocate_slots_scatters():
    mgr = KVCacheManager(num_pages=12, page_size=PAGE)
    for rid in "abcdef":
        mgr.allocate_slots(rid, 8)  # a: 0, 1  b: 2, 3  ...  f: 10, 11
    for rid in "bde":
        mgr.free(rid)  # free queue 3, 2, 7, 6, 9, 8: runs [2, 3] and [6, 7, 8, 9]
    twin = copy.deepcopy(mgr)
    assert twin.allocate_slots("x", 8) == KVCacheBlocks((3, 2))  # queue order
    assert twin.allocate_slots("y", 16) == KVCacheBlocks((7, 6, 9, 8))  # 4 runs: 4 descriptors a layer
    assert mgr.reserve("x", 8) == KVCacheBlocks((2, 3))  # best fit: 6..9 stays whole
    assert mgr.reserve("y", 16) == KVCacheBlocks((6, 7, 8, 9))  # one run
    mgr.check_integrity()


def test_reserve_takes_the_longest_runs_when_no_run_fits():
    mgr = KVCacheManager(num_pages=12, page_size=PAGE)
    for i in range(12):
        mgr.allocate_slots(f"p{i}", PAGE)  # p<i> holds page i
    for i in (1, 3, 4, 6, 7, 8, 10):
        mgr.free(f"p{i}")  # free runs [1], [3, 4], [6, 7, 8], [10]
    twin = copy.deepcopy(mgr)
    assert twin.allocate_slots("x", 20) == KVCacheBlocks((1, 3, 4, 6, 7))  # 3 runs
    assert mgr.reserve("x", 20) == KVCacheBlocks((3, 4, 6, 7, 8))  # 3-run, then the 2-run: 2 runs
    assert mgr.reserve("y", 8) == KVCacheBlocks((1, 10))  # two 1-runs left: lowest id first
    assert mgr.reserve("z", 4) is None and mgr.allocate_slots("z", 4) is None and not mgr.has("z")
    mgr.check_integrity()


def test_reserve_evicts_cached_pages_in_lru_order_like_allocate_slots():
    mgr = KVCacheManager(num_pages=6, page_size=PAGE)
    _prefill(mgr, "a", list(range(12)) + [99])  # pages 0, 1, 2 cached, 3 partial
    mgr.allocate_slots("b", 8)  # pages 4, 5
    mgr.free("a")  # freed 3, 2, 1, 0: page 3 (unhashed) -> free queue; LRU 2, 1, 0
    mgr.free("b")  # free queue 3, 5, 4
    mgr.record_cache_events()
    twin = copy.deepcopy(mgr)
    assert mgr.reserve("x", 8) == KVCacheBlocks((3, 4))  # free pages (run 3..5) while there are enough
    assert mgr.take_cache_events() == []
    assert mgr.reserve("y", 8) == KVCacheBlocks((5, 2))  # the last free page, then the LRU head
    assert twin.allocate_slots("x", 16) == KVCacheBlocks((3, 5, 4, 2))  # the same eviction
    evicted = (page_hashes(list(range(12)), PAGE)[2],)
    assert mgr.take_cache_events() == twin.take_cache_events() == [("removed", evicted)]
    computed, num_cached = mgr.get_computed_pages(list(range(12)) + [99])
    assert computed.page_ids == (0, 1) and num_cached == 8  # the prefix head survives, as with allocate_slots
    mgr.check_integrity()


# ---- random operation sequences -----------------------------------------------------------------


_BASES = ((0, 1, 2, 0, 1, 2, 0, 1), (0, 1, 2, 2, 1, 0, 2, 2), (2, 2, 2, 2, 1, 1, 1, 1))


class KVCacheMachine(RuleBasedStateMachine):
    """Random admit/reserve/extend/compute/free/pin/release sequences on a tiny pool.

    Alongside the manager it simulates the KV contents: each page records which token was
    written into each slot. A prefix hit must find exactly the prompt's tokens in the hit
    pages, and a live request must always find its own computed tokens in its pages, which
    proves no page was reused while owned.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mgr = KVCacheManager(num_pages=8, page_size=2)
        self.kv: dict[int, list[int | None]] = {}
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.pinned: dict[str, list[int]] = {}
        self.next_id = 0

    def _new_pages(self, blocks: KVCacheBlocks) -> None:
        for page in blocks.page_ids:
            self.kv[page] = [None] * self.mgr.page_size

    @rule(
        base=st.sampled_from(_BASES),
        keep=st.integers(0, 8),
        suffix=st.lists(st.integers(0, 2), max_size=4),
    )
    def admit(self, base, keep, suffix):
        """A new prompt: a shared base prefix (often hits) plus a random suffix."""
        prompt = list(base[:keep]) + suffix or [0]
        rid = f"r{self.next_id}"
        self.next_id += 1
        computed, num_cached = self.mgr.get_computed_pages(prompt)
        assert num_cached == len(computed) * 2 < len(prompt)
        for i, page in enumerate(computed.page_ids):  # hit pages hold exactly the prompt's KV
            assert self.kv[page] == prompt[i * 2 : i * 2 + 2]
        free_before = self.mgr.usage().free
        revived = sum(map(self.mgr._allocator.is_evictable, computed.page_ids))
        event(f"hit pages: {len(computed)}, evictable hits: {revived}")  # --hypothesis-show-statistics
        blocks = self.mgr.allocate_slots(rid, len(prompt), computed)
        event(f"admitted: {blocks is not None}")
        if blocks is None:
            assert not self.mgr.has(rid) and self.mgr.usage().free == free_before
            return
        self._new_pages(blocks)
        self.tokens[rid], self.computed[rid] = list(prompt), num_cached

    @rule(
        base=st.sampled_from(_BASES),
        keep=st.integers(0, 8),
        suffix=st.lists(st.integers(0, 2), max_size=4),
    )
    def reserve(self, base, keep, suffix):
        """A transfer's destination: pages reserved without prefix hits, then filled in one go.

        Succeeds exactly when allocate_slots would (checked on a copy), never hands out a page
        in use, and takes free pages in the fewest runs, then the same evictions as allocate_slots.
        """
        prompt = list(base[:keep]) + suffix or [0]
        rid = f"r{self.next_id}"
        self.next_id += 1
        alloc = self.mgr._allocator
        free = {p for p in range(self.mgr.num_pages) if alloc.ref_count(p) == 0 and not alloc.is_evictable(p)}
        in_use = {p for p in range(self.mgr.num_pages) if alloc.ref_count(p) > 0}
        twin = copy.deepcopy(self.mgr)
        expected = twin.allocate_slots(rid, len(prompt))
        blocks = self.mgr.reserve(rid, len(prompt))
        assert (blocks is None) == (expected is None)
        if blocks is None:
            event("reserved: none")
            assert not self.mgr.has(rid)
            return
        pages = blocks.page_ids
        event(f"reserved: {'evicts' if len(pages) > len(free) else f'runs: {count_runs(pages)}'}")
        assert len(set(pages)) == len(pages) == self.mgr.num_pages_for(len(prompt)) and not set(pages) & in_use
        if len(pages) <= len(free):
            assert set(pages) <= free and count_runs(pages) == fewest_runs(free, len(pages))
        else:
            assert set(pages) == set(expected.page_ids)  # every free page, then the same LRU evictions
        self._new_pages(blocks)
        self.tokens[rid], self.computed[rid] = list(prompt), 0
        self._write(rid, len(prompt))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), extra=st.lists(st.integers(0, 2), min_size=1, max_size=3))
    def extend(self, data, extra):
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        blocks = self.mgr.allocate_slots(rid, len(self.tokens[rid]) + len(extra))
        if blocks is not None:
            self._new_pages(blocks)
            self.tokens[rid].extend(extra)

    def _write(self, rid: str, end: int) -> None:
        """Simulate the model writing KV for positions computed[rid]..end, then publish pages."""
        tokens, table = self.tokens[rid], self.mgr.page_table(rid)
        for pos in range(self.computed[rid], end):  # only into pages this request owns alone
            self.kv[table[pos // 2]][pos % 2] = tokens[pos]
        self.computed[rid] = end
        self.mgr.cache_pages(rid, tokens, end)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def compute(self, data):
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        self._write(rid, data.draw(st.integers(self.computed[rid], len(self.tokens[rid]))))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def finish(self, data):
        """Compute the rest, then free: the normal end of a request."""
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        self._write(rid, len(self.tokens[rid]))
        self.mgr.free(rid)
        del self.tokens[rid], self.computed[rid]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        """Free without finishing (abort or preemption)."""
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.mgr.free(rid)
        del self.tokens[rid], self.computed[rid]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), key=st.sampled_from(["s0", "s1"]))
    def pin(self, data, key):
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.mgr.pin(rid, key)
        self.pinned[key] = self.mgr.page_table(rid)

    @precondition(lambda self: self.pinned)
    @rule(data=st.data())
    def release(self, data):
        key = data.draw(st.sampled_from(sorted(self.pinned)))
        self.mgr.release_pinned(key)
        del self.pinned[key]

    @rule()
    def reset(self):
        self.mgr.reset_prefix_cache()

    @invariant()
    def consistent(self):
        self.mgr.check_integrity()
        usage = self.mgr.usage()
        assert usage.free + usage.used == usage.num_pages
        owned = collections.Counter(p for rid in self.tokens for p in self.mgr.page_table(rid))
        owned.update(p for pages in self.pinned.values() for p in pages)
        assert usage.used == len(owned)
        assert sorted(self.mgr.pinned_keys()) == sorted(self.pinned)
        for rid, tokens in self.tokens.items():
            table = self.mgr.page_table(rid)
            assert len(table) == self.mgr.num_pages_for(len(tokens))
            for pos in range(self.computed[rid]):
                assert self.kv[table[pos // 2]][pos % 2] == tokens[pos]


KVCacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_kv_cache_state_machine = KVCacheMachine.TestCase


def test_cache_events_follow_caching_and_eviction():
    from splitserve.core.cache.prefix import page_hashes

    kv = KVCacheManager(num_pages=4, page_size=2)
    tokens = [5, 6, 7, 8, 9]
    kv.allocate_slots("a", 5)  # pages 0, 1, 2
    kv.cache_pages("a", tokens, 5)  # pages 0 and 1 are full
    assert kv.take_cache_events() == []  # nothing is recorded until asked
    kv.record_cache_events()
    kv.allocate_slots("b", 2)  # page 3
    kv.cache_pages("b", [1, 2], 2)
    assert kv.take_cache_events() == [("stored", tuple(page_hashes([1, 2], 2)))]
    kv.free("a")  # evictable pages keep their hashes: no event
    assert kv.take_cache_events() == []
    kv.allocate_slots("c", 6)  # takes free page 2, then evicts both cached pages of "a"
    (kind, removed), = kv.take_cache_events()
    assert kind == "removed" and sorted(removed) == sorted(page_hashes(tokens, 2))
    assert kv.take_cache_events() == []
    kv.check_integrity()


def test_reserve_behind_a_held_session_prefix_and_hold_hashed_pages():
    """A held session turn: the decode side reserves the session's pages first, then fresh contiguous ones; the
    prefill side holds the pages it copied in under a request id until its request took them."""
    dec = KVCacheManager(num_pages=16, page_size=4)
    tokens = list(range(100, 113))  # 3 full pages and one token
    dec.allocate_slots("turn1", 13)
    dec.cache_pages("turn1", tokens, 13)
    dec.pin("turn1", "s")
    dec.free("turn1")
    held, n = dec.get_computed_pages(tokens + [7] * 10)
    assert n == 12 and held.page_ids == (0, 1, 2)
    assert dec.reserve("turn2", 23, held) == KVCacheBlocks((4, 5, 6))  # only the fresh pages come back
    assert dec.page_table("turn2") == [0, 1, 2, 4, 5, 6]
    dec.release_pinned("s")
    dec.free("turn2")
    dec.check_integrity()
    assert dec.usage().used == 0

    pre = KVCacheManager(num_pages=8, page_size=4)
    pre.allocate_slots("old", 5)
    pre.cache_pages("old", tokens, 5)  # this worker already has the first page
    pre.free("old")
    filled = []
    got = pre.hold_hashed("r#held", page_hashes(tokens[:12], 4), lambda pages, idx: filled.append((pages, idx)))
    assert got == [0, 2, 3] and filled == [([2, 3], [1, 2])]  # page 0 from the cache; 2, 3 fresh (1 went back last)
    hit, n = pre.get_computed_pages(tokens)
    assert n == 12 and hit.page_ids == (0, 2, 3) and pre.has("r#held") and pre.pinned_keys() == []
    with pytest.raises(ValueError, match="already holds"):
        pre.hold_hashed("r#held", [], lambda p, i: None)
    assert pre.hold_hashed("big", page_hashes(list(range(40)), 4), lambda p, i: None) is None  # short: no change
    pre.free("r#held")
    pre.check_integrity()
    assert pre.usage().used == 0 and pre.get_computed_pages(tokens)[1] == 12  # still cached, evictable
