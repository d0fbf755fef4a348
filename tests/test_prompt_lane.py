"""The prompt lane (core/engine/lane.py): steps of prompts alone run while the decode step in flight runs on.

Checked here: which pages two steps share (exact page ids); the config refusing a lane without prompts first; on
the CPU, the host side (the lane's steps really run, give the tokens of ordinary steps, free every page, and a
session turn whose previous request still writes its page in the step in flight is queued behind it instead); on a
GPU (skipped without CUDA), the same with the lane's own high-priority stream and CUDA graphs.
"""

from __future__ import annotations

import pydantic
import pytest
import torch

from splitserve.core.config import EngineConfig
from splitserve.core.engine.batch import ScheduledBatch, SeqWork
from splitserve.core.messages import SamplingParams
from test_async_decode import assert_same_up_to_ties, make_engine, run_staggered, workload

GREEDY = SamplingParams(max_tokens=1, temperature=0.0)


@pytest.fixture(scope="module")
def s260k():
    from conftest import shared_model_path

    return str(shared_model_path("stories260K"))


def _row(rid: str, table: tuple[int, ...], start: int, n: int) -> SeqWork:
    return SeqWork(rid, tuple(range(3, 3 + n)), start, table, True, GREEDY)


def _batch(*rows: SeqWork, page_size: int = 16) -> ScheduledBatch:
    return ScheduledBatch(seqs=rows, page_size=page_size)


def test_written_pages_are_those_of_the_rows_positions():
    assert _row("a", (4, 5, 6), 14, 5).written_pages(8) == (5, 6)  # positions 14..18: pages 1 and 2 of the table
    assert _row("a", (4, 5, 6), 16, 1).written_pages(8) == (6,)
    assert _row("a", (4, 5, 6), 0, 8).written_pages(8) == (4,)
    assert SeqWork("a", (), 8, (4, 5), False, GREEDY).written_pages(8) == ()


def test_two_steps_share_pages_only_where_one_writes():
    decode = _batch(_row("a", (3, 7), 20, 1))  # writes page 7, reads 3 and 7
    assert _batch(_row("b", (2, 7), 30, 2)).shares_pages(decode)  # reads (and writes) the page "a" writes
    assert decode.shares_pages(_batch(_row("b", (2, 7), 30, 2)))  # either way round
    prompt = _batch(_row("c", (3, 9, 10), 20, 12))  # writes page 9 only; page 3 is a prefix both read
    assert not prompt.shares_pages(decode)
    assert prompt.shares_pages(_batch(_row("a", (3, 9), 20, 1)))  # writes page 9, which "a" reads and writes
    assert _batch(_row("c", (5, 6), 20, 12)).shares_pages(_batch(_row("c", (11, 12), 20, 1)))  # one request in both
    assert not _batch(_row("d", (5,), 0, 3)).shares_pages(_batch(_row("e", (6,), 0, 3), _row("f", (8, 9), 17, 1)))


def test_a_lane_needs_prompts_first():
    with pytest.raises(pydantic.ValidationError, match="prefill_first_tokens"):
        EngineConfig(prompt_lane=True)
    assert EngineConfig(prompt_lane=True, prefill_first_tokens=64).prompt_lane


def test_prompts_on_the_lane_give_the_tokens_of_ordinary_steps(s260k):
    """Prompts that arrive while others decode run on the lane while the step in flight is left in flight; their
    tokens are handed out first, and every request's tokens are those of synchronous steps."""
    prompts, params = workload(seed=7, n=16)
    sync = run_staggered(make_engine(s260k, False), prompts, params)
    engine = make_engine(s260k, True, prefill_first_tokens=24, prompt_lane=True)
    got = run_staggered(engine, prompts, params)
    assert_same_up_to_ties(s260k, prompts, got, sync)
    assert engine.runner.lane().steps >= len(prompts) // 2  # the lane really ran
    assert engine.runner.lane().graphs is None  # CPU: the same step, run synchronously


def _run_until_finished(engine, rid: str) -> None:
    for _ in range(200):
        if any(o.request_id == rid and o.finished for o in engine.step()):
            return
    raise AssertionError(f"{rid} did not finish")


