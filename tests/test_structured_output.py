"""Structured output (xgrammar): matcher and sampler units, then the real stack (router, prefill and decode workers as
processes) driven by the official openai client, every output checked with jsonschema."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from chat_templates import QWEN25
from cluster import Cluster
from conftest import shared_model_path
from splitserve.core.config import EngineConfig
from splitserve.core.engine.engine import LLMEngine
from splitserve.core.engine.grammar import (BATCH_FILL_MIN_ROWS, GrammarStates, StepBitmask, apply_bitmask_reference,
                                            apply_masks)
from splitserve.core.engine.sampler import SampleInput, argmax_only, masked_argmax_only, sample_batch
from splitserve.core.messages import SamplingParams
from splitserve.core.tokenizer import decode_continuation, load_tokenizer
from splitserve.router.openai_api import APIError, ChatCompletionRequest, CompletionRequest, parse_request

BUILTIN = "builtin:tiny-random-llama"

# --- schemas whose every instance is short (so a tiny model always finishes inside max_tokens) ---------------------

_names = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=4)
_leaf = st.one_of(
    st.builds(lambda lo, n: {"type": "string", "minLength": lo, "maxLength": lo + n},
              st.integers(0, 2), st.integers(0, 5)),
    st.builds(lambda lo, n: {"type": "integer", "minimum": lo, "maximum": lo + n},
              st.integers(-50, 50), st.integers(0, 200)),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.text("abcxyz ", min_size=1, max_size=5), min_size=1, max_size=4, unique=True).map(
        lambda v: {"enum": v}),
    st.text("abc", min_size=1, max_size=4).map(lambda v: {"const": v}),
)


def _object(values: st.SearchStrategy) -> st.SearchStrategy:
    props = st.dictionaries(_names, values, min_size=1, max_size=3)
    return props.flatmap(lambda p: st.lists(st.sampled_from(sorted(p)), unique=True).map(
        lambda req: {"type": "object", "properties": p, "required": req, "additionalProperties": False}))


_inner = st.one_of(_leaf, st.builds(lambda item, n: {"type": "array", "items": item, "maxItems": n},
                                    _leaf, st.integers(0, 2)))
SCHEMAS = _object(st.one_of(_inner, _object(_leaf)))
"""Objects of up to 3 properties (some required), values: bounded strings and integers, booleans, null, enums,
consts, short arrays and one more level of objects; no additional properties."""


@pytest.fixture(scope="module")
def builtin_grammars():
    tok = load_tokenizer(BUILTIN)
    return tok, GrammarStates(lambda: tok, tok.vocab_size, tok.eos_token_ids)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_every_valid_instance_is_allowed_token_by_token(builtin_grammars, data):
    """hypothesis-generated schemas and instances: each instance, as compact JSON with its properties in the schema's
    order (the order the grammar writes them in), passes the mask at every token and ends the matcher on EOS.
    xgrammar 0.2.9 writes length-bounded strings without escape sequences (a narrowing, never an invalid output),
    so instances whose strings need escaping are left out."""
    tok, states = builtin_grammars
    schema = data.draw(SCHEMAS)
    instance = _in_schema_order(data.draw(from_schema(schema).filter(lambda v: not _needs_escape(v))), schema)
    jsonschema.validate(instance, schema)
    state = states.add("unit", ("json", json.dumps(schema)))
    logits = torch.zeros(1, tok.vocab_size)
    for token in tok.encode(json.dumps(instance, ensure_ascii=False), add_special_tokens=False) + [2]:
        row = logits.clone()
        apply_masks(row, [(0, state)])
        assert row[0, token] == 0, f"token {token} masked in {json.dumps(instance)!r} for {schema}"
        assert states.accept("unit", token) == ("stop" if token == 2 else None)
    states.discard("unit")


def _needs_escape(value) -> bool:
    if isinstance(value, str):
        return any(c in '"\\' or ord(c) < 0x20 for c in value)
    if isinstance(value, dict):
        return any(_needs_escape(k) or _needs_escape(v) for k, v in value.items())
    return isinstance(value, list) and any(_needs_escape(v) for v in value)


def _in_schema_order(value, schema):
    if isinstance(value, dict):
        props = schema.get("properties", {})
        return {k: _in_schema_order(value[k], props[k]) for k in props if k in value}
    if isinstance(value, list):
        return [_in_schema_order(v, schema.get("items", {})) for v in value]
    return value


def test_masks_sampler_and_cache(builtin_grammars):
    tok, states = builtin_grammars
    spec = ("choice", json.dumps(["yes", "no"]))
    a, b = states.add("a", spec), states.add("b", spec)
    assert states.cache.get(*spec) is states.cache.get(*spec)  # compiled once
    logits = torch.randn(3, tok.vocab_size)
    raw = logits.clone()
    greedy = SamplingParams(temperature=0.0, grammar=spec)
    assert not argmax_only(greedy) and masked_argmax_only(greedy)  # overlapped decode: mask and argmax on the device
    assert not masked_argmax_only(SamplingParams(temperature=0.0, grammar=spec, logprobs=1))
    inputs = [SampleInput(greedy, (1,), (), grammar=a), SampleInput(SamplingParams(temperature=0.0), (1,), ()),
              SampleInput(SamplingParams(temperature=1.0, seed=3, logprobs=2, grammar=spec), (1,), (), grammar=b)]
    tokens, lps = sample_batch(logits, inputs)
    allowed = {tok.encode("yes", add_special_tokens=False)[0], tok.encode("no", add_special_tokens=False)[0]}
    assert tokens[0] in allowed and tokens[2] in allowed and tokens[1] == int(raw[1].argmax())
    assert torch.equal(logits, raw)  # logprobs asked: the mask went on a copy, logprobs are the model's own
    assert lps[2].logprob == pytest.approx(float(torch.log_softmax(raw[2], -1)[tokens[2]]))
    tokens, _ = sample_batch(logits[:2], inputs[:2])  # the batched argmax path applies the mask too
    assert tokens[0] in allowed
    states.retain(set())
    assert len(states) == 0


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_step_bitmask_matches_the_torch_reference(device):
    """The overlapped path's reused bitmask (xgrammar's kernel on the logits' device) against a torch reference, on
    random bits, rows and vocabularies (not multiples of 32), reusing the buffer across steps and growing it."""
    gen = torch.Generator().manual_seed(0)
    step = StepBitmask(1000, torch.device(device), capacity=4)
    for n in (3, 1, 4, 9, 6):
        logits = torch.randn(n, 1000, generator=gen).to(device)
        rows = step.rows(n)
        assert rows.shape == (n, 32) and rows.dtype == torch.int32
        masked = sorted(torch.randperm(n, generator=gen)[: max(1, n // 2)].tolist())
        for r in masked:
            rows[r] = torch.randint(-2**31, 2**31, (32,), generator=gen, dtype=torch.int64).to(torch.int32)
        expect = logits.clone()
        expect[masked] = apply_bitmask_reference(logits[masked], rows[masked].to(device))
        step.apply(logits, masked)
        assert torch.equal(logits.cpu(), expect.cpu())


def test_fill_rows_batched_equals_row_by_row_and_isolates_a_failing_matcher(builtin_grammars):
    tok, states = builtin_grammars
    specs = [("choice", json.dumps(["yes", "no"])), ("regex", "[0-9]{2}"), ("json_object", "")]
    for i in range(6):
        states.add(f"f{i}", specs[i % 3])
        states.accept(f"f{i}", tok.encode("{" if i % 3 == 2 else ("y" if i % 3 == 0 else "4"),
                                          add_special_tokens=False)[0])
    rows = [(5 - i, f"f{i}") for i in range(6)]
    one = torch.zeros(6, (tok.vocab_size + 31) // 32, dtype=torch.int32)
    for row, rid in rows:
        states.get(rid).fill(one, row)
    states.batch_fill_min_rows = 2
    batched = torch.zeros_like(one)
    assert states.fill_rows(batched, rows) == []
    assert torch.equal(batched, one)

    class Broken:  # the threaded call raises; row by row, only the broken matcher's request fails
        def batch_fill_next_token_bitmask(self, *args):
            raise RuntimeError("injected")

    class BrokenGrammar(type(states.get("f0"))):
        def fill(self, bitmask, row):
            raise RuntimeError("matcher out of step")

    states._batch_matcher, states._states["f3"] = Broken(), BrokenGrammar("f3", states.get("f3").matcher)
    again = torch.zeros_like(one)
    failed = states.fill_rows(again, rows)
    assert [(rid, str(exc)) for rid, exc in failed] == [("f3", "matcher out of step")]
    assert torch.equal(again[[0, 1, 3, 4, 5]], one[[0, 1, 3, 4, 5]])
    states._batch_matcher, states.batch_fill_min_rows = None, BATCH_FILL_MIN_ROWS
    states.retain(set())


def test_invalid_grammars_fail_naming_the_field(builtin_grammars):
    _tok, states = builtin_grammars
    for grammar, field in [(("regex", r"\p{L}"), "guided_regex"), (("grammar", "root ::= nothing"), "guided_grammar"),
                           (("json", '{"type": "strin"}'), "guided_json"), (("choice", "[]"), "guided_choice")]:
        with pytest.raises(ValueError, match=f"invalid grammar in .*{field}"):
            states.add("x", grammar)


def test_prefill_then_decode_replays_the_first_token():
    """The prefill side masks token 0; the decode side replays it into a fresh matcher before masking token 1
    (one engine plays both sides here; the decode side's pages hold no real KV, which only changes the logits)."""
    eng = LLMEngine(EngineConfig(model=BUILTIN, num_pages=64, page_size=8))
    tok = load_tokenizer(BUILTIN)
    prompt = tok.encode("Answer:")
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=5, grammar=("regex", "[0-9]{2}-[ab]{3}"))
    first = eng.add_request("p", prompt, params, prefill_only=True)
    while eng.has_unfinished():
        eng.step()
    assert chr(first.output_token_ids[0] - 3).isdigit()  # byte tokenizer: id = byte + 3
    assert eng.reserve("d", len(prompt) + 1) is not None
    assert eng.add_prefilled("d", prompt, params, first.output_token_ids[0]) is None
    req = eng.scheduler.requests["d"]
    while eng.has_unfinished():
        eng.step()
    text = decode_continuation(tok, prompt, req.output_token_ids)
    assert req.finish_reason == "stop" and len(text) == 6 and text[2] == "-", text
    assert len(eng.grammars) == 0  # matchers leave with their requests
    assert eng.reserve("e", len(prompt) + 1) is not None
    with pytest.raises(ValueError, match="not allowed by the request's grammar"):
        eng.add_prefilled("e", prompt, params, tok.encode("x", add_special_tokens=False)[0])
    eng.release("e")
    # with ignore_eos the EOS token does not end the request: the matcher terminating on it does
    done, = eng.generate([prompt], SamplingParams(max_tokens=40, temperature=1.0, seed=2, ignore_eos=True,
                                                  grammar=("choice", '["ok", "no"]')))
    assert done.finish_reason == "stop" and done.output_token_ids[-1] == 2
    assert decode_continuation(tok, prompt, done.output_token_ids) in ("ok", "no")


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"guided_json": "{not json"}, "guided_json"), ({"guided_json": {"type": 3}}, "guided_json"),
    ({"guided_regex": "(a"}, "guided_regex"), ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": " "}, "guided_grammar"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"guided_whitespace_pattern": " *"}, "guided_whitespace_pattern"),
    ({"structured_outputs": {"regex": "a"}}, "structured_outputs"),
    ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
])
def test_bad_structured_output_fields_are_400s_naming_them(body, param):
    with pytest.raises(APIError) as e:
        parse_request(CompletionRequest, {"prompt": "x", **body})
    assert e.value.status == 400 and e.value.param == param and param.split(".")[0] in e.value.message


