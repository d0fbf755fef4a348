"""The engine: one step is schedule -> run -> postprocess.

Used directly for offline generation (``splitserve generate``), and by every worker role: a prefill
worker adds ``prefill_only`` requests and streams KV from the runner's layer hook; a decode worker reserves
pages for incoming KV and then adds the request with its first token already known.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

from splitserve.core.cache.manager import KVCacheManager
from splitserve.core.config import EngineConfig
from splitserve.core.engine.batch import RunnerOutput, ScheduledBatch
from splitserve.core.engine.runner import KVPoolSpec, LayerHook, ModelRunner
from splitserve.core.engine.scheduler import Scheduler, SchedulerLimits
from splitserve.core.messages import SamplingParams, TokenLogprob
from splitserve.core.model.attention import make_backend
from splitserve.core.model.config import ModelConfig
from splitserve.core.model.layers import TORCH_OPS, KernelOps
from splitserve.core.model.loader import load_model
from splitserve.core.request import Request

logger = logging.getLogger(__name__)


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


def select_ops(cfg: EngineConfig, device: torch.device) -> KernelOps:
    """Triton RMSNorm / RoPE / SwiGLU on CUDA (unless the torch backend is forced), torch references elsewhere."""
    if device.type != "cuda" or cfg.attention_backend == "torch":
        return TORCH_OPS
    from splitserve.kernels import ops as triton_ops

    return KernelOps(
        rms_norm=triton_ops.rms_norm, rotary=triton_ops.rotary, silu_and_mul=triton_ops.silu_and_mul, name="triton"
    )


class LLMEngine:
    def __init__(self, cfg: EngineConfig, layer_hook: LayerHook | None = None) -> None:
        self.cfg = cfg
        device = resolve_device(cfg)
        torch.manual_seed(cfg.seed)
        model, mcfg = load_model(cfg, select_ops(cfg, device))
        self.model_config: ModelConfig = mcfg
        dtype = next(model.parameters()).dtype
        one = KVPoolSpec(mcfg.num_layers, 1, cfg.page_size, mcfg.num_kv_heads, mcfg.head_dim, dtype)
        num_pages = size_pool(cfg, one, device)
        spec = KVPoolSpec(mcfg.num_layers, num_pages, cfg.page_size, mcfg.num_kv_heads, mcfg.head_dim, dtype)
        self.kv_cache = spec.allocate(device)
        max_len = min(cfg.max_model_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings)
        self.info = RuntimeInfo(mcfg.model_id, str(device), dtype, num_pages, cfg.page_size, max_len, spec.bytes_per_page)
        self.eos_token_ids = frozenset(mcfg.eos_token_ids) | frozenset(cfg.extra_stop_token_ids)
        self.kv = KVCacheManager(num_pages, cfg.page_size, cfg.enable_prefix_caching)
        self._offline_ids = itertools.count()
        limits = SchedulerLimits(cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.chunk_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, limits)
        backend = make_backend(cfg.attention_backend, device.type)
        graphs = None
        if device.type == "cuda" and cfg.cuda_graphs and backend.name == "triton":
            from splitserve.core.engine.cuda_graphs import DecodeGraphs

            graphs = DecodeGraphs(model, self.kv_cache, backend, min(cfg.max_num_seqs, 256), max_len, cfg.page_size)
        self.runner = ModelRunner(model, self.kv_cache, backend, self.eos_token_ids, layer_hook, graphs)
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
    ) -> Request:
        """Queue a request. With ``session_key`` its pages stay pinned after it finishes (see :meth:`release_session`)."""
        req = self.make_request(request_id, prompt, params, prefill_only)
        req.session_key = session_key
        self.scheduler.add(req)
        return req

    def release_session(self, session_key: str) -> None:
        """Drop the pages an agent session kept (they stay in the prefix cache as evictable pages)."""
        self.kv.release_pinned(session_key)

    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Decode side: pages for ``num_tokens`` incoming tokens, owned by ``request_id`` from now on."""
        blocks = self.kv.reserve(request_id, num_tokens)
        return None if blocks is None else list(blocks.page_ids)

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
    ) -> StepOutput | None:
        """Decode side: the prompt's KV is in the reserved pages; continue from ``first_token``.

        Returns a finished output if the first token already ends the request (pages are freed), else None.
        """
        req = self.make_request(request_id, prompt, params)
        req.output_token_ids.append(first_token)
        if first_logprob is not None:
            req.output_logprobs.append(first_logprob)
        req.num_computed_tokens = len(prompt)
        reason = req.check_stop()
        if reason is not None:
            self.release(request_id)
            return StepOutput(request_id, finish_reason=reason, num_prompt_tokens=len(prompt))
        self.scheduler.add(req)
        return None

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id, "abort") is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # --- one step -----------------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        outputs = self._finish_out_of_memory()
        if batch.is_empty:
            return outputs
        out = self.runner.execute(batch)
        return outputs + self.postprocess(batch, out)

    def _finish_out_of_memory(self) -> list[StepOutput]:
        done = self.scheduler.out_of_memory
        self.scheduler.out_of_memory = []
        self.scheduler.finish_many((req, "length") for req in done)
        return [StepOutput(r.request_id, finish_reason="length", num_prompt_tokens=r.num_prompt_tokens) for r in done]

    def postprocess(self, batch: ScheduledBatch, out: RunnerOutput) -> list[StepOutput]:
        self.scheduler.commit(batch)
        outputs, done = [], []
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
                so.finish_reason = req.check_stop()
                if so.finish_reason is not None:
                    done.append((req, so.finish_reason))
                outputs.append(so)
        self.scheduler.finish_many(done)
        return outputs

    # --- offline convenience --------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]) -> list[Request]:
        """Run prompts to completion; returns the finished requests in prompt order."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        reqs = [self.add_request(f"offline-{next(self._offline_ids)}", p, sp) for p, sp in zip(prompts, plist)]
        while self.has_unfinished():
            self.step()
        return reqs
