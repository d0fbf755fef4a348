"""Overlapped decode steps (``EngineConfig.async_scheduling``): the same tokens as synchronous steps, pages freed only
after the step that writes them has completed, and a clean fallback when a launch raises. Greedy rows with a grammar
take the same path (mask filled while the step's forward runs): the same tokens, finish reasons and errors as the
synchronous path, matchers and pages released."""

from __future__ import annotations

import random

import pytest

from splitserve.core.config import EngineConfig
from splitserve.core.engine.engine import LLMEngine
from splitserve.core.messages import SamplingParams
from splitserve.core.request import PENDING_TOKEN


@pytest.fixture(scope="module")
def s260k():
    from conftest import shared_model_path

    return str(shared_model_path("stories260K"))


def make_engine(model: str, overlap: bool, **kw) -> LLMEngine:
    """stories260K on the CPU; ``overlap``: overlapped steps, prompt chunks included (``overlap_prefill="on"``: the
    GPU's default, which the CPU leaves off)."""
    base = dict(model=model, page_size=4, num_pages=256, enable_prefix_caching=True, async_scheduling=overlap,
                overlap_prefill="on", extra_stop_token_ids=(1,))
    base.update(kw)
    return LLMEngine(EngineConfig(**base))


def count_launches(engine: LLMEngine) -> list[int]:
    """[launches, of them with a prompt chunk of more than one token] (updated as the engine runs)."""
    calls = [0, 0]
    real = engine.runner.launch

    def launch(batch, prev):
        calls[0] += 1
        calls[1] += any(s.num_tokens > 1 for s in batch.seqs)
        return real(batch, prev)

    engine.runner.launch = launch
    return calls


def workload(seed: int, n: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts with shared prefixes, and plain greedy params with various lengths and stop ids."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, 500) for _ in range(9)]
    prompts, params = [], []
    for i in range(n):
        head = shared if i % 3 == 0 else []
        prompts.append([1] + head + [rng.randrange(3, 500) for _ in range(rng.randrange(2, 30))])
        params.append(SamplingParams(max_tokens=rng.randrange(1, 40), temperature=0.0, ignore_eos=i % 4 == 1,
                                     stop_token_ids=(rng.randrange(3, 500),) if i % 5 == 2 else ()))
    return prompts, params


def run(engine: LLMEngine, prompts, params) -> list[tuple[list[int], str | None]]:
    reqs = engine.generate(prompts, params)
    engine.kv.check_integrity()
    assert engine.kv.usage().used == 0
    assert not engine.has_unfinished()
    return [(r.output_token_ids, r.finish_reason) for r in reqs]


def last_logits(model: str, tokens: list[int]):
    """float32 ``[V]``: the reference engine's logits after ``tokens`` (one synchronous prefill, nothing batched)."""
    ref = make_engine(model, False, enable_prefix_caching=False)
    ref.add_request("ref", tokens, SamplingParams(max_tokens=1, temperature=0.0))
    batch = ref.scheduler.schedule()
    ids, pos, meta = ref.runner._prepare(batch)
    hidden = ref.runner.model(ids, pos, ref.runner.kv_cache, meta, ref.runner.backend)
    return ref.runner.model.compute_logits(hidden[-1:]).float()[0]


def assert_same_up_to_ties(model: str, prompts, got, want, tie: float = 1e-4) -> None:
    """``got == want``, except that a greedy sequence may part from the other where its two tokens' logits (in the
    reference) are within ``tie`` of each other and the best: batches of another shape round differently, and a
    near-tie (stories260K has some at 1e-6) then goes either way. Past such a point nothing more is compared."""
    for prompt, (g, g_reason), (w, w_reason) in zip(prompts, got, want):
        k = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), None)
        if k is None:
            assert (g, g_reason) == (w, w_reason)
            continue
        logits = last_logits(model, list(prompt) + w[:k])
        best = logits.max().item()
        assert best - logits[g[k]].item() < tie and best - logits[w[k]].item() < tie, (k, g[k], w[k])


