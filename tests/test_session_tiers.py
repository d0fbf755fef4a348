"""Session tiers (issue 11): pages pinned under a session go to host memory and disk under pressure and come back
byte-identical, registered under the same prefix-cache hashes; TTL, budgets and ending a session leave nothing.

Pure parts on a real KVCacheManager (exact page ids); copies on a real CPU tensor shaped like an engine's pool.
"""

from __future__ import annotations

import pytest
import torch

from splitserve.core.cache.manager import KVCacheManager
from splitserve.core.cache.prefix import page_hashes
from splitserve.core.messages import SessionHint
from splitserve.decode.sessions import SessionKeeper
from splitserve.decode.tiers import HostArena, PageCopier, SessionTiers

PAGE = 4
LAYERS, HEADS, DIM = 2, 2, 3


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _turn(kv: KVCacheManager, pool: torch.Tensor, session: str, tokens: list[int]) -> list[int]:
    """One finished turn: allocate with prefix hits, 'compute' KV (page content = f(token ids)), publish, pin."""
    rid = f"turn-{session}-{len(tokens)}"
    hits, _ = kv.get_computed_pages(tokens)
    kv.allocate_slots(rid, len(tokens), hits)
    pages = kv.page_table(rid)
    for i, page in enumerate(pages[len(hits):], start=len(hits)):
        pool[:, :, page] = _content(tokens[i * PAGE:(i + 1) * PAGE])
    kv.cache_pages(rid, tokens, len(tokens))
    kv.pin(rid, session)
    kv.free(rid)
    return pages