def test_a_turn_whose_page_the_step_in_flight_writes_waits_for_it(s260k):
    """A session's turn added as soon as its previous turn stopped on a stop id: the step in flight still has that
    request's row, writing the session's last page, so the turn is queued behind it, not run on the lane; a later
    turn runs on the lane. Both give the ids of a fresh engine without sessions, and ending the session frees all."""
    story = [1, 403, 407, 261, 378, 290, 263, 480, 271]  # 9 ids: the stop token lands mid-page (pages of 4)
    first = make_engine(s260k, False).generate([story], SamplingParams(max_tokens=3, temperature=0.0))[0]
    stop = first.output_token_ids[2]
    assert stop not in first.output_token_ids[:2]  # it stops at the third token, unforeseen by the scheduler
    engine = make_engine(s260k, True, prefill_first_tokens=24, prompt_lane=True)
    engine.add_request("bg", [1, 306, 367, 261, 402, 272], SamplingParams(max_tokens=300, temperature=0.0,
                                                                        ignore_eos=True))
    for _ in range(3):
        engine.step()
    t1 = engine.add_request("t1", story, SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=(stop,)),
                            session_key="s")
    _run_until_finished(engine, "t1")
    assert engine.scheduler.requests["bg"].request_id in engine._in_flight.rows and "t1" in engine._in_flight.rows
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    turns, lane_steps = [], []
    for new in ([290, 410, 263], [271, 407, 323]):
        prompt = story + t1.output_token_ids + new if not turns else turns[-1][0] + turns[-1][1].output_token_ids + new
        before = engine.runner.lane().steps
        req = engine.add_request(f"t{len(turns) + 2}", prompt, params, session_key="s")
        engine.step()
        lane_steps.append(engine.runner.lane().steps - before)
        _run_until_finished(engine, req.request_id)
        turns.append((prompt, req))
        for _ in range(3):
            engine.step()
    assert lane_steps == [0, 1]
    fresh = make_engine(s260k, False, enable_prefix_caching=False)
    want = [(r.output_token_ids, r.finish_reason) for r in fresh.generate([p for p, _ in turns], params)]
    assert_same_up_to_ties(s260k, [p for p, _ in turns], [(r.output_token_ids, r.finish_reason) for _, r in turns],
                           want)
    engine.abort("bg")
    while engine.has_unfinished():
        engine.step()
    engine.release_session("s")
    engine.kv.check_integrity()
    assert engine.kv.usage().used == 0


def test_a_prompt_that_raises_on_the_lane_fails_alone(s260k, monkeypatch):
    """Two prompts share a lane step and one of them raises in the forward pass: it fails with an error, the other
    and the decode row in flight keep the tokens they get without it, and every page is free afterwards."""
    from test_engine import inject_forward_faults

    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    bg, good = [1, 306, 367, 261, 402, 272], [1, 403, 407, 261, 378, 290]
    want = make_engine(s260k, False).generate([bg, good], params)
    engine = make_engine(s260k, True, prefill_first_tokens=24, prompt_lane=True)
    inject_forward_faults(engine, monkeypatch)
    reqs = [engine.add_request("bg", bg, params)]
    for _ in range(2):
        engine.step()
    reqs += [engine.add_request("forward-fault", [1, 290, 410, 263], params), engine.add_request("good", good, params)]
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert engine.runner.lane().steps == 1  # both in one lane step, run again one at a time inside it
    assert [r.output_token_ids for r in (reqs[0], reqs[2])] == [r.output_token_ids for r in want]
    assert reqs[1].finish_reason == "error" and not reqs[1].output_token_ids
    assert any(o.request_id == "forward-fault" and o.error and "injected fault" in o.error for o in outs)
    engine.kv.check_integrity()
    assert engine.kv.usage().used == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_lane_on_a_gpu_runs_its_own_graphs_on_its_own_stream(s260k):
    """stories260K in float32 on the GPU: prompts on the lane (own high-priority stream and graphs) give the ids of
    the same engine queueing them behind the step in flight, and every page is free afterwards."""
    prompts, params = workload(seed=7, n=16)
    kw = dict(device="cuda", dtype="float32", page_size=8, prefill_first_tokens=24, max_num_seqs=8)
    queued = run_staggered(make_engine(s260k, True, **kw), prompts, params)
    engine = make_engine(s260k, True, prompt_lane=True, **kw)
    engine.warmup(prompt_lens=(16,))
    lane = engine.runner.lane()
    assert lane.stream is not None and lane.stream.priority < 0
    assert lane.graphs is not None and lane.graphs is not engine.runner.graphs and lane.graphs.graphs
    assert lane.graphs.static.input_ids.data_ptr() != engine.runner.graphs.static.input_ids.data_ptr()
    got = run_staggered(engine, prompts, params)
    assert_same_up_to_ties(s260k, prompts, got, queued)
    assert lane.steps >= len(prompts) // 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_copies_into_the_pool_come_before_the_lanes_steps(s260k):
    """A copy into the pool outside the steps (a session restored from a tier) is ordered before later steps on
    every stream, the lane's included: a read queued on the lane sees what a slow copy on a side stream wrote."""
    engine = make_engine(s260k, True, device="cuda", dtype="float32", page_size=8, prefill_first_tokens=24,
                         prompt_lane=True)
    lane = engine.runner.lane()
    assert engine.runner.step_streams() == [torch.cuda.current_stream(), lane.stream]
    buf, side = torch.zeros(1, device="cuda"), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # after the zeros
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # tens of milliseconds before the write lands
        buf.fill_(1.0)
        written = torch.cuda.Event()
        written.record(side)
    engine.order_pool_write(written)
    with lane.context():
        seen = buf.clone()
    torch.cuda.synchronize()
    assert seen.item() == 1.0
