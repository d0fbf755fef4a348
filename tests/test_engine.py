"""The single-process engine: batching, chunking, prefix caching and preemption never change tokens; a request whose
step raises fails alone."""

from __future__ import annotations

import json
import logging
import math
import random
import subprocess
import sys
import uuid

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.core.config import EngineConfig
from splitserve.core.engine.engine import LLMEngine
from splitserve.core.engine.offline import generate_text
from splitserve.core.messages import SamplingParams
from splitserve.core.request import Request

from test_sampler import extreme_params  # a sibling test module (tests/ is on sys.path)

REF_PROMPT = [1, 403, 407, 261, 378]
REF_IDS = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292,
           411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def s260k():
    from conftest import shared_model_path

    return str(shared_model_path("stories260K"))


def make_engine(model: str, **kw) -> LLMEngine:
    base = dict(model=model, page_size=4, num_pages=256, enable_prefix_caching=False)
    base.update(kw)
    return LLMEngine(EngineConfig(**base))


def random_prompts(n: int, seed: int, lo: int = 3, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 512) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def outputs(engine: LLMEngine, prompts, params=GREEDY) -> list[list[int]]:
    reqs = engine.generate(prompts, params)
    engine.kv.check_integrity()
    assert engine.kv.usage().used == 0
    return [r.output_token_ids for r in reqs]


def test_reference_ids(s260k):
    assert outputs(make_engine(s260k), [REF_PROMPT], SamplingParams(max_tokens=32, temperature=0))[0] == REF_IDS


def test_batched_equals_one_at_a_time(s260k):
    prompts = random_prompts(6, seed=1)
    engine = make_engine(s260k)
    alone = [outputs(engine, [p])[0] for p in prompts]
    assert outputs(make_engine(s260k), prompts) == alone


def test_chunked_prefill_equals_whole(s260k):
    prompts = random_prompts(4, seed=2, lo=30, hi=60)
    whole = outputs(make_engine(s260k), prompts)
    chunked = outputs(make_engine(s260k, chunk_size=7, max_num_batched_tokens=16), prompts)
    assert chunked == whole


def test_prefix_cache_hits_equal_misses(s260k):
    rng = random.Random(3)
    shared = [1] + [rng.randrange(3, 512) for _ in range(21)]
    prompts = [shared + [rng.randrange(3, 512) for _ in range(k)] for k in (1, 5, 9)]
    miss = outputs(make_engine(s260k), prompts)
    engine = make_engine(s260k, enable_prefix_caching=True)
    first = outputs(engine, prompts[:1])
    reqs = engine.generate(prompts[1:], GREEDY)
    assert all(r.num_cached_tokens >= 20 for r in reqs), [r.num_cached_tokens for r in reqs]
    assert first + [r.output_token_ids for r in reqs] == miss
    engine.kv.check_integrity()


def test_preemption_equals_no_preemption(s260k):
    prompts = random_prompts(8, seed=4, lo=10, hi=20)
    params = SamplingParams(max_tokens=30, temperature=0.0)
    roomy = outputs(make_engine(s260k), prompts, params)
    tight = make_engine(s260k, num_pages=24)
    reqs = tight.generate(prompts, params)
    assert sum(r.num_preemptions for r in reqs) > 0
    assert [r.output_token_ids for r in reqs] == roomy
    tight.kv.check_integrity()
    assert tight.kv.usage().used == 0


def test_seeded_sampling_reproducible_and_top_k1_is_greedy(s260k):
    engine = make_engine(s260k)
    sp = SamplingParams(max_tokens=20, temperature=1.0, seed=1234)
    a = outputs(engine, [REF_PROMPT], sp)
    b = outputs(engine, [REF_PROMPT, REF_PROMPT[:3]], sp)[0]  # batch company must not matter
    c = outputs(engine, [REF_PROMPT], SamplingParams(max_tokens=20, temperature=1.0, seed=99))
    assert a[0] == b and a != c
    topk1 = outputs(engine, [REF_PROMPT], SamplingParams(max_tokens=20, temperature=0.8, top_k=1, seed=5))
    assert topk1[0] == REF_IDS[:20]


def test_seeded_sampling_survives_preemption(s260k):
    prompts = random_prompts(6, seed=5, lo=10, hi=20)
    sp = SamplingParams(max_tokens=25, temperature=0.9, top_p=0.9, seed=7)
    roomy = outputs(make_engine(s260k), prompts, sp)
    assert outputs(make_engine(s260k, num_pages=20), prompts, sp) == roomy


