"""Run one sequence through the model on a small paged KV cache, without the engine.

Used by tests (model vs transformers) and handy for kernel checks: prefill in one step (or in
chunks), then greedy decode one token per step. Pages are handed out in reverse order so
page ids are not contiguous and every multi-page path is exercised.
"""

from __future__ import annotations

import torch

from splitserve.core.model.attention import AttentionBackend, AttentionMetadata, TorchAttentionBackend
from splitserve.core.model.llama import LlamaForCausalLM


def single_seq_metadata(page_table: list[int], ctx_before: int, q_len: int, page_size: int,
                        device: torch.device) -> AttentionMetadata:
    """Metadata for one sequence that already holds ``ctx_before`` tokens and adds ``q_len`` now."""
    ctx = ctx_before + q_len
    slots = [page_table[p // page_size] * page_size + p % page_size for p in range(ctx_before, ctx)]
    i32 = dict(dtype=torch.int32, device=device)
    return AttentionMetadata(
        cu_seqlens_q=torch.tensor([0, q_len], **i32),
        context_lens=torch.tensor([ctx], **i32),
        block_tables=torch.tensor([page_table], **i32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_q_len=q_len,
        max_context_len=ctx,
        q_lens=[q_len],
        ctx_lens_host=[ctx],
        page_size=page_size,
    )


class SingleSequenceRunner:
    """Owns a KV cache for one sequence of up to ``max_len`` tokens."""

    def __init__(self, model: LlamaForCausalLM, max_len: int, page_size: int = 4,
                 backend: AttentionBackend | None = None):
        cfg = model.cfg
        self.model, self.page_size = model, page_size
        self.backend = backend or TorchAttentionBackend()
        self.device = model.embed_tokens.device
        num_pages = (max_len + page_size - 1) // page_size
        self.page_table = list(range(num_pages, 0, -1))  # page 0 stays unused
        self.kv_cache = torch.zeros(cfg.num_layers, 2, num_pages + 1, page_size, cfg.num_kv_heads, cfg.head_dim,
                                    dtype=model.dtype, device=self.device)
        self.num_tokens = 0

    def step(self, token_ids: list[int]) -> torch.Tensor:
        """Append ``token_ids``; returns float32 logits ``[len(token_ids), vocab]``."""
        n = len(token_ids)
        meta = single_seq_metadata(self.page_table, self.num_tokens, n, self.page_size, self.device)
        ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        pos = torch.arange(self.num_tokens, self.num_tokens + n, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, pos, self.kv_cache, meta, self.backend)
        self.num_tokens += n
        return self.model.compute_logits(hidden)


def prompt_logits(model: LlamaForCausalLM, prompt_ids: list[int], chunk: int | None = None,
                  page_size: int = 4) -> torch.Tensor:
    """float32 logits ``[len(prompt), vocab]`` of a prompt, optionally prefilled in chunks of ``chunk`` tokens."""
    runner = SingleSequenceRunner(model, len(prompt_ids), page_size)
    step = chunk or len(prompt_ids)
    return torch.cat([runner.step(prompt_ids[i:i + step]) for i in range(0, len(prompt_ids), step)])


def greedy_generate(model: LlamaForCausalLM, prompt_ids: list[int], max_new_tokens: int,
                    page_size: int = 4, backend: AttentionBackend | None = None) -> list[int]:
    """Greedy continuation (new ids only) of ``prompt_ids``: one prefill step, then one decode step per token."""
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    runner = SingleSequenceRunner(model, len(prompt_ids) + max_new_tokens, page_size, backend)
    logits = runner.step(list(prompt_ids))
    out: list[int] = []
    for _ in range(max_new_tokens):
        out.append(int(logits[-1].argmax()))
        if len(out) < max_new_tokens:
            logits = runner.step([out[-1]])
    return out
