"""Attention over a paged KV cache, behind a small backend interface.

KV cache layout (one tensor for the whole pool, owned by the model runner)::

    kv_cache: [num_layers, 2, num_pages, page_size, num_kv_heads, head_dim]   (model dtype)
    kv_cache[l, 0] is layer l's K pages, kv_cache[l, 1] its V pages.

A *slot* is ``page_id * page_size + offset``; token ``i`` of a request lives in slot
``block_table[i // page_size] * page_size + i % page_size``.

A batch is packed along the token axis (varlen): sequence ``b`` contributes the query tokens
``cu_seqlens_q[b]:cu_seqlens_q[b+1]``, which are the *last* ``q_len`` tokens of its
``context_lens[b]`` tokens (cached prefix + this step's tokens). Decode steps are the case
``q_len == 1``; prefill chunks after a prefix-cache hit or an earlier chunk have ``q_len <
context_len``, and the causal mask is offset accordingly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Per-step facts every attention layer reads. Built by the model runner.

    Attributes:
        cu_seqlens_q: int32 ``[B + 1]``, prefix sums of query tokens per sequence.
        context_lens: int32 ``[B]``, KV tokens per sequence after this step's tokens are written.
        block_tables: int32 ``[B, max_pages]``, page ids per sequence (padding: 0, never read).
        slot_mapping: int64 ``[T]``, destination slot of every query token's K/V.
        max_q_len / max_context_len: python ints (kernel grid sizes; no device sync needed).
        q_lens / ctx_lens_host: python lists mirroring the tensors (for the CPU reference path).
        on_layer_done: optional callback ``f(layer_idx)`` run after a layer's K/V are written
            (the prefill worker streams that layer's pages to the decode worker from here).
    """

    cu_seqlens_q: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    max_q_len: int
    max_context_len: int
    q_lens: list[int]
    ctx_lens_host: list[int]
    page_size: int
    on_layer_done: Callable[[int], None] | None = field(default=None, repr=False)
    decode_rows: int = 0
    """Mixed steps, eager or CUDA-graph (core/engine/cuda_graphs.py): the first ``decode_rows`` sequences have one
    query token each and are attended with the decode kernel; the sequences after them with the varlen kernel
    (0: one kernel for the whole step)."""

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens)

    @property
    def is_decode_only(self) -> bool:
        return self.max_q_len == 1


class AttentionBackend(Protocol):
    """Writes new K/V into pages and computes attention over the pages."""

    name: str

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata) -> None:
        """Store this step's K/V.

        Args:
            k, v: ``[T, num_kv_heads, head_dim]`` model dtype.
            kv_layer: ``[2, num_pages, page_size, num_kv_heads, head_dim]`` (one layer of the pool), written in place.
        """

    def attend(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Causal attention of the packed queries over each sequence's pages.

        Args:
            q: ``[T, num_heads, head_dim]`` model dtype; ``num_heads`` is a multiple of ``num_kv_heads`` (GQA).
            kv_layer: as in :meth:`write_kv`, already holding this step's K/V.
        Returns:
            ``[T, num_heads, head_dim]`` model dtype.
        """


def gather_pages(kv_pages: torch.Tensor, page_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Contiguous copy of one sequence's first ``num_tokens`` tokens.

    Args:
        kv_pages: ``[num_pages, page_size, H, D]``.
        page_ids: int ``[>= ceil(num_tokens / page_size)]``.
    Returns:
        ``[num_tokens, H, D]``.
    """
    page_size = kv_pages.shape[1]
    n_pages = (num_tokens + page_size - 1) // page_size
    return kv_pages[page_ids[:n_pages].long()].reshape(-1, *kv_pages.shape[2:])[:num_tokens]


class TorchAttentionBackend:
    """Reference backend (CPU and GPU): scatter by slot, gather each sequence's pages, causal SDPA."""

    name = "torch"

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata) -> None:
        num_pages, page_size = kv_layer.shape[1], kv_layer.shape[2]
        flat = kv_layer.view(2, num_pages * page_size, *kv_layer.shape[3:])
        flat[0].index_copy_(0, meta.slot_mapping, k.to(kv_layer.dtype))
        flat[1].index_copy_(0, meta.slot_mapping, v.to(kv_layer.dtype))

    def attend(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        num_heads, num_kv = q.shape[1], kv_layer.shape[3]
        start = 0
        for b, (q_len, ctx) in enumerate(zip(meta.q_lens, meta.ctx_lens_host)):
            table = meta.block_tables[b]
            k = gather_pages(kv_layer[0], table, ctx)
            v = gather_pages(kv_layer[1], table, ctx)
            qb = q[start : start + q_len]
            out[start : start + q_len] = _causal_sdpa(qb, k, v, scale, num_heads // num_kv)
            start += q_len
        return out


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, group: int) -> torch.Tensor:
    """q ``[Lq, Hq, D]``, k/v ``[Lk, Hkv, D]`` with Lq <= Lk; query i sits at position Lk - Lq + i."""
    lq, lk = q.shape[0], k.shape[0]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if lq == 1:
        o = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    else:
        pos_q = torch.arange(lk - lq, lk, device=q.device)
        mask = pos_q[:, None] >= torch.arange(lk, device=q.device)[None, :]
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return o.transpose(0, 1)


def make_backend(name: str, device: str) -> AttentionBackend:
    """``auto`` picks triton on CUDA and the torch reference elsewhere."""
    if name == "auto":
        name = "triton" if device == "cuda" else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        from splitserve.core.model.attention_triton import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r} (expected auto, torch or triton)")
