"""HTTP hardening of the router (issue 12): API keys, JSON content type, CORS, body and prompt limits, slow clients,
tokenization off the event loop, and an OpenAI-shaped 4xx (or catch-all 500) for every bad input.

Real router processes (tests/fakes/router_harness.py) with a scripted worker, called with the official ``openai``
client, ``http.client`` and raw sockets; the tests that need to hold the tokenizer or make it fail run the app in
process. No test measures time: ordering is shown with events, timeouts with a socket the server closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import logging
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).parent))
from fakes.router_harness import RouterHarness  # noqa: E402

from splitserve.core.config import RouterConfig  # noqa: E402
from splitserve.core.messages import Register  # noqa: E402
from splitserve.core.tokenizer import load_tokenizer  # noqa: E402
from splitserve.router.app import create_app, runner_options  # noqa: E402
from splitserve.router.main import add_arguments, config_from_args, main  # noqa: E402
from splitserve.router.service import SERVICE, load_api_keys  # noqa: E402

TOK = load_tokenizer("builtin:tiny-random-llama")
SCRIPT = TOK.encode(" Hello world!", add_special_tokens=False)
MODEL = "builtin:tiny-random-llama"
KEYS = ("k1-7f3a9c", "k2-0b5e1d")
ORIGIN = "https://app.example"
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """API keys, one allowed origin, a 1 MB body limit; a worker with a 256-token context (2048 characters)."""
    h = RouterHarness(tmp_path_factory.mktemp("guarded"), api_key=",".join(KEYS), allowed_origins=ORIGIN,
                      max_body_mb=1)
    h.add_worker("w", SCRIPT, vocab_size=TOK.vocab_size)
    yield h
    h.stop()


def _call(h: RouterHarness, method: str, path: str, body: bytes | Any = None, headers: dict | None = None,
          key: str | None = KEYS[0]) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON body or text); ``body``: bytes, an iterator of bytes (chunked), or JSON."""
    hdrs = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
            **(headers or {})}
    if body is not None and not isinstance(body, bytes) and not hasattr(body, "__next__"):
        body = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", h.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=hdrs, encode_chunked=hasattr(body, "__next__"))
        resp = conn.getresponse()
        text = resp.read().decode()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = text
        return resp.status, dict(resp.headers), data
    finally:
        conn.close()


def _err(data: Any) -> dict[str, Any]:
    assert isinstance(data, dict) and set(data["error"]) == ERROR_FIELDS, data
    return data["error"]


def _generate_reqs(h: RouterHarness) -> int:
    return len([e for e in h.events("w") if e["type"] == "GenerateReq"])


# --- item 6: API keys ---------------------------------------------------------------------------------------------


def test_api_key_required_on_v1_with_the_openai_client(guarded):
    for key in KEYS:
        c = openai.OpenAI(base_url=guarded.url + "/v1", api_key=key, max_retries=0, timeout=30)
        assert c.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].finish_reason == "length"
        assert c.models.list().data[0].id == MODEL
    wrong = openai.OpenAI(base_url=guarded.url + "/v1", api_key="k1-7f3a9", max_retries=0, timeout=30)
    before = _generate_reqs(guarded)
    with pytest.raises(openai.AuthenticationError) as exc:
        wrong.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert _generate_reqs(guarded) == before


