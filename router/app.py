"""The router's aiohttp application: the OpenAI-compatible API, health, metrics, admin and status page.

``create_app(config)`` builds the app; its startup hook loads the tokenizer, creates the process's one
ZeroMQ context and binds the control socket. Every request first passes two middlewares:

1. ``_errors`` (outermost): every failure becomes an OpenAI-shaped error (:class:`APIError`, aiohttp's own HTTP
   errors, a 405 keeping its ``Allow`` header, and a catch-all 500 ``server_error`` that logs one line with the
   request id, never a traceback page; a request head aiohttp cannot parse never reaches the app: aiohttp answers
   400 and :class:`_ProtocolLog` logs one line);
   requests are counted by status; one access-log line (``_access_log``: id, route, status, tokens, TTFT,
   duration, the reason of an error; never the prompt), at INFO (DEBUG for successful polls of /health,
   /metrics and /status.json).
2. ``_guard``: a CORS preflight is answered for ``--allowed-origins`` only (403 otherwise); ``/v1/*``,
   ``/tokenize`` and ``/detokenize`` need ``Authorization: Bearer <key>`` when API keys are configured (401) and,
   for POST, a JSON content type (415: a web page cannot make a visitor's browser send a completion); a body
   larger than ``--max-body-mb`` is a 413 (from ``Content-Length`` before reading, or once the read passes the
   limit); the body is read under ``--body-timeout-s`` (408, then the connection closes). Slow or idle
   connections without a whole request head are closed after ``--idle-timeout-s`` (:func:`runner_options`).

A completions or chat request then:

3. is parsed, checked (router/openai_api.py: 400 naming the field, 404 for an unknown model, a prompt-length
   check before tokenizing) and tokenized, with its chat template rendered, on the tokenizer threads
   (:meth:`RouterService.off_loop`), so a huge prompt never stalls the event loop (``/health`` keeps answering);
   a small completions body (:data:`INLINE_BODY_BYTES`) is parsed and checked on the loop, and goes to the threads
   only for a text prompt to tokenize;
4. becomes one choice per prompt and copy (router/choices.py), each a request on the workers;
5. is answered whole or as Server-Sent Events (router/formatting.py).

Run it with an ``AppRunner(app, **runner_options(config))`` (see :mod:`splitserve.router.main`): handler
cancellation on, so that a client that goes away cancels its handler, which aborts the request (every choice of
it) on the workers; and the idle/header timeout.
"""

from __future__ import annotations

from pathlib import Path
import asyncio
import contextlib
import json
import logging
import random
import sys
import time
from typing import Any, AsyncIterator

import jinja2
import zmq.asyncio
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.log import server_logger

from splitserve.core.config import RouterConfig
from splitserve.core.tokenizer import NoChatTemplateError, Tokenizer, load_tokenizer
from splitserve.router import admin, openapi
from splitserve.router.autoscale import AutoRatio
from splitserve.router.choices import Choice, full_body, merged, plan_choices, total_usage
from splitserve.router.formatting import ChatFormatter, CompletionFormatter, ResponseHead
from splitserve.router.openai_api import (
    APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, bad_request,
    check_prompt_chars, models_body, new_id, parse_json_body, parse_request, server_error, validate_body,
)
from splitserve.router.output import Delta
from splitserve.router.planner import Slo
from splitserve.router.service import SERVICE, RouterService
from splitserve.router.tools import check_tool_parser
from splitserve.router.version import package_version

logger = logging.getLogger(__name__)

_ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
                        "/tokenize", "/detokenize", "/version", "/openapi.json"})
_QUIET = frozenset({"/health", "/metrics", "/status.json"})
"""Polled routes: their access-log lines go at DEBUG."""
ACCESS = web.RequestKey("access", dict)
"""Per request: what the access-log line reports besides route and status (id, tokens, TTFT)."""


