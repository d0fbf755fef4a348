"""The router's automatic ratio loop, wired to a real registry and metrics (control socket replaced)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from splitserve.core.messages import Heartbeat, Register, SetRole
from splitserve.router.autoscale import AutoRatio, p90
from splitserve.router.control import switch_role
from splitserve.router.metrics import RouterMetrics
from splitserve.router.planner import Slo
from splitserve.router.pools import WorkerRegistry


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class RecordingControl:
    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []

    async def send(self, worker, msg) -> bool:
        self.sent.append((worker.worker_id, msg))
        return True


def make_service(roles: dict[str, str], clock: Clock):
    registry = WorkerRegistry(heartbeat_timeout_s=5.0, clock=clock)
    for wid, role in roles.items():
        registry.register(wid.encode(), Register(worker_id=wid, role=role, model_id="m", peer_addr="tcp://x:1",
                                                 transfer_addr="tcp://x:2", num_pages=64, page_size=16,
                                                 max_model_len=512))
        registry.heartbeat(Heartbeat(worker_id=wid, role=role, running=0, waiting=0, queued_tokens=0,
                                     kv_pages_used=0, kv_pages_free=64, kv_pages_cached=0))
    metrics = RouterMetrics(registry)
    return SimpleNamespace(registry=registry, metrics=metrics, control=RecordingControl())


def feed(svc, clock: Clock, ttft: float, tpot: float, n: int = 20) -> None:
    for _ in range(n):
        svc.metrics.history.append({"t": clock.t, "ttft": ttft, "tpot": tpot})


def test_p90():
    assert p90([]) is None
    assert p90([float(i) for i in range(1, 11)]) == 9.0  # nearest rank: 9 of 10 values at or below
    assert p90([3.0, 1.0, 2.0]) == 3.0


def test_decode_pressure_moves_a_prefill_worker_to_decode_then_back():
    clock = Clock()
    svc = make_service({"p0": "prefill", "p1": "prefill", "d0": "decode"}, clock)
    auto = AutoRatio(svc, Slo(ttft_p90_s=1.0, tpot_p90_s=0.05), interval_s=5.0, cooldown_s=30.0, clock=clock)

    def tick():
        return asyncio.run(auto.tick())

    feed(svc, clock, ttft=0.2, tpot=0.2)  # decode-heavy: TPOT 4x over, TTFT well within
    assert tick() is None  # hysteresis: one window is not enough
    clock.t += 5
    feed(svc, clock, ttft=0.2, tpot=0.2)
    switch = tick()
    assert switch is not None and (switch.from_role, switch.to_role) == ("prefill", "decode")
    wid, msg = svc.control.sent[-1]
    assert wid in ("p0", "p1") and msg == SetRole(role="decode", epoch=1)
    assert sorted(w.role for w in svc.registry.all()) == ["decode", "decode", "prefill"]
    # Still decode-heavy, but the last prefill worker is never taken.
    for _ in range(4):
        clock.t += 40
        feed(svc, clock, ttft=0.2, tpot=0.2)
        assert tick() is None
    # The workload turns prefill-heavy: a decode worker goes back to prefill after the cooldown.
    for _ in range(2):
        clock.t += 20
        feed(svc, clock, ttft=3.0, tpot=0.01)
        result = tick()
    assert result is not None and (result.from_role, result.to_role) == ("decode", "prefill")
    assert sorted(w.role for w in svc.registry.all()) == ["decode", "prefill", "prefill"]
    assert len(svc.control.sent) == 2


def _beat(wid: str, role: str, epoch: int) -> Heartbeat:
    return Heartbeat(worker_id=wid, role=role, running=0, waiting=0, queued_tokens=0, kv_pages_used=0,
                     kv_pages_free=64, kv_pages_cached=0, role_epoch=epoch)


def test_heartbeat_sent_before_a_role_switch_does_not_undo_it():
    svc = make_service({"p0": "prefill"}, Clock())
    w = svc.registry.get("p0")
    assert asyncio.run(switch_role(svc.control, w, "both"))
    assert svc.control.sent[-1] == ("p0", SetRole(role="both", epoch=1))
    svc.registry.heartbeat(_beat("p0", "prefill", 0))  # was on the wire when SetRole left
    assert w.role == "both" and w.capable("decode")
    assert asyncio.run(switch_role(svc.control, w, "decode"))
    assert svc.control.sent[-1] == ("p0", SetRole(role="decode", epoch=2))
    svc.registry.heartbeat(_beat("p0", "both", 1))
    assert w.role == "decode"
    svc.registry.heartbeat(_beat("p0", "decode", 2))  # the worker applied it: heartbeats speak for it again
    assert w.role == "decode" and w.role_epoch == 2
