"""End to end: the real router and workers as processes on loopback, called with the official openai client."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import signal
import time
import urllib.request

import openai
import pytest

from cluster import Cluster, poll_until
from conftest import shared_model_path

REF_TEXT = ", there was a little girl named Lily. She loved to play outside in the park. One day, she saw"
REF_IDS = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292,
           411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394]
PROMPTS = ["Once upon a time", "The little dog", "Tom and Sue went to the park. They", "One day, a big red ball",
           "Lily wanted", "The sun was"]


def start_cluster(tmp_path_factory, name: str, **kw) -> Cluster:
    logs = tmp_path_factory.mktemp(name)
    kw.setdefault("worker_args", ["--page-size", "8", "--num-pages", "512", "--lease-s", "5"])
    return Cluster(log_dir=logs, **kw).start()


@pytest.fixture(scope="module")
def pd(tmp_path_factory):
    c = start_cluster(tmp_path_factory, "pd", model=str(shared_model_path("stories260K")))
    yield c
    c.stop()


@pytest.fixture
def client(pd):
    yield openai.OpenAI(base_url=f"{pd.url}/v1", api_key="unused", max_retries=0, timeout=60)
    used = pd.wait_pages_free()
    assert used and not any(used.values()), f"KV pages still in use after the test: {used}"


def model_id(c: Cluster) -> str:
    with urllib.request.urlopen(f"{c.url}/v1/models") as r:
        return json.load(r)["data"][0]["id"]


def complete(client, model, prompt, **kw):
    kw.setdefault("temperature", 0)
    return client.completions.create(model=model, prompt=prompt, **kw)


def test_greedy_1p1d_matches_reference(pd, client):
    out = complete(client, model_id(pd), "Once upon a time", max_tokens=32)
    assert out.choices[0].text == REF_TEXT
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 32
    ids = complete(client, model_id(pd), [1, 403, 407, 261, 378], max_tokens=32, logprobs=1)
    assert ids.choices[0].text == REF_TEXT
    # the default transfer (auto) on one host: the prefill worker wrote straight into the decode worker's pages
    assert "KV transfer over shm (auto), same-host peers write into this pool directly" in (pd.log_dir / "decode-1.log").read_text()
    prefill_log = (pd.log_dir / "prefill-0.log").read_text()
    assert "for direct writes" in prefill_log and "sending inline" not in prefill_log
    assert len(ids.choices[0].logprobs.tokens) == 32


def test_stream_concatenates_to_non_streamed(pd, client):
    m = model_id(pd)
    for prompt in PROMPTS[:3]:
        whole = complete(client, m, prompt, max_tokens=40).choices[0].text
        chunks = list(complete(client, m, prompt, max_tokens=40, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == whole
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 40


def test_64_concurrent_streams_match_alone(pd, client):
    m = model_id(pd)
    alone = {p: complete(client, m, p, max_tokens=24).choices[0].text for p in PROMPTS}

    async def one(aclient, prompt):
        stream = await aclient.completions.create(model=m, prompt=prompt, max_tokens=24, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def run_all():
        aclient = openai.AsyncOpenAI(base_url=f"{pd.url}/v1", api_key="unused", max_retries=0, timeout=120)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(64)]
        texts = await asyncio.gather(*(one(aclient, p) for p in prompts))
        await aclient.close()
        return prompts, texts

    prompts, texts = asyncio.run(run_all())
    assert [alone[p] for p in prompts] == texts


def test_sampling_params_through_the_api(pd, client):
    m = model_id(pd)
    a = complete(client, m, "Once upon a time", max_tokens=20, seed=11, temperature=1.0)
    b = complete(client, m, "Once upon a time", max_tokens=20, seed=11, temperature=1.0)
    assert a.choices[0].text == b.choices[0].text
    cut = complete(client, m, "Once upon a time", max_tokens=32, stop=["little gi"])
    assert cut.choices[0].text == ", there was a " and cut.choices[0].finish_reason == "stop"
    echo = complete(client, m, "Once upon a time", max_tokens=3, echo=True, logprobs=2)
    assert echo.choices[0].text.startswith("Once upon a time, there")
    assert echo.choices[0].logprobs.token_logprobs[0] is None
    assert len(echo.choices[0].logprobs.tokens) == 5 + 3


def _log_has(path, text: str, timeout_s: float) -> bool:
    return poll_until(lambda: text in path.read_text(errors="replace"), timeout_s)


def _disconnect_while_decode_is_frozen(pd, client) -> tuple[str, bool]:
    """Stream a long request, freeze the decode worker (SIGSTOP) at the first chunk, close the stream, and thaw
    the worker once the router sent its abort. Returns (request id, whether the router sent one: it does not when
    the worker had already finished before it froze, i.e. the router lagged behind a whole generation)."""
    decode = pd.procs["decode-1"]
    stream = complete(client, model_id(pd), "Once upon a time", max_tokens=400, stream=True,
                      extra_body={"ignore_eos": True})
    rid = ""
    try:
        for chunk in stream:
            decode.send_signal(signal.SIGSTOP)  # mid-decode: every later token waits for the abort
            rid = chunk.id
            break
        stream.close()
        return rid, _log_has(pd.log_dir / "router.log", f"request {rid}-0: abort sent to worker decode-1", 4.0)
    finally:
        decode.send_signal(signal.SIGCONT)  # well inside the router's heartbeat timeout


def test_client_disconnect_aborts_and_frees_pages(pd, client):
    """A client that closes its stream mid-decode: the router aborts the request, the decode worker stops it there
    and frees its pages. Deterministic: the worker is frozen from the first chunk until the abort is queued."""
    for _attempt in range(3):
        before = sum(pd.worker_gauge("decode_tokens_total").values())
        rid, aborted = _disconnect_while_decode_is_frozen(pd, client)
        used = pd.wait_pages_free()
        assert used and not any(used.values())
        if aborted:
            break
    assert aborted, "three times the generation ended before the router saw the client go"
    assert _log_has(pd.log_dir / "decode-1.log", f"request {rid}-0: aborted (client went away", 10.0)
    time.sleep(1.5)  # a heartbeat carries the final count
    generated = sum(pd.worker_gauge("decode_tokens_total").values()) - before
    # frozen at its first token (the prefill's), the worker may have decoded none of the other 399 yet
    assert 0 <= generated < 399, f"the request was not aborted: {generated} of 399 tokens generated"


def test_bad_input_is_a_400_naming_the_field(pd, client):
    m = model_id(pd)
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, m, "hi", max_tokens=-1)
    assert "max_tokens" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=m, messages=[{"role": "user", "content": "hi"}])  # no chat template
    with pytest.raises(openai.NotFoundError if False else openai.APIStatusError) as e:
        complete(client, "no-such-model", "hi", max_tokens=2)
    assert e.value.status_code in (400, 404)
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, m, "word " * 600, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, m, [1, 2, 100000], max_tokens=2)  # token id outside the vocabulary
    assert "prompt" in str(e.value)
    req = urllib.request.Request(f"{pd.url}/v1/completions", data=b"{not json", method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as he:
        urllib.request.urlopen(req)
    assert he.value.code == 400 and "error" in json.load(he.value)


def test_prefill_worker_killed_request_still_finishes(tmp_path_factory):
    """Kill the only prefill worker: decode's lease expires and it recomputes the prompt itself."""
    c = start_cluster(tmp_path_factory, "kill", model=str(shared_model_path("stories260K")),
                      worker_args=["--page-size", "8", "--num-pages", "256", "--lease-s", "2"],
                      router_args=["--heartbeat-timeout-s", "30"])
    try:
        cl = openai.OpenAI(base_url=f"{c.url}/v1", api_key="unused", max_retries=0, timeout=60)
        m = model_id(c)
        assert complete(cl, m, "Once upon a time", max_tokens=32).choices[0].text == REF_TEXT
        c.kill("prefill-0")
        t0 = time.monotonic()
        assert complete(cl, m, "Once upon a time", max_tokens=32).choices[0].text == REF_TEXT
        assert time.monotonic() - t0 < 30
        used = c.wait_pages_free()
        assert used.get("decode-1") == 0
    finally:
        c.stop()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    src = shared_model_path("stories260K")
    dst = tmp_path_factory.mktemp("chatmodel") / "stories260K-chat"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    )
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(dst)


