"""The engine: one step is schedule -> run -> postprocess.

Flow of :meth:`LLMEngine.step`:
1. The scheduler picks this step's work (finishing as "length" the requests that cannot fit the pool).
2. The runner computes it and samples. When the whole batch raises, its sequences run again one at a time
   (a forward rewrites the same KV slots with the same values, so this is safe); a sequence that still
   raises, or whose sampling raised, is that request's own fault.
3. Postprocess: such a request is finished with ``finish_reason="error"`` and its ``error`` (pages freed,
   one WARNING line); the others append their tokens and finish on EOS, stop ids or length.

Overlapped steps (``EngineConfig.async_scheduling``): when every row of a step is greedy with nothing else asked
(plain, or masked by a grammar) -- a decode token, or with ``overlap_prefill`` a prompt chunk of any length -- the
step is launched without waiting for it (:meth:`ModelRunner.launch`) and committed with pending placeholder tokens
(a chunk before a prompt's last samples nothing and gets none). The next :meth:`LLMEngine.step`:
1'. schedules step N+1 and queues its forward pass (its inputs read step N's tokens on the device);
2'. waits for step N and resolves it (:meth:`LLMEngine._resolve`): placeholders become tokens, each token goes to its
    request's grammar matcher as on the synchronous path (a refused token fails the request with ``"error"``, a
    terminated matcher finishes it with ``"stop"``), and the requests that stop there finish;
3'. with grammar rows in N+1, fills their bitmask from the matchers (rows of requests that ended in 2' are skipped),
    and the runner applies it and queues the argmax (:meth:`LLMEngine._seal`);
so host work (scheduling, grammar matchers, outputs, the worker's messages) runs while the GPU computes, and a prompt
that arrives while a step runs is queued right behind it (an agent session's turn on a decode worker). Given
``arrivals`` (a worker's sockets), step 1' first waits on them while the step in flight is expected to run on
(0'., core/engine/pacing.py): work that comes then is taken in before N+1 is scheduled, so a new prompt runs in the
very next step instead of the one after, and the step returns nothing yet. With ``prompt_lane``, a step of prompts alone
(``prefill_first_tokens``) that shares no page with the step in flight runs synchronously on the prompt lane while
that step stays in flight (core/engine/lane.py). A step that
cannot overlap (sampling beyond argmax, logprobs, a layer hook, a prefill worker's prompts) first completes the step
in flight and runs synchronously. A request that stops at step N still has a row in step N+1: its extra token is dropped and
its pages are freed once N+1 has completed.

Requests are checked when they are added (:meth:`LLMEngine.make_request`): a prompt this engine can never
serve, or sampling parameters the sampler cannot honour (NaN, infinite, impossible ranges), raise ``ValueError``.

Used directly for offline generation (``splitserve generate``), and by every worker role: a prefill
worker adds ``prefill_only`` requests and streams KV from the runner's layer hook; a decode worker reserves
pages for incoming KV and then adds the request with its first token already known.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from splitserve.core.cache.manager import KVCacheBlocks, KVCacheManager
from splitserve.core.config import EngineConfig
from splitserve.core.engine.batch import RunnerOutput, ScheduledBatch, SeqResult, SeqWork, error_text
from splitserve.core.engine.grammar import GrammarStates
from splitserve.core.engine.pacing import StepClock
from splitserve.core.engine.runner import InFlight, KVPoolSpec, LayerHook, ModelRunner
from splitserve.core.engine.sampler import argmax_only, check_params, masked_argmax_only
from splitserve.core.engine.scheduler import Scheduler, SchedulerLimits
from splitserve.core.messages import SamplingParams, TokenLogprob
from splitserve.core.model.attention import make_backend
from splitserve.core.model.config import ModelConfig
from splitserve.core.model.layers import TORCH_OPS, KernelOps
from splitserve.core.model.loader import load_model
from splitserve.core.request import PENDING_TOKEN, Request
from splitserve.core.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

PoolAllocator = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


@dataclass
class StepOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    """With ``finish_reason="error"``: why the request failed (its own fault: it must not be recomputed)."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RuntimeInfo:
    """Facts derived at start-up (never user-set)."""

    model_id: str
    device: str
    dtype: torch.dtype
    num_pages: int
    page_size: int
    max_model_len: int
    bytes_per_page: int