def _content(tokens: list[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash(tuple(tokens)) % (2**31))
    return torch.randn(LAYERS, 2, PAGE, HEADS, DIM, generator=g)


def _pool(num_pages: int) -> torch.Tensor:
    return torch.zeros(LAYERS, 2, num_pages, PAGE, HEADS, DIM)


def test_pin_hashed_reuses_cached_pages_and_fills_the_rest_before_registering_them():
    kv = KVCacheManager(num_pages=8, page_size=PAGE)
    kv.allocate_slots("a", 12)  # pages 0, 1, 2
    kv.cache_pages("a", list(range(12)), 12)
    hashes = page_hashes(list(range(12)), PAGE)
    kv.free("a")  # evictable: 2, 1, 0 (tail first)
    kv.allocate_slots("b", 24)  # free pages 3..7 then evicts 2 (the LRU head)
    kv.free("b")  # unhashed, tail first: the free queue is 2, 7, 6, 5, 4, 3
    assert kv._allocator.lookup(hashes[2]) is None and kv._allocator.lookup(hashes[0]) == 0
    seen = []

    def fill(pages, indices):
        seen.append((list(pages), list(indices), [kv._allocator.lookup(hashes[i]) for i in indices]))

    assert kv.pin_hashed("s", hashes, fill) == [0, 1, 2]  # 0 and 1 still cached; 2 is the free queue's head
    assert seen == [([2], [2], [None])]  # filled while no lookup finds it
    assert kv._allocator.lookup(hashes[2]) == 2 and kv.pinned_pages("s") == [0, 1, 2] and kv.has_pinned("s")
    assert kv.pinned_hashes("s") == [(0, hashes[0]), (1, hashes[1]), (2, hashes[2])]
    with pytest.raises(ValueError):
        kv.pin_hashed("s", hashes, fill)
    kv.check_integrity()


def test_pin_hashed_changes_nothing_when_short_or_when_fill_raises():
    kv = KVCacheManager(num_pages=4, page_size=PAGE)
    hashes = page_hashes(list(range(20)), PAGE)
    assert kv.pin_hashed("s", hashes, lambda p, i: None) is None  # 5 pages asked of 4
    assert kv.usage().used == 0 and kv.pinned_keys() == [] and not kv.has_pinned("s")

    def boom(pages, indices):
        raise RuntimeError("copy failed")

    with pytest.raises(RuntimeError):
        kv.pin_hashed("s", hashes[:3], boom)
    usage = kv.usage()
    assert usage.used == 0 and usage.cached == 0 and usage.free == 4 and kv.pinned_keys() == []
    kv.check_integrity()


def test_offload_and_restore_are_byte_identical_from_host_and_from_disk(tmp_path):
    for host_bytes, disk_bytes, tier in ((1 << 20, 0, "host"), (0, 1 << 20, "disk")):
        kv, pool = KVCacheManager(num_pages=16, page_size=PAGE), _pool(16)
        tokens = list(range(100, 122))  # 5 full pages and a partial one
        pages = _turn(kv, pool, "s", tokens)
        before = pool[:, :, pages[:5]].clone()
        tiers = SessionTiers(PageCopier(pool), host_bytes, str(tmp_path / tier), disk_bytes)
        keeper = SessionKeeper(kv, kv.release_pinned, 0.5, tiers=tiers)
        keeper.touch(SessionHint("s"))
        assert keeper.make_room("test") and keeper.where() == {"s": tier}
        assert kv.pinned_keys() == [] and tiers.pages(tier) == 5
        tiers.flush()  # disk writes run in the background
        keeper.poll()
        assert len(list((tmp_path / tier).glob("*.kv"))) == (tier == "disk")
        assert (tiers.stored["s"].data is None) == (tier == "disk")  # written: the host copy is let go
        kv.reset_prefix_cache()  # the pool forgets the pages: a restore must copy every one
        pool.fill_(float("nan"))
        assert keeper.restore("s") and keeper.where() == {"s": "gpu"}
        restored = kv.pinned_pages("s")
        assert torch.equal(pool[:, :, restored], before)  # bit for bit
        hits, n = kv.get_computed_pages(tokens + [7])
        assert list(hits.page_ids) == restored and n == 20  # the next turn's prefix hit
        assert keeper.counters.restore_bytes == 5 * tiers.page_bytes and keeper.counters.restores == 1
        assert list((tmp_path / tier).glob("*.kv")) == [] and tiers.stored == {}
        kv.check_integrity()


def test_restore_reuses_pages_still_cached_and_copies_only_the_evicted_ones():
    kv, pool = KVCacheManager(num_pages=10, page_size=PAGE), _pool(10)
    tokens = list(range(16))
    pages = _turn(kv, pool, "s", tokens)
    assert pages == [0, 1, 2, 3]
    before = pool[:, :, pages].clone()
    tiers = SessionTiers(PageCopier(pool), 1 << 20)
    keeper = SessionKeeper(kv, kv.release_pinned, 0.5, tiers=tiers)
    keeper.touch(SessionHint("s"))
    assert keeper.make_room("test")
    kv.allocate_slots("other", 28)  # 7 pages: free 4..9, then evicts page 3 (released first: tail first)
    pool[:, :, 3] = 0.0  # another request's KV
    kv.free("other")  # unhashed, tail first: the free queue is 3, 9, 8, ...
    assert keeper.restore("s")
    assert kv.pinned_pages("s") == [0, 1, 2, 3] and keeper.counters.restore_bytes == tiers.page_bytes
    assert torch.equal(pool[:, :, kv.pinned_pages("s")], before)
    kv.check_integrity()


def test_victims_by_expected_return_and_size_or_by_lru_and_the_host_tier_spills_to_disk(tmp_path):
    after_three = {
        "expected_return": {"late-big": "disk", "late-small": "host", "old": "host", "soon": "gpu"},
        "lru": {"old": "disk", "late-small": "disk", "late-big": "host", "soon": "gpu"},
    }
    for policy, expected in after_three.items():
        kv, pool, clock = KVCacheManager(num_pages=64, page_size=PAGE), _pool(64), Clock()
        page_bytes = PageCopier(pool).page_bytes()
        tiers = SessionTiers(PageCopier(pool), 5 * page_bytes, str(tmp_path / policy), 100 * page_bytes)
        keeper = SessionKeeper(kv, kv.release_pinned, 0.5, clock=clock, tiers=tiers, policy=policy)
        for name, back, pages in (("old", 5.0, 2), ("late-small", 600.0, 2), ("late-big", 600.0, 4), ("soon", 1.0, 2)):
            keeper.touch(SessionHint(name, expected_return_s=back))
            _turn(kv, pool, name, [len(name) * 1000 + i for i in range(pages * PAGE + 1)])
            clock.t += 1
        # at t=4: old is due in 1 s, soon now, late-* in about 597 s (late-big is the larger)
        assert keeper.victims() == (["late-big", "late-small", "old", "soon"] if policy == "expected_return"
                                    else ["old", "late-small", "late-big", "soon"])
        for _ in range(3):
            assert keeper.make_room("test")
        assert keeper.where() == expected
        assert tiers.used("host") <= tiers.host_bytes and keeper.evictions["to_host"] == 3
        tiers.flush()
        assert keeper.evictions["to_disk"] == list(expected.values()).count("disk")
        for name in list(expected):
            keeper.end(name)
        assert keeper.where() == {} and kv.usage().pinned == 0 and list((tmp_path / policy).glob("*")) == []
        kv.check_integrity()


def test_sessions_idle_past_the_ttl_are_dropped_from_every_tier_and_counted():
    kv, pool, clock = KVCacheManager(num_pages=32, page_size=PAGE), _pool(32), Clock()
    tiers = SessionTiers(PageCopier(pool), 1 << 20)
    keeper = SessionKeeper(kv, kv.release_pinned, 0.5, clock=clock, tiers=tiers, ttl_s=100.0)
    for name in ("a", "b"):
        keeper.touch(SessionHint(name))
        _turn(kv, pool, name, [ord(name) * 10 + i for i in range(9)])
    assert keeper.make_room("test") and sorted(keeper.where().values()) == ["gpu", "host"]
    clock.t = 50.0
    keeper.touch(SessionHint("c"))
    clock.t = 120.0
    keeper.poll()
    assert keeper.where() == {} and keeper.evictions["ttl"] == 2 and tiers.stored == {}
    stats = keeper.stats()
    assert stats.pages_gpu == stats.pages_host == stats.live == 0 and dict(stats.evictions)["ttl"] == 2
    kv.check_integrity()


def test_a_session_too_big_for_any_tier_is_dropped_and_a_restore_without_room_falls_back():
    kv, pool = KVCacheManager(num_pages=8, page_size=PAGE), _pool(8)
    tiers = SessionTiers(PageCopier(pool), PageCopier(pool).page_bytes())  # one page of host memory
    keeper = SessionKeeper(kv, kv.release_pinned, 0.5, tiers=tiers)
    keeper.touch(SessionHint("big"))
    _turn(kv, pool, "big", list(range(13)))
    assert keeper.make_room("test") and keeper.where() == {} and keeper.evictions["dropped"] == 1
    keeper.touch(SessionHint("one"))
    _turn(kv, pool, "one", list(range(50, 55)))  # one full page
    assert keeper.make_room("test") and keeper.where() == {"one": "host"}
    kv.reset_prefix_cache()
    kv.allocate_slots("hog", 8 * PAGE)  # every page in use
    assert not keeper.restore("one") and keeper.where() == {} and keeper.evictions["restore_failed"] == 1
    kv.free("hog")
    kv.check_integrity()


def test_a_pinned_duplicate_page_keeps_its_hash_and_is_published_once_the_original_is_evicted():
    kv = KVCacheManager(num_pages=6, page_size=PAGE)
    tokens = list(range(9))
    hashes = page_hashes(tokens, PAGE)
    for rid in ("first", "copy"):  # the decode side reserves fresh pages for a transfer: no prefix reuse
        kv.reserve(rid, len(tokens))
        kv.cache_pages(rid, tokens, 8)
    assert kv.page_table("first") == [0, 1, 2] and kv.page_table("copy") == [3, 4, 5]
    kv.pin("copy", "s")
    kv.free("copy")
    assert kv.pinned_hashes("s") == [(3, hashes[0]), (4, hashes[1])]  # unpublished, yet its content is known
    assert kv.publish_pinned("s") == 0  # pages 0 and 1 still hold those hashes
    kv.free("first")  # evictable: 2, 1, 0
    kv.allocate_slots("other", 3 * PAGE)  # evicts 2, 1, 0
    assert kv.get_computed_pages(tokens)[1] == 0
    assert kv.publish_pinned("s") == 2
    hits, n = kv.get_computed_pages(tokens)
    assert list(hits.page_ids) == [3, 4] and n == 8
    kv.free("other")
    kv.release_pinned("s")
    kv.check_integrity()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offload_and_restore_run_on_a_side_stream_after_the_current_one_and_are_byte_identical():
    """The copy out is ordered after a write still queued on the current stream; pages stay pinned until it is done.

    (Run on an H200 on 2026-11-30 as a script with the same steps: the offload waited for the queued write, both
    copies were bit-identical.)"""
    kv, pool = KVCacheManager(num_pages=64, page_size=PAGE), _pool(64).to(torch.bfloat16).cuda()
    pages = _turn(kv, pool, "s", list(range(33)))[:8]  # 8 full pages
    warm = torch.empty(pool[:, :, :8].shape, dtype=pool.dtype, pin_memory=True)  # cached by the host allocator,
    del warm  # so the offload's pinned buffer comes without a device synchronisation
    idx = torch.tensor(pages, device="cuda")
    torch.cuda.synchronize()
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):  # keep the current stream busy so the write below is still queued when the copy is asked for
        busy = torch.tanh(busy @ busy / 64)
    pool[:, :, idx] = (busy[0, 0] * 0 + 3.0).to(pool.dtype)  # ordered after the matmuls
    expected = torch.full(pool[:, :, :8].shape, 3.0, dtype=pool.dtype)
    tiers = SessionTiers(PageCopier(pool), 1 << 20)
    keeper = SessionKeeper(kv, kv.release_pinned, 0.5, tiers=tiers)
    keeper.touch(SessionHint("s"))
    keeper.make_room("test")  # True only if the copy already finished
    while "s" in kv.pinned_keys():
        keeper.poll()
    assert keeper.where() == {"s": "host"} and tiers.stored["s"].data.is_pinned()
    assert torch.equal(tiers.stored["s"].data, expected)
    kv.reset_prefix_cache()
    pool.fill_(float("nan"))
    assert keeper.restore("s")
    assert torch.equal(pool[:, :, kv.pinned_pages("s")].cpu(), expected)  # the current stream waited for the copy
    keeper.poll()
    assert tiers.copier._in_flight == []
    kv.check_integrity()


