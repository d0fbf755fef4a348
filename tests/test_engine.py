"""The single-process engine: batching, chunking, prefix caching and preemption never change tokens."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from splitserve.core.config import EngineConfig
from splitserve.core.engine.engine import LLMEngine
from splitserve.core.engine.offline import generate_text
from splitserve.core.messages import SamplingParams

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
