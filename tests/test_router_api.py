"""Pure tests of request validation, error bodies, output processing and logprob formatting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from splitserve.core.messages import TokenLogprob, TokenOut
from splitserve.core.tokenizer import IncrementalDetokenizer, StopChecker, load_tokenizer
from splitserve.router.openai_api import (
    APIError, ChatCompletionRequest, CompletionRequest, check_prompt_chars, check_token_ids, copy_params, echo_only,
    parse_json_body, parse_request, to_sampling_params,
)
from splitserve.router.output import CompletionLogprobs, OutputProcessor, WorkerFailed, chat_logprobs

TOK = load_tokenizer("builtin:tiny-random-llama")


def _err(cls, body) -> APIError:
    with pytest.raises(APIError) as exc:
        parse_request(cls, body)
    assert exc.value.status == 400
    assert set(exc.value.body()["error"]) == {"message", "type", "param", "code"}
    return exc.value


@pytest.mark.parametrize("field, value", [
    ("max_tokens", -1), ("max_tokens", "ten"), ("temperature", -0.5), ("top_p", 0), ("top_k", -2),
    ("min_p", 1.5), ("seed", 1.5), ("stop", 3), ("stop", [""]), ("stop_token_ids", ["a"]), ("n", 0), ("n", 129), ("n", 1.0),
    ("logprobs", 21), ("echo", "yes"), ("presence_penalty", 3), ("stream", "true"), ("best_of", 2),
    # strict, finite, bounded: strings, NaN and infinities are refused for every number (issue 12)
    ("temperature", "0.5"), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", 1e39),
    ("top_p", "0.5"), ("top_p", float("nan")), ("min_p", float("-inf")), ("min_p", True), ("top_k", 2**40),
    ("repetition_penalty", 1e-300), ("repetition_penalty", 0), ("repetition_penalty", float("inf")),
    ("repetition_penalty", "1.1"), ("presence_penalty", float("nan")), ("frequency_penalty", "1"),
    ("frequency_penalty", -2.5), ("seed", 2**64), ("seed", -(2**63) - 1), ("seed", 1e30), ("min_tokens", -1),
    ("min_tokens", 1.0), ("max_tokens", float("inf")), ("logprobs", -1), ("stop_token_ids", [-1]),
    ("stop_token_ids", [2**31]), ("prompt", [1, 2**31]),
])
def test_completion_field_errors_name_the_field(field, value):
    err = _err(CompletionRequest, {"model": "m", "prompt": "x", field: value})
    assert err.param.split(".")[0] == field and field in err.message


@pytest.mark.parametrize("prompt, prompts", [
    ("x", ["x"]), ("", [""]), ([1, 2], [[1, 2]]), (["a", "b"], ["a", "b"]), ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_every_prompt_form_gives_one_entry_per_prompt(prompt, prompts):
    assert parse_request(CompletionRequest, {"prompt": prompt}).prompts() == prompts


@pytest.mark.parametrize("prompt", [[], [[]], [1, -2], [1, "a"], ["a", [1]], [True], [[1, 2**31]], 5, None, [1.0]])
def test_bad_prompt_forms_name_the_prompt_and_the_forms(prompt):
    err = _err(CompletionRequest, {"model": "m", "prompt": prompt})
    assert err.param == "prompt" and "list of token-id lists" in err.message


@pytest.mark.parametrize("body, param", [
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"bogus": 1}}, "stream_options.bogus"),
    ({"n": 2, "best_of": 3}, "best_of"), ({"best_of": 0}, "best_of"), ({"max_tokens": 0}, "max_tokens"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"a": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"), ({"logit_bias": {"5": "1"}}, "logit_bias.5"),
    ({"suffix": "end"}, "suffix"), ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"tools": [{"type": "function"}]}, "tools"), ({"tool_choice": "auto"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"), ({"guided_json": {"type": 5}}, "guided_json"),
    ({"guided_regex": "(a"}, "guided_regex"), ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": " "}, "guided_grammar"),
])
def test_field_rules_and_refused_parameters_name_the_field(body, param):
    err = _err(CompletionRequest, {"prompt": "x", **body})
    assert err.param == param and param.split(".")[0] in err.message


def test_accepted_extras_map_to_sampling_params_and_copies_get_their_seed():
    req = parse_request(CompletionRequest, {"prompt": "x", "n": 3, "best_of": 3, "seed": 2**64 - 2, "user": "u",
                                            "logit_bias": {"7": -100, "3": 2.5}, "include_stop_str_in_output": True,
                                            "response_format": {"type": "text"}, "tool_choice": "none"})
    p = to_sampling_params(req, 4, 100, "prompt")
    assert p.logit_bias == ((3, 2.5), (7, -100.0)) and req.include_stop_str_in_output
    assert [copy_params(p, j).seed for j in range(3)] == [2**64 - 2, 2**64 - 1, 0]  # seed + j, wrapped at 2**64
    assert copy_params(to_sampling_params(parse_request(CompletionRequest, {"prompt": "x"}), 4, 100, "prompt"),
                       2).seed is None
    echo = parse_request(CompletionRequest, {"prompt": "x", "max_tokens": 0, "echo": True})
    assert echo_only(echo) and to_sampling_params(echo, 4, 100, "prompt").max_tokens == 1
    chat = {"messages": [{"role": "user", "content": "x"}]}
    assert _err(ChatCompletionRequest, {**chat, "max_completion_tokens": 0}).param == "max_completion_tokens"
    assert _err(ChatCompletionRequest, {**chat, "tools": [{"type": "function"}]}).param == "tools.0.function"


def test_prompt_forms_and_chat_fields():
    assert parse_request(CompletionRequest, {"model": "m", "prompt": [1, 2]}).prompt == [1, 2]
    assert _err(CompletionRequest, {"model": "m", "prompt": [1, -2]}).param == "prompt"
    assert _err(CompletionRequest, {"model": "m", "prompt": []}).param == "prompt"
    assert _err(ChatCompletionRequest, {"model": "m", "messages": []}).param == "messages"
    assert _err(ChatCompletionRequest, {"model": "m", "messages": [{"content": "x"}]}).param == "messages.0.role"
    err = _err(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                       "max_completion_tokens": -1})
    assert err.param == "max_completion_tokens"
    req = parse_request(ChatCompletionRequest, {"model": "m", "user": "u1", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert req.template_messages() == [{"role": "user", "content": "ab"}]


def test_invalid_json_bodies():
    for raw in (b"{", b"[1, 2]", b"\xff", b"[" * 10_000, b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                b'{"seed": 1' + b"0" * 5000 + b"}", b""):
        with pytest.raises(APIError) as exc:
            parse_json_body(raw)
        assert exc.value.status == 400 and exc.value.code == "invalid_json"


@pytest.mark.parametrize("raw, param", [
    (b'{"prompt": "\\ud800"}', "prompt"), (b'{"a": {"b": ["x", "\\uDC00y"]}}', "a.b.1"),
    (b'{"\\ud800": 1}', "\ud800"),
])
def test_lone_surrogates_are_refused_by_field(raw, param):
    with pytest.raises(APIError) as exc:
        parse_json_body(raw)
    assert exc.value.status == 400 and exc.value.param == param and exc.value.code == "invalid_unicode"


def test_valid_surrogate_pairs_and_escaped_backslashes_pass():
    assert parse_json_body(b'{"p": "\\ud83d\\ude00", "q": "\\\\ud800"}') == {"p": "\U0001f600", "q": "\\ud800"}


def test_prompt_character_limit_before_tokenizing():
    chat = parse_request(ChatCompletionRequest, {"messages": [{"role": "user", "content": "a" * 6}] * 2})
    check_prompt_chars(chat, 12)
    check_prompt_chars(chat, None)
    completion = parse_request(CompletionRequest, {"prompt": ["b", "a" * 12]})
    check_prompt_chars(completion, 12)
    check_prompt_chars(parse_request(CompletionRequest, {"prompt": [1] * 50}), 1)  # ids: the context check's
    for req, limit, param in ((chat, 11, "messages"), (completion, 11, "prompt")):
        with pytest.raises(APIError) as exc:
            check_prompt_chars(req, limit)
        assert exc.value.param == param and "12 characters" in exc.value.message


def test_sampling_params_mapping_and_context_checks():
    req = parse_request(CompletionRequest, {"model": "m", "prompt": "x", "max_tokens": 5, "temperature": 0,
                                            "top_k": 3, "seed": 9, "stop_token_ids": [4], "ignore_eos": True,
                                            "logprobs": 2, "echo": True, "repetition_penalty": 1.1})
    p = to_sampling_params(req, 10, 100, "prompt")
    assert (p.max_tokens, p.temperature, p.top_k, p.seed, p.stop_token_ids, p.ignore_eos) == (5, 0.0, 3, 9, (4,), True)
    assert (p.logprobs, p.prompt_logprobs, p.repetition_penalty) == (2, 2, 1.1)
    with pytest.raises(APIError) as exc:
        to_sampling_params(req, 100, 100, "prompt")
    assert exc.value.param == "prompt" and exc.value.code == "context_length_exceeded"
    with pytest.raises(APIError) as exc:
        to_sampling_params(req, 97, 100, "prompt")
    assert exc.value.param == "max_tokens"
    chat = parse_request(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                 "logprobs": True, "top_logprobs": 3})
    p = to_sampling_params(chat, 10, 100, "messages")
    assert p.max_tokens == 90 and p.logprobs == 3 and p.prompt_logprobs is None  # default: the rest of the context
    bad = parse_request(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                "top_logprobs": 3})
    with pytest.raises(APIError, match="top_logprobs"):
        to_sampling_params(bad, 10, 100, "messages")


def test_extremes_inside_the_ranges_pass_and_min_tokens_is_checked_against_max_tokens():
    req = parse_request(CompletionRequest, {"model": "m", "prompt": "x", "temperature": 10000, "top_k": 2**31 - 1,
                                            "repetition_penalty": 1e-4, "seed": 2**64 - 1, "min_tokens": 16})
    p = to_sampling_params(req, 10, 100, "prompt")
    assert (p.temperature, p.top_k, p.repetition_penalty, p.seed, p.min_tokens) == (1e4, 2**31 - 1, 1e-4, 2**64 - 1, 16)
    for body, message in (({"min_tokens": 17}, "max_tokens (16, the default)"),
                          ({"min_tokens": 5, "max_tokens": 4}, "max_tokens (4)")):
        req = parse_request(CompletionRequest, {"model": "m", "prompt": "x", **body})
        with pytest.raises(APIError) as exc:
            to_sampling_params(req, 10, 100, "prompt")
        assert exc.value.param == "min_tokens" and message in exc.value.message


def test_token_ids_inside_the_vocabulary():
    req = parse_request(CompletionRequest, {"model": "m", "prompt": [1, 2], "stop_token_ids": [258],
                                            "logit_bias": {"259": 1}})
    check_token_ids(req, [1, 2], "prompt", None)  # vocabulary unknown: only the parse-time bounds apply
    check_token_ids(req, [1, 2], "prompt", 260)
    for prompt, vocab, param in (([1, 2], 258, "stop_token_ids"), ([1, 300], 260, "prompt"),
                                 ([1, 2], 259, "logit_bias")):
        with pytest.raises(APIError) as exc:
            check_token_ids(req, prompt, "prompt", vocab)
        assert exc.value.status == 400 and exc.value.param == param and f"[0, {vocab})" in exc.value.message


def _proc(stops=(), prompt=(1,)) -> OutputProcessor:
    return OutputProcessor("r1", IncrementalDetokenizer(TOK, list(prompt)), StopChecker(stops))


def _feed(proc: OutputProcessor, text: str, last: str | None = "length") -> list[str]:
    ids = TOK.encode(text, add_special_tokens=False)
    out = []
    for i, t in enumerate(ids):
        d = proc.process(TokenOut("r1", (t,), finish_reason=last if i == len(ids) - 1 else None))
        out.append(d.text)
        if d.finish_reason:
            break
    return out


def test_output_processor_multibyte_and_stop_across_tokens():
    proc = _proc()
    pieces = _feed(proc, "héllo wörld ✓")
    assert "".join(pieces) == "héllo wörld ✓" and all("\ufffd" not in p for p in pieces)
    assert proc.completion_tokens == len("héllo wörld ✓".encode())
    proc = _proc(stops=["lo w"])
    pieces = _feed(proc, "hello world")
    assert "".join(pieces) == "hel" and proc.stopped_by_string and proc.finished
    # the held-back partial match is released when generation ends without a hit
    proc = _proc(stops=["xyz"])
    assert "".join(_feed(proc, "abcxy")) == "abcxy" and not proc.stopped_by_string


def test_output_processor_worker_error():
    proc = _proc()
    with pytest.raises(WorkerFailed, match="boom"):
        proc.process(TokenOut("r1", (), finish_reason="error", error="boom"))
    assert proc.finished


def test_logprob_formatting():
    ids = TOK.encode("ab", add_special_tokens=False)
    entries = [None, TokenLogprob(ids[1], -0.5, ((ids[1], -0.5), (ids[0], -1.0)))]
    fmt = CompletionLogprobs(TOK)
    out = fmt.format(ids, entries)
    assert out == {"tokens": ["a", "b"], "token_logprobs": [None, -0.5], "top_logprobs": [None, {"b": -0.5, "a": -1.0}],
                   "text_offset": [0, 1]}
    assert fmt.format(ids[:1], [entries[1]])["text_offset"] == [2]  # offsets run on across chunks
    chat = chat_logprobs(TOK, [entries[1]], top_n=1)
    assert chat == {"content": [{"token": "b", "logprob": -0.5, "bytes": [98],
                                 "top_logprobs": [{"token": "b", "logprob": -0.5, "bytes": [98]}]}]}


def test_router_never_imports_torch():
    code = ("import sys, splitserve.router.app, splitserve.router.main, splitserve.router.admin; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_router_config_from_flags_and_env():
    import argparse

    from splitserve.router.main import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--port", "9001", "--decode-policy", "kv_aware", "--extra-stop-token-ids", "1,5"])
    env = {"SPLITSERVE_PORT": "9000", "SPLITSERVE_ADMIN_TOKEN": "t", "SPLITSERVE_SHARED_DIR": "/x",
           "SPLITSERVE_HEARTBEAT_TIMEOUT_S": "2.5"}
    cfg = config_from_args(args, environ=env)
    assert (cfg.port, cfg.admin_token, cfg.heartbeat_timeout_s, cfg.decode_policy) == (9001, "t", 2.5, "kv_aware")
    assert cfg.extra_stop_token_ids == (1, 5)
    with pytest.raises(ValueError):
        config_from_args(parser.parse_args(["--prefill-policy", "kv_aware"]), environ={})


def test_token_id_prompts_are_checked_item_by_item():
    """Token-id prompts: ints in range only (a bool, a float, a negative id or one past the limit is a 400)."""
    from splitserve.router.openai_api import MAX_TOKEN_ID, CompletionRequest, _all_token_ids

    assert _all_token_ids([0, 5, MAX_TOKEN_ID]) and _all_token_ids([])
    for bad in ([1, True], [1, 2.0], [-1, 3], [MAX_TOKEN_ID + 1], [1, "2"], [1, None]):
        assert not _all_token_ids(bad), bad
    assert CompletionRequest.model_validate({"model": "m", "prompt": [3, 4]}).prompts() == [[3, 4]]
    assert CompletionRequest.model_validate({"model": "m", "prompt": [[3], [4, 5]]}).prompts() == [[3], [4, 5]]
    for bad in ([1, True], [[1], [True]], [[1], []]):
        with pytest.raises(ValueError):
            CompletionRequest.model_validate({"model": "m", "prompt": bad})