def test_missing_or_wrong_key_is_a_401_and_public_routes_need_none(guarded):
    for path, body in (("/v1/completions", {"prompt": "x"}), ("/tokenize", {"prompt": "x"}),
                       ("/detokenize", {"tokens": [1]}), ("/v1/models", None), ("/v1/nope", None)):
        method = "GET" if body is None else "POST"
        for key in (None, "wrong", KEYS[0] + "x"):
            status, headers, data = _call(guarded, method, path, body, key=key)
            assert status == 401 and headers["WWW-Authenticate"] == "Bearer", (path, key)
            assert _err(data)["code"] == "invalid_api_key"
    status, _, data = _call(guarded, "POST", "/tokenize", {"prompt": "Hi"}, key=KEYS[1])
    assert status == 200 and data["tokens"] == TOK.encode("Hi")
    assert _call(guarded, "POST", "/detokenize", {"tokens": data["tokens"]}, key=KEYS[1])[0] == 200
    assert _call(guarded, "GET", "/v1/models", headers={"Authorization": f"bearer {KEYS[0]}"})[0] == 200
    for path in ("/health", "/metrics", "/version", "/status.json"):
        assert _call(guarded, "GET", path, key=None)[0] == 200, path
    log = guarded.router_log.read_text()
    assert all(k not in log for k in KEYS) and "API keys: 2" in log


def test_api_keys_from_flags_variable_and_file(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    keys = tmp_path / "keys"
    keys.write_text("# one key a line\nfile-key-1\n\n  file-key-2  \n")
    args = parser.parse_args(["--api-key", "a", "--api-key", "b,c", "--api-key-file", str(keys)])
    config = config_from_args(args, environ={"SPLITSERVE_API_KEY": "env-key"})
    assert load_api_keys(config) == ("a", "b", "c", "file-key-1", "file-key-2")
    assert "api_key=" not in repr(config) and "'b'" not in repr(config)  # keys stay out of reprs
    from_env = config_from_args(parser.parse_args([]), environ={"SPLITSERVE_API_KEY": "x, y,"})
    assert load_api_keys(from_env) == ("x", "y")
    assert load_api_keys(config_from_args(parser.parse_args([]), environ={"SPLITSERVE_API_KEY": ""})) == ()
    (tmp_path / "empty").write_text("# nothing\n")
    for path in (tmp_path / "empty", tmp_path / "missing"):
        assert main(parser.parse_args(["--api-key-file", str(path)])) == 2


# --- item 1: JSON content type, CORS ------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          "text/plain; charset=utf-8"])
def test_post_bodies_must_be_json(guarded, content_type):
    before = _generate_reqs(guarded)
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        status, _, data = _call(guarded, "POST", path, {"prompt": "x", "messages": []},
                                headers={"Content-Type": content_type})
        err = _err(data)
        assert status == 415 and content_type in err["message"] and "application/json" in err["message"]
    assert _generate_reqs(guarded) == before
    status, _, _ = _call(guarded, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2},
                         headers={"Content-Type": "application/json; charset=utf-8"})
    assert status == 200


def test_cors_preflight_only_for_listed_origins(guarded):
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    status, headers, _ = _call(guarded, "OPTIONS", "/v1/completions", headers={"Origin": ORIGIN, **ask}, key=None)
    assert status == 204 and headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "authorization,content-type"
    status, headers, data = _call(guarded, "OPTIONS", "/v1/completions", key=None,
                                  headers={"Origin": "https://evil.example", **ask})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    assert _err(data)["code"] == "origin_not_allowed"
    status, headers, _ = _call(guarded, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2},
                               headers={"Origin": ORIGIN})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN
    status, headers, _ = _call(guarded, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2, "stream": True},
                               headers={"Origin": ORIGIN})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN  # streams too
    status, headers, _ = _call(guarded, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2},
                               headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in headers


# --- item 2: body size, prompt length -----------------------------------------------------------------------------


