"""The router's aiohttp application: the OpenAI-compatible API, health, metrics, admin and status page.

``create_app(config)`` builds the app; its startup hook loads the tokenizer, creates the process's one
ZeroMQ context and binds the control socket. Run it with an ``AppRunner(app, handler_cancellation=True)``
(see :mod:`splitserve.router.main`) so that a client that goes away cancels its handler, which aborts
the request on the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from typing import Any, AsyncIterator

import jinja2
import msgspec
import zmq.asyncio
from aiohttp import web

from splitserve.core.config import RouterConfig
from splitserve.core.messages import SamplingParams
from splitserve.core.tokenizer import NoChatTemplateError, Tokenizer, load_tokenizer
from splitserve.router import admin
from splitserve.router.autoscale import AutoRatio
from splitserve.router.formatting import ChatFormatter, CompletionFormatter, Formatter
from splitserve.router.openai_api import (
    APIError, ChatCompletionRequest, CompletionRequest, bad_request, check_token_ids, models_body, new_id,
    parse_json_body, parse_request, to_sampling_params,
)
from splitserve.router.output import Delta, OutputProcessor
from splitserve.router.planner import Slo
from splitserve.router.service import SERVICE, RouterService

logger = logging.getLogger(__name__)

_ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"})


def _endpoint_label(request: web.Request) -> str:
    return request.path if request.path in _ENDPOINTS else "other"


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """OpenAI-shaped errors for API errors and unknown routes; request counts by status."""
    svc = request.app[SERVICE]
    try:
        resp = await handler(request)
    except APIError as exc:
        resp = web.json_response(exc.body(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        body = APIError(exc.status, exc.reason, type="invalid_request_error").body()
        resp = web.json_response(body, status=exc.status)
    svc.metrics.requests.labels(_endpoint_label(request), str(resp.status)).inc()
    return resp


# --- OpenAI endpoints ----------------------------------------------------------------------------


async def completions(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICE]
    req = parse_request(CompletionRequest, parse_json_body(await request.read()))
    svc.check_model(req.model)
    prompt_ids = list(req.prompt) if isinstance(req.prompt, list) else svc.tokenizer.encode(req.prompt)
    fmt = CompletionFormatter(svc.tokenizer, svc.model_name, req, prompt_ids)
    return await _serve(request, svc, req, fmt, prompt_ids, "prompt")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICE]
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
    fmt = ChatFormatter(svc.tokenizer, svc.model_name, req)
    return await _serve(request, svc, req, fmt, prompt_ids, "messages")


async def _serve(request: web.Request, svc: RouterService, req: Any, fmt: Formatter, prompt_ids: list[int],
                 prompt_field: str) -> web.StreamResponse:
    svc.admit()
    max_len = svc.max_model_len()
    if max_len is None:
        raise APIError(503, "no healthy workers are available", type="service_unavailable", code="no_workers")
    check_token_ids(req, prompt_ids, prompt_field, svc.vocab_size())
    params = to_sampling_params(req, len(prompt_ids), max_len, prompt_field)
    params = _with_router_stops(svc, params)
    proc = svc.processor(new_id("req"), prompt_ids, req.stop_strings)
    gen = svc.generate(proc, prompt_ids, params)
    async with contextlib.aclosing(gen):
        if req.stream:
            return await _stream(request, fmt, gen, proc, req.include_usage)
        deltas = [d async for d in gen]
        return web.json_response(fmt.full(deltas, proc))


def _with_router_stops(svc: RouterService, params: SamplingParams) -> SamplingParams:
    extra = tuple(svc.config.extra_stop_token_ids)
    if not extra:
        return params
    return msgspec.structs.replace(params, stop_token_ids=tuple(dict.fromkeys(params.stop_token_ids + extra)))


async def _sse(resp: web.StreamResponse, body: dict[str, Any]) -> None:
    await resp.write(b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n")


async def _stream(request: web.Request, fmt: Formatter, gen: AsyncIterator[Delta], proc: OutputProcessor,
                  include_usage: bool) -> web.StreamResponse:
    """SSE stream; headers go out with the first output, so failures before it get a real HTTP status."""
    first = await anext(gen, None)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    try:
        try:
            for body in fmt.start_chunks():
                await _sse(resp, body)
            if first is not None:
                await _send_delta(resp, fmt, first, proc)
                async for delta in gen:
                    await _send_delta(resp, fmt, delta, proc)
            if include_usage:
                await _sse(resp, fmt.usage_chunk(proc))
        except APIError as exc:
            logger.warning("request %s: stream ended with error: %s", proc.request_id, exc.message)
            await _sse(resp, exc.body())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except ConnectionResetError:  # the caller closes ``gen``, which aborts the request on its workers
        logger.info("request %s: client disconnected mid-stream", proc.request_id)
    return resp


async def _send_delta(resp: web.StreamResponse, fmt: Formatter, delta: Delta, proc: OutputProcessor) -> None:
    body = fmt.chunk(delta, proc)
    if body is not None:
        await _sse(resp, body)


async def list_models(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    return web.json_response(models_body(svc.model_name, svc.max_model_len()))


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
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    admin.add_routes(app)
    return app

