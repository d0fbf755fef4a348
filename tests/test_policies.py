"""Routing policies and the worker registry, without processes."""

from __future__ import annotations

import random

import pytest

from splitserve.core.cache.prefix import page_hashes
from splitserve.core.messages import Heartbeat, Register
from splitserve.router.policies import POLICY_NAMES, RouteRequest, make_policy, prefix_match_pages
from splitserve.router.pools import WorkerRegistry


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _reg(wid: str, role: str = "both", num_pages: int = 100, page_size: int = 4) -> Register:
    return Register(worker_id=wid, role=role, model_id="m", peer_addr=f"p-{wid}", transfer_addr=f"t-{wid}",
                    num_pages=num_pages, page_size=page_size, max_model_len=512)


def _hb(wid: str, role: str = "both", running: int = 0, waiting: int = 0, queued: int = 0, free: int = 100,
        cached: int = 0, events=()) -> Heartbeat:
    return Heartbeat(worker_id=wid, role=role, running=running, waiting=waiting, queued_tokens=queued,
                     kv_pages_used=100 - free - cached, kv_pages_free=free, kv_pages_cached=cached,
                     cache_events=tuple(events))


def _registry(*ids: str, role: str = "both") -> tuple[WorkerRegistry, Clock]:
    clock = Clock()
    reg = WorkerRegistry(heartbeat_timeout_s=5.0, clock=clock)
    for wid in ids:
        reg.register(wid.encode(), _reg(wid, role))
    return reg, clock


REQ = RouteRequest([1, 2, 3, 4, 5, 6, 7, 8, 9])


