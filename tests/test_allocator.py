"""PageAllocator and prefix hashing: exact page ids, ref counts, FIFO/LRU order, contiguous runs, integrity.

Pure Python (no torch): these run in milliseconds.
"""

from __future__ import annotations

import collections
import hashlib
import os
import random
import struct
import subprocess
import sys

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from splitserve.core.cache.allocator import CacheIntegrityError, FreeQueue, PageAllocator
from splitserve.core.cache.prefix import hash_page, iter_page_hashes, page_hashes


def _refs(alloc: PageAllocator) -> dict[int, int]:
    return {p: alloc.ref_count(p) for p in range(alloc.num_pages) if alloc.ref_count(p) > 0}


# ---- prefix hashing -----------------------------------------------------------------------------


def test_hash_page_is_chained_and_content_sensitive():
    root = hash_page(None, [1, 2, 3, 4])
    assert 0 <= root < 2**64
    assert hash_page(None, [1, 2, 3, 4]) == root
    assert hash_page(None, [1, 2, 3, 5]) != root
    assert hash_page(root, [5, 6, 7, 8]) != hash_page(None, [5, 6, 7, 8])
    assert hash_page(None, [1, 2, 3, 4], ("model-a",)) != hash_page(None, [1, 2, 3, 4], ("model-b",))
    # Length-prefixed encodings: splitting tokens differently never collides trivially.
    assert hash_page(None, [1, 2]) != hash_page(None, [1, 2, 0])
    assert hash_page(None, [], extra=(1,)) != hash_page(None, [], extra=("1",))


def test_page_hashes_cover_full_pages_only():
    tokens = list(range(10))
    hashes = page_hashes(tokens, 4)
    assert len(hashes) == 2  # tokens 8..9 are a partial tail page
    assert hashes[0] == hash_page(None, [0, 1, 2, 3])
    assert hashes[1] == hash_page(hashes[0], [4, 5, 6, 7])
    assert page_hashes(tokens[:3], 4) == []
    with pytest.raises(ValueError):
        page_hashes(tokens, 0)


def _reference_hash(parent: int | None, ids: list[int], extra_bytes: bytes) -> int:
    """The documented byte layout, written out: marker (+ parent), length, int64 ids, extra."""
    link = b"\x00root" if parent is None else b"\x01parent" + parent.to_bytes(8, "little")
    data = link + struct.pack(f"<Q{len(ids)}q", len(ids), *ids) + extra_bytes
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def test_hashes_match_the_byte_layout_on_random_prompts():
    """The one-pass chain (ids encoded once) equals hashing the documented bytes page by page, and stops where the
    caller stops."""
    rng = random.Random(7)
    extra_bytes = b"T" + (12).to_bytes(8, "little") + b"S" + (3).to_bytes(8, "little") + b"m-a"
    for _ in range(20):
        page = rng.choice([1, 4, 16])
        ids = [rng.randrange(-2**63, 2**63) if rng.random() < 0.05 else rng.randrange(130_000)
               for _ in range(rng.randrange(0, 200))]
        want, parent = [], None
        for start in range(0, len(ids) - page + 1, page):
            parent = _reference_hash(parent, ids[start:start + page], extra_bytes)
            want.append(parent)
        assert page_hashes(ids, page, ("m-a",)) == want
        assert [hash_page(None, ids[:page], ("m-a",))] == want[:1] or len(ids) < page
        if len(want) > 2:
            lazy = iter_page_hashes(ids[page:], page, ("m-a",), parent=want[0])
            assert next(lazy) == want[1] and next(lazy) == want[2]
    assert hash_page(None, []) == _reference_hash(None, [], b"T" + bytes(8))


def test_hash_rejects_bad_input():
    with pytest.raises(ValueError):
        hash_page(None, [1.5])
    with pytest.raises(ValueError):
        hash_page(-1, [1])
    with pytest.raises(ValueError):
        hash_page(None, [1], extra=(object(),))
    with pytest.raises(ValueError):
        hash_page(None, [2**63])
    with pytest.raises(ValueError):
        page_hashes([1, True, 3, 4], 2)
    with pytest.raises(ValueError):
        page_hashes([1, 2, "3", 4], 2)