@pytest.mark.parametrize("num_pages", [256, 40])  # 40 pages: preemptions while steps are in flight
def test_overlapped_steps_give_the_synchronous_tokens(s260k, num_pages):
    prompts, params = workload(seed=num_pages, n=24)
    sync = run(make_engine(s260k, False, num_pages=num_pages), prompts, params)
    engine = make_engine(s260k, True, num_pages=num_pages)
    launches = count_launches(engine)
    overlapped = run(engine, prompts, params)
    assert_same_up_to_ties(s260k, prompts, overlapped, sync)
    assert all(PENDING_TOKEN not in toks for toks, _ in overlapped)
    assert launches[0] > 20 and launches[1] >= 1  # the overlapped path really ran, prompts on it too
    if num_pages == 40:
        assert engine.scheduler.num_preemptions > 0


def run_staggered(engine: LLMEngine, prompts, params, every: int = 2) -> list[tuple[list[int], str | None]]:
    """Like :func:`run`, but a new request arrives every ``every`` steps (while a step is in flight)."""
    reqs, todo = [], list(zip(prompts, params))
    while todo or engine.has_unfinished():
        if todo:
            prompt, sp = todo.pop(0)
            reqs.append(engine.add_request(f"late-{len(reqs)}", prompt, sp))
        for _ in range(every):
            engine.step()
    engine.kv.check_integrity()
    assert engine.kv.usage().used == 0
    return [(r.output_token_ids, r.finish_reason) for r in reqs]


@pytest.mark.parametrize("chunk", [3, 512])  # 3: prompts in chunks that sample nothing
def test_prompt_chunks_launched_behind_the_step_in_flight_agree(s260k, chunk):
    """Prompts that arrive while decode steps run are queued behind the step in flight (``overlap_prefill``), in
    chunks or whole: the synchronous tokens. With ``overlap_prefill`` off no launched step carries a prompt chunk."""
    prompts, params = workload(seed=11, n=16)
    sync = run_staggered(make_engine(s260k, False, chunk_size=chunk), prompts, params)
    on = make_engine(s260k, True, chunk_size=chunk)
    launches_on = count_launches(on)
    assert_same_up_to_ties(s260k, prompts, run_staggered(on, prompts, params), sync)
    off = make_engine(s260k, True, chunk_size=chunk, overlap_prefill="off")
    launches_off = count_launches(off)
    assert_same_up_to_ties(s260k, prompts, run_staggered(off, prompts, params), sync)
    assert launches_on[1] >= len(prompts) // 2 and launches_off[1] == 0 and launches_off[0] > 0


@pytest.mark.parametrize("overlap", [False, True])
def test_short_prompts_first_give_the_same_tokens(s260k, overlap):
    """``prefill_first_tokens``: prompts that arrive while others decode run in steps of their own (the decode rows
    skip those steps, never two in a row): the tokens of ordinary steps, and such steps really ran."""
    prompts, params = workload(seed=5, n=16)
    sync = run_staggered(make_engine(s260k, False), prompts, params)
    engine = make_engine(s260k, overlap, prefill_first_tokens=24)
    alone, real = [], engine.scheduler._prompts_alone
    engine.scheduler._prompts_alone = lambda: alone.append(real()) or alone[-1]
    assert_same_up_to_ties(s260k, prompts, run_staggered(engine, prompts, params), sync)
    assert sum(b is not None for b in alone) >= len(prompts) // 2


