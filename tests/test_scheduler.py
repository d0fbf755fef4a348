"""Scheduler with a real KVCacheManager, pure Python (no torch): admission, preemption, and requests that wait
while holding pages (a decode worker's requests whose KV arrived from a prefill worker)."""

from __future__ import annotations

from splitserve.core.cache.manager import KVCacheManager
from splitserve.core.engine.scheduler import Scheduler, SchedulerLimits
from splitserve.core.messages import SamplingParams
from splitserve.core.request import Request, RequestStatus

PAGE = 4
PARAMS = SamplingParams(max_tokens=64, temperature=0)


def make(num_pages: int, max_num_seqs: int = 4) -> Scheduler:
    return Scheduler(KVCacheManager(num_pages=num_pages, page_size=PAGE),
                     SchedulerLimits(max_num_seqs=max_num_seqs, max_num_batched_tokens=64, chunk_size=64,
                                     enable_prefix_caching=False))


def fresh(rid: str, n: int) -> Request:
    return Request(rid, list(range(100, 100 + n)), PARAMS)


def prefilled(sched: Scheduler, rid: str, n: int) -> Request:
    """What ``LLMEngine.add_prefilled`` queues: pages reserved and filled by a transfer, first token known."""
    req = fresh(rid, n)
    assert sched.kv.reserve(rid, n) is not None
    req.output_token_ids.append(7)
    req.num_computed_tokens = n
    return req


def test_prefilled_request_runs_its_first_decode_step_in_its_reserved_pages():
    sched = make(num_pages=4)
    sched.add(prefilled(sched, "a", 6))
    batch = sched.schedule()
    assert [(s.request_id, s.token_ids, s.start_pos, s.page_table) for s in batch.seqs] == [("a", (7,), 6, (0, 1))]


def test_waiting_page_holders_give_way_when_nothing_can_run():
    # c (a preempted request, 12 tokens = 3 pages) is at the head; a and b wait behind it holding 2 pages each,
    # so only 2 of 6 pages are free and nothing runs. Before the fix, schedule() returned empty batches for ever.
    sched = make(num_pages=6)
    a, b = prefilled(sched, "a", 8), prefilled(sched, "b", 8)
    assert (sched.kv.page_table("a"), sched.kv.page_table("b")) == ([0, 1], [2, 3])
    sched.add(fresh("c", 12))
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    # b, the newest holder, gave its pages up (to be recomputed); c took them; a still fits beside it
    assert not sched.kv.has("b") and (b.num_computed_tokens, b.num_preemptions) == (0, 1)
    assert [(s.request_id, s.start_pos, s.page_table) for s in batch.seqs] == [("c", 0, (4, 5, 3)), ("a", 8, (0, 1, 2))]
    assert [r.request_id for r in sched.running] == ["c", "a"] and list(sched.waiting) == [b]
    assert b.status is RequestStatus.WAITING and sched.kv.usage().free == 0


def test_head_that_cannot_fit_the_whole_pool_is_given_up_instead_of_blocking():
    sched = make(num_pages=2)
    sched.add(fresh("big", 12))  # 3 pages > pool
    sched.add(fresh("small", 3))
    batch = sched.schedule()
    assert [r.request_id for r in sched.out_of_memory] == ["big"]
    assert [(s.request_id, s.page_table) for s in batch.seqs] == [("small", (0,))]


def test_running_requests_are_preempted_newest_first_before_waiting_holders():
    sched = make(num_pages=3)
    sched.add(fresh("old", 4))
    sched.add(fresh("new", 4))
    sched.schedule()
    for r in sched.running:  # both prompts computed, a first token sampled: each now needs a second page
        r.num_computed_tokens = 4
        r.output_token_ids.append(9)
    holder = prefilled(sched, "held", 4)
    sched.add(holder)
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["old"] and sched.kv.page_table("old") == [0, 1]  # new's page
    assert [r.request_id for r in sched.waiting] == ["new", "held"] and sched.kv.has("held")


def test_head_waits_while_pages_are_reserved_for_transfers_in_flight():
    sched = make(num_pages=4)
    assert sched.kv.reserve("in-flight", 12) is not None  # a transfer still filling 3 pages: not in the scheduler
    sched.add(fresh("c", 8))
    for _ in range(3):
        assert sched.schedule().is_empty
    assert list(sched.waiting)[0].request_id == "c" and not sched.out_of_memory
    sched.kv.free("in-flight")  # the transfer failed; its pages are back
    assert [(s.request_id, len(s.page_table)) for s in sched.schedule().seqs] == [("c", 2)]


def test_a_request_running_alone_takes_pages_from_waiting_holders_rather_than_giving_up():
    sched = make(num_pages=4)
    sched.add(fresh("r", 4))
    sched.schedule()
    r = sched.running[0]
    r.num_computed_tokens = 4
    r.output_token_ids.append(9)  # needs a second page now
    held = [prefilled(sched, "h1", 4), prefilled(sched, "h2", 4), prefilled(sched, "h3", 4)]  # pool full
    for h in held:
        sched.add(h)
    batch = sched.schedule()
    assert [(s.request_id, s.page_table) for s in batch.seqs] == [("r", (0, 3))]  # h3's page
    assert not sched.out_of_memory and not sched.kv.has("h3") and sched.kv.has("h1") and sched.kv.has("h2")


