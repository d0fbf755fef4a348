"""Tool calling in chat: parsers and streams as units, then the real stack (router + one worker, the built-in random
model, Qwen2.5's real chat template, --tool-call-parser hermes) driven by the official openai client."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from chat_templates import LLAMA31, QWEN25
from cluster import Cluster
from splitserve.core.tokenizer import load_tokenizer
from splitserve.router.openai_api import APIError, ChatCompletionRequest, parse_request
from splitserve.router.tools import ToolCallStream, check_tool_parser, parse_llama3_json, whole_message

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12,
                                                                                 "maximum": 14}},
                                       "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"}]
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'


# --- units --------------------------------------------------------------------------------------------------------


def _run(stream: ToolCallStream, text: str, step: int) -> tuple[str, list[dict]]:
    """Push ``text`` in pieces of ``step`` characters; (content, merged calls)."""
    content, deltas = "", []
    for i in range(0, len(text), step):
        c, d = stream.push(text[i:i + step])
        content, deltas = content + c, deltas + d
    c, d = stream.finish()
    calls: list[dict] = []
    for delta in deltas + d:
        if delta["index"] == len(calls):
            calls.append({"name": delta["function"]["name"], "arguments": delta["function"]["arguments"]})
        else:
            calls[delta["index"]]["arguments"] += delta["function"]["arguments"]
    return content + c, calls


@pytest.mark.parametrize("mode, parser, text, content, calls", [
    ("auto", "hermes", "Let me see. " + HERMES_CALL + "\n<tool_call>{\"name\": \"get_time\", \"arguments\": "
     "{\"zone\": 2}}</tool_call>", "Let me see. ",
     [("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {"zone": 2})]),
    ("auto", "hermes", "no call, only a <tool tag", "no call, only a <tool tag", []),
    ("auto", "hermes", "<tool_call>{\"name\": \"get_time\", \"arguments\": {\"zone\": 1}}", "",
     [("get_time", {"zone": 1})]),  # the closing tag may be cut by EOS
    ("auto", "hermes", "<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ("auto", "llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "f"}}; '
     '{"name": "get_time", "parameters": {"zone": -3}}', "",
     [("get_weather", {"city": "Oslo", "unit": "f"}), ("get_time", {"zone": -3})]),
    ("auto", "llama3_json", "  Just {text}", "  Just {text}", []),
    ("auto", "llama3_json", '{"name": 5}', '{"name": 5}', []),
    ("required", None, '[{"name": "get_time", "parameters": {"zone": 4}}]', "", [("get_time", {"zone": 4})]),
    ("required", None, '[{"name": "get_time", "param', '[{"name": "get_time", "param', []),
])
def test_tool_call_streams_give_the_same_result_in_any_pieces(mode, parser, text, content, calls):
    for step in (1, 3, 7, len(text)):
        got_content, got_calls = _run(ToolCallStream(mode, parser), text, step)
        assert got_content == content
        assert [(c["name"], json.loads(c["arguments"])) for c in got_calls] == calls
    whole_content, whole_calls = whole_message(ToolCallStream(mode, parser), text)
    assert (whole_content or "") == content and len(whole_calls) == len(calls)
    reason = ToolCallStream(mode, parser)
    _run(reason, text, 5)
    assert reason.finish_reason("stop") == ("tool_calls" if calls else "stop")
    assert reason.finish_reason("length") == "length"


def test_named_calls_stream_their_arguments_and_keep_stop():
    stream = ToolCallStream("named", None, "get_time")
    content, calls = _run(stream, '{"zone": 11}', 4)
    assert content == "" and calls == [{"name": "get_time", "arguments": '{"zone": 11}'}]
    assert stream.finish_reason("stop") == "stop"
    assert parse_llama3_json('<|python_tag|>{"name": "f", "arguments": "{\\"a\\": 1}"}') == [("f", '{"a": 1}')]


def test_auto_needs_a_parser_and_tools_render_in_llama31():
    req = parse_request(ChatCompletionRequest, {"messages": ASK, "tools": TOOLS})
    with pytest.raises(APIError) as e:
        check_tool_parser(req, None)
    assert e.value.param == "tool_choice" and "--tool-call-parser" in e.value.message
    check_tool_parser(parse_request(ChatCompletionRequest, {"messages": ASK, "tools": TOOLS,
                                                            "tool_choice": "required"}), None)
    turn = ASK + [{"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                  "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    req = parse_request(ChatCompletionRequest, {"messages": turn, "tools": TOOLS})
    tok = load_tokenizer("builtin:tiny-random-llama")
    tok.set_chat_template(LLAMA31)
    text = tok.apply_chat_template(req.template_messages(), tools=req.template_tools())
    assert '"name": "get_time"' in text  # the tools, in the first user message
    assert '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}<|eot_id|>' in text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n\"18 C, sunny\"<|eot_id|>" in text


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
    ({"tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tool_fields_are_400s_naming_them(body, param):
    with pytest.raises(APIError) as e:
        parse_request(ChatCompletionRequest, {"messages": ASK, "tools": TOOLS, **body})
    assert e.value.status == 400 and e.value.param == param and param.split(".")[0] in e.value.message


# --- the real stack -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    logs = tmp_path_factory.mktemp("tools")
    template = logs / "qwen.jinja"
    template.write_text(QWEN25)
    c = Cluster(model="builtin:tiny-random-llama", prefill=0, decode=0, colocated=1, log_dir=logs,
                worker_args=["--page-size", "16", "--num-pages", "1024"],
                router_args=["--chat-template", str(template), "--tool-call-parser", "hermes",
                             "--served-model-name", "m"]).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(client, stream: bool, **kw):
    """(content, calls as [{"id", "name", "arguments"}], finish_reason, usage) of one chat request."""
    kw.setdefault("messages", ASK)
    kw.setdefault("temperature", 1.0)
    if not stream:
        out = client.chat.completions.create(model="m", tools=TOOLS, **kw)
        msg = out.choices[0].message
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in msg.tool_calls or ()]
        return msg.content, calls, out.choices[0].finish_reason, out.usage
    content, calls, finish = "", [], None
    for chunk in client.chat.completions.create(model="m", tools=TOOLS, stream=True, **kw):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or ():
            if d.index == len(calls):
                assert d.id and d.type == "function" and d.function.name
                calls.append({"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""})
            else:
                assert d.id is None and d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments
        finish = choice.finish_reason or finish
    return content or None, calls, finish, None


def _valid(call: dict) -> dict:
    args = json.loads(call["arguments"])
    jsonschema.validate(args, SCHEMAS[call["name"]])
    return args


@pytest.mark.parametrize("stream", [False, True])
def test_required_forces_a_valid_call_from_a_random_model(client, stream):
    for seed in range(3):
        content, calls, finish, _ = _chat(client, stream, tool_choice="required", parallel_tool_calls=False,
                                          seed=seed)
        assert content is None and finish == "tool_calls" and len(calls) == 1
        assert calls[0]["id"].startswith("call_")
        _valid(calls[0])
    _content, calls, finish, _ = _chat(client, stream, tool_choice="required", seed=7, max_tokens=600)
    assert finish == "tool_calls" and calls and all(_valid(c) is not None for c in calls)


@pytest.mark.parametrize("stream", [False, True])
def test_named_function_forces_its_arguments(client, stream):
    content, calls, finish, _ = _chat(client, stream, seed=3,
                                      tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert content is None and finish == "stop" and [c["name"] for c in calls] == ["get_time"]
    assert -12 <= _valid(calls[0])["zone"] <= 14


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_hermes_calls_and_passes_text_through(client, stream):
    content, calls, finish, _ = _chat(client, stream, extra_body={"guided_choice": ["Let me see. " + HERMES_CALL]})
    assert content == "Let me see. " and finish == "tool_calls"
    assert [(c["name"], _valid(c)) for c in calls] == [("get_weather", {"city": "Paris", "unit": "c"})]
    content, calls, finish, _ = _chat(client, stream, extra_body={"guided_choice": ["Sunny, <tool call> later"]})
    assert content == "Sunny, <tool call> later" and calls == [] and finish == "stop"


def test_a_call_round_trips_through_a_tool_message(client):
    """Turn 1 calls a tool; turn 2 sends the call and its result back, rendered by the template; the answer is text."""
    _content, calls, _finish, _ = _chat(client, False, tool_choice="required", parallel_tool_calls=False, seed=1)
    call = calls[0]
    turn2 = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "18 C and sunny"}]
    content, calls2, finish, usage = _chat(client, False, messages=turn2, tool_choice="auto",
                                           extra_body={"guided_choice": ["It is 18 C and sunny."]})
    assert content == "It is 18 C and sunny." and calls2 == [] and finish == "stop"
    tok = load_tokenizer("builtin:tiny-random-llama")
    tok.set_chat_template(QWEN25)
    req = parse_request(ChatCompletionRequest, {"messages": turn2, "tools": TOOLS})
    rendered = tok.apply_chat_template(req.template_messages(), tools=req.template_tools())
    assert "<tool_response>\n18 C and sunny\n</tool_response>" in rendered
    assert f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {json.dumps(json.loads(call["arguments"]))}}}' \
        in rendered
    assert usage.prompt_tokens == len(tok.encode(rendered, add_special_tokens=False))
    _c, _calls, _f, bare = _chat(client, False, messages=turn2, tool_choice="none", max_tokens=1)
    assert bare.prompt_tokens < usage.prompt_tokens  # "none": the tools are not rendered


def test_bad_tool_requests_are_400s_through_the_client(client):
    for kw, param in [({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
                      ({"tool_choice": "required", "extra_body": {"guided_regex": "x"}}, "tool_choice")]:
        with pytest.raises(openai.BadRequestError) as e:
            _chat(client, False, **kw)
        assert e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt="x", extra_body={"tools": TOOLS})
    assert e.value.body["param"] == "tools"
