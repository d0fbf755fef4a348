"""The router's request path, independent of HTTP: admission, worker choice, and the token stream.

:meth:`RouterService.generate` routes one request (a decode-capable worker, plus a prefill-capable
worker when serving disaggregated), sends :class:`GenerateReq`, and yields :class:`Delta` objects
until the request finishes. Whatever ends the iteration early (client disconnect, stop string,
timeout, error) sends :class:`AbortReq` to the workers, so no worker keeps generating for nobody.
Failures surface as :class:`~splitserve.router.openai_api.APIError`.

It also keeps what the HTTP layer checks against: the API keys (:func:`load_api_keys`, :meth:`RouterService.key_ok`),
the prompt character limit (:meth:`RouterService.prompt_char_limit`) and the thread pool that tokenizes and renders
chat templates off the event loop (:meth:`RouterService.off_loop`), whose tokenizer caches stay within
:data:`TOKENIZER_CACHE_ENTRIES` entries in all (:func:`bound_bpe_cache`).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import random
import re
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Sequence, TypeVar

import zmq.asyncio
from aiohttp import web
from tokenizers import __version__ as tokenizers_version
from tokenizers.models import BPE

from splitserve.core import keys
from splitserve.core.config import RouterConfig
from splitserve.core.messages import EndSession, GenerateReq, SamplingParams, SessionHint
from splitserve.core.tokenizer import IncrementalDetokenizer, StopChecker, Tokenizer
from splitserve.router.control import ControlPlane, RequestStream
from splitserve.router.metrics import RouterMetrics
from splitserve.router.openai_api import CHARS_PER_TOKEN, APIError
from splitserve.router.output import Delta, OutputProcessor, WorkerFailed
from splitserve.router.policies import RouteRequest, make_policy
from splitserve.router.pools import WorkerRegistry, WorkerState

logger = logging.getLogger(__name__)

TOKENIZER_THREADS = 4
"""Threads that tokenize and render chat templates (the HF tokenizer releases the GIL in ``encode_batch``)."""
TOKENIZER_CACHE_ENTRIES = 2048
"""BPE encode-cache entries the router's tokenizer keeps in all, over its :data:`TOKENIZER_THREADS` threads
(:func:`bound_bpe_cache`). An entry is one pre-tokenized word (the whole prompt for a tokenizer without a
pre-tokenizer, such as the built-in one) under 256 bytes, up to about 8.5 KB: at most about 17 MB in all."""
MAX_SESSIONS = 100_000
"""Sessions the router remembers the holder of (the oldest is forgotten first: its next turn is a full prefill)."""
MAX_GROUPS = 4096
"""Routing groups (the copies of one prompt, ``n`` > 1) remembered, newest first: long enough for one request."""
_T = TypeVar("_T")


class _Timing:
    """TTFT / TPOT / ITL bookkeeping of one request."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None

    def on_tokens(self, metrics: RouterMetrics) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
        elif self.last is not None:
            metrics.itl.observe(now - self.last)
        self.last = now

    def finish(self, metrics: RouterMetrics, proc: OutputProcessor) -> None:
        ttft = None if self.first is None else self.first - self.start
        tpot = None
        if self.first is not None and self.last is not None and proc.completion_tokens > 1:
            tpot = (self.last - self.first) / (proc.completion_tokens - 1)
        metrics.observe_request(ttft, tpot, time.monotonic() - self.start, proc.num_prompt_tokens,
                                proc.completion_tokens)