def test_prefill_role_takes_whole_prompts_up_to_its_budget_first_come_first_served():
    from splitserve.core.config import EngineConfig
    from splitserve.core.engine.engine import limits_for_role

    cfg = EngineConfig(chunk_size=8, max_num_batched_tokens=16, prefill_token_budget=40, enable_prefix_caching=False)
    assert limits_for_role(cfg, "decode") == SchedulerLimits(64, 16, 8, False)
    sched = Scheduler(KVCacheManager(num_pages=32, page_size=PAGE), limits_for_role(cfg, "prefill"))
    for rid, n in (("a", 22), ("b", 13), ("c", 9)):
        sched.add(fresh(rid, n))
    batch = sched.schedule()  # a and b whole, then c cut where the budget ends
    assert [(s.request_id, s.start_pos, s.num_tokens) for s in batch.seqs] == [("a", 0, 22), ("b", 0, 13), ("c", 0, 5)]


def test_rows_carry_the_request_history_only_when_sampling_reads_it():
    """A greedy row gets no prompt / output ids (copying them every step was most of the scheduling time); penalties,
    min_tokens and random draws get both, exactly as the request holds them; token ids slice across the prompt and
    the outputs."""
    sched = make(num_pages=64)
    wants = {"plain": PARAMS, "rep": SamplingParams(max_tokens=64, temperature=0, repetition_penalty=1.2),
             "min": SamplingParams(max_tokens=64, temperature=0, min_tokens=3),
             "draw": SamplingParams(max_tokens=64, temperature=0.7, seed=1)}
    for rid, params in wants.items():
        sched.add(Request(rid, list(range(100, 106)), params))
    for _ in range(3):  # the prompts, then two decode rows each
        for s in sched.schedule().seqs:
            req = sched.requests[s.request_id]
            req.num_computed_tokens = s.start_pos + s.num_tokens
            req.output_token_ids.append(7 + len(req.output_token_ids))
    rows = {s.request_id: s for s in sched.schedule().seqs}
    assert (rows["plain"].prompt_token_ids, rows["plain"].output_token_ids) == ((), ())
    for rid in ("rep", "min", "draw"):
        assert rows[rid].prompt_token_ids == tuple(range(100, 106)) and rows[rid].output_token_ids == (7, 8, 9)
    assert all(s.token_ids == (9,) and s.start_pos == 8 for s in rows.values())
    req = sched.requests["plain"]
    assert req.token_ids(4, 8) == (104, 105, 7, 8) == tuple(req.all_token_ids[4:8])
    assert req.token_ids(0, 2) == (100, 101) and req.token_ids(7, 9) == (8, 9) and req.token_ids(9, 9) == ()


def test_short_prompts_run_alone_ahead_of_the_decode_rows_never_twice_in_a_row():
    sched = Scheduler(KVCacheManager(num_pages=32, page_size=PAGE),
                      SchedulerLimits(max_num_seqs=8, max_num_batched_tokens=64, chunk_size=64,
                                      enable_prefix_caching=False, prefill_first_tokens=8))
    a, b = prefilled(sched, "a", 4), prefilled(sched, "b", 4)
    sched.add(a)
    sched.add(b)

    def step(want):
        batch = sched.schedule()
        assert [(s.request_id, s.num_tokens, s.start_pos, s.page_table) for s in batch.seqs] == want
        sched.commit(batch)
        for s in batch.seqs:
            if s.sample:
                sched.requests[s.request_id].output_token_ids.append(9)

    step([("a", 1, 4, (0, 2)), ("b", 1, 4, (1, 3))])
    sched.add(fresh("c", 6))  # short: alone, the decode rows wait a step
    sched.add(fresh("d", 20))  # too long for what is left of the limit (2): stays waiting
    step([("c", 6, 0, (4, 5))])
    assert [r.request_id for r in sched.waiting] == ["d"]
    sched.add(fresh("e", 5))  # short, but the last step was prompts alone: everyone runs, d and e in chunks
    step([("a", 1, 5, (0, 2)), ("b", 1, 5, (1, 3)), ("c", 1, 6, (4, 5)), ("d", 20, 0, (6, 7, 8, 9, 10)),
          ("e", 5, 0, (11, 12))])
    sched.add(fresh("f", 9))  # longer than the limit: an ordinary step
    step([("a", 1, 6, (0, 2)), ("b", 1, 6, (1, 3)), ("c", 1, 7, (4, 5)), ("d", 1, 20, (6, 7, 8, 9, 10, 13)),
          ("e", 1, 5, (11, 12)), ("f", 9, 0, (14, 15, 16))])
    sched.add(fresh("g", 3))
    sched.add(fresh("h", 5))  # 3 + 5 fit the limit together
    step([("g", 3, 0, (17,)), ("h", 5, 0, (18, 19))])