def test_rows_that_need_more_than_argmax_run_synchronously_and_agree(s260k):
    prompts, params = workload(seed=7, n=12)
    special = [SamplingParams(max_tokens=20, temperature=0.8, seed=3, logprobs=2),
               SamplingParams(max_tokens=15, temperature=0.0, min_tokens=4), SamplingParams(max_tokens=9, logprobs=1,
                                                                                           temperature=0.0)]
    params = [p if i % 4 else special[i // 4 % 3] for i, p in enumerate(params)]
    sync = run(make_engine(s260k, False), prompts, params)
    engine = make_engine(s260k, True)
    launches = count_launches(engine)
    assert run(engine, prompts, params) == sync
    assert launches[0] > 0


def test_pages_of_a_request_aborted_in_flight_are_freed_after_its_step(s260k):
    engine = make_engine(s260k, True)
    keep = engine.add_request("keep", [1, 40, 41, 42], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    engine.add_request("gone", [1, 50, 51, 52, 53], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine._in_flight is not None and "gone" in engine.scheduler.in_flight
    engine.abort("gone")
    retiring = [k for k in engine.kv._requests if k.startswith("gone#retiring")]
    assert retiring and not engine.kv.has("gone")  # held, not free: the step in flight still writes them
    engine.step()
    assert not any(k.startswith("gone#retiring") for k in engine.kv._requests)
    while engine.has_unfinished():
        engine.step()
    assert engine.kv.usage().used == 0
    alone = make_engine(s260k, False).generate([[1, 40, 41, 42]], SamplingParams(max_tokens=30, temperature=0.0,
                                                                                  ignore_eos=True))[0]
    assert keep.output_token_ids == alone.output_token_ids


def test_a_launch_that_raises_falls_back_to_the_synchronous_step(s260k):
    prompts, params = workload(seed=3, n=10)
    sync = run(make_engine(s260k, False), prompts, params)
    engine = make_engine(s260k, True)
    real, calls = engine.runner.launch, [0]

    def flaky(batch, prev):
        calls[0] += 1
        if calls[0] % 3 == 0:
            raise RuntimeError("injected launch failure")
        return real(batch, prev)

    engine.runner.launch = flaky
    assert run(engine, prompts, params) == sync
    assert calls[0] > 6


@pytest.mark.parametrize("num_pages", [14, 20, 28])
def test_stops_and_preemptions_in_flight_under_a_tight_pool(s260k, num_pages):
    """Requests that stop (common stop ids) at a step whose successor preempted them, in pools that keep preempting."""
    rng = random.Random(num_pages)
    prompts = [[1] + [rng.randrange(3, 500) for _ in range(rng.randrange(3, 12))] for _ in range(16)]
    common = (261, 286, 298, 315, 317, 338)  # ids stories260K emits often: stops land anywhere
    params = [SamplingParams(max_tokens=rng.randrange(8, 40), temperature=0.0,
                             stop_token_ids=common[: rng.randrange(0, 4)]) for _ in prompts]
    sync = run(make_engine(s260k, False, num_pages=num_pages), prompts, params)
    engine = make_engine(s260k, True, num_pages=num_pages)
    assert run(engine, prompts, params) == sync
    assert engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("seed", [1, 5, 9, 17, 28, 33])  # 1 and 28 once left a placeholder in a request out of pages
def test_random_workloads_overlapped_equal_synchronous(s260k, seed):
    """Random pools (some smaller than one request), prompts, stop ids, min_tokens and prefix caching."""
    rng = random.Random(seed)
    num_pages = rng.choice([10, 12, 16, 24, 40, 256])
    prompts = [[1] + [rng.randrange(3, 500) for _ in range(rng.randrange(2, 20))] for _ in range(rng.randrange(1, 20))]
    common = (261, 286, 298, 315, 317, 338, 1)
    params = [SamplingParams(max_tokens=rng.randrange(1, 40), temperature=0.0, ignore_eos=rng.random() < 0.3,
                             stop_token_ids=common[: rng.randrange(0, 5)], min_tokens=rng.choice([0, 0, 0, 2]))
              for _ in prompts]
    caching = rng.random() < 0.7
    sync = run(make_engine(s260k, False, num_pages=num_pages, enable_prefix_caching=caching), prompts, params)
    assert run(make_engine(s260k, True, num_pages=num_pages, enable_prefix_caching=caching), prompts, params) == sync


# --- grammar rows (structured output) on the overlapped path ------------------------------------------------------

GRAMMARS = (
    ("regex", "[a-z ]{1,24}\\."),  # ends after a few tokens (the matcher then allows only the stop token)
    ("choice", '["Once upon a time", "the end", "a big dog"]'),
    ("json", '{"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer",'
             ' "minimum": 0, "maximum": 99}}, "required": ["name", "age"], "additionalProperties": false}'),
    ("grammar", 'root ::= "{\\"text\\": \\"" body\nbody ::= [^"\\\\\\x00-\\x1f] body'),  # never ends: "length"
)


def grammar_workload(seed: int, n: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Greedy rows, about two thirds with a grammar (ending at various steps, with and without ignore_eos), the rest
    plain, so that batches mix them and grammar requests finish while others go on."""
    rng = random.Random(seed)
    prompts, params = workload(seed, n)
    out = []
    for i, p in enumerate(params):
        if i % 3 == 2:
            out.append(p)
            continue
        out.append(SamplingParams(max_tokens=rng.randrange(6, 40), temperature=0.0, ignore_eos=rng.random() < 0.4,
                                  grammar=GRAMMARS[rng.randrange(len(GRAMMARS))]))
    return prompts, out


def count_grammar_launches(engine: LLMEngine) -> list[int]:
    """Counts launches of steps that have grammar rows."""
    calls = [0]
    real = engine.runner.launch

    def launch(batch, prev):
        calls[0] += any(s.params.grammar is not None for s in batch.seqs)
        return real(batch, prev)

    engine.runner.launch = launch
    return calls


def run_streams(engine: LLMEngine, prompts, params, setup=None) -> dict[str, tuple[list[int], str | None, str | None]]:
    """Every request's streamed tokens, finish reason and error, from the step outputs; also checks that the
    streamed tokens are the request's own, that no page leaks and that the matchers left with their requests."""
    reqs = [engine.add_request(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
    if setup is not None:
        setup(engine)
    streams = {r.request_id: ([], None, None) for r in reqs}
    while engine.has_unfinished():
        for so in engine.step():
            toks, reason, err = streams[so.request_id]
            assert reason is None, f"{so.request_id}: output after it finished"
            streams[so.request_id] = (toks + so.new_token_ids, so.finish_reason, so.error)
    for r in reqs:
        assert streams[r.request_id][0] == r.output_token_ids and streams[r.request_id][1] == r.finish_reason
    engine.kv.check_integrity()
    assert engine.kv.usage().used == 0 and len(engine.grammars) == 0
    return streams


@pytest.mark.parametrize("num_pages, seed, batch_fill", [(256, 1, 16), (256, 4, 2), (24, 2, 2), (16, 3, 16)])
def test_grammar_rows_overlapped_give_the_synchronous_tokens(s260k, num_pages, seed, batch_fill):
    """24 and 16 pages: preemptions while steps are in flight; ``batch_fill`` 2: the threaded bitmask fill."""
    prompts, params = grammar_workload(seed, 18)
    sync = run_streams(make_engine(s260k, False, num_pages=num_pages), prompts, params)
    engine = make_engine(s260k, True, num_pages=num_pages)
    engine.grammars.batch_fill_min_rows = batch_fill
    launches = count_grammar_launches(engine)
    assert run_streams(engine, prompts, params) == sync
    assert launches[0] > 15  # grammar rows really took the overlapped path
    reasons = {reason for toks, reason, _ in sync.values()}
    assert {"stop", "length"} <= reasons  # grammars ended mid-batch while other rows went on
    if num_pages < 256:
        assert engine.scheduler.num_preemptions > 0


def refuse_token(at: int, victim: str = "r0"):
    """A setup that makes ``victim``'s grammar refuse its ``at``-th accepted token (as an engine bug or a matcher out of
    step would): the request must fail with "error" on both paths, the others go on."""
    def setup(engine: LLMEngine) -> None:
        real, seen = engine.grammars.accept, [0]

        def accept(request_id, token_id):
            if request_id == victim:
                seen[0] += 1
                if seen[0] == at:
                    raise ValueError(f"token {token_id} is not allowed by the request's grammar")
            return real(request_id, token_id)

        engine.grammars.accept = accept
    return setup


def test_a_refused_token_fails_its_request_alike(s260k):
    prompts, params = grammar_workload(5, 8)
    params[0] = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, grammar=GRAMMARS[3])
    sync = run_streams(make_engine(s260k, False), prompts, params, refuse_token(4))
    engine = make_engine(s260k, True)
    launches = count_grammar_launches(engine)
    assert run_streams(engine, prompts, params, refuse_token(4)) == sync
    toks, reason, err = sync["r0"]
    assert reason == "error" and "not allowed by the request's grammar" in err and len(toks) == 4
    assert launches[0] > 5


def starve(after: int, victim: str = "r0"):
    """A setup whose ``victim`` matcher allows no token at all once it has accepted ``after`` tokens."""
    from splitserve.core.engine.grammar import RequestGrammar

    class Starved(RequestGrammar):
        __slots__ = ("accepted",)

        def accept(self, token_id: int) -> bool:
            self.accepted = getattr(self, "accepted", 0) + 1
            return super().accept(token_id)

        def fill(self, bitmask, row: int) -> None:
            super().fill(bitmask, row)
            if getattr(self, "accepted", 0) >= after:
                bitmask[row].zero_()

    def setup(engine: LLMEngine) -> None:
        engine.grammars._states[victim] = Starved(victim, engine.grammars._states[victim].matcher)
    return setup


def test_a_row_with_no_token_left_fails_its_request_alike(s260k):
    prompts, params = grammar_workload(6, 8)
    params[0] = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, grammar=GRAMMARS[3])
    sync = run_streams(make_engine(s260k, False), prompts, params, starve(5))
    assert run_streams(make_engine(s260k, True), prompts, params, starve(5)) == sync
    toks, reason, err = sync["r0"]
    assert reason == "error" and "no token is left to sample" in err and len(toks) == 5


def test_a_grammar_request_aborted_in_flight_frees_its_pages_after_its_step(s260k):
    engine = make_engine(s260k, True)
    endless = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, grammar=GRAMMARS[3])
    keep = engine.add_request("keep", [1, 40, 41, 42], endless)
    engine.add_request("plain", [1, 60, 61], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    engine.add_request("gone", [1, 50, 51, 52, 53], endless)
    for _ in range(4):
        engine.step()
    assert engine._in_flight is not None and "gone" in engine.scheduler.in_flight
    engine.abort("gone")
    assert any(k.startswith("gone#retiring") for k in engine.kv._requests) and not engine.kv.has("gone")
    engine.step()  # its row of the step in flight is dropped, its row of the next step is left unmasked
    assert not any(k.startswith("gone#retiring") for k in engine.kv._requests)
    assert engine.grammars.get("gone") is None
    while engine.has_unfinished():
        engine.step()
    assert engine.kv.usage().used == 0 and len(engine.grammars) == 0
    alone = make_engine(s260k, False).generate([[1, 40, 41, 42]], endless)[0]
    assert keep.output_token_ids == alone.output_token_ids


def test_a_prefilled_grammar_request_continues_on_the_overlapped_path(s260k):
    """Decode worker side: the first token (from a prefill worker) is replayed into the matcher, then the decode
    steps overlap (one engine plays the prefill side; the decode side's pages hold no real KV, so both decode
    engines see the same zero KV)."""
    params = SamplingParams(max_tokens=30, temperature=0.0, grammar=GRAMMARS[2])
    prompt = [1, 70, 71, 72, 73]
    first = make_engine(s260k, False).generate([prompt], SamplingParams(max_tokens=1, temperature=0.0,
                                                                        grammar=GRAMMARS[2]))[0].output_token_ids[0]
    outs = []
    for overlap in (False, True):
        engine = make_engine(s260k, overlap)
        launches = count_grammar_launches(engine)
        assert engine.reserve("d", len(prompt) + 1) is not None
        assert engine.add_prefilled("d", prompt, params, first) is None
        req = engine.scheduler.requests["d"]
        while engine.has_unfinished():
            engine.step()
        assert engine.kv.usage().used == 0 and len(engine.grammars) == 0
        outs.append((req.output_token_ids, req.finish_reason))
        assert (launches[0] > 3) == overlap
    assert outs[0] == outs[1] and outs[0][1] == "stop"