def test_hash_is_stable_across_processes():
    """Hashes must not depend on PYTHONHASHSEED (routers compare hashes from other processes)."""
    code = (
        "from splitserve.core.cache.prefix import page_hashes\n"
        "print(page_hashes(list(range(9)), 4, ('m', 1)))"
    )
    outputs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(proc.stdout.strip())
    assert outputs == {str(page_hashes(list(range(9)), 4, ("m", 1)))}


# ---- allocation order and ref counts ------------------------------------------------------------


def test_fresh_pool_allocates_in_id_order_and_freed_pages_go_to_the_back():
    alloc = PageAllocator(6)
    assert alloc.allocate(3) == [0, 1, 2]
    assert alloc.allocate(1) == [3]
    alloc.decref([1, 0])
    assert alloc.num_free == 4 and alloc.num_used == 2
    # Free queue: 4, 5 (never used), then 1, 0 in release order.
    assert alloc.allocate(4) == [4, 5, 1, 0]
    assert alloc.num_free == 0
    alloc.check_integrity({0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1})


def test_allocate_is_all_or_nothing():
    alloc = PageAllocator(4)
    assert alloc.allocate(3) == [0, 1, 2]
    assert alloc.allocate(2) is None
    assert alloc.num_free == 1 and alloc.num_used == 3
    assert alloc.allocate(0) == []
    assert alloc.allocate(1) == [3]
    assert alloc.allocate(1) is None
    alloc.check_integrity({0: 1, 1: 1, 2: 1, 3: 1})


def test_ref_counts_incref_decref():
    alloc = PageAllocator(4)
    pages = alloc.allocate(2)
    alloc.incref(pages)
    alloc.incref([0])
    assert _refs(alloc) == {0: 3, 1: 2}
    alloc.decref([0, 1])
    assert _refs(alloc) == {0: 2, 1: 1}
    alloc.decref([0, 0, 1])
    assert _refs(alloc) == {}
    assert alloc.num_free == 4 and alloc.num_used == 0
    alloc.check_integrity({})


def test_misuse_raises_value_error_and_changes_nothing():
    alloc = PageAllocator(3)
    alloc.allocate(1)
    with pytest.raises(ValueError):
        alloc.decref([0, 0])  # double free in one call: validated before anything changes
    assert alloc.ref_count(0) == 1
    alloc.decref([0])
    with pytest.raises(ValueError):
        alloc.decref([0])  # double free
    with pytest.raises(ValueError):
        alloc.incref([1])  # free page: must be allocated, not incref'd
    with pytest.raises(ValueError):
        alloc.decref([7])  # unknown id
    with pytest.raises(ValueError):
        alloc.register(2, 123)  # not in use
    with pytest.raises(ValueError):
        alloc.allocate(-1)
    with pytest.raises(ValueError):
        PageAllocator(0)
    alloc.check_integrity({})


# ---- contiguous allocation (transfer destinations) ----------------------------------------------


def count_runs(pages) -> int:
    """Runs of consecutive ascending ids in ``pages`` as listed (one transfer descriptor each)."""
    return sum(1 for i, page in enumerate(pages) if i == 0 or page != pages[i - 1] + 1)


def fewest_runs(free_ids, n: int) -> int:
    """The fewest runs of consecutive ids in the set ``free_ids`` that can hold ``n`` pages."""
    ids = sorted(free_ids)
    lengths = sorted(collections.Counter(page - i for i, page in enumerate(ids)).values(), reverse=True)
    total = 0
    for k, length in enumerate(lengths):
        if total >= n:
            return k
        total += length
    return len(lengths)


def _fragmented() -> PageAllocator:
    """16 pages with runs of free ids [2, 3], [5, 6, 7], [9], [12, 13, 14, 15].

    All allocated, then released so the free queue is 9, 2, 3, 12, 13, 14, 15, 5, 6, 7.
    """
    alloc = PageAllocator(16)
    alloc.allocate(16)
    for pages in ([9], [2, 3], [12, 13, 14, 15], [5, 6, 7]):
        alloc.decref(pages)
    return alloc