def test_colocated_and_2p2d_match_1p1d(pd, client, chat_model, tmp_path_factory):
    m = model_id(pd)
    expected = {p: complete(client, m, p, max_tokens=24).choices[0].text for p in PROMPTS}
    for name, kw in (("colocated", dict(prefill=0, decode=0, colocated=2)), ("2p2d", dict(prefill=2, decode=2))):
        c = start_cluster(tmp_path_factory, name, model=chat_model, **kw)
        try:
            cl = openai.OpenAI(base_url=f"{c.url}/v1", api_key="unused", max_retries=0, timeout=60)
            got = {p: complete(cl, model_id(c), p, max_tokens=24).choices[0].text for p in PROMPTS}
            assert got == expected, name
            chat = cl.chat.completions.create(
                model=model_id(c), messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=16,
                temperature=0)
            assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
            assert chat.usage.completion_tokens == 16
            used = c.wait_pages_free()
            assert used and not any(used.values())
        finally:
            c.stop()


def test_prefix_cache_hit_on_the_prefill_worker_is_transferred_too(pd, client):
    """The second request reuses the prefill worker's cached pages; those pages must reach the decode worker."""
    m = model_id(pd)
    prompt = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    first = complete(client, m, prompt, max_tokens=24)
    second = complete(client, m, prompt, max_tokens=24)
    assert second.usage.prompt_tokens_details.cached_tokens >= 8
    assert second.choices[0].text == first.choices[0].text


