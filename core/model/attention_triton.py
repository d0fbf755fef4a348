"""Triton attention backend: the paged kernels of :mod:`splitserve.kernels` behind :class:`AttentionBackend`."""

from __future__ import annotations

import torch

from splitserve.core.model.attention import AttentionMetadata
from splitserve.kernels.attention import paged_decode_attention, paged_prefill_attention
from splitserve.kernels.cache import reshape_and_cache


class TritonAttentionBackend:
    """Writes K/V with ``reshape_and_cache``; decode-only steps use flash-decoding, others the paged prefill kernel.

    Tensor layouts are those of :class:`splitserve.core.model.attention.AttentionBackend`:
    ``kv_layer`` ``[2, num_pages, page_size, num_kv_heads, head_dim]``, ``q`` ``[T, num_heads, head_dim]``,
    ``k``/``v`` ``[T, num_kv_heads, head_dim]``, all in the model dtype.
    """

    name = "triton"

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata) -> None:
        reshape_and_cache(k, v, kv_layer, meta.slot_mapping)

    def attend(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if meta.is_decode_only and q.shape[0] == meta.num_seqs:
            return paged_decode_attention(
                q, kv_layer[0], kv_layer[1], meta.block_tables, meta.context_lens, scale, meta.max_context_len
            )
        return paged_prefill_attention(
            q, kv_layer[0], kv_layer[1], meta.cu_seqlens_q, meta.context_lens, meta.block_tables, scale, meta.max_q_len,
            **_prefill_tiles(q),
        )


def _prefill_tiles(q: torch.Tensor) -> dict[str, int]:
    """Large tiles on GPU; small ones under the CPU interpreter, where every program is simulated."""
    if q.is_cuda:
        return {"block_m": 128, "block_n": 64, "num_warps": 8}
    return {"block_m": 16, "block_n": 16, "num_warps": 4}