def test_contiguous_on_a_fresh_pool_is_one_run_and_leaves_queue_order_alone():
    alloc = PageAllocator(8)
    assert alloc.allocate_contiguous(5) == [0, 1, 2, 3, 4]
    assert alloc.allocate(2) == [5, 6]
    alloc.decref([1, 0])
    assert alloc.allocate_contiguous(0) == []
    assert alloc.allocate_contiguous(4) is None and alloc.num_free == 3  # all or nothing
    assert alloc.allocate_contiguous(2) == [0, 1]  # free queue 7, 1, 0: the run [0, 1], not 7 and 1
    assert alloc.allocate(1) == [7]
    with pytest.raises(ValueError):
        alloc.allocate_contiguous(-1)
    alloc.check_integrity({p: 1 for p in range(8)})


def test_contiguous_takes_the_fewest_runs_best_fit_last():
    alloc = _fragmented()
    assert alloc.allocate(3) == [9, 2, 3]  # queue order: three pages in two runs
    alloc = _fragmented()
    assert alloc.allocate_contiguous(3) == [5, 6, 7]  # the run that fits exactly; 12..15 stays whole
    assert alloc.allocate_contiguous(5) == [9, 12, 13, 14, 15]  # longest run, then the shortest run for 1 more
    assert alloc.allocate(2) == [2, 3]  # untaken free pages kept their queue order
    alloc.check_integrity({p: 1 for p in range(16)})


def test_contiguous_longest_runs_first_and_ties_to_the_lowest_id():
    alloc = _fragmented()
    assert alloc.allocate_contiguous(6) == [2, 3, 12, 13, 14, 15]  # 4-run, then the 2-run (not the 3-run)
    assert alloc.allocate_contiguous(1) == [9]  # best fit: the 1-run
    alloc.decref([13])  # runs [5, 6, 7] and [13]
    assert alloc.allocate_contiguous(2) == [5, 6]  # only 5..7 holds 2; 7 stays free
    assert alloc.allocate_contiguous(2) == [7, 13]  # no run holds 2: two 1-runs, lowest id first
    alloc = _fragmented()
    alloc.decref([1])  # runs [1, 2, 3], [5, 6, 7], [9], [12..15]
    assert alloc.allocate_contiguous(3) == [1, 2, 3]  # two 3-runs fit: the lower id wins


def test_contiguous_evicts_lru_only_after_every_free_page():
    alloc = PageAllocator(6)
    assert alloc.allocate(6) == [0, 1, 2, 3, 4, 5]
    for page in (0, 1, 2, 4):
        alloc.register(page, 100 + page)
    alloc.decref([2, 1, 0])  # LRU: 2, 1, 0
    alloc.decref([5])
    alloc.decref([3])  # free queue: 5, 3
    alloc.decref([4])  # LRU: 2, 1, 0, 4 (page 4 sits next to free pages 3 and 5: no matter)
    alloc.record_events()
    assert alloc.allocate_contiguous(1) == [3]  # a free page, never an evictable one
    alloc.decref([3])
    twin = PageAllocator(6)  # the same state, through allocate
    twin.allocate(6)
    for page in (0, 1, 2, 4):
        twin.register(page, 100 + page)
    for pages in ([2, 1, 0], [5], [3], [4]):
        twin.decref(pages)
    twin.record_events()
    assert alloc.allocate_contiguous(4) == [3, 5, 2, 1]  # every free page ascending, then LRU order
    assert twin.allocate(4) == [5, 3, 2, 1]  # the same pages and evictions
    assert alloc.take_events() == twin.take_events() == [("removed", (102, 101))]
    assert alloc.lookup(100) == 0 and alloc.lookup(104) == 4 and alloc.hash_of(2) is None
    alloc.check_integrity({1: 1, 2: 1, 3: 1, 5: 1})


# Weighted so that pools fill up, fragment and hold evictable cached pages.
_OPS = st.lists(st.tuples(st.sampled_from(["allocate"] * 3 + ["contiguous"] * 3 + ["decref"] * 4 + ["register"] * 3
                                          + ["touch"]), st.integers(0, 40)), min_size=20, max_size=80)