def test_round_robin_cycles_in_id_order():
    reg, _ = _registry("b", "a", "c")
    p = make_policy("round_robin", "decode")
    picks = [p.choose(reg.candidates("decode"), REQ).worker_id for _ in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_least_loaded_uses_router_and_heartbeat_load():
    reg, _ = _registry("a", "b", "c")
    reg.heartbeat(_hb("a", running=3))
    reg.heartbeat(_hb("b", running=1, waiting=1))
    reg.get("c").inflight = 4  # router-tracked requests count even before a heartbeat reports them
    p = make_policy("least_loaded", "decode")
    assert p.choose(reg.candidates("decode"), REQ).worker_id == "b"
    # the prefill pool weighs queued prompt tokens first
    reg.heartbeat(_hb("b", running=1, waiting=1, queued=900))
    reg.get("a").pending_prefill_tokens = 50
    assert make_policy("least_loaded", "prefill").choose(reg.candidates("prefill"), REQ).worker_id == "c"


def test_prefix_aware_prefers_longest_cached_prefix_then_load():
    reg, _ = _registry("a", "b", "c", role="prefill")
    hashes = page_hashes(REQ.prompt_token_ids, 4)
    assert len(hashes) == 2
    reg.heartbeat(_hb("a", role="prefill", events=[("stored", hashes[:1])]))
    reg.heartbeat(_hb("b", role="prefill", running=5, events=[("stored", hashes)]))
    p = make_policy("prefix_aware", "prefill")
    assert prefix_match_pages(reg.get("b"), REQ) == 2
    assert p.choose(reg.candidates("prefill"), REQ).worker_id == "b"
    # b evicts its second page: a and b now tie on one page, a is less loaded
    reg.heartbeat(_hb("b", role="prefill", running=5, events=[("removed", hashes[1:])]))
    assert p.choose(reg.candidates("prefill"), REQ).worker_id == "a"
    # a chained hash without its parent is no prefix match
    reg.heartbeat(_hb("c", role="prefill", events=[("stored", hashes[1:])]))
    assert prefix_match_pages(reg.get("c"), REQ) == 0


def test_kv_aware_prefers_free_pages():
    reg, _ = _registry("a", "b", role="decode")
    reg.heartbeat(_hb("a", role="decode", free=10, cached=5))
    reg.heartbeat(_hb("b", role="decode", free=12, cached=0, running=9))
    assert make_policy("kv_aware", "decode").choose(reg.candidates("decode"), REQ).worker_id == "a"


def test_power_of_two_is_seeded_and_picks_the_less_loaded_of_two():
    reg, _ = _registry("a", "b", "c", "d")
    for wid, running in zip("abcd", (4, 1, 3, 2)):
        reg.heartbeat(_hb(wid, running=running))
    cands = reg.candidates("decode")
    picks1 = [make_policy("power_of_two", "decode", random.Random(7)).choose(cands, REQ).worker_id for _ in range(1)]
    p1, p2 = (make_policy("power_of_two", "decode", random.Random(7)) for _ in range(2))
    seq1 = [p1.choose(cands, REQ).worker_id for _ in range(20)]
    seq2 = [p2.choose(cands, REQ).worker_id for _ in range(20)]
    assert seq1 == seq2 and seq1[0] == picks1[0]
    assert "a" not in seq1  # the most loaded worker never wins a pair
    assert len(set(seq1)) > 1


def test_make_policy_rejects_unknown_and_wrong_pool():
    assert set(POLICY_NAMES) == {"round_robin", "least_loaded", "prefix_aware", "kv_aware", "power_of_two"}
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("fastest", "decode")
    with pytest.raises(ValueError, match="does not apply"):
        make_policy("kv_aware", "prefill")
    with pytest.raises(ValueError, match="no candidate"):
        make_policy("least_loaded", "decode").choose([], REQ)


def test_registry_heartbeat_timeout_roles_and_draining():
    reg, clock = _registry("p", role="prefill")
    reg.register(b"d", _reg("d", "decode"))
    assert reg.has_healthy("prefill") and reg.has_healthy("decode")
    clock.t += 4.0
    reg.heartbeat(_hb("p", role="prefill"))
    clock.t += 2.0  # d: 6 s without a heartbeat; p: 2 s
    assert [w.worker_id for w in reg.expire()] == ["d"]
    assert reg.expire() == []  # reported once
    assert not reg.has_healthy("decode") and reg.candidates("decode") == []
    reg.heartbeat(_hb("d", role="decode"))
    assert [w.worker_id for w in reg.candidates("decode")] == ["d"]
    reg.get("d").draining = True
    assert reg.candidates("decode") == [] and not reg.has_healthy("decode")  # draining takes no new work
    assert reg.heartbeat(_hb("unknown")) is None


def test_registry_reregister_replaces_entry_and_heartbeat_role_switch():
    reg, _ = _registry("w")
    reg.get("w").inflight = 3
    old = reg.register(b"w", _reg("w", "decode"))
    assert old is not None and old.inflight == 3
    assert reg.get("w").inflight == 0 and reg.get("w").role == "decode"
    reg.heartbeat(_hb("w", role="prefill"))
    assert reg.candidates("decode") == [] and reg.candidates("prefill")[0].worker_id == "w"
    assert reg.remove("w") is not None and reg.all() == []


def test_registrations_are_bounded_and_silent_workers_are_forgotten():
    from splitserve.router.pools import RegistryFull

    clock = Clock()
    reg = WorkerRegistry(heartbeat_timeout_s=5.0, clock=clock, max_workers=2, forget_after_s=60.0)
    reg.register(b"a", _reg("a"))
    reg.register(b"b", _reg("b"))
    with pytest.raises(RegistryFull):
        reg.register(b"c", _reg("c"))
    reg.register(b"a", _reg("a"))  # a known id may register again (a restarted worker)
    clock.t += 30
    reg.heartbeat(_hb("b"))
    assert [w.worker_id for w in reg.expire()] == ["a"]  # out of routing, still listed
    assert reg.forget_stale() == [] and [w.worker_id for w in reg.all()] == ["a", "b"]
    clock.t += 31
    assert [w.worker_id for w in reg.forget_stale()] == ["a"]  # 61 s silent: forgotten
    assert [w.worker_id for w in reg.all()] == ["b"]
    reg.register(b"c", _reg("c"))  # room again
    assert "peer_addr" not in reg.get("c").to_json(clock(), addresses=False)