def test_matches_hf_with_repetition_penalty_and_prompt_logprobs(s260k):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(s260k, torch_dtype=torch.float32).eval()
    ids = torch.tensor([REF_PROMPT])
    ref = hf.generate(ids, max_new_tokens=20, do_sample=False, repetition_penalty=1.3)[0, 5:].tolist()
    engine = make_engine(s260k)
    assert outputs(engine, [REF_PROMPT], SamplingParams(max_tokens=20, temperature=0, repetition_penalty=1.3))[0] == ref
    req = engine.generate([REF_PROMPT], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2, logprobs=3))[0]
    with torch.no_grad():
        lp = torch.log_softmax(hf(ids).logits[0].float(), -1)
    assert req.prompt_logprobs[0] is None and len(req.prompt_logprobs) == 5
    for pos in range(1, 5):
        got = req.prompt_logprobs[pos]
        assert got.token_id == REF_PROMPT[pos]
        assert got.logprob == pytest.approx(lp[pos - 1, REF_PROMPT[pos]].item(), rel=1e-4, abs=1e-5)
        assert [t for t, _ in got.top] == torch.topk(lp[pos - 1], 2).indices.tolist()
    first = req.output_logprobs[0]
    assert first.token_id == REF_IDS[0] and len(first.top) == 3
    assert first.logprob == pytest.approx(lp[4, REF_IDS[0]].item(), rel=1e-4, abs=1e-5)


def test_penalties_and_stop_ids(s260k):
    engine = make_engine(s260k)
    plain = outputs(engine, [REF_PROMPT], SamplingParams(max_tokens=32, temperature=0))[0]
    assert plain == REF_IDS  # repeats 432 and 426, so penalties must change it
    freq = outputs(engine, [REF_PROMPT], SamplingParams(max_tokens=32, temperature=0, frequency_penalty=5.0))[0]
    pres = outputs(engine, [REF_PROMPT], SamplingParams(max_tokens=32, temperature=0, presence_penalty=5.0))[0]
    assert freq != plain and pres != plain
    assert len(set(pres)) > len(set(plain))
    stopped = engine.generate([REF_PROMPT], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=(plain[3],)))[0]
    assert stopped.output_token_ids == plain[:4] and stopped.finish_reason == "stop"
    assert engine.generate([REF_PROMPT], SamplingParams(max_tokens=5, temperature=0))[0].finish_reason == "length"


def test_stop_string_spanning_tokens_is_trimmed(s260k):
    cfg = EngineConfig(model=s260k, page_size=4, num_pages=64)
    full = generate_text(cfg, "Once upon a time", SamplingParams(max_tokens=32, temperature=0))
    assert full["text"].startswith(", there was a little girl named Lily.")
    cut = generate_text(cfg, "Once upon a time", SamplingParams(max_tokens=32, temperature=0), stop=["ittle gi"])
    assert cut["text"] == ", there was a l" and cut["finish_reason"] == "stop"