@settings(max_examples=300, deadline=None)
@given(ops=_OPS)
def test_contiguous_random_operations(ops):
    """Random allocate/contiguous/decref/register/touch sequences on 12 pages: contiguous allocation
    succeeds exactly when allocate would, takes only unowned pages, free ones first in the fewest runs,
    evicts in LRU order, and leaves integrity intact."""
    alloc = PageAllocator(12)
    owned: list[int] = []  # one entry per reference held
    for op, k in ops:
        if op == "contiguous":
            owned.extend(_check_contiguous(alloc, k % 14))
        elif op == "allocate":
            owned.extend(alloc.allocate(k % 6) or [])
        elif op == "decref" and owned:
            alloc.decref([owned.pop(k % len(owned))])
        elif op == "register" and owned and alloc.hash_of(owned[k % len(owned)]) is None:
            alloc.register(owned[k % len(owned)], 1000 + k % 12)  # few hashes: duplicates happen
        elif op == "touch" and alloc.lookup(1000 + k % 12) is not None:
            alloc.touch([alloc.lookup(1000 + k % 12)])
            owned.append(alloc.lookup(1000 + k % 12))
        alloc.check_integrity(collections.Counter(owned))


def _check_contiguous(alloc: PageAllocator, n: int) -> list[int]:
    """``alloc.allocate_contiguous(n)``, checked against the state before; the pages taken."""
    free_queue, lru = list(alloc._free), list(alloc._evictable)
    in_use = {p for p in range(alloc.num_pages) if alloc.ref_count(p) > 0}
    pages = alloc.allocate_contiguous(n)
    kind = "evicts" if n > len(free_queue) else "one run" if count_runs(pages or []) <= 1 else "several runs"
    event("refused" if pages is None else kind)  # pytest --hypothesis-show-statistics
    if n > len(free_queue) + len(lru):
        assert pages is None and list(alloc._free) == free_queue and list(alloc._evictable) == lru
        return []
    assert pages is not None and len(pages) == len(set(pages)) == n and not set(pages) & in_use
    assert all(alloc.ref_count(p) == 1 for p in pages)
    if n <= len(free_queue):
        assert pages == sorted(pages) and set(pages) <= set(free_queue)
        assert count_runs(pages) == fewest_runs(free_queue, n)
        assert list(alloc._free) == [p for p in free_queue if p not in pages] and list(alloc._evictable) == lru
    else:
        assert pages == sorted(free_queue) + lru[: n - len(free_queue)] and not alloc._free
        assert all(alloc.hash_of(p) is None for p in pages)
    return pages


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["append", "popleft", "remove", "remove"]), st.integers(0, 199)),
                    min_size=200, max_size=600))
def test_free_queue_keeps_the_order_of_a_plain_deque(ops):
    """FreeQueue against a plain deque model (delete from the middle = ``deque.remove``): same pages in the same
    order, the byte map in step, through enough removals that its stale entries get dropped (more than 64)."""
    queue, model = FreeQueue(200), collections.deque(range(200))
    compacted = False
    for op, k in ops:
        if op == "append" and not queue.flags[k]:
            queue.append(k)
            model.append(k)
        elif op == "popleft" and model:
            assert queue.popleft() == model.popleft()
        elif op == "remove" and model:
            page = model[k % len(model)]
            entries = queue.entries()
            queue.remove(page)
            model.remove(page)
            compacted |= queue.entries() < entries
        assert list(queue) == list(model) and len(queue) == len(model)
        held = set(model)
        assert bytes(queue.flags) == bytes(1 if p in held else 0 for p in range(200))
    event("compacted" if compacted else "no compaction")


def test_free_queue_refuses_a_page_twice_or_a_page_it_does_not_hold():
    queue = FreeQueue(3)
    with pytest.raises(CacheIntegrityError):
        queue.append(1)
    assert queue.popleft() == 0
    with pytest.raises(CacheIntegrityError):
        queue.remove(0)
    queue.remove(2)
    queue.append(0)
    assert list(queue) == [1, 0] and queue.popleft() == 1 and queue.popleft() == 0 and len(queue) == 0
    with pytest.raises(IndexError):
        queue.popleft()


# ---- prefix cache -------------------------------------------------------------------------------


