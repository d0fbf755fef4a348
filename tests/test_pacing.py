"""The window before the next overlapped step (core/engine/pacing.py, the engine's step 0'): the clock's arithmetic
on exact times, and the engine taking in a prompt that arrives while a decode step runs, so that the prompt runs in
the very next step (queued behind the step in flight) with the same tokens as without the window."""

from __future__ import annotations

import pytest

from splitserve.core.engine.pacing import DEVICE_SHARE, MARGIN_S, StepClock
from splitserve.core.messages import SamplingParams
from test_async_decode import count_launches, make_engine


def test_no_samples_no_window_and_steps_found_complete_teach_nothing():
    clock = StepClock()
    assert clock.window(10.0, 10.0) == 0.0
    clock.launched(9.99, 10.0)
    clock.completed(10.0, 10.5, waited=False)  # the host came late: no device sample, start unknown
    assert clock.device_s is None and clock.last_end == 0.0 and clock.window(10.0, 10.0) == 0.0


def test_window_is_the_expected_end_less_the_hosts_share():
    clock = StepClock(alpha=0.5)
    assert clock.launched(0.998, 1.000) == 1.000  # host 2 ms
    clock.completed(1.000, 1.010, waited=True)  # the device ran it from its launch (nothing before): 10 ms
    assert clock.device_s == pytest.approx(0.010) and clock.last_end == 1.010
    launched = clock.launched(1.004, 1.006)  # launched while the first ran: it starts when the first ends
    assert clock.host_s == pytest.approx(0.002) and clock.start_of(launched) == 1.010
    expected = 1.010 + DEVICE_SHARE * 0.010 - (0.002 + MARGIN_S) - 1.012
    assert clock.window(launched, 1.012) == pytest.approx(expected)
    clock.completed(launched, 1.030, waited=True)  # a 20 ms step: the average moves half way
    assert clock.device_s == pytest.approx(0.015) and clock.last_end == 1.030
    assert clock.window(1.031, 1.040) == pytest.approx(1.031 + DEVICE_SHARE * 0.015 - (0.002 + MARGIN_S) - 1.040)
    clock.opened(0.004, arrived=True)
    clock.opened(0.002, arrived=False)
    clock.completed(1.05, 1.06, waited=False)
    assert clock.report() == ("2 overlapped steps waited for, 1 found complete, 0 shared with a prompt lane's step; "
                              "device 15.00 ms, host 2.00 ms a step; 2 windows (mean 3.00 ms), work came in 1")
    assert not any(clock.stats.values())  # counted afresh


def test_a_step_shared_with_the_prompt_lane_gives_its_end_but_no_sample():
    clock = StepClock(alpha=0.5)
    clock.launched(0.998, 1.000)
    clock.completed(1.000, 1.010, waited=True)
    clock.completed(1.010, 1.040, waited=True, shared=True)  # 30 ms, of which the lane's step took most
    assert clock.device_s == pytest.approx(0.010) and clock.last_end == 1.040
    assert clock.stats["shared"] == 1 and clock.stats["waited"] == 2


@pytest.fixture(scope="module")
def s260k():
    from conftest import shared_model_path

    return str(shared_model_path("stories260K"))


PROMPTS = ([1, 45, 87, 123, 9, 300], [1, 77, 12, 400, 5], [1, 250, 251, 252, 30, 31, 32, 33])
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _decoding(engine) -> None:
    """Two requests decoding, an overlapped step in flight."""
    for i, prompt in enumerate(PROMPTS[:2]):
        engine.add_request(f"r{i}", prompt, PARAMS)
    outs = []
    while engine._in_flight is None:
        outs += engine.step()
    return outs


def _finish(engine, outs, arrivals=None) -> dict[str, list[int]]:
    while engine.has_unfinished():
        outs += engine.step(arrivals)
    tokens: dict[str, list[int]] = {}
    for so in outs:
        tokens.setdefault(so.request_id, []).extend(so.new_token_ids)
    return tokens


def test_a_prompt_arriving_in_the_window_runs_in_the_next_step_with_the_same_tokens(s260k):
    plain = make_engine(s260k, True)
    outs = _decoding(plain)
    plain.add_request("late", PROMPTS[2], PARAMS)  # no window: it waits for the step launched before it came
    expected = _finish(plain, outs)

    engine = make_engine(s260k, True)
    now = [100.0]
    engine._now = lambda: now[0]
    engine.clock.device_s, engine.clock.host_s = 0.010, 0.001  # a 10 ms step, 1 ms of host work
    outs = _decoding(engine)
    prev, launches = engine._in_flight, count_launches(engine)
    offered = []

    def arrivals(timeout_s: float) -> bool:  # the worker's sockets: a prompt comes 2 ms into the window
        offered.append(timeout_s)
        engine.add_request("late", PROMPTS[2], PARAMS)
        return True

    assert engine.step(arrivals) == [] and engine._in_flight is prev and launches[0] == 0  # nothing launched
    assert offered == [pytest.approx(prev.launched + DEVICE_SHARE * 0.010 - (engine.clock.host_s + MARGIN_S)
                                     - now[0])]
    outs += engine.step(lambda t: pytest.fail("a prompt waits: no window"))
    assert "late" in engine._in_flight.rows and launches == [1, 1]  # the prompt is in the very next step, queued
    step = engine.step(lambda t: False)
    assert [so.new_token_ids for so in step if so.request_id == "late"] == [expected["late"][:1]]
    outs += step
    assert _finish(engine, outs, lambda t: False) == expected  # nothing more comes: launches go on as before
    assert launches[0] > 5
    engine.kv.check_integrity()
    assert engine.kv.usage().used == 0


def test_nothing_arriving_launches_after_the_window(s260k):
    engine = make_engine(s260k, True)
    engine._now = lambda: 5.0
    engine.clock.device_s, engine.clock.host_s = 0.010, 0.001
    outs = _decoding(engine)
    waited = []
    tokens = _finish(engine, outs, lambda t: waited.append(t) or False)
    assert waited and all(t > 0 for t in waited)  # each overlapped step offered its window, nothing came

    plain = make_engine(s260k, True)
    assert tokens == _finish(plain, _decoding(plain))