def test_bodies_over_the_limit_get_413(guarded):
    big = json.dumps({"prompt": "x" * (3 * 1024 * 1024), "max_tokens": 2}).encode()
    status, _, data = _call(guarded, "POST", "/v1/completions", big)
    assert status == 413 and _err(data)["code"] == "body_too_large" and "--max-body-mb" in data["error"]["message"]
    chunks = iter([big[i:i + 65536] for i in range(0, len(big), 65536)])  # no Content-Length: refused while read
    status, _, data = _call(guarded, "POST", "/v1/completions", chunks)
    assert status == 413 and _err(data)["code"] == "body_too_large"
    assert _call(guarded, "GET", "/health")[0] == 200


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x" * 2049}, "prompt"),
    ("/v1/completions", {"prompt": ["short", "y" * 2049]}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "z" * 1500}] * 2}, "messages"),
    ("/tokenize", {"prompt": "x" * 2049}, "prompt"),
])
def test_prompts_longer_than_the_character_limit_get_400(guarded, path, body, param):
    """8 characters per token of the worker's 256-token context: 2048 characters."""
    status, _, data = _call(guarded, "POST", path, body)
    err = _err(data)
    assert status == 400 and err["param"] == param and "characters" in err["message"] and "2048" in err["message"]


# --- item 5: every bad input gets a 400 naming the problem ---------------------------------------------------------


DEEP = b'{"prompt": "x", "extra": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"


