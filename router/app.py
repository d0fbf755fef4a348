"""The router's aiohttp application: the OpenAI-compatible API, health, metrics, admin and status page.

``create_app(config)`` builds the app; its startup hook loads the tokenizer, creates the process's one
ZeroMQ context and binds the control socket. A completions or chat request:

1. is parsed and checked (router/openai_api.py: 400 naming the field, 404 for an unknown model);
2. becomes one choice per prompt and copy (router/choices.py), each a request on the workers;
3. is answered whole or as Server-Sent Events (router/formatting.py);
4. leaves one access-log line (``_access_log``: id, route, status, tokens, TTFT, duration, the reason of an error;
   never the prompt), at INFO (DEBUG for successful polls of /health, /metrics and /status.json).

Run it with an ``AppRunner(app, handler_cancellation=True)`` (see :mod:`splitserve.router.main`) so that a client
that goes away cancels its handler, which aborts the request (every choice of it) on the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from typing import Any, AsyncIterator

import jinja2
import zmq.asyncio
from aiohttp import web

from splitserve.core.config import RouterConfig
from splitserve.core.tokenizer import NoChatTemplateError, Tokenizer, load_tokenizer
from splitserve.router import admin
from splitserve.router.autoscale import AutoRatio
from splitserve.router.choices import Choice, full_body, merged, plan_choices, total_usage
from splitserve.router.formatting import ChatFormatter, CompletionFormatter, ResponseHead
from splitserve.router.openai_api import (
    APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, bad_request,
    models_body, parse_json_body, parse_request, validate_body,
)
from splitserve.router.output import Delta
from splitserve.router.planner import Slo
from splitserve.router.service import SERVICE, RouterService
from splitserve.router.version import package_version

logger = logging.getLogger(__name__)

_ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
                        "/tokenize", "/detokenize", "/version"})
_QUIET = frozenset({"/health", "/metrics", "/status.json"})
"""Polled routes: their access-log lines go at DEBUG."""
ACCESS = web.RequestKey("access", dict)
"""Per request: what the access-log line reports besides route and status (id, tokens, TTFT)."""


def _endpoint_label(request: web.Request) -> str:
    return request.path if request.path in _ENDPOINTS else "other"


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """OpenAI-shaped errors for API errors and unknown routes; request counts by status; the access log."""
    svc = request.app[SERVICE]
    start = time.monotonic()
    request[ACCESS] = {}
    reason = None
    try:
        resp = await handler(request)
    except APIError as exc:
        resp, reason = web.json_response(exc.body(), status=exc.status), exc.message
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        body = APIError(exc.status, exc.reason, type="invalid_request_error").body()
        resp, reason = web.json_response(body, status=exc.status), exc.reason
    svc.metrics.requests.labels(_endpoint_label(request), str(resp.status)).inc()
    _access_log(request, resp.status, time.monotonic() - start, reason)
    return resp


def _access_log(request: web.Request, status: int, duration_s: float, reason: str | None) -> None:
    """One line per request: id, route, status, tokens, TTFT, duration, and why it failed (never the prompt)."""
    info = request[ACCESS]
    parts = [f"id={info.get('id', '-')}", f"route={request.method} {request.path}", f"status={status}"]
    if "prompt_tokens" in info:
        parts += [f"prompt_tokens={info['prompt_tokens']}", f"output_tokens={info['output_tokens']}"]
    if info.get("ttft_s") is not None:
        parts.append(f"ttft_ms={info['ttft_s'] * 1e3:.1f}")
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


async def completions(request: web.Request) -> web.StreamResponse:
    svc, head = request.app[SERVICE], _head(request, "cmpl")
    req = parse_request(CompletionRequest, parse_json_body(await request.read()))
    svc.check_model(req.model)
    prompts = req.prompts()
    ids = [list(p) if isinstance(p, list) else svc.tokenizer.encode(p) for p in prompts]

    def make_fmt(index: int, i: int) -> CompletionFormatter:
        return CompletionFormatter(svc.tokenizer, svc.model_name, head, index, req, prompts[i], ids[i])

    return await _serve(request, svc, req, plan_choices(svc, req, ids, "prompt", make_fmt))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    svc, head = request.app[SERVICE], _head(request, "chatcmpl")
    req = parse_request(ChatCompletionRequest, parse_json_body(await request.read()))
    svc.check_model(req.model)
    try:
        text = svc.tokenizer.apply_chat_template(req.template_messages(), add_generation_prompt=True)
    except NoChatTemplateError as exc:
        raise bad_request(f"model '{svc.model_name}' has no chat template; use /v1/completions instead",
                          param="model", code="no_chat_template") from exc
    except jinja2.TemplateError as exc:
        raise bad_request(f"the chat template rejected the messages: {exc}", param="messages") from exc
    prompt_ids = svc.tokenizer.encode(text, add_special_tokens=False)

    def make_fmt(index: int, _prompt: int) -> ChatFormatter:
        return ChatFormatter(svc.tokenizer, svc.model_name, head, index, req)

    return await _serve(request, svc, req, plan_choices(svc, req, [prompt_ids], "messages", make_fmt))


async def _serve(request: web.Request, svc: RouterService, req: Any, choices: list[Choice]) -> web.StreamResponse:
    """Run every choice; the access log gets the request's token counts and TTFT (time to any first token)."""
    access = request[ACCESS]
    start = time.monotonic()
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
    req = validate_body(TokenizeRequest, parse_json_body(await request.read()))
    svc.check_model(req.model)
    tokens = svc.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    return web.json_response({"tokens": tokens, "count": len(tokens), "max_model_len": svc.max_model_len()})


async def detokenize(request: web.Request) -> web.Response:
    """vLLM's ``/detokenize``: ``{"model", "tokens"}`` -> ``{"prompt"}``; ids outside the vocabulary are a 400."""
    svc = request.app[SERVICE]
    req = validate_body(DetokenizeRequest, parse_json_body(await request.read()))
    svc.check_model(req.model)
    vocab = svc.vocab_size() or svc.tokenizer.vocab_size
    bad = next((t for t in req.tokens if t >= vocab), None)
    if bad is not None:
        raise bad_request(f"invalid field 'tokens': token ids must be in [0, {vocab}), got {bad}", param="tokens")
    return web.json_response({"prompt": svc.tokenizer.decode(req.tokens)})


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


def create_app(config: RouterConfig, tokenizer: Tokenizer | None = None, rng: random.Random | None = None,
               ctx: zmq.asyncio.Context | None = None) -> web.Application:
    """The router app. ``tokenizer`` defaults to ``load_tokenizer(config.model)``; ``ctx`` to a new
    ZeroMQ context owned (and terminated) by the app."""
    app = web.Application(middlewares=[_errors], client_max_size=64 * 1024 * 1024)
    own_ctx = ctx is None
    zctx = ctx if ctx is not None else zmq.asyncio.Context()
    svc = RouterService(config, tokenizer if tokenizer is not None else load_tokenizer(config.model), zctx, rng)
    app[SERVICE] = svc

    async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
        await svc.control.start()
        auto = _start_auto_ratio(svc)
        yield
        if auto is not None:
            auto.cancel()
        await svc.control.stop()
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
    admin.add_routes(app)
    return app