class RouterService:
    """Worker registry, policies, control plane and metrics of one router process."""

    def __init__(self, config: RouterConfig, tokenizer: Tokenizer, ctx: zmq.asyncio.Context,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.model_names = served_names(config)
        """The names clients may use in ``model`` (``--served-model-name`` aliases, else ``--model``)."""
        self.model_name = self.model_names[0]
        """The name responses carry."""
        self.tokenizer = tokenizer
        self.sessions: OrderedDict[str, str] = OrderedDict()
        """session id -> the decode worker that holds its KV after its last turn."""
        self._groups: OrderedDict[str, str] = OrderedDict()
        """Routing group -> the prefill worker its first request went to (bounded by ``MAX_GROUPS``)."""
        self.registry = WorkerRegistry(config.heartbeat_timeout_s, max_workers=config.max_workers,
                                       forget_after_s=config.forget_worker_after_s)
        self.metrics = RouterMetrics(self.registry)
        control_keys = keys.load(config.keys_dir, "router") if config.keys_dir else None
        self.control = ControlPlane(ctx, self.registry, config.control_host, config.control_port,
                                    control_keys=control_keys)
        self.metrics.watch_refusals(lambda: self.control.refused)
        self.prefill_policy = make_policy(config.prefill_policy, "prefill", rng)
        self.decode_policy = make_policy(config.decode_policy, "decode", rng)
        self.inflight = 0
        self.accepting = True
        self.auto_ratio = None
        """The automatic ratio controller loop, when ``config.auto_ratio`` is on (router/autoscale.py)."""
        self.api_keys = [k.encode() for k in load_api_keys(config)]
        """Bearer keys of the API (empty: none needed); never logged."""
        self.pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tokenize")
        bound_bpe_cache(tokenizer, TOKENIZER_CACHE_ENTRIES // TOKENIZER_THREADS)

    # --- HTTP-layer checks -----------------------------------------------------------------------

    def key_ok(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries one of the API keys (always, when none is configured).
        Every key is compared, each in constant time, so the time taken does not say which one nearly matched."""
        if not self.api_keys:
            return True
        scheme, _, given = (authorization or "").partition(" ")
        token = given.strip().encode("utf-8", "surrogatepass")
        ok = False
        for key in self.api_keys:
            ok |= hmac.compare_digest(token, key)
        return ok and scheme.lower() == "bearer"

    def prompt_char_limit(self) -> int | None:
        """Longest text prompt taken before tokenizing: ``max_prompt_chars``, else :data:`CHARS_PER_TOKEN` per token
        of the workers' context length (``None`` while no worker is known)."""
        if self.config.max_prompt_chars is not None:
            return self.config.max_prompt_chars
        max_len = self.max_model_len()
        return None if max_len is None else CHARS_PER_TOKEN * max_len

    async def off_loop(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn(*args, **kwargs)`` on the tokenizer threads, so a huge prompt never stalls the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    # --- admission -------------------------------------------------------------------------------

    def healthy(self) -> bool:
        return self.registry.has_healthy("prefill") and self.registry.has_healthy("decode")

    def check_model(self, model: str | None) -> None:
        """404 ``model_not_found`` unless ``model`` is omitted (one model is served), a served name or ``--model``."""
        if model is not None and model not in self.model_names and model != self.config.model:
            names = ", ".join(f"'{n}'" for n in self.model_names)
            raise APIError(404, f"model '{model}' does not exist; this server serves {names}",
                           param="model", code="model_not_found")

    def max_model_len(self) -> int | None:
        """The smallest context length among routable workers (``None`` without workers)."""
        lens = [w.max_model_len for w in self.registry.all() if w.routable]
        return min(lens) if lens else None

    def vocab_size(self) -> int | None:
        """The smallest vocabulary among routable workers that reported one."""
        sizes = [w.vocab_size for w in self.registry.all() if w.routable and w.vocab_size]
        return min(sizes) if sizes else None

    def admit(self, count: int = 1) -> None:
        """503 without routable workers or while shutting down; 429 when ``count`` more requests would put more
        than ``max_queued_requests`` in flight."""
        if not self.accepting:
            raise APIError(503, "the router is shutting down", type="service_unavailable")
        if not self.registry.candidates("prefill") or not self.registry.candidates("decode"):
            raise APIError(503, "no healthy prefill-capable and decode-capable workers are available",
                           type="service_unavailable", code="no_workers")
        if self.inflight + count > self.config.max_queued_requests:
            raise APIError(429, f"too many requests in flight (limit {self.config.max_queued_requests}); "
                           "retry later", type="rate_limit_exceeded", code="overloaded")

    def pick(self, prompt_ids: Sequence[int], session: SessionHint | None = None,
             group: str | None = None) -> tuple[WorkerState, WorkerState | None]:
        """(decode worker, prefill worker or ``None`` when the decode worker prefills itself). A session's turn goes
        to the decode worker that holds its KV while that worker can take it; else anywhere (a full prefill). The
        requests of one ``group`` (copies of one prompt) go to the same prefill worker while it can take them."""
        decode, prefill = self._pick(prompt_ids, session)
        if group is None or prefill is None:
            return decode, prefill
        earlier = self.registry.get(self._groups.get(group, ""))
        if earlier is not None and earlier is not decode and earlier in self.registry.candidates("prefill"):
            return decode, earlier
        self._groups[group] = prefill.worker_id
        while len(self._groups) > MAX_GROUPS:
            self._groups.popitem(last=False)
        return decode, prefill

    def _pick(self, prompt_ids: Sequence[int], session: SessionHint | None) -> tuple[WorkerState, WorkerState | None]:
        route = RouteRequest(prompt_ids)
        decode = self._session_holder(session) or self.decode_policy.choose(self.registry.candidates("decode"), route)
        prefill_cands = self.registry.candidates("prefill")
        prefill_only = [w for w in prefill_cands if w.role == "prefill"]
        if prefill_only:
            return decode, self.prefill_policy.choose(prefill_only, route)
        if decode.role == "both":
            return decode, None
        others = [w for w in prefill_cands if w is not decode]
        if not others:
            raise APIError(503, "no prefill-capable worker is available", type="service_unavailable")
        return decode, self.prefill_policy.choose(others, route)

    def _session_holder(self, session: SessionHint | None) -> WorkerState | None:
        held_by = self.sessions.get(session.session_id) if session is not None else None
        holder = self.registry.get(held_by) if held_by is not None else None
        if holder is None or holder not in self.registry.candidates("decode"):
            return None
        return holder

    def forget_sessions_of(self, worker_id: str) -> list[str]:
        """The sessions routed to ``worker_id``, forgotten here: it drains or stops decoding, and drops their KV (each
        logged there, counted as an eviction by reason); their next turns are prefilled in full elsewhere."""
        dropped = [sid for sid, wid in self.sessions.items() if wid == worker_id]
        for sid in dropped:
            del self.sessions[sid]
        self.metrics.sessions.set(len(self.sessions))
        return dropped

    def _remember_session(self, session: SessionHint | None, decode: WorkerState) -> WorkerState | None:
        """Where the session's KV will be after this turn (forgotten with its last turn; bounded, oldest first).
        Returns the previous holder when this turn goes elsewhere and that worker is still up (it should let go)."""
        if session is None:
            return None
        previous = self.sessions.pop(session.session_id, None)
        if not session.end:
            self.sessions[session.session_id] = decode.worker_id
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
        self.metrics.sessions.set(len(self.sessions))
        old = self.registry.get(previous) if previous not in (None, decode.worker_id) else None
        return old if old is not None and old.healthy else None

    # --- the token stream ------------------------------------------------------------------------

    def processor(self, request_id: str, prompt_ids: Sequence[int], stop_strings: Sequence[str],
                  **options: Any) -> OutputProcessor:
        """Per-request output state (detokenizer, stop strings, counts) for :meth:`generate`; ``options`` are
        :class:`OutputProcessor` fields (``stop_token_ids``, ``include_stop_str``, ``echo_only``)."""
        return OutputProcessor(request_id, IncrementalDetokenizer(self.tokenizer, prompt_ids),
                               StopChecker(stop_strings), num_prompt_tokens=len(prompt_ids), **options)

    async def generate(self, proc: OutputProcessor, prompt_ids: Sequence[int], params: SamplingParams,
                       admitted: bool = False, session: SessionHint | None = None,
                       group: str | None = None) -> AsyncIterator[Delta]:
        """Route and run one request, yielding deltas until it finishes (see module docstring). ``admitted``: the
        caller already checked :meth:`admit` for it (the choices of one API request are admitted together)."""
        if not admitted:
            self.admit()
        decode, prefill = self.pick(prompt_ids, session, group)
        moved_from = self._remember_session(session, decode)
        if moved_from is not None:  # its holder is draining or not decoding: it lets the old copy go
            await self.control.send(moved_from, EndSession(session_id=session.session_id))
        request_id = proc.request_id
        stream = self.control.open_stream(request_id, decode, prefill, len(prompt_ids))
        self.inflight += 1
        self.metrics.inflight.inc()
        logger.info("request %s: decode=%s prefill=%s prompt_tokens=%d", request_id, decode.worker_id,
                    prefill.worker_id if prefill else "(local)", len(prompt_ids))
        try:
            req = GenerateReq(request_id, tuple(prompt_ids), params, prefill.worker_id if prefill else None,
                              prefill.peer_addr if prefill else None, session=session,
                              prefill_key=prefill.curve_key if prefill else None)
            if not await self.control.send(decode, req):
                raise APIError(503, f"worker {decode.worker_id} is unreachable", type="service_unavailable")
            async for delta in self._deltas(stream, proc):
                yield delta
        finally:
            await self._end(stream, proc)

    async def _deltas(self, stream: RequestStream, proc: OutputProcessor) -> AsyncIterator[Delta]:
        timing = _Timing()
        deadline = asyncio.get_running_loop().time() + self.config.request_timeout_s
        while not proc.finished:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                out = await asyncio.wait_for(stream.queue.get(), timeout=max(remaining, 0.0))
            except asyncio.TimeoutError:
                logger.warning("request %s: timed out after %.1f s", stream.request_id,
                               self.config.request_timeout_s)
                raise APIError(504, f"request timed out after {self.config.request_timeout_s} s",
                               type="timeout", code="timeout") from None
            if out.timing is not None:
                self.metrics.observe_timing(out.timing)
                logger.debug("request %s: timing %s", stream.request_id, out.timing)
            try:
                delta = proc.process(out)
            except WorkerFailed as exc:
                logger.warning("request %s: failed: %s", stream.request_id, exc)
                grammar = _GRAMMAR_ERROR.search(str(exc))
                if grammar is not None:  # a grammar xgrammar refuses (core/engine/grammar.py): the client's fault
                    raise APIError(400, f"invalid field '{grammar[1]}': {grammar[2]}", param=grammar[1],
                                   code="invalid_grammar") from exc
                raise APIError(500, f"generation failed: {exc}", type="server_error", code="worker_error") from exc
            if delta.token_ids:
                timing.on_tokens(self.metrics)
            yield delta
        timing.finish(self.metrics, proc)

    async def _end(self, stream: RequestStream, proc: OutputProcessor) -> None:
        try:
            if not proc.finished:
                await self.control.abort(stream.request_id, "client went away or request failed")
            elif proc.stopped_by_string:
                await self.control.abort(stream.request_id, "stop string")
        finally:
            self.control.close_stream(stream)
            self.inflight -= 1
            self.metrics.inflight.dec()
            logger.debug("request %s: done (%d tokens)", stream.request_id, proc.completion_tokens)


_GRAMMAR_ERROR = re.compile(r"invalid grammar in (\S+): (.*)")
"""A worker's error for a structured-output spec it cannot compile (core/engine/grammar.py)."""


def bound_bpe_cache(tokenizer: Tokenizer, per_thread: int) -> bool:
    """Cap the encode cache of a Hugging Face BPE model at ``per_thread`` entries per thread. ``False`` when there is
    nothing to cap (no BPE model: a Unigram model's cache is one shared map, WordPiece has none) or, logged, when the
    library cannot resize it (its default then stands). Call it before the first encode: cached entries stay.

    Since ``tokenizers`` 0.23 that cache is thread-local: each thread that encodes keeps its own map of up to 10,000
    entries, freed only when the thread exits. Tokenizing on :data:`TOKENIZER_THREADS` threads, the router kept up
    to four times 10,000 whole soak prompts of about 4 KB each, and two thirds of the soak's prompts are short
    enough (under 256 bytes) to be cached: issue 12's router RSS growth of about 3 KB per request, linear for some
    60,000 requests. Encoded ids do not depend on the cache."""
    model = getattr(getattr(tokenizer, "backend", None), "model", None)
    if not isinstance(model, BPE):
        return False
    if not hasattr(model, "_resize_cache"):
        logger.warning("tokenizers %s cannot resize the BPE cache: each tokenizer thread may keep its default",
                       tokenizers_version)
        return False
    model._resize_cache(per_thread)
    logger.info("tokenizer BPE cache: at most %d entries per tokenizer thread", per_thread)
    return True


def load_api_keys(config: RouterConfig) -> tuple[str, ...]:
    """``api_key`` plus the keys in ``api_key_file`` (one a line; blank lines and ``#`` comments skipped). Raises
    ``OSError`` for an unreadable file and ``ValueError`` for one without keys."""
    keys = list(config.api_key)
    if config.api_key_file is not None:
        with open(config.api_key_file, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
        found = [line for line in lines if line and not line.startswith("#")]
        if not found:
            raise ValueError(f"api_key_file {config.api_key_file} holds no key")
        keys += found
    return tuple(dict.fromkeys(keys))


def served_names(config: RouterConfig) -> tuple[str, ...]:
    """The names clients may use for the model: ``served_model_name`` (aliases), else ``model``."""
    return config.served_model_name or (config.model,)


SERVICE = web.AppKey("service", RouterService)
"""Where the app keeps its :class:`RouterService`."""
