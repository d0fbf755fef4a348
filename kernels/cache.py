"""KV page writes and token gather/scatter (Triton), with torch references.

Layouts::

    kv_layer: [2, num_pages, page_size, num_kv_heads, head_dim]              (one layer; [0] K, [1] V)
    kv_pool:  [num_layers, 2, num_pages, page_size, num_kv_heads, head_dim]  (the whole cache)

A slot is ``page_id * page_size + offset``. For gather/scatter, ``page_ids`` is a sequence's block table:
token ``t`` of the sequence lives in page ``page_ids[t // page_size]`` at row ``t % page_size``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------
# reshape_and_cache
# ----------------------------------------------------------------------------------------------


def ref_reshape_and_cache(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Reference: ``kv_layer[0/1]`` flattened to slots gets ``k``/``v`` rows at ``slot_mapping`` (negative: skipped).

    Args:
        k, v: ``[T, Hkv, D]`` any float dtype. kv_layer: ``[2, P, S, Hkv, D]``, written in place.
        slot_mapping: int64 ``[T]``.
    """
    flat = kv_layer.view(2, -1, *kv_layer.shape[3:])
    keep = slot_mapping >= 0
    flat[0][slot_mapping[keep]] = k[keep].to(kv_layer.dtype)
    flat[1][slot_mapping[keep]] = v[keep].to(kv_layer.dtype)