def test_decode_worker_killed_mid_stream_fails_clearly(tmp_path_factory):
    c = start_cluster(tmp_path_factory, "killdecode", model=str(shared_model_path("stories260K")),
                      router_args=["--heartbeat-timeout-s", "2"])
    try:
        cl = openai.OpenAI(base_url=f"{c.url}/v1", api_key="unused", max_retries=0, timeout=60)
        stream = complete(cl, model_id(c), "Once upon a time", max_tokens=400, stream=True,
                          extra_body={"ignore_eos": True})
        t0 = time.monotonic()
        with pytest.raises(openai.APIError) as e:
            for i, _chunk in enumerate(stream):
                if i == 2:
                    c.kill("decode-1")
        assert "decode-1" in str(e.value) and time.monotonic() - t0 < 30
        assert c.wait_pages_free()["prefill-0"] == 0
        assert c.health() == 503
    finally:
        c.stop()


def test_one_token_requests_finish_at_the_prefill_token(pd, client):
    m = model_id(pd)
    out = complete(client, m, "Once upon a time", max_tokens=1)
    assert out.choices[0].text == "," and out.choices[0].finish_reason == "length"
    stream = list(complete(client, m, "Once upon a time", max_tokens=1, stream=True))
    assert "".join(c.choices[0].text for c in stream if c.choices) == ","
    stopped = complete(client, m, "Once upon a time", max_tokens=5, extra_body={"stop_token_ids": [432]})
    # like vLLM: a non-special stop token stays in the text; generation ends on it with "stop"
    assert stopped.choices[0].text == "," and stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == 1


def test_time_breakdown_reaches_metrics_and_bench_serve(pd, client):
    """Where each disaggregated request's time went: prefill queue and compute, transfer, join, per request."""
    import asyncio

    from splitserve.benchmarks.serve import Prompt, RunConfig, run_requests
    from splitserve.router.metrics import BREAKDOWN_STAGES

    prompts = [Prompt(prompt=[1, 403, 407, 261, 378 + i], prompt_len=5, output_len=6) for i in range(3)]
    cfg = RunConfig(base_url=pd.url, model=None, request_rate=float("inf"))
    _model, results, _duration, breakdown = asyncio.run(run_requests(cfg, prompts))
    assert all(r.ok for r in results)
    assert set(breakdown) == {*BREAKDOWN_STAGES, "ttft"}  # and the router's own TTFT
    disaggregated = {k: v for k, v in breakdown.items() if k != "local_prefill"}
    assert all(v is not None and v >= 0 for v in disaggregated.values()), breakdown
    assert breakdown["ttft"] >= breakdown["prefill_compute"]
    assert breakdown["prefill_compute"] > 0 and breakdown["local_prefill"] is None  # every prompt went to prefill-0
    metrics = pd.metrics()
    assert "splitserve_kv_transfer_bytes_count" in metrics and "splitserve_prefill_queue_seconds_bucket" in metrics