@pytest.mark.parametrize("raw, param, words", [
    (b'{"prompt": "x",', None, "not valid JSON"),
    (b"[" * 10_000 + b"]" * 10_000, None, "nested too deeply"),
    (DEEP, None, "nested too deeply"),
    (b'{"prompt": "a\\ud800b"}', "prompt", "surrogate"),
    (b'{"prompt": ["ok", "\\udfff"]}', "prompt.1", "surrogate"),
    (b'{"prompt": "x", "stop": ["\\ud83d"]}', "stop.0", "surrogate"),
    (b'{"prompt": "x", "seed": 1e30}', "seed", "seed"),
    (b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}", None, "digits"),
    (b'{"prompt": "x", "temperature": Infinity}', "temperature", "finite"),
    (b'{"prompt": "x", "top_p": NaN}', "top_p", "finite"),
    (b'{"prompt": "x", "presence_penalty": -Infinity}', "presence_penalty", "finite"),
    (b'{"prompt": "x", "temperature": 1e400}', "temperature", "finite"),
    (b'{"prompt": "x", "logit_bias": {"5": NaN}}', "logit_bias.5", "finite"),
    (b'{"prompt": NaN}', "prompt", "prompt"),
    (b'{"prompt": "\xff"}', None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
    (b"", None, "not valid JSON"),
])
def test_bad_json_gets_a_400_naming_the_problem(guarded, raw, param, words):
    before = _generate_reqs(guarded)
    status, _, data = _call(guarded, "POST", "/v1/completions", raw)
    err = _err(data)
    assert status == 400 and err["type"] == "invalid_request_error" and err["param"] == param
    assert words in err["message"]
    assert _generate_reqs(guarded) == before


def test_a_lone_surrogate_in_chat_messages_is_named(guarded):
    status, _, data = _call(guarded, "POST", "/v1/chat/completions",
                            b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}')
    assert status == 400 and _err(data)["param"] == "messages.0.content"
    ok = {"messages": [{"role": "user", "content": "emoji \U0001f600"}], "max_tokens": 2}
    raw = json.dumps(ok).encode()  # ensure_ascii: a valid surrogate pair, \ud83d\ude00
    assert b"\\ud83d\\ude00" in raw and _call(guarded, "POST", "/v1/chat/completions", raw)[0] == 200


# --- item 4: slow clients ------------------------------------------------------------------------------------------


HEAD = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n")


def _until_closed(port: int, data: bytes) -> bytes:
    """Send ``data``, then stall; whatever the server answers until it closes (the 30 s bound only ends a hang)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


def test_slow_or_idle_clients_are_disconnected(tmp_path):
    h = RouterHarness(tmp_path, idle_timeout_s=1, body_timeout_s=1)
    try:
        assert _until_closed(h.port, b"") == b""  # connected, sent nothing
        assert _until_closed(h.port, HEAD[:60]) == b""  # half a request head
        answer = _until_closed(h.port, HEAD + b'{"prompt": ')  # the head, then part of the body
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"Connection: close" in head
        assert json.loads(body)["error"]["code"] == "body_timeout"
        assert h.get("/health")[0] == 503  # still serving (no worker here)
    finally:
        h.stop()


# --- items 3 and 5, in process: tokenization off the event loop, the catch-all 500 -----------------------------------


class _Backend:
    """The real tokenizer backend, with ``encode_batch`` replaced by ``encode``."""

    def __init__(self, real: Any, encode: Any) -> None:
        self._real, self.encode_batch = real, encode

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _Tokenizer:
    def __init__(self, encode: Any) -> None:
        self.backend = _Backend(TOK.backend, encode)

    def __getattr__(self, name: str) -> Any:
        return getattr(TOK, name)


@contextlib.asynccontextmanager
async def _serving(tokenizer: Any, **config: Any):
    """The app on a free port with one registered worker (context 1000 tokens); yields (session, base URL)."""
    cfg = RouterConfig(control_port=0, heartbeat_timeout_s=600, **config)
    app = create_app(cfg, tokenizer)
    runner = web.AppRunner(app, **runner_options(cfg))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    app[SERVICE].registry.register(b"w", Register("w", "both", MODEL, "", "tcp://127.0.0.1:1", 64, 16, 1000),
                                   external=True)
    try:
        async with aiohttp.ClientSession() as session:
            yield session, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("path, body, status", [
    ("/tokenize", {"prompt": "word " * 80_000}, 200),
    ("/v1/completions", {"prompt": "word " * 80_000}, 400),  # tokenized, then too long for the context
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 80_000}]}, 400),
])
def test_health_answers_while_a_large_prompt_is_tokenized(path, body, status):
    """The tokenizer blocks until the test has had its /health answer: were tokenization on the event loop, the
    health check would wait behind it (and the big request would be done first)."""
    started, release = threading.Event(), threading.Event()

    def encode(texts: list[str], add_special_tokens: bool = True) -> Any:
        started.set()
        release.wait(timeout=30)
        return TOK.backend.encode_batch(texts, add_special_tokens=add_special_tokens)

    async def run() -> None:
        async with _serving(_Tokenizer(encode), max_prompt_chars=10**6) as (session, url):
            big = asyncio.ensure_future(session.post(url + path, json=body))
            assert await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)
            async with session.get(url + "/health") as health:
                assert health.status == 200 and not big.done()
            release.set()
            async with await big as resp:
                data = await resp.json()
            assert resp.status == status, data
            if status == 200:
                assert data["count"] == len(TOK.encode(body["prompt"]))
            else:
                assert data["error"]["code"] == "context_length_exceeded"

    asyncio.run(run())


def test_an_unexpected_error_is_an_openai_shaped_500_and_one_log_line(caplog):
    def encode(texts: list[str], add_special_tokens: bool = True) -> Any:
        raise RuntimeError("tokenizer exploded")

    async def run() -> list[tuple[int, Any]]:
        out = []
        async with _serving(_Tokenizer(encode)) as (session, url):
            for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/completions", {"prompt": "x", "stream": True}),
                               ("/tokenize", {"prompt": "x"})):
                async with session.post(url + path, json=body) as resp:
                    out.append((resp.status, await resp.json()))
            async with session.get(url + "/health") as resp:
                out.append((resp.status, await resp.json()))
        return out

    with caplog.at_level(logging.INFO, logger="splitserve.router"):
        results = asyncio.run(run())
    assert results[-1][0] == 200
    for status, data in results[:-1]:
        assert status == 500 and data["error"]["type"] == "server_error"
        assert data["error"]["param"] is None and data["error"]["code"] is None
        request_id = data["error"]["message"].split("(request ")[1].split(")")[0]
        lines = [r for r in caplog.records if r.levelno == logging.ERROR and request_id in r.getMessage()]
        assert len(lines) == 1 and "RuntimeError" in lines[0].getMessage() and lines[0].exc_info is None
