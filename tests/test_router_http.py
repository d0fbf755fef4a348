"""The real router process over HTTP, called with the official ``openai`` client, against scripted workers.

Scripted workers (tests/fakes/scripted_worker.py) speak the real control protocol and emit a fixed
token script, so the expected text is known exactly; real workers are covered by the end-to-end tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).parent))
from fakes.router_harness import RouterHarness, wait_for  # noqa: E402

from splitserve.core.tokenizer import load_tokenizer  # noqa: E402

TOK = load_tokenizer("builtin:tiny-random-llama")
TEXT = " Hello world! Stop here. More text follows."
SCRIPT = TOK.encode(TEXT, add_special_tokens=False)
MODEL = "builtin:tiny-random-llama"
VOCAB = TOK.vocab_size
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    h = RouterHarness(tmp_path_factory.mktemp("r1"), admin_token=TOKEN)
    h.add_worker("w1", SCRIPT, vocab_size=VOCAB)
    yield h
    h.stop()


@pytest.fixture(scope="module")
def slow_router(tmp_path_factory):
    """One slow worker and room for one request in flight (429s, disconnects); admin API disabled."""
    h = RouterHarness(tmp_path_factory.mktemp("r2"), max_queued_requests=1)
    h.add_worker("slow", SCRIPT, delay=0.05)
    yield h
    h.stop()


def _expected(n: int) -> str:
    return TOK.decode([SCRIPT[i % len(SCRIPT)] for i in range(n)])


def _last_request_id(h: RouterHarness, wid: str) -> str:
    return [e for e in h.events(wid) if e["type"] == "GenerateReq"][-1]["request_id"]


def test_completion_stream_equals_non_stream_and_usage(router):
    c = router.client()
    full = c.completions.create(model=MODEL, prompt="Hi there", max_tokens=12, temperature=0)
    assert full.choices[0].text == _expected(12)
    assert full.choices[0].finish_reason == "length"
    n_prompt = len(TOK.encode("Hi there"))
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (n_prompt, 12)
    chunks = list(c.completions.create(model=MODEL, prompt="Hi there", max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.total_tokens == n_prompt + 12


def test_token_id_prompt_and_worker_gets_params(router):
    c = router.client()
    out = c.completions.create(model=MODEL, prompt=[1, 40, 41], max_tokens=3, temperature=0.5,
                               extra_body={"stop_token_ids": [7]})
    assert out.choices[0].text == _expected(3)
    gen = [e for e in router.events("w1") if e["type"] == "GenerateReq"][-1]
    assert gen["prompt_len"] == 3 and gen["max_tokens"] == 3 and gen["temperature"] == 0.5
    assert gen["stop_token_ids"] == [7] and gen["prefill_worker"] is None  # colocated worker prefills itself


@pytest.mark.parametrize("body, status", [
    ({"prompt": [1, 40, 41], "max_tokens": 3}, 200),  # token ids: parsed on the event loop when the body is small
    ({"prompt": "Hi there", "max_tokens": 3}, 200),  # text: tokenized on the tokenizer threads
    ({"prompt": [[1, 40], [1, 41, 42]], "max_tokens": 2}, 200),
    ({"prompt": [1, 40, VOCAB], "max_tokens": 3}, 400),  # an id outside the vocabulary, named
    ({"prompt": [1, 40], "max_tokens": 3, "temperature": -1}, 400),  # a bad field, named
])
def test_small_and_large_completion_bodies_give_one_answer(router, body, status):
    """A completions body up to ``INLINE_BODY_BYTES`` is parsed on the router's event loop, a larger one on its
    tokenizer threads: the same request, padded with JSON whitespace past the limit, gets the same answer."""
    from splitserve.router.app import INLINE_BODY_BYTES

    raw = json.dumps({"model": MODEL, "temperature": 0, **body}).encode()
    padded = raw[:-1] + b" " * INLINE_BODY_BYTES + b"}"
    small, large = (router.request("POST", "/v1/completions", raw=r) for r in (raw, padded))
    assert len(raw) <= INLINE_BODY_BYTES < len(padded)
    for got in (small, large):  # response ids and timestamps differ between any two requests
        if isinstance(got[1], dict):
            got[1].pop("id", None)
            got[1].pop("created", None)
    assert small == large and small[0] == status


def test_chat_role_first_and_stream_equals_non_stream(router):
    c = router.client()
    msgs = [{"role": "user", "content": "hello"}]
    full = c.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=8)
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].message.content == _expected(8)
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == len(TOK.encode(TOK.apply_chat_template(msgs), add_special_tokens=False))


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_trimmed_and_worker_aborted(router, stream):
    c = router.client()
    kwargs = dict(model=MODEL, prompt="x", max_tokens=40, stop=["Stop h", "zzz"])
    if stream:
        chunks = list(c.completions.create(stream=True, **kwargs))
        text = "".join(ch.choices[0].text for ch in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        out = c.completions.create(**kwargs)
        text, finish = out.choices[0].text, out.choices[0].finish_reason
    assert text == " Hello world! " and finish == "stop"
    rid = _last_request_id(router, "w1")
    wait_for(lambda: any(e["type"] == "AbortReq" and e["request_id"] == rid for e in router.events("w1")),
             what="AbortReq after the stop string")


def test_logprobs_completions_echo_and_chat(router):
    c = router.client()
    out = c.completions.create(model=MODEL, prompt="ab", max_tokens=3, logprobs=2, echo=True)
    lp = out.choices[0].logprobs
    n_prompt = len(TOK.encode("ab"))
    assert out.choices[0].text == "ab" + _expected(3)
    assert len(lp.tokens) == n_prompt + 3 and lp.token_logprobs[0] is None and lp.token_logprobs[-1] == -0.25
    assert len(lp.top_logprobs[-1]) == 2 and lp.text_offset == sorted(lp.text_offset)
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "q"}], max_tokens=2,
                                     logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert [x.token for x in content] == [TOK.decode([t]) for t in SCRIPT[:2]]
    assert len(content[0].top_logprobs) == 3 and content[0].logprob == -0.25


def _error(router, path, body=None, raw=None):
    status, data = router.request("POST", path, body=body, raw=raw)
    assert set(data["error"]) == {"message", "type", "param", "code"}
    return status, data["error"]


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "prompt": "x", "n": 0}, "n"),
    ({"model": MODEL, "prompt": 5}, "prompt"),
    ({"model": MODEL}, "prompt"),
    ({"model": MODEL, "prompt": "x" * 300}, "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 1000}, "max_tokens"),
])
def test_bad_completion_requests_name_the_field(router, body, param):
    status, err = _error(router, "/v1/completions", body=body)
    assert status == 400 and err["param"] == param and param in err["message"]


NAN, INF = float("nan"), float("inf")
POISON = [({"repetition_penalty": 1e-300}, "repetition_penalty"),
          ({"min_tokens": 1, "stop_token_ids": [100000]}, "stop_token_ids"),
          ({"min_tokens": 1, "temperature": 1e39}, "temperature")]
"""Requests that once killed a worker (issue 12)."""


@pytest.mark.parametrize("fields, param", POISON + [
    ({"temperature": NAN}, "temperature"), ({"top_p": INF}, "top_p"), ({"min_p": -INF}, "min_p"),
    ({"presence_penalty": NAN}, "presence_penalty"), ({"frequency_penalty": "0.5"}, "frequency_penalty"),
    ({"temperature": "0.5"}, "temperature"), ({"repetition_penalty": INF}, "repetition_penalty"),
    ({"max_tokens": NAN}, "max_tokens"), ({"seed": 2**64}, "seed"), ({"top_k": 2**40}, "top_k"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"), ({"stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ({"prompt": [1, VOCAB]}, "prompt"), ({"logprobs": 21}, "logprobs"),
])
def test_bad_sampling_values_get_400_and_never_reach_the_worker(router, fields, param):
    """NaN and Infinity go out as JSON's non-standard literals, which Python's json (and so the router) parses."""
    before = len(router.events("w1"))
    status, err = _error(router, "/v1/completions", body={"model": MODEL, "prompt": "x", **fields})
    assert status == 400 and err["type"] == "invalid_request_error"
    assert err["param"].split(".")[0] == param and param in err["message"]
    assert not [e for e in router.events("w1")[before:] if e["type"] == "GenerateReq"]


@pytest.mark.parametrize("fields, param", POISON)
def test_poison_requests_get_400_from_the_openai_client(router, fields, param):
    c = router.client()
    with pytest.raises(openai.BadRequestError) as exc:
        c.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body=fields)
    assert exc.value.param == param and param in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                  extra_body=fields)
    assert exc.value.param == param
    assert c.completions.create(model=MODEL, prompt="x", max_tokens=3).choices[0].text == _expected(3)


def test_invalid_json_and_bad_chat(router):
    status, err = _error(router, "/v1/completions", raw=b"{not json")
    assert status == 400 and "JSON" in err["message"]
    status, err = _error(router, "/v1/chat/completions", body={"model": MODEL, "messages": "hi"})
    assert status == 400 and err["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as exc:
        router.client().completions.create(model=MODEL, prompt="x", max_tokens=-3)
    assert "max_tokens" in str(exc.value)


def test_models_health_and_metrics(router):
    assert router.client().models.list().data[0].id == MODEL
    assert router.get("/health")[0] == 200
    router.client().completions.create(model=MODEL, prompt="m", max_tokens=4, stream=True).close()
    router.client().completions.create(model=MODEL, prompt="m", max_tokens=4)
    status, text = router.get("/metrics")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("splitserve_ttft_seconds", "splitserve_tpot_seconds", "splitserve_itl_seconds",
                 "splitserve_e2e_seconds", "splitserve_worker_kv_pages_free", "splitserve_worker_transfer_bytes",
                 "splitserve_requests_inflight", "splitserve_worker_running"):
        assert name in families, name
    ok = [s for s in families["splitserve_requests"].samples
          if s.labels.get("endpoint") == "/v1/completions" and s.labels.get("status") == "200"]
    assert ok and ok[0].value >= 1
    free = [s for s in families["splitserve_worker_kv_pages_free"].samples if s.labels["worker"] == "w1"]
    assert free and free[0].value <= 64


def test_client_disconnect_aborts_on_worker(slow_router):
    h = slow_router
    stream = h.client().completions.create(model=MODEL, prompt="x", max_tokens=200, stream=True)
    next(iter(stream))
    rid = _last_request_id(h, "slow")
    stream.close()
    wait_for(lambda: any(e["type"] == "AbortReq" and e["request_id"] == rid for e in h.events("slow")),
             what="AbortReq after the client disconnected")
    wait_for(lambda: h.status()["inflight"] == 0, what="the request to be dropped")


def test_overload_gets_429_and_admin_disabled_403(slow_router):
    h = slow_router
    wait_for(lambda: h.status()["inflight"] == 0, what="idle router")
    stream = h.client().completions.create(model=MODEL, prompt="x", max_tokens=200, stream=True)
    next(iter(stream))
    with pytest.raises(openai.RateLimitError):
        h.client().completions.create(model=MODEL, prompt="y", max_tokens=2)
    stream.close()
    assert h.request("GET", "/admin/workers", headers={"Authorization": "Bearer x"})[0] == 403


def test_no_workers_503_then_worker_death_mid_stream(tmp_path):
    h = RouterHarness(tmp_path, heartbeat_timeout_s=1.0)
    try:
        assert h.get("/health")[0] == 503
        with pytest.raises(openai.APIStatusError) as exc:
            h.client().completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert exc.value.status_code == 503
        h.add_worker("dying", SCRIPT, delay=0.02, die_after=3)
        assert h.get("/health")[0] == 200
        stream = h.client().completions.create(model=MODEL, prompt="x", max_tokens=50, stream=True)
        with pytest.raises(openai.APIError) as exc:
            for _ in stream:
                pass
        assert "stopped responding" in str(exc.value)
        assert h.get("/health")[0] == 503
        assert h.status()["inflight"] == 0
    finally:
        h.stop()


def test_disaggregated_routing_admin_and_no_chat_template(tmp_path, shared_models):
    h = RouterHarness(tmp_path, model=str(shared_models("stories260K")), admin_token=TOKEN)
    try:
        h.add_worker("p1", SCRIPT, role="prefill")
        h.add_worker("d1", SCRIPT, role="decode")
        model = h.client().models.list().data[0].id
        out = h.client().completions.create(model=model, prompt="Once", max_tokens=2)
        assert out.choices[0].finish_reason == "length"
        gen = [e for e in h.events("d1") if e["type"] == "GenerateReq"][-1]
        assert gen["prefill_worker"] == "p1"
        with pytest.raises(openai.BadRequestError) as exc:
            h.client().chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        assert "chat template" in str(exc.value)
        _admin_round_trip(h)
    finally:
        h.stop()


def _admin_round_trip(h: RouterHarness) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert h.request("GET", "/admin/workers", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert h.request("GET", "/admin/workers")[0] == 401
    status, data = h.request("GET", "/admin/workers", headers=auth)
    assert status == 200 and {w["worker_id"]: w["role"] for w in data["workers"]} == {"p1": "prefill", "d1": "decode"}
    assert h.request("POST", "/admin/workers/p1/role", body={"role": "bogus"}, headers=auth)[0] == 400
    assert h.request("POST", "/admin/workers/p1/role", body={"role": "both"}, headers=auth)[0] == 200
    wait_for(lambda: {"type": "SetRole", "role": "both"} in h.events("p1"), what="SetRole at the worker")
    assert h.request("POST", "/admin/workers/d1/drain", headers=auth)[0] == 200
    wait_for(lambda: {"type": "Drain"} in h.events("d1"), what="Drain at the worker")
    assert h.request("POST", "/admin/workers/nope/drain", headers=auth)[0] == 404
    # d1 drains: p1 (now "both") serves alone, colocated.
    h.client().completions.create(model=h.client().models.list().data[0].id, prompt="Once", max_tokens=2)
    assert [e for e in h.events("p1") if e["type"] == "GenerateReq"][-1]["prefill_worker"] is None
    assert h.request("DELETE", "/admin/workers/d1", headers=auth)[0] == 200
    assert [w["worker_id"] for w in h.status()["workers"]] == ["p1"]
    ext = {"worker_id": "ext", "role": "decode", "model_id": "m", "peer_addr": "", "transfer_addr": "tcp://x:1",
           "num_pages": 8, "page_size": 4, "max_model_len": 64}
    assert h.request("POST", "/admin/workers", body={**ext, "num_pages": "many"}, headers=auth)[0] == 400
    status, data = h.request("POST", "/admin/workers", body=ext, headers=auth)
    assert status == 201 and data["external"] and data["role"] == "decode"


def test_sigterm_finishes_inflight_stream_then_exits(tmp_path):
    h = RouterHarness(tmp_path, grace_period=30)
    try:
        h.add_worker("w", SCRIPT, delay=0.05)
        stream = h.client().completions.create(model=MODEL, prompt="x", max_tokens=20, stream=True)
        it = iter(stream)
        parts = [next(it).choices[0].text]
        h.router.send_signal(__import__("signal").SIGTERM)
        parts += [ch.choices[0].text for ch in it]
        assert "".join(parts) == _expected(20)
        assert h.router.wait(timeout=20) == 0
    finally:
        h.stop()


# --- issue 10: prompt forms, n, max_tokens=0, extras, model names, tokenize, access log ----------------------


def _texts_by_index(chunks) -> dict[int, str]:
    texts: dict[int, str] = {}
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    return texts


@pytest.mark.parametrize("prompt, lens", [
    ("Hi there", [len(TOK.encode("Hi there"))]),
    (["a", "bc d"], [len(TOK.encode("a")), len(TOK.encode("bc d"))]),
    ([1, 40, 41], [3]),
    ([[1, 40], [1, 41, 42], [5]], [2, 3, 1]),
])
@pytest.mark.parametrize("stream", [False, True])
def test_every_prompt_form_with_n_copies_is_a_choice_with_its_index(router, prompt, lens, stream):
    """Prompt i with n copies gives choices i*n .. i*n+n-1; usage counts each prompt once and every output."""
    c, n = router.client(), 2
    before = len([e for e in router.events("w1") if e["type"] == "GenerateReq"])
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=3, n=n, temperature=0)
    if stream:
        chunks = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        texts, usage = _texts_by_index(chunks), chunks[-1].usage
        finishes = {ch.choices[0].index: ch.choices[0].finish_reason for ch in chunks
                    if ch.choices and ch.choices[0].finish_reason}
        assert len({ch.id for ch in chunks}) == 1
    else:
        out = c.completions.create(**kwargs)
        assert [ch.index for ch in out.choices] == list(range(len(lens) * n))
        texts, usage = {ch.index: ch.text for ch in out.choices}, out.usage
        finishes = {ch.index: ch.finish_reason for ch in out.choices}
    assert texts == {i: _expected(3) for i in range(len(lens) * n)}
    assert finishes == {i: "length" for i in range(len(lens) * n)}
    assert (usage.prompt_tokens, usage.completion_tokens) == (sum(lens), 3 * n * len(lens))
    gens = [e for e in router.events("w1") if e["type"] == "GenerateReq"][before:]
    assert sorted(g["prompt_len"] for g in gens) == sorted(k for k in lens for _ in range(n))


def test_n_copies_in_chat_and_best_of_must_equal_n(router):
    c = router.client()
    msgs = [{"role": "user", "content": "hello"}]
    out = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, n=3)
    assert [ch.index for ch in out.choices] == [0, 1, 2]
    assert {ch.message.content for ch in out.choices} == {_expected(4)} and out.usage.completion_tokens == 12
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, n=2, stream=True))
    roles = [ch.choices[0].index for ch in chunks if ch.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]
    texts: dict[int, str] = {}
    for ch in chunks:
        texts[ch.choices[0].index] = texts.get(ch.choices[0].index, "") + (ch.choices[0].delta.content or "")
    assert texts == {0: _expected(4), 1: _expected(4)}
    assert len(c.completions.create(model=MODEL, prompt="x", max_tokens=2, n=2, best_of=2).choices) == 2
    with pytest.raises(openai.BadRequestError) as exc:
        c.completions.create(model=MODEL, prompt="x", max_tokens=2, n=2, best_of=4)
    assert exc.value.param == "best_of" and "best_of" in exc.value.message


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_zero_echo_gives_the_prompt_alone(router, stream):
    c = router.client()
    n_prompt = len(TOK.encode("ab cd"))
    kwargs = dict(model=MODEL, prompt="ab cd", max_tokens=0, echo=True, logprobs=1)
    if stream:
        chunks = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        tokens = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
        usage = chunks[-1].usage
    else:
        out = c.completions.create(**kwargs)
        text, tokens, usage = out.choices[0].text, out.choices[0].logprobs.tokens, out.usage
        assert out.choices[0].finish_reason == "length" and out.choices[0].logprobs.token_logprobs[1] == -1.0
    assert text == "ab cd" and len(tokens) == n_prompt
    assert (usage.prompt_tokens, usage.completion_tokens) == (n_prompt, 0)


def test_max_tokens_zero_without_echo_is_refused(router):
    c = router.client()
    with pytest.raises(openai.BadRequestError) as exc:
        c.completions.create(model=MODEL, prompt="x", max_tokens=0)
    assert exc.value.param == "max_tokens" and "max_tokens" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_completion_tokens=0)
    assert exc.value.param == "max_completion_tokens"
    assert c.completions.create(model=MODEL, prompt="x", max_tokens=0, echo=True).choices[0].text == "x"


REFUSED = [  # not implemented (suffix, functions...), or implemented and given a value they cannot take
    ("completions", {"suffix": " the end"}, "suffix"),
    ("completions", {"response_format": {"type": "xml"}}, "response_format"),
    ("completions", {"guided_json": {"type": 5}}, "guided_json"),
    ("completions", {"guided_regex": "[a-z"}, "guided_regex"),
    ("completions", {"guided_choice": []}, "guided_choice"),
    ("completions", {"guided_grammar": 5}, "guided_grammar"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format"),
    ("chat", {"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),
    ("chat", {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ("chat", {"guided_json": {"type": 5}}, "guided_json"),
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("completions", {"logit_bias": {"5": 150}}, "logit_bias"),
    ("completions", {"logit_bias": {str(VOCAB): 1}}, "logit_bias"),
]


@pytest.mark.parametrize("api, fields, param", REFUSED)
def test_unsupported_parameters_are_refused_by_name(router, api, fields, param):
    c = router.client()
    before = len(router.events("w1"))
    with pytest.raises(openai.BadRequestError) as exc:
        if api == "chat":
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                      extra_body=fields)
        else:
            c.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body=fields)
    assert exc.value.param.split(".")[0].split("[")[0] == param and param in exc.value.message  # or a path in it
    assert not [e for e in router.events("w1")[before:] if e["type"] == "GenerateReq"]


def test_harmless_values_of_refused_parameters_and_user_are_accepted(router):
    c = router.client()
    out = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                    response_format={"type": "text"}, tool_choice="none", user="user-7f3a")
    assert out.choices[0].message.content == _expected(2)
    biased = c.completions.create(model=MODEL, prompt="x", max_tokens=2, logit_bias={"5": -100, "7": 100})
    assert biased.choices[0].text == _expected(2)  # scripted worker: the bias is applied by real workers only
    assert "user-7f3a" not in router.router_log.read_text()


@pytest.mark.parametrize("stream", [False, True])
def test_stop_reason_and_include_stop_str_in_output(router, stream):
    c = router.client()

    def run(**kw):
        kw = {"model": MODEL, "prompt": "x", "max_tokens": 40, **kw}
        if not stream:
            out = c.completions.create(**kw)
            return out.choices[0].text, out.choices[0].finish_reason, out.choices[0].stop_reason
        chunks = [ch for ch in c.completions.create(stream=True, **kw) if ch.choices]
        last = chunks[-1].choices[0]
        return "".join(ch.choices[0].text for ch in chunks), last.finish_reason, last.stop_reason

    assert run(stop=["Stop h"]) == (" Hello world! ", "stop", "Stop h")
    assert run(stop=["Stop h"], extra_body={"include_stop_str_in_output": True}) == (
        " Hello world! Stop h", "stop", "Stop h")
    stop_id = SCRIPT[2]
    assert run(extra_body={"stop_token_ids": [stop_id]}) == (_expected(3), "stop", stop_id)
    assert run(max_tokens=2) == (_expected(2), "length", None)


def test_model_optional_and_unknown_model_is_404(router):
    status, data = router.request("POST", "/v1/completions", body={"prompt": "x", "max_tokens": 2})
    assert status == 200 and data["model"] == MODEL and data["choices"][0]["text"] == _expected(2)
    with pytest.raises(openai.NotFoundError) as exc:
        router.client().completions.create(model="nope", prompt="x", max_tokens=2)
    assert exc.value.code == "model_not_found" and exc.value.param == "model" and "nope" in exc.value.message
    with pytest.raises(openai.NotFoundError):
        router.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_served_model_name_aliases(tmp_path):
    h = RouterHarness(tmp_path, served_model_name="story,story-alias")  # the flag takes several names, comma-joined
    try:
        h.add_worker("w", SCRIPT)
        c = h.client()
        assert [m.id for m in c.models.list().data] == ["story", "story-alias"]
        for name in ("story", "story-alias"):
            out = c.completions.create(model=name, prompt="x", max_tokens=2)
            assert out.model == "story" and out.choices[0].text == _expected(2)
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="other", prompt="x", max_tokens=2)
    finally:
        h.stop()


def test_tokenize_detokenize_and_version(router):
    status, data = router.request("POST", "/tokenize", body={"model": MODEL, "prompt": "Hi there"})
    ids = TOK.encode("Hi there")
    assert status == 200 and data == {"tokens": ids, "count": len(ids), "max_model_len": 256}
    status, data = router.request("POST", "/tokenize", body={"prompt": "Hi", "add_special_tokens": False})
    assert data["tokens"] == TOK.encode("Hi", add_special_tokens=False)
    status, data = router.request("POST", "/detokenize", body={"model": MODEL, "tokens": ids})
    assert status == 200 and data == {"prompt": TOK.decode(ids)}
    status, data = router.request("POST", "/detokenize", body={"tokens": [1, VOCAB]})
    assert status == 400 and data["error"]["param"] == "tokens"
    status, data = router.request("POST", "/tokenize", body={"model": "nope", "prompt": "x"})
    assert status == 404 and data["error"]["code"] == "model_not_found"
    status, data = router.request("POST", "/tokenize", body={"model": MODEL})
    assert status == 400 and data["error"]["param"] == "prompt"
    from splitserve.router.version import package_version

    assert router.get("/version") == (200, {"version": package_version()})


def test_one_access_log_line_per_request_without_the_prompt(router):
    c = router.client()
    secret = "zebra quokka"
    out = c.completions.create(model=MODEL, prompt=secret, max_tokens=3, n=2)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt=secret, max_tokens=0)
    n_prompt = len(TOK.encode(secret))

    def lines():
        return [ln for ln in router.router_log.read_text().splitlines() if " access " in ln]

    ok = wait_for(lambda: [ln for ln in lines() if f"id={out.id} " in ln], what="the access-log line")
    assert len(ok) == 1 and "INFO" in ok[0] and "route=POST /v1/completions status=200" in ok[0]
    assert f"prompt_tokens={n_prompt} output_tokens=6" in ok[0] and "ttft_ms=" in ok[0] and "duration_ms=" in ok[0]
    fields = dict(part.split("=", 1) for part in ok[0].split(" access ", 1)[1].split() if "=" in part)
    assert 0 <= float(fields["prep_ms"]) <= float(fields["duration_ms"])  # reading the request, before the TTFT clock
    bad = wait_for(lambda: [ln for ln in lines() if "status=400" in ln and "max_tokens" in ln], what="the 400 line")
    assert "reason=" in bad[-1] and "INFO" in bad[-1]
    assert secret not in router.router_log.read_text()


def test_chat_template_flag_and_admin_token_file(tmp_path, shared_models):
    """--chat-template gives a model without one a chat API; --admin-token-file keeps the token out of argv."""
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    h = RouterHarness(tmp_path, model=str(shared_models("stories260K")), chat_template=str(template),
                      admin_token_file=str(token_file))
    try:
        h.add_worker("w", SCRIPT)
        out = h.client().chat.completions.create(messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                                 model=h.client().models.list().data[0].id)
        tok = load_tokenizer(str(shared_models("stories260K")))
        assert out.usage.prompt_tokens == len(tok.encode("hi|", add_special_tokens=False))
        status, body = h.request("GET", "/admin/workers", headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and body["workers"]
        assert TOKEN not in " ".join(h.router.args)
    finally:
        h.stop()