def test_generate_cli_json_builtin():
    out = subprocess.run(
        [sys.executable, "-m", "splitserve.cli", "generate", "--prompt", "Hello", "--max-tokens", "5", "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    obj = json.loads(out.stdout)
    assert set(obj) >= {"prompt_token_ids", "token_ids", "text", "finish_reason"}
    assert len(obj["token_ids"]) == 5 and obj["finish_reason"] == "length"


def test_request_larger_than_the_pool_ends_instead_of_hanging(s260k):
    engine = make_engine(s260k, num_pages=6)  # 24 tokens of KV
    with pytest.raises(ValueError, match="KV pages"):
        engine.add_request("big", list(range(3, 40)), GREEDY)
    req = engine.add_request("grows", REF_PROMPT, SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    for _ in range(200):
        if not engine.has_unfinished():
            break
        engine.step()
    assert req.finished and req.finish_reason == "length" and len(req.output_token_ids) >= 18
    engine.kv.check_integrity()
    assert engine.kv.usage().used == 0


def test_agent_session_pins_pages_between_turns(s260k):
    engine = make_engine(s260k, enable_prefix_caching=True, num_pages=64)
    first = engine.add_request("turn-1", REF_PROMPT, SamplingParams(max_tokens=20, temperature=0), session_key="agent-7")
    while engine.has_unfinished():
        engine.step()
    usage = engine.kv.usage()
    assert usage.pinned > 0 and usage.used == usage.pinned  # kept after the request ended
    engine.kv.check_integrity()
    history = first.all_token_ids + [403, 407]
    # Cache pressure that would evict unpinned pages: fill the pool with other requests.
    engine.generate(random_prompts(3, seed=9, lo=30, hi=40), SamplingParams(max_tokens=20, temperature=0))
    second = engine.add_request("turn-2", history, SamplingParams(max_tokens=4, temperature=0), session_key="agent-7")
    while engine.has_unfinished():
        engine.step()
    assert second.num_cached_tokens >= (len(first.all_token_ids) - 1) // 4 * 4 - 4
    engine.release_session("agent-7")
    engine.kv.check_integrity()
    assert engine.kv.usage().used == 0


# --- requests fail alone (issue 12) ---------------------------------------------------------------------------

SAMPLES_VALID_IDS = {  # extreme values the sampler handles: they produce tokens
    "rep-1e-300": SamplingParams(max_tokens=6, repetition_penalty=1e-300, seed=1),
    "rep-subnormal": SamplingParams(max_tokens=6, temperature=0, repetition_penalty=5e-324),
    "temp-1e39": SamplingParams(max_tokens=6, min_tokens=1, temperature=1e39, seed=2),
    "stop-out-of-vocab": SamplingParams(max_tokens=6, min_tokens=1, stop_token_ids=(100000, -1)),
    "huge-top-k-and-logprobs": SamplingParams(max_tokens=6, top_k=2**62, logprobs=10**9, prompt_logprobs=10**9, seed=3),
}
FAILS = {  # the request fails with this in its error; the engine refuses the first four when they are added
    "temp-nan": (SamplingParams(max_tokens=6, temperature=math.nan), "temperature"),
    "top-p-inf": (SamplingParams(max_tokens=6, top_p=math.inf), "top_p"),
    "freq-nan": (SamplingParams(max_tokens=6, temperature=0, frequency_penalty=math.nan), "frequency_penalty"),
    "rep-inf": (SamplingParams(max_tokens=6, repetition_penalty=math.inf), "repetition_penalty"),
    "ban-every-token": (SamplingParams(max_tokens=6, min_tokens=3, stop_token_ids=tuple(range(512))), "no token"),
    "forward-fault": (SamplingParams(max_tokens=6, temperature=0), "injected"),
    "forward-fault-late": (SamplingParams(max_tokens=9, temperature=0, ignore_eos=True), "injected"),
}
SHORT = SamplingParams(max_tokens=10, temperature=0.0)


def add_unchecked(engine: LLMEngine, request_id: str, prompt, params: SamplingParams) -> Request:
    """Add a request the way ``add_request`` does, minus its checks (as if the API edge and admission were bypassed)."""
    req = Request(request_id, list(prompt), params, engine.eos_token_ids, engine.info.max_model_len)
    engine.scheduler.add(req)
    return req


def inject_forward_faults(engine: LLMEngine, monkeypatch) -> None:
    """The runner raises for any batch holding a ``forward-fault*`` request (the late one after 3 tokens)."""
    real = engine.runner.execute

    def execute(batch, in_lane=False):
        for s in batch.seqs:
            made = len(engine.scheduler.requests[s.request_id].output_token_ids)
            if s.request_id == "forward-fault" or (s.request_id == "forward-fault-late" and made >= 3):
                raise RuntimeError(f"injected fault for {s.request_id}")
        return real(batch, in_lane)

    monkeypatch.setattr(engine.runner, "execute", execute)


def run_all(engine: LLMEngine) -> dict[str, list]:
    """Step until idle; every request's StepOutputs by id."""
    outs: dict[str, list] = {}
    while engine.has_unfinished():
        for so in engine.step():
            outs.setdefault(so.request_id, []).append(so)
    return outs


def test_poison_requests_fail_alone_and_20_others_keep_their_tokens(s260k, monkeypatch, caplog):
    prompts = random_prompts(20, seed=12, lo=3, hi=16)
    alone = outputs(make_engine(s260k), prompts, SHORT)
    engine = make_engine(s260k)
    inject_forward_faults(engine, monkeypatch)
    for name, (params, field) in list(FAILS.items())[:4]:
        with pytest.raises(ValueError, match=field):
            engine.add_request(name, REF_PROMPT, params)
    normal = [engine.add_request(f"normal-{i}", p, SHORT) for i, p in enumerate(prompts[:10])]
    poison = {name: add_unchecked(engine, name, REF_PROMPT, p) for name, p in SAMPLES_VALID_IDS.items()}
    poison |= {name: add_unchecked(engine, name, REF_PROMPT, p) for name, (p, _) in FAILS.items()}
    normal += [engine.add_request(f"normal-{i}", p, SHORT) for i, p in enumerate(prompts[10:], start=10)]
    with caplog.at_level(logging.WARNING, logger="splitserve.core.engine.engine"):
        outs = run_all(engine)
    assert [r.output_token_ids for r in normal] == alone
    for name, (_, field) in FAILS.items():
        last = outs[name][-1]
        assert (last.finish_reason, poison[name].finish_reason) == ("error", "error") and field in last.error
        assert sum(f"request {name}:" in rec.getMessage() for rec in caplog.records) == 1  # one WARNING line
    assert len(poison["forward-fault-late"].output_token_ids) == 3  # tokens made before the fault stay
    for name in SAMPLES_VALID_IDS:
        req = poison[name]
        assert req.finish_reason in ("stop", "length") and all(0 <= t < 512 for t in req.output_token_ids)
    assert len(poison["huge-top-k-and-logprobs"].output_logprobs[0].top) == 512
    engine.kv.check_integrity()
    assert engine.kv.usage().used == 0


@pytest.fixture(scope="module")
def shared_engine(s260k):
    """One engine for the hypothesis examples (they must leave it idle with every page free)."""
    prompts = random_prompts(3, seed=13, lo=3, hi=12)
    engine = make_engine(s260k)
    return engine, prompts, outputs(engine, prompts, SHORT)


@settings(max_examples=25, deadline=None)
@given(params=extreme_params(max_tokens=st.integers(-3, 5)), at=st.integers(0, 3))
def test_engine_steps_with_an_extreme_request_among_normal_ones(shared_engine, params, at):
    engine, prompts, alone = shared_engine
    rid = f"extreme-{uuid.uuid4().hex}"
    normal = [engine.add_request(f"{rid}-normal-{i}", p, SHORT) for i, p in enumerate(prompts)]
    extreme = add_unchecked(engine, rid, prompts[at % len(prompts)][::-1], params)
    outs = run_all(engine)
    assert [r.output_token_ids for r in normal] == alone
    if extreme.finish_reason == "error":
        assert outs[rid][-1].error
    else:
        assert extreme.finish_reason in ("stop", "length") and all(0 <= t < 512 for t in extreme.output_token_ids)
    engine.kv.check_integrity()
    assert engine.kv.usage().used == 0


def test_copies_of_one_prompt_compute_it_once(s260k):
    prompt = [1] + [(7 * i) % 480 + 3 for i in range(47)]  # 48 tokens, 12 pages of 4
    params = SamplingParams(max_tokens=8, temperature=0.0)
    alone = make_engine(s260k).generate([prompt], params)[0].output_token_ids
    engine = make_engine(s260k, enable_prefix_caching=True)
    reqs = engine.generate([prompt] * 4 + [[1, 9, 10, 11, 12]], params)
    assert all(r.output_token_ids == alone for r in reqs[:4])
    assert reqs[0].num_cached_tokens == 0 and [r.num_cached_tokens for r in reqs[1:4]] == [44, 44, 44]
    engine.kv.check_integrity()
    assert engine.kv.usage().used == 0


def test_copies_of_one_prompt_start_together_once_its_pages_are_cached(s260k):
    prompt = [1] + [(7 * i) % 480 + 3 for i in range(47)]  # 48 tokens, 12 pages of 4
    engine = make_engine(s260k, enable_prefix_caching=True)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    for i in range(4):
        engine.add_request(f"copy{i}", prompt, params)
    engine.add_request("other", [1, 9, 10, 11, 12], params)
    engine.step()  # copy0 computes the prompt; the others wait to hit its pages
    assert [r.request_id for r in engine.scheduler.running] == ["copy0"]
    engine.step()  # then every copy starts at once (and the request queued behind them)
    assert sorted(r.request_id for r in engine.scheduler.running) == ["copy0", "copy1", "copy2", "copy3", "other"]
    assert [engine.scheduler.requests[f"copy{i}"].num_cached_tokens for i in (1, 2, 3)] == [44, 44, 44]
    while engine.has_unfinished():
        engine.step()
    engine.kv.check_integrity()
    assert engine.kv.usage().used == 0