def test_the_host_arena_hands_out_runs_first_fit_and_takes_them_back_when_their_tensor_goes():
    arena = HostArena(10 * 8, 8, pin=False)  # 10 units of 8 bytes
    a = arena.take((4, 2), torch.float32)  # 32 bytes: units 0-3
    b = arena.take((3,), torch.float64)  # 24 bytes: units 4-6
    c = arena.take((2, 2), torch.float32)  # units 7-8
    assert a.is_contiguous() and a.shape == (4, 2) and arena.free_units() == 1
    assert arena.take((3,), torch.float32) is None  # 12 bytes need 2 units; 1 is free
    a.fill_(1.0), b.fill_(2.0), c.fill_(3.0)
    assert a.sum() == 8 and b.sum() == 6 and c.sum() == 12  # the runs do not overlap
    del b
    assert arena.free_units() == 4 and arena._free == [[4, 3], [9, 1]]
    d = arena.take((5,), torch.float32)  # 20 bytes, 3 units: first fit is the run b left
    assert arena._free == [[9, 1]]
    del a, d
    assert arena._free == [[0, 7], [9, 1]]  # merged with its free neighbour
    del c
    assert arena._free == [[0, 10]] and arena.free_units() == 10
    assert HostArena(0, 8, pin=False).take((1,), torch.float32) is None