def test_prompt_forms_and_n_copies_on_real_workers(pd, client):
    """Every prompt form; greedy copies are identical, seeded copy j draws what seed + j draws alone (vLLM's rule)."""
    m = model_id(pd)
    ids = [1, 403, 407, 261, 378]  # "Once upon a time"
    for prompt in (["Once upon a time", "The little dog"], [ids, ids[:3]]):
        out = complete(client, m, prompt, max_tokens=8, n=2)
        texts = [c.text for c in out.choices]
        assert [c.index for c in out.choices] == [0, 1, 2, 3] and texts[0] == texts[1] and texts[2] == texts[3]
        assert texts[0] == REF_TEXT[:len(texts[0])] and out.usage.completion_tokens == 32
    seeded = complete(client, m, "Once upon a time", max_tokens=12, n=2, seed=7, temperature=1.0)
    alone = [complete(client, m, "Once upon a time", max_tokens=12, seed=s, temperature=1.0).choices[0].text
             for s in (7, 8)]
    assert [c.text for c in seeded.choices] == alone
    chunks = list(complete(client, m, [ids, ids], max_tokens=6, n=2, stream=True, seed=7, temperature=1.0))
    streamed: dict[int, str] = {}
    for ch in chunks:
        for c in ch.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed[0] == streamed[2] == alone[0][:len(streamed[0])] and streamed[1] == streamed[3]


def test_logit_bias_max_tokens_zero_and_tokenize_on_real_workers(pd, client):
    m = model_id(pd)
    banned = complete(client, m, "Once upon a time", max_tokens=4, logit_bias={"432": -100})  # 432 is ","
    assert not banned.choices[0].text.startswith(",")
    forced = complete(client, m, "Once upon a time", max_tokens=3, logit_bias={"376": 100}, temperature=0.8,
                      extra_body={"ignore_eos": True})  # 376 is " little": sampled rows draw only it
    assert forced.choices[0].text.split() == ["little"] * 3
    full = complete(client, m, "Once upon a time", max_tokens=2, echo=True, logprobs=1)
    only = complete(client, m, "Once upon a time", max_tokens=0, echo=True, logprobs=1)
    assert only.choices[0].text == "Once upon a time" and only.usage.completion_tokens == 0
    assert only.choices[0].logprobs.token_logprobs == full.choices[0].logprobs.token_logprobs[:5]
    with urllib.request.urlopen(urllib.request.Request(
            f"{pd.url}/tokenize", data=json.dumps({"model": m, "prompt": "Once upon a time"}).encode(),
            headers={"Content-Type": "application/json"})) as r:
        tok = json.load(r)
    assert tok["tokens"] == [1, 403, 407, 261, 378] and tok["count"] == 5 and tok["max_model_len"] > 5
    with urllib.request.urlopen(urllib.request.Request(
            f"{pd.url}/detokenize", data=json.dumps({"tokens": tok["tokens"]}).encode(),
            headers={"Content-Type": "application/json"})) as r:
        assert json.load(r)["prompt"].strip() == "Once upon a time"


def test_n_copies_prefill_their_prompt_once(pd, client):
    """The copies of one prompt go to one prefill worker, which computes the prompt once and serves the other
    copies from its prefix cache (each copy still gets the same greedy text)."""
    m = model_id(pd)
    rng = random.Random(11)
    prompt = [1] + [rng.randrange(3, 500) for _ in range(80)]
    before = _prefill_tokens_settled(pd)
    out = complete(client, m, prompt, max_tokens=6, n=4)
    assert len({c.text for c in out.choices}) == 1
    computed = _prefill_tokens_settled(pd, above=before + len(prompt)) - before
    assert len(prompt) <= computed < 2 * len(prompt)  # 4 x 81 without sharing; 81 + 3 short tails with it


def _prefill_tokens_settled(c: Cluster, above: float = 0.0, timeout_s: float = 20.0) -> float:
    """The workers' prefill token counters summed, once at least ``above`` and unchanged over two heartbeats."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        total = sum(c.worker_gauge("prefill_tokens_total").values())
        if total >= above and total == last:
            return total
        last = total
        time.sleep(2.5)
    raise AssertionError(f"prefill token counters did not settle (last {last}, wanted >= {above})")