def test_cached_page_becomes_evictable_and_is_evicted_lru_after_free_pages():
    alloc = PageAllocator(4)
    assert alloc.allocate(3) == [0, 1, 2]
    for page, page_hash in ((0, 100), (1, 101), (2, 102)):
        assert alloc.register(page, page_hash)
    alloc.decref([2, 1, 0])  # released tail first: LRU order 2, 1, 0
    assert alloc.num_free == 4 and alloc.num_cached == 3 and alloc.num_evictable == 3
    alloc.check_integrity({})
    # The never-used page 3 goes first, then evictable pages in LRU order, losing their hashes.
    assert alloc.allocate(2) == [3, 2]
    assert alloc.lookup(102) is None and alloc.hash_of(2) is None
    assert alloc.lookup(101) == 1 and alloc.lookup(100) == 0
    assert alloc.allocate(1) == [1]
    assert alloc.num_cached == 1
    alloc.check_integrity({3: 1, 2: 1, 1: 1})


def test_touch_revives_evictable_page():
    alloc = PageAllocator(3)
    assert alloc.allocate(2) == [0, 1]
    alloc.register(0, 7)
    alloc.decref([0, 1])
    assert alloc.is_evictable(0) and alloc.num_free == 3
    alloc.touch([alloc.lookup(7)])
    assert not alloc.is_evictable(0) and alloc.ref_count(0) == 1
    assert alloc.num_free == 2 and alloc.num_used == 1
    # A revived page is never evicted: only the two free pages remain allocatable.
    assert alloc.allocate(3) is None
    assert alloc.allocate(2) == [2, 1]
    assert alloc.lookup(7) == 0
    alloc.check_integrity({0: 1, 1: 1, 2: 1})


def test_lru_order_follows_release_time_not_page_id():
    alloc = PageAllocator(3)
    pages = alloc.allocate(3)
    for page in pages:
        alloc.register(page, 1000 + page)
    alloc.decref([1])
    alloc.decref([0])
    alloc.touch([1])  # a hit moves page 1 out of the LRU ...
    alloc.decref([2])
    alloc.decref([1])  # ... and its release puts it at the back again
    assert alloc.allocate(3) == [0, 2, 1]


def test_duplicate_hash_keeps_the_existing_mapping():
    alloc = PageAllocator(3)
    a, b = alloc.allocate(2)
    assert alloc.register(a, 55) is True
    assert alloc.register(b, 55) is False
    assert alloc.lookup(55) == a and alloc.hash_of(b) is None
    assert alloc.register(a, 55) is True  # same pair again: no-op
    with pytest.raises(ValueError):
        alloc.register(a, 56)  # a page holds one content
    alloc.decref([b])  # unhashed duplicate goes straight back to the free queue
    assert not alloc.is_evictable(b)
    assert alloc.allocate(2) == [2, b]
    alloc.check_integrity({a: 1, b: 1, 2: 1})


def test_reset_prefix_cache_frees_only_unowned_cached_pages():
    alloc = PageAllocator(3)
    a, b = alloc.allocate(2)
    alloc.register(a, 1)
    alloc.register(b, 2)
    alloc.decref([a])
    assert alloc.reset_prefix_cache() == 1
    assert alloc.lookup(1) is None and alloc.lookup(2) == b
    alloc.check_integrity({b: 1})


# ---- integrity check ----------------------------------------------------------------------------


def test_integrity_detects_wrong_owner_counts():
    alloc = PageAllocator(3)
    alloc.allocate(2)
    alloc.check_integrity({0: 1, 1: 1})
    with pytest.raises(CacheIntegrityError):
        alloc.check_integrity({0: 1})  # page 1 leaked: in use but nobody owns it
    with pytest.raises(CacheIntegrityError):
        alloc.check_integrity({0: 2, 1: 1})  # owner thinks it holds more refs
    with pytest.raises(CacheIntegrityError):
        alloc.check_integrity({0: 1, 1: 1, 2: 1})  # owner holds a free page
    with pytest.raises(CacheIntegrityError):
        alloc.check_integrity({0: 1, 1: 1, 9: 1})  # unknown page


def test_integrity_detects_corrupted_free_lists():
    alloc = PageAllocator(3)
    alloc.allocate(1)
    alloc._free.append(0)  # corrupt on purpose: an in-use page in the free queue
    with pytest.raises(CacheIntegrityError):
        alloc.check_integrity({0: 1})