def test_offloads_use_the_arena_fall_back_when_it_is_full_and_give_their_runs_back(tmp_path):
    kv, pool = KVCacheManager(num_pages=32, page_size=PAGE), _pool(32)
    page_bytes = PageCopier(pool).page_bytes()
    tiers = SessionTiers(PageCopier(pool), 6 * page_bytes, str(tmp_path / "d"), 100 * page_bytes)
    keeper = SessionKeeper(kv, kv.release_pinned, 0.5, tiers=tiers)
    arena = tiers.copier.arena
    before = {}
    for name, first in (("a", 100), ("b", 200)):  # 4 full pages each: the second does not fit the arena's 6
        keeper.touch(SessionHint(name))
        before[name] = pool[:, :, _turn(kv, pool, name, list(range(first, first + 17)))[:4]].clone()
    def in_arena(entry) -> bool:
        return entry.data.untyped_storage().data_ptr() == arena._buf.untyped_storage().data_ptr()

    assert keeper.make_room("test") and arena.free_units() == 2
    (first,) = tiers.stored.values()
    assert in_arena(first)  # 4 of the arena's 6 pages
    assert keeper.make_room("test")
    (second,) = [e for e in tiers.stored.values() if e is not first]
    assert not in_arena(second) and second.data.shape == first.data.shape  # 2 pages left: allocated on its own
    tiers.flush()
    keeper.poll()  # the host tier keeps 6 pages: one session went on to disk, its host copy let go
    kv.reset_prefix_cache()
    pool.fill_(float("nan"))
    for name in ("a", "b"):  # one from host memory, one from disk (read into the arena)
        assert keeper.restore(name)
        assert torch.equal(pool[:, :, kv.pinned_pages(name)], before[name])
    assert tiers.stored == {} and arena.free_units() == arena.units  # every run came back
    kv.check_integrity()


