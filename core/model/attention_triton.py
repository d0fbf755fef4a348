"""Triton attention backend: the paged kernels of :mod:`splitserve.kernels` behind :class:`AttentionBackend`.

Which kernel runs (measured on an H100, benchmarks/RESULTS.md "Kernels (issue 5)"):

* decode-only steps: :func:`paged_decode_attention` (flash-decoding over the pages);
* prefill steps on CUDA made of a few long fresh prompts (no cached prefix): torch SDPA (flash) per sequence on
  K/V gathered out of the pages; SDPA alone ran 1.6x faster than the Triton prefill kernel on 2048-token prompts;
* every other prefill step (many or short sequences, and the CPU interpreter): :func:`paged_prefill_attention`,
  given the step's context bound, so that a few query rows over a long cached context (a session's next turn) split
  the keys over the multiprocessors instead of walking them from a handful of programs.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F

from splitserve.core.model.attention import AttentionMetadata
from splitserve.kernels.attention import compile_variants, paged_decode_attention, paged_prefill_attention
from splitserve.kernels.cache import gather_tokens, reshape_and_cache

# SDPA per sequence pays a gather and a few launches per sequence: measured faster than the Triton kernel only
# for a single long fresh prompt (1 x 2048: 0.118 vs 0.138 ms; 4 x 2048: 0.944 vs 0.447 ms on H100).
SDPA_MIN_Q_LEN = 256
SDPA_MAX_SEQS = 1


class TritonAttentionBackend:
    """Writes K/V with ``reshape_and_cache`` and attends with the paged kernels (see the module docstring).

    Tensor layouts are those of :class:`splitserve.core.model.attention.AttentionBackend`:
    ``kv_layer`` ``[2, num_pages, page_size, num_kv_heads, head_dim]``, ``q`` ``[T, num_heads, head_dim]``,
    ``k``/``v`` ``[T, num_kv_heads, head_dim]``, all in the model dtype.

    Args:
        use_sdpa_prefill: allow the SDPA prefill path on CUDA (False forces the Triton prefill kernel).
    """

    name = "triton"

    def __init__(self, use_sdpa_prefill: bool = True) -> None:
        self.use_sdpa_prefill = use_sdpa_prefill

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata) -> None:
        reshape_and_cache(k, v, kv_layer, meta.slot_mapping)

    def compile_variants(self, kv_layer: torch.Tensor, num_heads: int) -> int:
        """Compile every variant of the attention kernels now (warm-up), over one layer of the pool ``[2, P, S,
        Hkv, D]`` (read, never written); returns the launches made."""
        return compile_variants(kv_layer[0], kv_layer[1], num_heads)

    def attend(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if meta.decode_rows:
            return _split_attend(q, kv_layer, meta, scale)
        if meta.is_decode_only and q.shape[0] == meta.num_seqs:
            return paged_decode_attention(
                q, kv_layer[0], kv_layer[1], meta.block_tables, meta.context_lens, scale, meta.max_context_len
            )
        if self._prefer_sdpa(q, meta):
            return _sdpa_prefill(q, kv_layer, meta, scale)
        return paged_prefill_attention(
            q, kv_layer[0], kv_layer[1], meta.cu_seqlens_q, meta.context_lens, meta.block_tables, scale, meta.max_q_len,
            max_context_len=meta.max_context_len, **_prefill_tiles(q),
        )

    def _prefer_sdpa(self, q: torch.Tensor, meta: AttentionMetadata) -> bool:
        return (
            self.use_sdpa_prefill
            and q.is_cuda
            and meta.num_seqs <= SDPA_MAX_SEQS
            and min(meta.q_lens, default=0) >= SDPA_MIN_Q_LEN
            and meta.q_lens == meta.ctx_lens_host  # with a cached prefix the Triton kernel was faster (masked SDPA)
        )


def _prefill_tiles(q: torch.Tensor) -> dict[str, int]:
    """The varlen kernel's tiles: its defaults on CUDA, 16 x 16 in the CPU interpreter (which runs every program)."""
    return {} if q.is_cuda else {"block_m": 16, "block_n": 16}


def _split_attend(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """A mixed step: the ``d`` decode rows (``q[:d]``) with the split-K decode kernel, the prefill rows after them
    with the varlen kernel (sequences ``d:``, their rows from ``cu_seqlens_q[d:]``), each writing its own rows of one
    output. The prefill rows' key splits are sized for one row: usually one session turn is all there is (a mixed
    CUDA graph has room for several, the rest empty); more rows only make more, shorter programs."""
    d, out = meta.decode_rows, torch.empty_like(q)
    paged_decode_attention(q[:d], kv_layer[0], kv_layer[1], meta.block_tables[:d], meta.context_lens[:d], scale,
                           meta.max_context_len, out=out[:d])
    paged_prefill_attention(q, kv_layer[0], kv_layer[1], meta.cu_seqlens_q[d:], meta.context_lens[d:],
                            meta.block_tables[d:], scale, meta.max_q_len, out=out,
                            max_context_len=meta.max_context_len, split_rows=1, **_prefill_tiles(q))
    return out


SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
"""Not cuDNN: it builds an execution plan for every new sequence length (a first prompt of a new length paid
about a second on an H200 in a serving run), and prompts come in every length."""


def _sdpa_prefill(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Per sequence: gather its K/V ``[2, ctx, Hkv, D]`` from the pages, then causal SDPA (GQA inside SDPA)."""
    with sdpa_kernel(list(SDPA_BACKENDS)):
        return _sdpa_prefill_seqs(q, kv_layer, meta, scale)


def _sdpa_prefill_seqs(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    start = 0
    for b, (q_len, ctx) in enumerate(zip(meta.q_lens, meta.ctx_lens_host)):
        kv = gather_tokens(kv_layer, meta.block_tables[b], 0, ctx)
        # 4-D [1, H, L, D] inputs: SDPA's flash kernel takes GQA only in this form (3-D fell back to math, 40x slower)
        qh = q[start : start + q_len].transpose(0, 1).unsqueeze(0)
        kh, vh = (kv[i].transpose(0, 1).contiguous().unsqueeze(0) for i in (0, 1))
        if q_len == ctx:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
        else:  # cached prefix: query i sits at ctx - q_len + i (SDPA's is_causal would align top-left)
            pos = torch.arange(ctx - q_len, ctx, device=q.device)
            mask = pos[:, None] >= torch.arange(ctx, device=q.device)[None, :]
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start : start + q_len] = o[0].transpose(0, 1)
        start += q_len
    return out