def resolve_device(cfg: EngineConfig) -> torch.device:
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
        device = torch.device("cuda", cfg.device_index)
        torch.cuda.set_device(device)  # Triton launches (and new streams) use the current device
        return device
    return torch.device("cpu")


def size_pool(cfg: EngineConfig, spec_one_page: KVPoolSpec, device: torch.device) -> int:
    """Pages that fit: config value, else a share of free GPU memory, else ``cpu_kv_cache_mb``."""
    if cfg.num_pages is not None:
        return cfg.num_pages
    per_page = spec_one_page.bytes_per_page
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(2, int(free * cfg.kv_cache_memory_fraction) // per_page)
    return max(2, cfg.cpu_kv_cache_mb * (1 << 20) // per_page)


def limits_for_role(cfg: EngineConfig, role: str) -> SchedulerLimits:
    """Scheduler limits of a worker role: ``prefill`` computes whole prompts up to ``prefill_token_budget`` a step;
    ``decode`` and ``both`` keep chunked prefill so decode steps stay short, and run short prompts first when
    ``prefill_first_tokens`` says so."""
    if role == "prefill":
        budget = cfg.prefill_token_budget
        return SchedulerLimits(cfg.max_num_seqs, budget, budget, cfg.enable_prefix_caching)
    return SchedulerLimits(cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.chunk_size, cfg.enable_prefix_caching,
                           cfg.prefill_first_tokens)


def select_ops(cfg: EngineConfig, device: torch.device) -> KernelOps:
    """Triton RMSNorm / RoPE / SwiGLU on CUDA (unless the torch backend is forced), torch references elsewhere."""
    if device.type != "cuda" or cfg.attention_backend == "torch":
        return TORCH_OPS
    from splitserve.kernels import ops as triton_ops

    return KernelOps(
        rms_norm=triton_ops.rms_norm, rotary=triton_ops.rotary, silu_and_mul=triton_ops.silu_and_mul, name="triton"
    )


@dataclass(frozen=True)
class StepTiming:
    """When a step's scheduling began, when it started (queued, if overlapped) and when its tokens reached the host
    (``time.monotonic()``), whether it replayed a CUDA graph, its rows, and whether it was overlapped."""

    scheduled: float
    started: float
    ended: float
    graphed: bool
    rows: int
    overlapped: bool


CLOCK_REPORT_S = 30.0
"""Seconds between two log lines on the step window (while decode steps overlap)."""


class LLMEngine:
    def __init__(
        self, cfg: EngineConfig, layer_hook: LayerHook | None = None, allocate: PoolAllocator | None = None
    ) -> None:
        """``allocate(shape, dtype, device)``: where the KV pool lives (a transfer backend may need it shared)."""
        self.cfg = cfg
        device = resolve_device(cfg)
        torch.manual_seed(cfg.seed)
        model, mcfg = load_model(cfg, select_ops(cfg, device))
        self.model_config: ModelConfig = mcfg
        dtype = next(model.parameters()).dtype
        one = KVPoolSpec(mcfg.num_layers, 1, cfg.page_size, mcfg.num_kv_heads, mcfg.head_dim, dtype)
        num_pages = size_pool(cfg, one, device)
        spec = KVPoolSpec(mcfg.num_layers, num_pages, cfg.page_size, mcfg.num_kv_heads, mcfg.head_dim, dtype)
        self.kv_cache = spec.allocate(device) if allocate is None else allocate(spec.shape, dtype, device)
        max_len = min(cfg.max_model_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings)
        self.info = RuntimeInfo(mcfg.model_id, str(device), dtype, num_pages, cfg.page_size, max_len, spec.bytes_per_page)
        self.eos_token_ids = frozenset(mcfg.eos_token_ids) | frozenset(cfg.extra_stop_token_ids)
        self.kv = KVCacheManager(num_pages, cfg.page_size, cfg.enable_prefix_caching)
        self._offline_ids = itertools.count()
        self.scheduler = Scheduler(self.kv, limits_for_role(cfg, "both"))
        backend = make_backend(cfg.attention_backend, device.type)
        graphs = None
        if device.type == "cuda" and cfg.cuda_graphs and backend.name == "triton":
            from splitserve.core.engine.cuda_graphs import DecodeGraphs

            graphs = DecodeGraphs(model, self.kv_cache, backend, min(cfg.max_num_seqs, 256), max_len, cfg.page_size)
        self.runner = ModelRunner(model, self.kv_cache, backend, self.eos_token_ids, layer_hook, graphs)
        self.grammars = GrammarStates(lambda: load_tokenizer(cfg.model), mcfg.vocab_size, self.eos_token_ids)
        """Structured output: compiled grammars and one matcher per constrained request (core/engine/grammar.py)."""
        self.runner.grammars = self.grammars
        self._in_flight: InFlight | None = None
        self.clock = StepClock()
        """When the overlapped step in flight should end (module flow, step 0')."""
        self._now: Callable[[], float] = time.monotonic
        self._clock_report_at = 0.0
        """When the step window's next log line is due (0: not started)."""
        self.last_step: StepTiming | None = None
        """The last step whose tokens reached the host: for a worker's per-request timing log."""
        logger.info("engine ready: model %s on %s, %d pages of %d tokens", mcfg.model_id, device, num_pages, cfg.page_size)

    # --- requests -----------------------------------------------------------------------------------

    def check_prompt(self, request_id: str, prompt: Sequence[int]) -> None:
        """Raise ``ValueError`` (with a message for the client) for a prompt this engine can never serve."""
        if not prompt:
            raise ValueError(f"request {request_id}: empty prompt")
        vocab = self.model_config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"request {request_id}: prompt token ids must be in [0, {vocab})")
        if len(prompt) >= self.info.max_model_len:
            raise ValueError(
                f"request {request_id}: prompt has {len(prompt)} tokens, the context is {self.info.max_model_len}"
            )
        if self.kv.num_pages_for(len(prompt) + 1) > self.info.num_pages:
            raise ValueError(
                f"request {request_id}: prompt of {len(prompt)} tokens needs more KV pages than this worker has "
                f"({self.info.num_pages} pages of {self.info.page_size} tokens)"
            )

    def make_request(self, request_id: str, prompt: Sequence[int], params: SamplingParams, prefill_only: bool = False) -> Request:
        self.check_prompt(request_id, prompt)
        try:
            check_params(params)
            if params.grammar is not None:  # structured output: compile (cached) and start the request's matcher
                self.grammars.add(request_id, params.grammar)
        except ValueError as exc:
            raise ValueError(f"request {request_id}: {exc}") from exc
        return Request(
            request_id=request_id,
            prompt_token_ids=list(prompt),
            params=params,
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.info.max_model_len,
            prefill_only=prefill_only,
        )

    def add_request(
        self,
        request_id: str,
        prompt: Sequence[int],
        params: SamplingParams,
        prefill_only: bool = False,
        session_key: str | None = None,
        continues: str | None = None,
    ) -> Request:
        """Queue a request. With ``session_key`` its pages stay pinned after it finishes (see :meth:`release_session`);
        ``continues``: the session whose KV it continues (default ``session_key``; a session's last turn pins nothing
        but still takes over the session's partial last page)."""
        req = self.make_request(request_id, prompt, params, prefill_only)
        req.session_key = session_key
        req.continues = continues or session_key
        self.scheduler.add(req)
        return req

    def release_session(self, session_key: str) -> None:
        """Drop the pages an agent session kept (they stay in the prefix cache as evictable pages)."""
        self.kv.release_pinned(session_key)

    def reserve(self, request_id: str, num_tokens: int, held: KVCacheBlocks | None = None) -> list[int] | None:
        """Decode side: pages for ``num_tokens`` incoming tokens, owned by ``request_id`` from now on (its whole page
        table; with ``held``, a session's prefix hits from ``kv.get_computed_pages``, those pages first)."""
        if self.kv.reserve(request_id, num_tokens, held) is None:
            return None
        return self.kv.page_table(request_id)

    def release(self, request_id: str) -> None:
        """Free reserved pages of a request that never entered the scheduler (transfer failed or aborted)."""
        if self.kv.has(request_id):
            self.kv.free(request_id)

    def add_prefilled(
        self,
        request_id: str,
        prompt: Sequence[int],
        params: SamplingParams,
        first_token: int,
        first_logprob: TokenLogprob | None = None,
        session_key: str | None = None,
    ) -> StepOutput | None:
        """Decode side: the prompt's KV is in the reserved pages; continue from ``first_token``.

        Returns a finished output if the first token already ends the request (pages are freed), else None.
        With ``session_key`` the pages stay pinned after it finishes, as :meth:`add_request` does.
        """
        req = self.make_request(request_id, prompt, params)
        req.session_key = session_key
        req.output_token_ids.append(first_token)
        if first_logprob is not None:
            req.output_logprobs.append(first_logprob)
        req.num_computed_tokens = len(prompt)
        reason = req.check_stop() or self.grammars.accept(request_id, first_token)  # replay: the mask of token 1
        if reason is not None:
            self.scheduler.keep_session(req, reason)
            self.release(request_id)
            return StepOutput(request_id, finish_reason=reason, num_prompt_tokens=len(prompt))
        self.scheduler.add(req)
        return None

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id, "abort") is not None

    def has_unfinished(self) -> bool:
        """Requests to run, or a step in flight to complete (keep calling :meth:`step`)."""
        return self.scheduler.num_unfinished > 0 or self._in_flight is not None

    def order_pool_write(self, event: "torch.cuda.Event") -> None:
        """Steps launched from now on, on every stream steps run on, start after ``event`` (a copy into the pool
        made outside the steps: a session's pages restored from a tier)."""
        for stream in self.runner.step_streams():
            stream.wait_event(event)

    def wait_in_flight(self) -> None:
        """Block until the step in flight (if any) has finished on the device; its tokens are still handed out by the
        next :meth:`step`. Pages published to the prefix cache when a step was launched are written by then: call it
        before another process reads this pool's pages (a prefill worker copying a held session prefix)."""
        flight = self._in_flight
        if flight is not None and flight.done is not None:
            flight.done.synchronize()

    def warmup(self, prompt_lens: Sequence[int] = (16, 1024, 3000), mixed_graphs: bool | None = None) -> str:
        """Compile every kernel variant and capture every CUDA graph before serving; returns a one-line report.
        ``mixed_graphs``: capture every mixed graph too (None: ``capture_mixed_graphs``, where None means no; a
        worker decides by its role, :meth:`WorkerConfig.captures_mixed_graphs`).

        Every variant of the attention kernels is launched once first (``compile_variants``): a mixed step of a new
        shape must compile nothing mid-serving.

        Runs real prefills (one prompt of each length that fits, then all of them batched) and a few decode
        steps, then forgets their prefix-cache entries, so the pool is as it was.
        """
        t0 = time.perf_counter()
        if self.runner.device.type == "cuda" and self.runner.backend.name == "triton":
            self.runner.backend.compile_variants(self.kv_cache[0], self.model_config.num_heads)
        mixed = bool(self.cfg.capture_mixed_graphs) if mixed_graphs is None else mixed_graphs
        graphs = self.runner.graphs.capture_all(mixed) if self.runner.graphs is not None else 0
        if self.cfg.prompt_lane and self.runner.graphs is not None:
            graphs += self.runner.lane().graphs.capture_prompt_steps()
        lens = [n for n in prompt_lens if self.kv.num_pages_for(n + 4) <= self.info.num_pages // 2
                and n + 4 < self.info.max_model_len]
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        vocab = self.model_config.vocab_size
        for group in [[n] for n in lens] + [lens]:
            self.generate([[(7 * i + 3) % vocab for i in range(n)] for n in group], params)
        self.kv.reset_prefix_cache()
        return f"{graphs} CUDA graphs captured, prefill lengths {lens} compiled in {time.perf_counter() - t0:.1f}s"

    # --- one step -----------------------------------------------------------------------------------

    def step(self, arrivals: Callable[[float], bool] | None = None) -> list[StepOutput]:
        """One step (module flow). ``arrivals(timeout_s)``: waits up to ``timeout_s`` for new work, True when some came
        (step 0'); without it the next overlapped step is launched at once."""
        prev = self._in_flight
        if prev is None:
            return self._step_now()
        if arrivals is not None and self.cfg.step_window and self._await_arrivals(prev, arrivals):
            return []  # prev is still in flight: the caller takes the new work in and steps again
        scheduled_at = self._now()
        batch = self.scheduler.schedule()  # rows of prev's requests read prev's pending tokens
        if self._lane_fits(batch, prev):
            return self._run_in_lane(batch, prev, scheduled_at)
        launched = not batch.is_empty and self._overlappable(batch) and self._launch(batch, prev, scheduled_at)
        outputs = self._complete(prev)
        if launched:
            outputs += self._seal(self._in_flight)  # prev's tokens reached the matchers: mask this step's rows
        outputs += self._finish_out_of_memory()  # after prev: a request that cannot grow keeps its last token
        if launched or batch.is_empty:
            return outputs
        return outputs + self._step_now()  # scheduled again: every token is known now

    def _await_arrivals(self, prev: InFlight, arrivals: Callable[[float], bool]) -> bool:
        """Step 0': wait for new work while ``prev`` should run on; True when some came."""
        if not self.scheduler.decoding_only():  # work is already there: schedule it now
            return False
        now = self._now()
        if now >= self._clock_report_at:
            if self._clock_report_at:
                logger.info("step window: %s", self.clock.report())
            self._clock_report_at = now + CLOCK_REPORT_S
        left = self.clock.window(prev.launched, now)
        if left <= 0:
            return False
        arrived = arrivals(left)
        self.clock.opened(left, arrived)
        return arrived

    def _lane_fits(self, batch: ScheduledBatch, prev: InFlight) -> bool:
        """``batch`` may run on the prompt lane while ``prev`` is in flight (core/engine/lane.py, steps 1-2)."""
        return (self.cfg.prompt_lane and self.scheduler.is_prompts_alone(batch)
                and not batch.shares_pages(prev.batch))

    def _run_in_lane(self, batch: ScheduledBatch, prev: InFlight, scheduled_at: float) -> list[StepOutput]:
        """Run the prompts of ``batch`` on the prompt lane and hand out their tokens; ``prev`` stays in flight
        (core/engine/lane.py, steps 3-4)."""
        started = self._now()
        out = self._execute(batch, in_lane=True)
        prev.shared = True
        self.runner.lane().steps += 1
        self.last_step = StepTiming(scheduled_at, started, self._now(), self.runner.last_graphed, len(batch.seqs), False)
        return self.postprocess(batch, out) + self._finish_out_of_memory()

    def _step_now(self) -> list[StepOutput]:
        """Nothing in flight: run one step synchronously, or launch it overlapped (its outputs come next step)."""
        scheduled_at = self._now()
        batch = self.scheduler.schedule()
        outputs = self._finish_out_of_memory()
        if batch.is_empty:
            return outputs
        if self._overlappable(batch) and self._launch(batch, None, scheduled_at):
            return outputs + self._seal(self._in_flight)
        started = self._now()
        out = self._execute(batch)
        self.last_step = StepTiming(scheduled_at, started, self._now(), self.runner.last_graphed, len(batch.seqs), False)
        return outputs + self.postprocess(batch, out)

    def _overlappable(self, batch: ScheduledBatch) -> bool:
        return self.cfg.async_scheduling and not self.runner.needs_hook(batch) and all(
            self._overlappable_row(s) for s in batch.seqs)

    def _overlappable_row(self, s: SeqWork) -> bool:
        """A decode token sampled greedily; with ``overlap_prefill`` also a prompt chunk (not a prefill worker's: its
        prompts end at their first token)."""
        if s.prompt_logprobs or (s.sample and not self._argmax_row(s)):
            return False
        if s.num_tokens == 1 and s.sample:
            return True
        mode = self.cfg.overlap_prefill
        if mode == "off" or (mode == "auto" and self.runner.device.type != "cuda"):
            return False
        return not self.scheduler.requests[s.request_id].prefill_only

    def _argmax_row(self, s: SeqWork) -> bool:
        """The row's token is the argmax of its logits, masked by its grammar (whose matcher is here) if it has one."""
        if s.params.grammar is None:
            return argmax_only(s.params)
        return masked_argmax_only(s.params) and self.grammars.get(s.request_id) is not None

    def _seal(self, flight: InFlight) -> list[StepOutput]:
        """Fill the bitmask rows of ``flight``'s grammar rows from their matchers, then have the runner mask and argmax
        them (module flow, step 3'). Rows of requests that ended meanwhile stay unmasked (their tokens are dropped);
        a request whose matcher raises fails with ``finish_reason="error"``."""
        if flight.sealed:
            return []
        rows = [(row, s.request_id) for row, s in enumerate(flight.batch.seqs)
                if s.params.grammar is not None and s.request_id in self.scheduler.requests
                and self.grammars.get(s.request_id) is not None]
        failed = self.grammars.fill_rows(self.runner.mask_rows(flight), rows) if rows else []
        bad = {rid for rid, _ in failed}
        self.runner.seal(flight, [row for row, rid in rows if rid not in bad])
        return self._fail_errors(RunnerOutput(results=tuple(
            SeqResult(rid, None, error=error_text("structured output", exc)) for rid, exc in failed)))

    def _launch(self, batch: ScheduledBatch, prev: InFlight | None, scheduled_at: float) -> bool:
        """Queue ``batch`` on the device and commit it with pending tokens; False (nothing changed) if that raised.
        ``scheduled_at``: when its scheduling began (the host's share, for :attr:`clock`)."""
        try:
            launched = self.runner.launch(batch, prev)
        except Exception as exc:  # the synchronous path runs it again and isolates a request that raises
            logger.info("requests %s: launching the overlapped step raised %s; running it synchronously",
                        ",".join(s.request_id for s in batch.seqs), type(exc).__name__)
            return False
        if prev is not None:
            prev.retirees = self.scheduler.take_retiring()  # released when prev completes
        launched.placeholders = self.scheduler.start_in_flight(batch)
        launched.scheduled = scheduled_at
        launched.launched = self.clock.launched(scheduled_at, self._now())
        self._in_flight = launched
        return True

    def _complete(self, prev: InFlight) -> list[StepOutput]:
        """Wait for ``prev``, free the pages that waited for it, and hand out its tokens."""
        waited = not prev.completed()
        out = prev.results()
        ended = self._now()
        self.clock.completed(prev.launched, ended, waited, prev.shared)
        self.last_step = StepTiming(prev.scheduled, prev.launched, ended, prev.graphed, len(prev.batch.seqs), True)
        if self._in_flight is prev:  # nothing newer in flight
            self._in_flight = None
            self.scheduler.in_flight = frozenset()
            prev.retirees += self.scheduler.take_retiring()
        for key in prev.retirees:
            self.kv.free(key)
        return self._resolve(prev, out)

    def _resolve(self, prev: InFlight, out: RunnerOutput) -> list[StepOutput]:
        """Put each row's token in place of its placeholder and feed it to the request's grammar; finish the requests
        that stop there (a refused token: ``"error"``), and fail those whose row had no token left."""
        outputs, done, failed = [], [], []
        for res in out.results:
            req = self.scheduler.requests.get(res.request_id)
            idx = prev.placeholders.get(res.request_id)
            if req is None or idx is None or idx >= len(req.output_token_ids) or req.output_token_ids[idx] != PENDING_TOKEN:
                continue  # finished or aborted meanwhile
            if res.token_id is None:  # its grammar and logits allowed no token: fails as on the synchronous path
                req.keep_outputs(idx)
                failed.append(res)
                continue
            req.output_token_ids[idx] = res.token_id
            req.num_pending -= 1
            so = StepOutput(req.request_id, [res.token_id], num_prompt_tokens=req.num_prompt_tokens,
                            num_cached_tokens=req.num_cached_tokens)
            so.finish_reason = req.stop_reason_at(idx + 1) or self._grammar_step(req, res.token_id, so)
            if so.finish_reason is not None:
                req.keep_outputs(idx + 1)
                self.scheduler.cache_known(req)
                done.append((req, so.finish_reason))
            outputs.append(so)
        self.scheduler.finish_many(done)
        outputs += self._fail_errors(RunnerOutput(results=tuple(failed)))
        if len(self.grammars):
            self.grammars.retain(self.scheduler.requests)
        return outputs

    def _execute(self, batch: ScheduledBatch, in_lane: bool = False) -> RunnerOutput:
        """Run ``batch`` (``in_lane``: on the prompt lane); when it raises, run its sequences one at a time so that only
        those that raise fail."""
        try:
            return self.runner.execute(batch, in_lane)
        except Exception as exc:  # isolation boundary: one request's fault must not end the others (or the worker)
            if len(batch.seqs) == 1:
                return RunnerOutput(results=(self._failed_seq(batch.seqs[0], exc),))
            logger.info("requests %s: the step raised %s; running them one at a time",
                        ",".join(s.request_id for s in batch.seqs), type(exc).__name__)
        results: list[SeqResult] = []
        for seq in batch.seqs:
            try:
                one = ScheduledBatch(seqs=(seq,), page_size=batch.page_size)
                results.extend(self.runner.execute(one, in_lane).results)
            except Exception as exc:  # this request's own fault: postprocess fails it and logs the error
                results.append(self._failed_seq(seq, exc))
        return RunnerOutput(results=tuple(results))

    @staticmethod
    def _failed_seq(seq: SeqWork, exc: Exception) -> SeqResult:
        return SeqResult(request_id=seq.request_id, token_id=None, error=error_text("the model step", exc))

    def _finish_out_of_memory(self) -> list[StepOutput]:
        done = [r for r in self.scheduler.out_of_memory if r.request_id in self.scheduler.requests]
        self.scheduler.out_of_memory = []
        self.scheduler.finish_many((req, "length") for req in done)
        return [StepOutput(r.request_id, finish_reason="length", num_prompt_tokens=r.num_prompt_tokens) for r in done]

    def postprocess(self, batch: ScheduledBatch, out: RunnerOutput) -> list[StepOutput]:
        outputs = self._fail_errors(out)  # before commit, which would publish a failed step's KV to the prefix cache
        self.scheduler.commit(batch)
        done = []
        for res in out.results:
            req = self.scheduler.requests.get(res.request_id)
            if req is None:
                continue
            so = StepOutput(req.request_id, num_prompt_tokens=req.num_prompt_tokens, num_cached_tokens=req.num_cached_tokens)
            if res.prompt_logprobs and len(req.prompt_logprobs) < req.num_prompt_tokens:
                if not req.prompt_logprobs:
                    req.prompt_logprobs.append(None)
                req.prompt_logprobs.extend(res.prompt_logprobs)
            if res.token_id is not None:
                req.output_token_ids.append(res.token_id)
                so.new_token_ids.append(res.token_id)
                if res.logprob is not None:
                    req.output_logprobs.append(res.logprob)
                    so.logprobs.append(res.logprob)
                if len(req.output_token_ids) == 1 and req.wants_prompt_logprobs:
                    so.prompt_logprobs = list(req.prompt_logprobs)
                so.finish_reason = req.check_stop() or self._grammar_step(req, res.token_id, so)
                if so.finish_reason is not None:
                    done.append((req, so.finish_reason))
                outputs.append(so)
        self.scheduler.finish_many(done)
        if len(self.grammars):
            self.grammars.retain(self.scheduler.requests)
        return outputs

    def _grammar_step(self, req: Request, token_id: int, so: StepOutput) -> str | None:
        """Advance the request's grammar with its new token: ``"stop"`` when it terminates, ``"error"`` (with
        ``so.error``) when it refuses the token; None to continue (and for requests without a grammar)."""
        try:
            return self.grammars.accept(req.request_id, token_id)
        except ValueError as exc:
            so.error = error_text("structured output", exc)
            logger.warning("request %s: %s", req.request_id, so.error)
            return "error"

    def _fail_errors(self, out: RunnerOutput) -> list[StepOutput]:
        """Finish with ``finish_reason="error"`` every request whose sequence failed; their pages are freed."""
        outputs = []
        for res in out.results:
            req = self.scheduler.requests.get(res.request_id) if res.error is not None else None
            if req is None:
                continue
            logger.warning("request %s: failed in the engine and removed: %s", req.request_id, res.error)
            self.scheduler.finish_many([(req, "error")])
            outputs.append(StepOutput(req.request_id, finish_reason="error", error=res.error,
                                      num_prompt_tokens=req.num_prompt_tokens, num_cached_tokens=req.num_cached_tokens))
        return outputs

    # --- offline convenience --------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]) -> list[Request]:
        """Run prompts to completion; returns the finished requests in prompt order."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        reqs = [self.add_request(f"offline-{next(self._offline_ids)}", p, sp) for p, sp in zip(prompts, plist)]
        while self.has_unfinished():
            self.step()
        return reqs