def _disk_tier_session(disk_dir) -> tuple[KVCacheManager, SessionTiers, SessionKeeper]:
    """A pool with a disk tier only, and session ``s`` (3 pages) already let go to it, its write not waited for."""
    kv, pool = KVCacheManager(num_pages=16, page_size=PAGE), _pool(16)
    tiers = SessionTiers(PageCopier(pool), 0, str(disk_dir), 1 << 20)
    keeper = SessionKeeper(kv, kv.release_pinned, 0.5, tiers=tiers)
    keeper.touch(SessionHint("s"))
    _turn(kv, pool, "s", list(range(13)))
    return kv, tiers, keeper


def test_a_session_file_cut_short_fails_its_restore_alone(tmp_path):
    kv, tiers, keeper = _disk_tier_session(tmp_path / "d")
    assert keeper.make_room("test") and keeper.where() == {"s": "disk"}
    tiers.flush()
    keeper.poll()
    path = tiers.stored["s"].path
    path.write_bytes(path.read_bytes()[:10])
    kv.reset_prefix_cache()
    assert not keeper.restore("s") and keeper.evictions["restore_failed"] == 1
    assert keeper.where() == {} and list((tmp_path / "d").glob("*.kv")) == [] and kv.usage().pinned == 0
    kv.check_integrity()


def test_a_failed_disk_write_drops_the_session_and_counts_it(tmp_path):
    kv, tiers, keeper = _disk_tier_session(tmp_path / "gone")
    (tmp_path / "gone").rmdir()  # the write cannot create its file
    assert keeper.make_room("test") and keeper.where() == {"s": "disk"}
    tiers.flush()
    keeper.poll()
    assert keeper.where() == {} and keeper.evictions["dropped"] == 1 and tiers.stored == {}
    keeper.close()
    kv.check_integrity()