def _endpoint_label(request: web.Request) -> str:
    return request.path if request.path in _ENDPOINTS else "other"


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Module flow, step 1: OpenAI-shaped errors, the catch-all 500, request counts by status, the access log."""
    svc = request.app[SERVICE]
    start = time.monotonic()
    request[ACCESS] = {"start": start}
    try:
        resp, reason = await handler(request), None
    except APIError as exc:
        resp, reason = _error_response(exc), exc.message
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp, reason = _error_response(APIError(exc.status, exc.reason, type="invalid_request_error")), exc.reason
        if "Allow" in exc.headers:  # a 405 names the methods the route takes (RFC 9110)
            resp.headers["Allow"] = exc.headers["Allow"]
    except Exception as exc:  # the catch-all: one log line, a 500 in the same shape, no traceback page
        request_id = request[ACCESS].setdefault("id", new_id("req"))
        _log_unexpected(request_id, exc, f"{request.method} {request.path}")
        err = server_error(request_id)
        resp, reason = _error_response(err), f"{type(exc).__name__}: {exc}"[:200]
    svc.metrics.requests.labels(_endpoint_label(request), str(resp.status)).inc()
    _access_log(request, resp.status, time.monotonic() - start, reason)
    return resp


def _error_response(exc: APIError) -> web.Response:
    resp = web.json_response(exc.body(), status=exc.status)
    if exc.status == 401:
        resp.headers["WWW-Authenticate"] = "Bearer"
    if exc.status in (408, 413):  # the body is unread (or still coming): do not keep the connection
        resp.force_close()
    return resp


def _log_unexpected(request_id: str, exc: BaseException, where: str) -> None:
    """One ERROR line naming the request (the traceback only at DEBUG)."""
    logger.error("request %s: unexpected %s in %s: %s", request_id, type(exc).__name__, where, str(exc)[:200])
    logger.debug("request %s: traceback of the unexpected error", request_id, exc_info=exc)


_PROTECTED = ("/tokenize", "/detokenize")
"""Besides ``/v1/*``: routes that need the API key (``/health``, ``/metrics``, ``/version`` never do)."""


def _protected(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1" or path in _PROTECTED


@web.middleware
async def _guard(request: web.Request, handler: Any) -> web.StreamResponse:
    """Module flow, step 2: CORS preflight, API key, JSON content type, body size and body read timeout."""
    config = request.app[SERVICE].config
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return _preflight(request, config.allowed_origins)
    if _protected(request.path):
        if not request.app[SERVICE].key_ok(request.headers.get("Authorization")):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        routed = request.match_info.http_exception is None  # else the route's own 404 / 405 comes first
        if request.method == "POST" and routed and request.content_type != "application/json":
            given = request.headers.get("Content-Type", "(none)")[:100]
            raise APIError(415, f"Content-Type must be application/json, got '{given}'",
                           code="unsupported_media_type")
    await _read_body(request, config)
    return await handler(request)


def max_body_bytes(config: RouterConfig) -> int:
    return int(config.max_body_mb * 1024 * 1024)


async def _read_body(request: web.Request, config: RouterConfig) -> None:
    """Read (and cache, for the handler's ``request.read()``) the body within the size limit and the timeout."""
    if not request.body_exists:
        return
    limit = max_body_bytes(config)
    too_large = APIError(413, f"request body is larger than {config.max_body_mb:g} MB (--max-body-mb)",
                         code="body_too_large")
    if request.content_length is not None and request.content_length > limit:
        raise too_large  # refused before any byte of it is read
    try:
        async with asyncio.timeout(config.body_timeout_s):
            await request.read()  # aiohttp stops at client_max_size (chunked bodies)
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {config.body_timeout_s:g} s "
                       "(--body-timeout-s)", code="body_timeout") from None


def _origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    return origin is not None and ("*" in allowed or origin in allowed)


def _preflight(request: web.Request, allowed: tuple[str, ...]) -> web.Response:
    """A CORS preflight: 204 with the allow headers for a listed origin, 403 for any other."""
    origin = request.headers.get("Origin")
    if not _origin_allowed(origin, allowed):
        raise APIError(403, f"origin {origin!r} is not allowed (--allowed-origins)", code="origin_not_allowed")
    asked = request.headers.get("Access-Control-Request-Headers", "Authorization, Content-Type")
    return web.Response(status=204, headers={
        "Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": asked, "Access-Control-Max-Age": "600", "Vary": "Origin"})


async def _cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the allow-origin header on every answer to a listed origin (streams included)."""
    origin = request.headers.get("Origin")
    if _origin_allowed(origin, request.app[SERVICE].config.allowed_origins):
        response.headers.setdefault("Access-Control-Allow-Origin", origin)
        response.headers.setdefault("Vary", "Origin")


def _access_log(request: web.Request, status: int, duration_s: float, reason: str | None) -> None:
    """One line per request: id, route, status, tokens, TTFT, duration, and why it failed (never the prompt)."""
    info = request[ACCESS]
    parts = [f"id={info.get('id', '-')}", f"route={request.method} {request.path}", f"status={status}"]
    if "prompt_tokens" in info:
        parts += [f"prompt_tokens={info['prompt_tokens']}", f"output_tokens={info['output_tokens']}"]
    if info.get("ttft_s") is not None:
        parts.append(f"ttft_ms={info['ttft_s'] * 1e3:.1f}")
    if "served" in info:  # before the TTFT clock: reading, parsing and checking the request, tokenizing its prompt
        parts.append(f"prep_ms={(info['served'] - info['start']) * 1e3:.1f}")
    parts.append(f"duration_ms={duration_s * 1e3:.1f}")
    if reason is not None:
        parts.append(f"reason={json.dumps(reason)}")
    level = logging.DEBUG if request.path in _QUIET and status < 400 else logging.INFO
    logger.log(level, "access %s", " ".join(parts))


# --- OpenAI endpoints ----------------------------------------------------------------------------


def _head(request: web.Request, id_prefix: str) -> ResponseHead:
    """The response's id and time, made first so that the access log names even a refused request."""
    head = ResponseHead.new(id_prefix)
    request[ACCESS]["id"] = head.id
    return head


def _with_session_header(request: web.Request, req: Any) -> Any:
    """``X-Session-Id`` stands for the body's ``session_id`` when the body has none."""
    header = request.headers.get("X-Session-Id")
    if header is None or req.session_id is not None:
        return req
    if not 0 < len(header) <= 256:
        raise bad_request("X-Session-Id must be 1 to 256 characters", param="session_id")
    return req.model_copy(update={"session_id": header})


INLINE_BODY_BYTES = 32 << 10
"""A completions body up to this size is parsed and checked on the event loop (about a millisecond: an agent's turn
of about 3,000 token ids is 22 KB), and only a text prompt then goes to the tokenizer threads. On an H200 host serving
32 agent sessions (tenth session, same call) this took a turn's time before its request leaves for a worker from
1.1-1.3 ms (p50; p90 1.6-1.7) on the threads to 1.0 ms (p90 1.2); the turn's TTFT did not move beyond run-to-run
noise."""


async def completions(request: web.Request) -> web.StreamResponse:
    svc, head = request.app[SERVICE], _head(request, "cmpl")
    raw, limit = await request.read(), svc.prompt_char_limit()
    if len(raw) > INLINE_BODY_BYTES:
        req, prompts, ids = await svc.off_loop(_prepare_completion, svc, raw, limit)
    else:
        req, prompts = _parse_completion(svc, raw, limit)
        if all(isinstance(p, list) for p in prompts):  # token ids: nothing to tokenize
            ids = _encode_prompts(svc, prompts)
        else:
            ids = await svc.off_loop(_encode_prompts, svc, prompts)
    req = _with_session_header(request, req)

    def make_fmt(index: int, i: int) -> CompletionFormatter:
        return CompletionFormatter(svc.tokenizer, svc.model_name, head, index, req, prompts[i], ids[i])

    return await _serve(request, svc, req, plan_choices(svc, req, ids, "prompt", make_fmt))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    svc, head = request.app[SERVICE], _head(request, "chatcmpl")
    req, prompt_ids = await svc.off_loop(_prepare_chat, svc, await request.read(), svc.prompt_char_limit())
    req = _with_session_header(request, req)

    def make_fmt(index: int, _prompt: int) -> ChatFormatter:
        return ChatFormatter(svc.tokenizer, svc.model_name, head, index, req, prompt_ids, svc.config.tool_call_parser)

    return await _serve(request, svc, req, plan_choices(svc, req, [prompt_ids], "messages", make_fmt))


# Module flow, step 3: these run on the tokenizer threads; they read only the immutable parts of the service (the
# registry changes on the event loop, so the prompt limit is computed there and passed in).


def _prepare_completion(svc: RouterService, raw: bytes,
                        limit: int | None) -> tuple[CompletionRequest, list[str | list[int]], list[list[int]]]:
    """(request, its prompts, each prompt's token ids)."""
    req, prompts = _parse_completion(svc, raw, limit)
    return req, prompts, _encode_prompts(svc, prompts)


def _parse_completion(svc: RouterService, raw: bytes,
                      limit: int | None) -> tuple[CompletionRequest, list[str | list[int]]]:
    """(request, its prompts): parsed and checked, nothing tokenized."""
    req = parse_request(CompletionRequest, parse_json_body(raw))
    svc.check_model(req.model)
    check_prompt_chars(req, limit)
    return req, req.prompts()


def _encode_prompts(svc: RouterService, prompts: list[str | list[int]]) -> list[list[int]]:
    """Each prompt's token ids (a text prompt through the tokenizer)."""
    return [list(p) if isinstance(p, list) else _encode(svc.tokenizer, p) for p in prompts]


def _prepare_chat(svc: RouterService, raw: bytes, limit: int | None) -> tuple[ChatCompletionRequest, list[int]]:
    """(request, the token ids of its rendered chat template)."""
    req = parse_request(ChatCompletionRequest, parse_json_body(raw))
    svc.check_model(req.model)
    check_prompt_chars(req, limit)
    check_tool_parser(req, svc.config.tool_call_parser)
    try:
        text = svc.tokenizer.apply_chat_template(req.template_messages(), add_generation_prompt=True,
                                                 tools=req.template_tools())
    except NoChatTemplateError as exc:
        raise bad_request(f"model '{svc.model_name}' has no chat template: start the router with --chat-template FILE, "
                          "or use /v1/completions", param="model", code="no_chat_template") from exc
    except jinja2.TemplateError as exc:
        raise bad_request(f"the chat template rejected the messages: {exc}", param="messages") from exc
    return req, _encode(svc.tokenizer, text, add_special_tokens=False)


def _validated(svc: RouterService, cls: type[Any], raw: bytes) -> Any:
    """``/tokenize`` and ``/detokenize`` bodies: JSON, the model, the served model."""
    req = validate_body(cls, parse_json_body(raw))
    svc.check_model(req.model)
    return req


def _encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """``tokenizer.encode``, through the HF backend's ``encode_batch`` where there is one: that one releases the GIL
    while it works (``encode`` holds it), so the event loop runs meanwhile. Both give the same ids."""
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "encode_batch"):
        return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


async def _serve(request: web.Request, svc: RouterService, req: Any, choices: list[Choice]) -> web.StreamResponse:
    """Run every choice; the access log gets the request's token counts and TTFT (time to any first token)."""
    access = request[ACCESS]
    start = access["served"] = time.monotonic()
    deltas: dict[int, list[Delta]] = {c.index: [] for c in choices}

    async def timed() -> AsyncIterator[tuple[Choice, Delta]]:
        async with contextlib.aclosing(merged(svc, choices)) as stream:
            async for ch, delta in stream:
                if delta.token_ids and access.get("ttft_s") is None:
                    access["ttft_s"] = time.monotonic() - start
                yield ch, delta

    try:
        async with contextlib.aclosing(timed()) as gen:
            if req.stream:
                return await _stream(request, choices, gen, req.include_usage)
            async for ch, delta in gen:
                deltas[ch.index].append(delta)
            return web.json_response(full_body(choices, deltas))
    finally:
        usage_ = total_usage(choices)
        access["prompt_tokens"], access["output_tokens"] = usage_["prompt_tokens"], usage_["completion_tokens"]


async def _sse(resp: web.StreamResponse, body: dict[str, Any]) -> None:
    await resp.write(b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n")


async def _stream(request: web.Request, choices: list[Choice], gen: AsyncIterator[tuple[Choice, Delta]],
                  include_usage: bool) -> web.StreamResponse:
    """SSE stream; headers go out with the first output, so failures before it get a real HTTP status."""
    first = await anext(gen, None)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    request_id = choices[0].fmt.id
    try:
        try:
            for ch in choices:
                for body in ch.fmt.start_chunks():
                    await _sse(resp, body)
            if first is not None:
                await _send_delta(resp, *first)
                async for ch, delta in gen:
                    await _send_delta(resp, ch, delta)
            if include_usage:
                await _sse(resp, choices[0].fmt.usage_chunk(total_usage(choices)))
        except APIError as exc:
            logger.warning("request %s: stream ended with error: %s", request_id, exc.message)
            await _sse(resp, exc.body())
        except ConnectionResetError:
            raise
        except Exception as exc:  # the catch-all, once the 200 is out: an error event in the same shape
            _log_unexpected(request_id, exc, "the stream")
            await _sse(resp, server_error(request_id).body())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except ConnectionResetError:  # the caller closes ``gen``, which aborts the request on its workers
        logger.info("request %s: client disconnected mid-stream", request_id)
    return resp


async def _send_delta(resp: web.StreamResponse, ch: Choice, delta: Delta) -> None:
    body = ch.fmt.chunk(delta, ch.proc)
    if body is not None:
        await _sse(resp, body)


async def list_models(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    return web.json_response(models_body(svc.model_names, svc.max_model_len()))


async def tokenize(request: web.Request) -> web.Response:
    """vLLM's ``/tokenize``: ``{"model", "prompt"}`` -> ``{"tokens", "count", "max_model_len"}``."""
    svc = request.app[SERVICE]
    tokens = await svc.off_loop(_tokens, svc, await request.read(), svc.prompt_char_limit())
    return web.json_response({"tokens": tokens, "count": len(tokens), "max_model_len": svc.max_model_len()})


def _tokens(svc: RouterService, raw: bytes, limit: int | None) -> list[int]:
    req = _validated(svc, TokenizeRequest, raw)
    check_prompt_chars(req, limit)
    return _encode(svc.tokenizer, req.prompt, add_special_tokens=req.add_special_tokens)


async def detokenize(request: web.Request) -> web.Response:
    """vLLM's ``/detokenize``: ``{"model", "tokens"}`` -> ``{"prompt"}``; ids outside the vocabulary are a 400."""
    svc = request.app[SERVICE]
    req = await svc.off_loop(_validated, svc, DetokenizeRequest, await request.read())
    vocab = svc.vocab_size() or svc.tokenizer.vocab_size
    bad = max(req.tokens, default=0)
    if bad >= vocab:
        raise bad_request(f"invalid field 'tokens': token ids must be in [0, {vocab}), got {bad}", param="tokens")
    return web.json_response({"prompt": await svc.off_loop(svc.tokenizer.decode, req.tokens)})


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": package_version()})


async def health(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    ok = svc.healthy() and svc.accepting
    return web.json_response({"status": "ok" if ok else "unavailable"}, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    return web.Response(body=svc.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})


# --- app -----------------------------------------------------------------------------------------


def _start_auto_ratio(svc: RouterService) -> asyncio.Task | None:
    cfg = svc.config
    if not cfg.auto_ratio:
        return None
    slo = Slo(ttft_p90_s=cfg.slo_ttft_ms / 1e3, tpot_p90_s=cfg.slo_tpot_ms / 1e3)
    svc.auto_ratio = AutoRatio(svc, slo, cfg.auto_ratio_interval_s, cfg.auto_ratio_cooldown_s)
    return asyncio.get_running_loop().create_task(svc.auto_ratio.run())


class _ProtocolLog(logging.LoggerAdapter):
    """aiohttp's server logger, for what fails before the app sees a request (a malformed request head: any client
    can send one, and aiohttp answers it with a plain 400 and closes): one INFO line naming the peer and the parser's
    reason instead of an ERROR with a traceback; anything else one ERROR line (the traceback at DEBUG)."""

    def exception(self, msg: Any, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300] if exc is not None else "unknown"
        level = logging.INFO if isinstance(exc, HttpProcessingError) else logging.ERROR
        self.logger.log(level, f"{msg}: %s", *args, reason)
        self.logger.debug("traceback of the error above", exc_info=exc)


def runner_options(config: RouterConfig) -> dict[str, Any]:
    """``web.AppRunner`` keywords: handler cancellation (a client that goes away aborts its request), no aiohttp
    access log (``_access_log`` writes one), ``idle_timeout_s`` for idle connections and unfinished request heads
    (aiohttp's keep-alive timer runs from the connection or the last response; bytes do not reset it), and at most
    ``body_timeout_s`` (10 s by default) spent discarding the rest of a body the server answered without reading."""
    return {"handler_cancellation": True, "access_log": None, "keepalive_timeout": config.idle_timeout_s,
            "lingering_time": min(10.0, config.body_timeout_s), "logger": _ProtocolLog(server_logger, {})}


def create_app(config: RouterConfig, tokenizer: Tokenizer | None = None, rng: random.Random | None = None,
               ctx: zmq.asyncio.Context | None = None) -> web.Application:
    """The router app. ``tokenizer`` defaults to ``load_tokenizer(config.model)``; ``ctx`` to a new
    ZeroMQ context owned (and terminated) by the app."""
    app = web.Application(middlewares=[_errors, _guard], client_max_size=max_body_bytes(config))
    if config.allowed_origins:
        app.on_response_prepare.append(_cors_headers)
    own_ctx = ctx is None
    zctx = ctx if ctx is not None else zmq.asyncio.Context()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
    if config.chat_template:
        tokenizer.set_chat_template(Path(config.chat_template).read_text(encoding="utf-8"))
    svc = RouterService(config, tokenizer, zctx, rng)
    app[SERVICE] = svc

    async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
        await svc.control.start()
        auto = _start_auto_ratio(svc)
        yield
        if auto is not None:
            auto.cancel()
        await svc.control.stop()
        svc.pool.shutdown(wait=False, cancel_futures=True)
        if own_ctx:
            zctx.term()

    app.cleanup_ctx.append(_lifecycle)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/version", version)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    openapi.add_route(app, api_keys=bool(svc.api_keys))
    admin.add_routes(app)
    return app

