"""A worker stays visibly alive while its loop is inside a long step: the side thread resends its heartbeat; and a
step's tokens leave in one frame."""

from __future__ import annotations

import contextlib
import threading
import time

import zmq

from splitserve.core.config import EngineConfig, WorkerConfig
from splitserve.core.engine.engine import LLMEngine, StepOutput
from splitserve.core.engine.service import WorkerCore
from splitserve.core.messages import Heartbeat, Register, RequestTiming, SamplingParams, TokenOut, TokenOuts, decode


@contextlib.contextmanager
def worker_and_router(engine: LLMEngine | None = None, **worker: object):
    """A worker core on ``engine`` (a small default one) connected to a bare ROUTER socket standing in for the
    router: yields (core, router socket); both are closed after."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    core = WorkerCore(WorkerConfig(role="both", router_addr=f"tcp://127.0.0.1:{port}", **worker),
                      engine or LLMEngine(EngineConfig(num_pages=64)))
    try:
        yield core, router
    finally:
        core.close()
        router.close(0)


def test_heartbeats_keep_coming_while_a_step_blocks_the_loop():
    engine = LLMEngine(EngineConfig(num_pages=64))
    in_step, release = threading.Event(), threading.Event()
    real_step = engine.step

    def long_step(arrivals=None):
        in_step.set()
        release.wait(30)
        return real_step()

    engine.step = long_step
    engine.add_request("r0", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0))
    with worker_and_router(engine, heartbeat_s=0.1) as (core, router):
        loop = threading.Thread(target=core.run, daemon=True)
        loop.start()
        try:
            assert in_step.wait(30)
            during = _receive(router, until=lambda got: sum(isinstance(m, Heartbeat) for m in got) >= 3,
                              timeout_s=30)
            assert not release.is_set()  # all of them arrived while the step was still blocked
            beats = [m for m in during if isinstance(m, Heartbeat)]
            assert len(beats) >= 3 and all(b.worker_id == core.worker_id and b.cache_events == () for b in beats)
        finally:
            release.set()
            core.request_stop()
            loop.join(30)
    assert not loop.is_alive()


def _receive(sock: zmq.Socket, until, timeout_s: float) -> list:
    got: list = []
    deadline = time.monotonic() + timeout_s
    while not until(got) and time.monotonic() < deadline:
        if sock.poll(100):
            _identity, payload = sock.recv_multipart()
            msg = decode(payload)
            if not isinstance(msg, Register):
                got.append(msg)
    return got


def test_a_steps_tokens_leave_in_one_frame_and_a_lone_token_as_itself():
    """The decode loop hands a step's outputs to their owners; the ``TokenOut``s they send (a failure's too) reach the
    router as one ``TokenOuts`` frame, in order; a step with one output sends a plain ``TokenOut``."""
    with worker_and_router() as (core, router):
        for rid in ("a", "b", "c"):
            core.own(rid, lambda out: core.send_token_out(TokenOut(request_id=out.request_id, token_ids=(7,))))
        core.own("d", lambda out: core.fail_request("d", "boom"))
        core.own("e", lambda out: core.send_token_out(TokenOut(request_id="e", token_ids=(8,),
                                                               timing=RequestTiming(local_prefill_s=0.01))))
        step = [StepOutput(rid, [7]) for rid in ("a", "b", "nobody", "d", "c", "e")]
        core.hand_out(step)
        core.hand_out(step[:1])
        core.hand_out([])
        got = _receive(router, until=lambda got: len(got) >= 3, timeout_s=30)
        assert [type(m) for m in got] == [TokenOut, TokenOuts, TokenOut]
        assert got[0].request_id == "e"  # a first output (it carries its timing) goes ahead of the step's others
        assert [(o.request_id, o.finish_reason) for o in got[1].outs] == [("a", None), ("b", None), ("d", "error"),
                                                                          ("c", None)]
        assert got[2].request_id == "a"
        assert _receive(router, until=lambda got: bool(got), timeout_s=0.5) == []  # no frame for an empty step


def test_the_step_window_waits_to_its_end_and_wakes_on_a_message():
    """``wait_for_work`` (the engine's step window) waits the whole window, also below a millisecond, where a ZeroMQ
    poll rounds the timeout down (0.9 ms to no wait, 2.7 to 2); a message that is there ends it at once."""
    with worker_and_router() as (core, router):
        for window in (0.0009, 0.0027):
            start = time.monotonic()
            assert core.wait_for_work(window) is False
            assert time.monotonic() - start >= window  # never ends early (a lower bound: it cannot flake)
        core.heartbeat(force=True)
        assert router.poll(30_000)
        identity = router.recv_multipart()[0]
        router.send_multipart([identity, b"wake"])
        assert core.wait_for_work(30.0) is True