@triton.jit
def _reshape_and_cache_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr, skt, skh, svt, svh, s_kv, s_slot, s_head,
    N_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        offs_h = tl.arange(0, H_PAD)
        offs_d = tl.arange(0, D_PAD)
        mask = (offs_h < N_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
        dst = cache_ptr + slot * s_slot + offs_h[:, None] * s_head + offs_d[None, :]
        dt = cache_ptr.dtype.element_ty
        k = tl.load(k_ptr + t * skt + offs_h[:, None] * skh + offs_d[None, :], mask=mask)
        tl.store(dst, k.to(dt), mask=mask)
        v = tl.load(v_ptr + t * svt + offs_h[:, None] * svh + offs_d[None, :], mask=mask)
        tl.store(dst + s_kv, v.to(dt), mask=mask)


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write this step's K/V into their slots (Triton); same contract as :func:`ref_reshape_and_cache`.

    Args:
        k, v: ``[T, Hkv, D]`` (strided views ok, head_dim contiguous). kv_layer: ``[2, P, S, Hkv, D]`` contiguous
            in its last three axes, written in place. slot_mapping: int64 ``[T]`` (negative entries are skipped).
    """
    if k.shape != v.shape or k.dim() != 3 or k.shape[1:] != kv_layer.shape[3:]:
        raise ValueError(f"k/v {tuple(k.shape)}/{tuple(v.shape)} do not match kv_layer {tuple(kv_layer.shape)}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be int64 [T={k.shape[0]}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if k.stride(2) != 1 or v.stride(2) != 1 or kv_layer.stride(4) != 1 or kv_layer.stride(1) != kv_layer.stride(2) * kv_layer.shape[2]:
        raise ValueError("reshape_and_cache needs contiguous head_dim and pages made of whole slots")
    if k.shape[0] == 0:
        return
    _reshape_and_cache_kernel[(k.shape[0],)](
        k, v, kv_layer, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_layer.stride(0), kv_layer.stride(2), kv_layer.stride(3),
        N_HEADS=k.shape[1], HEAD_DIM=k.shape[2], H_PAD=triton.next_power_of_2(k.shape[1]),
        D_PAD=triton.next_power_of_2(k.shape[2]), num_warps=4,
    )


# ----------------------------------------------------------------------------------------------
# token gather / scatter between pages and a contiguous buffer
# ----------------------------------------------------------------------------------------------


def _token_slots(page_ids: torch.Tensor, page_size: int, token_start: int, token_end: int) -> torch.Tensor:
    tok = torch.arange(token_start, token_end, device=page_ids.device)
    return page_ids.long()[tok // page_size] * page_size + tok % page_size


def ref_gather_tokens_layers(kv_pool: torch.Tensor, page_ids: torch.Tensor, token_start: int, token_end: int) -> torch.Tensor:
    """Reference gather. kv_pool ``[L, 2, P, S, Hkv, D]``, page_ids int32 ``[n]`` -> ``[L, 2, n_tok, Hkv, D]``."""
    slots = _token_slots(page_ids, kv_pool.shape[3], token_start, token_end)
    return kv_pool.flatten(2, 3)[:, :, slots].contiguous()


def ref_scatter_tokens_layers(src: torch.Tensor, kv_pool: torch.Tensor, page_ids: torch.Tensor, token_start: int) -> None:
    """Reference scatter. src ``[L, 2, n_tok, Hkv, D]`` into kv_pool ``[L, 2, P, S, Hkv, D]`` (in place)."""
    slots = _token_slots(page_ids, kv_pool.shape[3], token_start, token_start + src.shape[2])
    kv_pool.view(*kv_pool.shape[:2], -1, *kv_pool.shape[4:])[:, :, slots] = src.to(kv_pool.dtype)


@triton.jit
def _copy_tokens_kernel(
    pool_ptr, buf_ptr, page_ids_ptr, token_start, s_layer, s_kv, s_page, s_row, b_layer, b_kv, b_tok,
    PAGE: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr, TO_BUF: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    lk = tl.program_id(1)
    layer = (lk // 2).to(tl.int64)
    kv = lk % 2
    tok = token_start + i
    page = tl.load(page_ids_ptr + tok // PAGE).to(tl.int64)
    pool_row = pool_ptr + layer * s_layer + kv * s_kv + page * s_page + (tok % PAGE) * s_row
    buf_row = buf_ptr + layer * b_layer + kv * b_kv + i * b_tok
    for start in range(0, ROW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < ROW
        if TO_BUF:
            tl.store(buf_row + offs, tl.load(pool_row + offs, mask=mask), mask=mask)
        else:
            tl.store(pool_row + offs, tl.load(buf_row + offs, mask=mask), mask=mask)


def _copy_tokens(kv_pool: torch.Tensor, buf: torch.Tensor, page_ids: torch.Tensor, token_start: int, to_buf: bool) -> None:
    if kv_pool.dim() != 6 or buf.dim() != 5 or buf.shape[:2] != kv_pool.shape[:2] or buf.shape[3:] != kv_pool.shape[4:]:
        raise ValueError(f"buffer {tuple(buf.shape)} does not match pool {tuple(kv_pool.shape)}")
    if buf.dtype != kv_pool.dtype or page_ids.dtype != torch.int32:
        raise ValueError("buffer and pool dtypes must match and page_ids must be int32")
    n_tok, page_size = buf.shape[2], kv_pool.shape[3]
    if token_start < 0 or page_ids.numel() * page_size < token_start + n_tok:
        raise ValueError(f"tokens [{token_start}, {token_start + n_tok}) exceed {page_ids.numel()} pages of {page_size}")
    row = kv_pool.shape[4] * kv_pool.shape[5]
    if kv_pool.stride(3) != row or kv_pool.stride(5) != 1 or buf.stride(2) != row or buf.stride(4) != 1 or buf.stride(3) != kv_pool.shape[5]:
        raise ValueError("pool pages and buffer need contiguous [Hkv, D] token rows")
    if n_tok == 0:
        return
    _copy_tokens_kernel[(n_tok, 2 * kv_pool.shape[0])](
        kv_pool, buf, page_ids, token_start, kv_pool.stride(0), kv_pool.stride(1), kv_pool.stride(2), kv_pool.stride(3),
        buf.stride(0), buf.stride(1), buf.stride(2),
        PAGE=page_size, ROW=row, BLOCK=min(2048, triton.next_power_of_2(row)), TO_BUF=to_buf, num_warps=4,
    )


def gather_tokens_layers(
    kv_pool: torch.Tensor, page_ids: torch.Tensor, token_start: int, token_end: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Copy tokens ``[token_start, token_end)`` of one sequence out of every layer's pages (Triton).

    Args:
        kv_pool: ``[L, 2, P, S, Hkv, D]`` (any dtype). page_ids: int32 ``[n]``, the sequence's block table
            (covering at least ``token_end`` tokens).
        out: optional buffer ``[L, 2, token_end - token_start, Hkv, D]`` (contiguous token rows), e.g. pinned staging.
    Returns:
        Contiguous ``[L, 2, token_end - token_start, Hkv, D]`` in ``kv_pool.dtype`` (``out`` when given).
    """
    if out is not None:
        _copy_tokens(kv_pool, out, page_ids, token_start, to_buf=True)
        return out
    buf = torch.empty(*kv_pool.shape[:2], max(token_end - token_start, 0), *kv_pool.shape[4:], dtype=kv_pool.dtype, device=kv_pool.device)
    _copy_tokens(kv_pool, buf, page_ids, token_start, to_buf=True)
    return buf


def scatter_tokens_layers(src: torch.Tensor, kv_pool: torch.Tensor, page_ids: torch.Tensor, token_start: int) -> None:
    """Inverse of :func:`gather_tokens_layers`; the pool's page size may differ from the sender's.

    Args:
        src: ``[L, 2, n_tok, Hkv, D]`` contiguous. kv_pool: ``[L, 2, P, S, Hkv, D]`` same dtype, written in place.
        page_ids: int32 ``[n]`` destination block table; token ``token_start + i`` gets ``src[:, :, i]``.
    """
    _copy_tokens(kv_pool, src, page_ids, token_start, to_buf=False)


def gather_tokens(
    kv_layer: torch.Tensor, page_ids: torch.Tensor, token_start: int, token_end: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """One layer: kv_layer ``[2, P, S, Hkv, D]``, page_ids int32 ``[n]`` -> contiguous ``[2, n_tok, Hkv, D]``.

    ``out`` is an optional ``[2, n_tok, Hkv, D]`` destination buffer.
    """
    buf = None if out is None else out.unsqueeze(0)
    return gather_tokens_layers(kv_layer.unsqueeze(0), page_ids, token_start, token_end, out=buf)[0]


def scatter_tokens(src: torch.Tensor, kv_layer: torch.Tensor, page_ids: torch.Tensor, token_start: int) -> None:
    """One layer: src ``[2, n_tok, Hkv, D]`` into kv_layer ``[2, P, S, Hkv, D]`` (in place) at tokens from token_start."""
    scatter_tokens_layers(src.unsqueeze(0), kv_layer.unsqueeze(0), page_ids, token_start)


def ref_gather_tokens(kv_layer: torch.Tensor, page_ids: torch.Tensor, token_start: int, token_end: int) -> torch.Tensor:
    """Reference of :func:`gather_tokens` (same shapes)."""
    return ref_gather_tokens_layers(kv_layer.unsqueeze(0), page_ids, token_start, token_end)[0]


def ref_scatter_tokens(src: torch.Tensor, kv_layer: torch.Tensor, page_ids: torch.Tensor, token_start: int) -> None:
    """Reference of :func:`scatter_tokens` (same shapes)."""
    ref_scatter_tokens_layers(src.unsqueeze(0), kv_layer.unsqueeze(0), page_ids, token_start)


# ----------------------------------------------------------------------------------------------
# pool -> pool copy (the one-sided KV path: a prefill worker's pages straight into a decode worker's pages)
# ----------------------------------------------------------------------------------------------


def _check_copy_slots(src_pool: torch.Tensor, dst_pool: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> int:
    if src_pool.dim() != 6 or dst_pool.dim() != 6 or src_pool.shape[1] != 2 or dst_pool.shape[1] != 2:
        raise ValueError(f"pools must be [L, 2, P, S, Hkv, D], got {tuple(src_pool.shape)} and {tuple(dst_pool.shape)}")
    if src_pool.shape[4:] != dst_pool.shape[4:] or src_pool.dtype != dst_pool.dtype:
        raise ValueError("source and destination need the same [Hkv, D] rows and dtype")
    if not (src_pool.is_contiguous() and dst_pool.is_contiguous()):
        raise ValueError("source and destination pools must be contiguous")
    if src_slots.shape != dst_slots.shape or src_slots.dim() != 1:
        raise ValueError(f"slot vectors must be 1-D and equal, got {tuple(src_slots.shape)}, {tuple(dst_slots.shape)}")
    return src_pool.shape[4] * src_pool.shape[5]


def ref_copy_slots_layers(
    src_pool: torch.Tensor, dst_pool: torch.Tensor, layer_start: int, layer_end: int,
    src_slots: torch.Tensor, dst_slots: torch.Tensor,
) -> None:
    """Reference: for layers ``[layer_start, layer_end)``, token rows ``src_slots`` (K and V) of ``src_pool`` into
    rows ``dst_slots`` of ``dst_pool``.

    Args:
        src_pool: ``[L, 2, Ps, Ss, Hkv, D]``; dst_pool: ``[L, 2, Pd, Sd, Hkv, D]``, same dtype, written in place (page
            sizes may differ). src_slots, dst_slots: int64 ``[T]`` on the pools' device.
    """
    row = _check_copy_slots(src_pool, dst_pool, src_slots, dst_slots)
    n = layer_end - layer_start
    src = src_pool[layer_start:layer_end].reshape(n, 2, -1, row)
    dst_pool[layer_start:layer_end].view(n, 2, -1, row)[:, :, dst_slots] = src[:, :, src_slots]


def ref_copy_slots(src_layer: torch.Tensor, dst_layer: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """One layer of :func:`ref_copy_slots_layers`: ``[2, P, S, Hkv, D]`` layers."""
    ref_copy_slots_layers(src_layer.unsqueeze(0), dst_layer.unsqueeze(0), 0, 1, src_slots, dst_slots)


@triton.jit
def _copy_slots_kernel(
    src_ptr, dst_ptr, src_slot_ptr, dst_slot_ptr, num_tokens, s_layer_src, s_layer_dst, s_kv_src, s_kv_dst,
    ROW: tl.constexpr, BLOCK: tl.constexpr, TOKENS: tl.constexpr,
):
    """Program (i, lk): token rows ``[i * TOKENS, (i + 1) * TOKENS)`` of plane ``lk % 2`` of layer ``lk // 2``."""
    lk = tl.program_id(1).to(tl.int64)
    src_plane = src_ptr + (lk // 2) * s_layer_src + (lk % 2) * s_kv_src
    dst_plane = dst_ptr + (lk // 2) * s_layer_dst + (lk % 2) * s_kv_dst
    toks = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    live = toks < num_tokens
    src_rows = tl.load(src_slot_ptr + toks, mask=live, other=0).to(tl.int64) * ROW
    dst_rows = tl.load(dst_slot_ptr + toks, mask=live, other=0).to(tl.int64) * ROW
    for start in range(0, ROW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = live[:, None] & (offs < ROW)[None, :]
        vals = tl.load(src_plane + src_rows[:, None] + offs[None, :], mask=mask)
        tl.store(dst_plane + dst_rows[:, None] + offs[None, :], vals, mask=mask)


def copy_slots_layers(
    src_pool: torch.Tensor, dst_pool: torch.Tensor, layer_start: int, layer_end: int,
    src_slots: torch.Tensor, dst_slots: torch.Tensor, check: bool = True, tokens_per_program: int = 4,
) -> None:
    """Triton version of :func:`ref_copy_slots_layers` (same arguments), one launch for every layer of the range.

    ``dst_pool`` may live on a peer GPU (a CUDA IPC mapping opened on this device). Each program copies
    ``tokens_per_program`` (a power of 2) token rows of K or V of one layer, 16-byte accesses. ``check=False``
    skips the argument checks (a hot path whose arguments were checked once already).
    """
    row = _check_copy_slots(src_pool, dst_pool, src_slots, dst_slots) if check else src_pool.shape[4] * src_pool.shape[5]
    n = src_slots.numel()
    if n == 0 or layer_end <= layer_start:
        return
    block = min(triton.next_power_of_2(row), max(16, 4096 // tokens_per_program))
    _copy_slots_kernel[(triton.cdiv(n, tokens_per_program), 2 * (layer_end - layer_start))](
        src_pool[layer_start], dst_pool[layer_start], src_slots, dst_slots, n,
        src_pool.stride(0), dst_pool.stride(0), src_pool.stride(1), dst_pool.stride(1),
        ROW=row, BLOCK=block, TOKENS=tokens_per_program, num_warps=4,
    )


def copy_slots(src_layer: torch.Tensor, dst_layer: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """One layer of :func:`copy_slots_layers`: ``[2, P, S, Hkv, D]`` layers."""
    copy_slots_layers(src_layer.unsqueeze(0), dst_layer.unsqueeze(0), 0, 1, src_slots, dst_slots)


__all__ = [
    "copy_slots",
    "copy_slots_layers",
    "ref_copy_slots",
    "ref_copy_slots_layers",
    "gather_tokens",
    "gather_tokens_layers",
    "ref_gather_tokens",
    "ref_gather_tokens_layers",
    "ref_reshape_and_cache",
    "ref_scatter_tokens",
    "ref_scatter_tokens_layers",
    "reshape_and_cache",
    "scatter_tokens",
    "scatter_tokens_layers",
]