def test_structured_output_maps_to_the_grammar():
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert parse_request(ChatCompletionRequest, {**chat, "response_format": {"type": "json_object"}}).grammar == (
        "json_object", "")
    assert parse_request(CompletionRequest, {"prompt": "x", "guided_choice": ["a", "b"]}).grammar == (
        "choice", '["a", "b"]')
    req = parse_request(CompletionRequest, {"prompt": "x", "response_format": {"type": "text"}})
    assert req.grammar is None


# --- the real stack -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pd(tmp_path_factory):
    logs = tmp_path_factory.mktemp("structured")
    template = logs / "qwen.jinja"
    template.write_text(QWEN25)
    c = Cluster(model=str(shared_model_path("stories260K")), log_dir=logs,
                worker_args=["--page-size", "8", "--num-pages", "1024", "--max-num-seqs", "128"],
                router_args=["--chat-template", str(template), "--served-model-name", "m"]).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(pd):
    return openai.OpenAI(base_url=f"{pd.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _schema_batch(n: int) -> list[dict]:
    """``n`` distinct schemas with a required property, drawn by hypothesis (fixed seed, no shrinking: the same
    varied schemas every run)."""
    found: dict[str, dict] = {}

    @seed(20261130)
    @settings(max_examples=20 * n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(SCHEMAS)
    def draw(schema):
        if len(found) < n and schema["required"]:  # at least one property in every output
            found.setdefault(json.dumps(schema, sort_keys=True), schema)

    draw()
    assert len(found) == n
    return list(found.values())


def test_outputs_always_parse_and_match_their_schema(pd):
    """50 generated schemas, each through completions (non-streamed) and chat (streamed), all at once."""
    schemas = _schema_batch(50)

    async def completion(ac, i, schema):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
        out = await ac.completions.create(model="m", prompt="Once upon a time", max_tokens=400, temperature=0.8,
                                          seed=i, extra_body={"response_format": fmt})
        return out.choices[0].text, out.choices[0].finish_reason

    async def chat(ac, i, schema):
        stream = await ac.chat.completions.create(
            model="m", messages=[{"role": "system", "content": "JSON"}, {"role": "user", "content": "Tell me"}],
            max_tokens=350, temperature=0.8, seed=i, stream=True,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}})
        text, finish = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def run():
        ac = openai.AsyncOpenAI(base_url=f"{pd.url}/v1", api_key="unused", max_retries=0, timeout=300)
        jobs = [f(ac, i, s) for i, s in enumerate(schemas) for f in (completion, chat)]
        results = await asyncio.gather(*jobs)
        await ac.close()
        return results

    results = asyncio.run(run())
    assert len({text for text, _ in results}) >= 50  # varied outputs, not one trivial object
    for k, (text, finish) in enumerate(results):
        schema = schemas[k // 2]
        assert finish == "stop", (text, schema)
        jsonschema.validate(json.loads(text), schema)


def test_regex_choice_grammar_and_json_object(client):
    def text(stream: bool, **extra):
        out = client.completions.create(model="m", prompt="Once upon a time", max_tokens=60, temperature=1.0,
                                        seed=1, stream=stream, extra_body=extra)
        if not stream:
            return out.choices[0].text
        return "".join(c.choices[0].text for c in out if c.choices)

    for stream in (False, True):
        assert text(stream, guided_choice=["happy", "sad", "a big dog"]) in ("happy", "sad", "a big dog")
        code = text(stream, guided_regex=r"[A-Z]{2}-[0-9]{3}")
        assert len(code) == 6 and code[:2].isupper() and code[3:].isdigit()
        assert text(stream, guided_grammar='root ::= "yes" | "no" | ("maybe" [0-9])') in (
            ["yes", "no"] + [f"maybe{i}" for i in range(10)])
        obj = text(stream, guided_json={"type": "object", "properties": {"ok": {"type": "boolean"}},
                                        "required": ["ok"], "additionalProperties": False})
        assert json.loads(obj)["ok"] in (True, False)
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=300,
                                          temperature=0, response_format={"type": "json_object"})
    if chat.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(chat.choices[0].message.content), dict)
    else:  # a free-form object may run past max_tokens; it is still a prefix of one
        assert chat.choices[0].message.content.startswith("{")


def test_bad_grammars_are_400s_naming_the_field(client):
    cases = [({"guided_json": {"type": "strin"}}, "guided_json"), ({"guided_regex": "(x"}, "guided_regex"),
             ({"guided_choice": []}, "guided_choice"),
             ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"minimum": "0"}}}},
              "response_format.json_schema.schema"),
             # valid for the router's checks, refused by xgrammar on the worker: still a 400 naming the field
             ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
             ({"guided_regex": r"\p{L}+"}, "guided_regex")]
    for extra, param in cases:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                out = client.completions.create(model="m", prompt="x", max_tokens=5, stream=stream, extra_body=extra)
                list(out) if stream else None
            assert e.value.body["param"] == param and param.split(".")[0] in e.value.body["message"], e.value.body
