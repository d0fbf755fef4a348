"""PageAllocator and prefix hashing: exact page ids, ref counts, FIFO/LRU order, integrity.

Pure Python (no torch): these run in milliseconds.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from splitserve.core.cache.allocator import CacheIntegrityError, PageAllocator
from splitserve.core.cache.prefix import hash_page, page_hashes


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


def test_hash_rejects_bad_input():
    with pytest.raises(ValueError):
        hash_page(None, [1.5])
    with pytest.raises(ValueError):
        hash_page(-1, [1])
    with pytest.raises(ValueError):
        hash_page(None, [1], extra=(object(),))
    with pytest.raises(ValueError):
        hash_page(None, [2**63])


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