class _Event:
    """Stands for a CUDA event: done once the test says so."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


class _AsyncCopier(PageCopier):
    """CPU copies that report completion only when the test completes their events (the CUDA path's contract)."""

    def __init__(self, kv_cache: torch.Tensor) -> None:
        super().__init__(kv_cache)
        self.events: list[_Event] = []

    def to_host(self, pages):
        data, _ = super().to_host(pages)
        self.events.append(_Event())
        return data, self.events[-1]


def test_while_a_copy_to_host_is_in_flight_the_pages_stay_pinned_and_no_second_victim_is_taken():
    kv, pool, clock = KVCacheManager(num_pages=32, page_size=PAGE), _pool(32), Clock()
    copier = _AsyncCopier(pool)
    keeper = SessionKeeper(kv, kv.release_pinned, 0.2, clock=clock, tiers=SessionTiers(copier, 1 << 20))
    for name, back in (("a", 600.0), ("b", 300.0), ("c", 5.0)):
        keeper.touch(SessionHint(name, expected_return_s=back))
        _turn(kv, pool, name, [ord(name) * 100 + i for i in range(13)])  # 4 pages each, 3 full
    assert not keeper.make_room("a transfer")  # a's copy started; nothing freed yet
    assert keeper.where() == {"a": "gpu", "b": "gpu", "c": "gpu"} and kv.pinned_keys() == ["a", "b", "c"]
    assert not keeper.make_room("a transfer") and len(copier.events) == 1  # waits for it: no second victim
    keeper.enforce_cap()  # 12 pinned, 4 of them leaving: 8 > 6.4, so b goes too (its copy in flight as well)
    assert len(copier.events) == 2 and kv.pinned_keys() == ["a", "b", "c"]
    copier.events[0].done = True
    keeper.poll()
    assert keeper.where() == {"a": "host", "b": "gpu", "c": "gpu"}
    keeper.touch(SessionHint("b"))  # b is back before its copy finished: it stays in the pool, the copy is dropped
    copier.events[1].done = True
    keeper.poll()
    assert keeper.where() == {"a": "host", "b": "gpu", "c": "gpu"} and set(keeper.tiers.stored) == {"a"}
    for name in "abc":
        keeper.end(name)
    assert kv.usage().pinned == 0 and keeper.tiers.stored == {}
    kv.check_integrity()


def test_an_arena_run_whose_copy_out_is_in_flight_comes_back_only_once_the_copy_is_done():
    kv, pool = KVCacheManager(num_pages=32, page_size=PAGE), _pool(32)
    copier = _AsyncCopier(pool)
    keeper = SessionKeeper(kv, kv.release_pinned, 0.5, tiers=SessionTiers(copier, 1 << 20))
    arena = copier.arena
    keeper.touch(SessionHint("s"))
    _turn(kv, pool, "s", list(range(13)))  # 3 full pages
    assert not keeper.make_room("test") and arena.free_units() == arena.units - 3  # the copy out runs
    keeper.end("s")  # the session ends meanwhile: its buffer stays out of the arena while the copy may write it
    assert keeper.tiers.stored == {} and arena.free_units() == arena.units - 3
    keeper.poll()
    assert arena.free_units() == arena.units - 3
    copier.events[0].done = True
    keeper.poll()
    assert arena.free_units() == arena.units and kv.usage().pinned == 0
    kv.check_integrity()


def test_a_turn_waits_for_copies_in_flight_instead_of_dropping_its_session():
    kv, pool = KVCacheManager(num_pages=8, page_size=PAGE), _pool(8)
    copier = _AsyncCopier(pool)
    keeper = SessionKeeper(kv, kv.release_pinned, 1.0, tiers=SessionTiers(copier, 1 << 20))
    keeper.touch(SessionHint("s1"))
    first = list(range(12))
    before = pool[:, :, _turn(kv, pool, "s1", first)].clone()
    assert keeper.make_room("test") is False  # its copy is in flight: the pages stay pinned
    copier.events[0].done = True
    keeper.poll()
    assert keeper.where() == {"s1": "host"} and kv.pinned_keys() == []
    kv.reset_prefix_cache()  # a restore must copy every page
    keeper.touch(SessionHint("s2"))
    _turn(kv, pool, "s2", list(range(100, 120)))  # 5 pages
    kv.allocate_slots("hog", 3 * PAGE)  # the pool is full
    assert keeper.make_room("a restore needs the pages") is False  # s2 offloading, still in flight
    assert keeper.claim("s1") == "wait" and keeper.where() == {"s1": "host", "s2": "gpu"}  # s1's copy is kept
    copier.events[1].done = True
    keeper.poll()  # s2's pool pages are released
    assert keeper.claim("s1") == "hit" and keeper.where() == {"s1": "gpu", "s2": "host"}
    assert torch.equal(pool[:, :, kv.pinned_pages("s1")], before)
    assert keeper.claim("nobody") == "miss" and keeper.evictions["restore_failed"] == 0
    for session in ("s1", "s2"):
        keeper.end(session)
    kv.free("hog")
    assert keeper.where() == {} and kv.usage().used == 0
    kv.check_integrity()
