"""Fused per-token kernels (Triton) with torch references: RMSNorm + residual add, rotary embedding, SwiGLU.

Numerics follow Hugging Face Llama in the model dtype: the residual sum is rounded to the model dtype, RMSNorm
normalises in float32 and rounds before the weight multiply, rotary casts cos/sin to the model dtype and rounds
each product, SwiGLU rounds ``silu(gate)`` before the multiply. The Triton kernels reproduce each rounding step,
so they agree with the references to the last bit up to float32 reduction order (on H100/H200: bf16 bit-exact for
all three; fp16/fp32 within 1 ulp, where the compiler contracts multiply-adds into FMAs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------
# RMSNorm (+ residual)
# ----------------------------------------------------------------------------------------------


def ref_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference ``(out, new_residual)``.

    Args:
        x: ``[T, H]`` model dtype. weight: ``[H]`` model dtype. residual: ``[T, H]`` model dtype or None.
    Returns:
        ``out`` ``[T, H]`` = ``weight * normalize(s)`` with ``s = x + residual`` (or ``x``), and ``new_residual = s``
        (``x`` itself when ``residual`` is None).
    """
    s = x if residual is None else x + residual
    sf = s.float()
    normed = (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed, s


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, eps, n_cols, sx, sr, so, snr,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + t * sx + offs, mask=mask, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(res_ptr + t * sr + offs, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(new_res_ptr + t * snr + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * so + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton RMSNorm fused with the residual add; same contract as :func:`ref_rms_norm`.

    Args:
        x: ``[T, H]`` model dtype, last axis contiguous. weight: ``[H]`` same dtype.
        residual: ``[T, H]`` same dtype or None.
        out, residual_out: optional contiguous ``[T, H]`` buffers for the two results (``residual_out`` only
            used with a residual; it may be ``residual`` itself).
    Returns:
        ``(out [T, H], new_residual [T, H])`` in ``x.dtype`` (``new_residual is x`` without residual).
    """
    if x.dim() != 2 or weight.shape != (x.shape[1],) or x.stride(1) != 1:
        raise ValueError(f"rms_norm wants x [T, H] (contiguous rows) and weight [H]; got {tuple(x.shape)}, {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.stride(1) != 1):
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    out = torch.empty_like(x) if out is None else out
    new_res = x if residual is None else (torch.empty_like(x) if residual_out is None else residual_out)
    res = x if residual is None else residual
    if x.shape[0]:
        block = triton.next_power_of_2(x.shape[1])
        _rms_norm_kernel[(x.shape[0],)](
            x, res, weight, out, new_res, eps, x.shape[1], x.stride(0), res.stride(0), out.stride(0), new_res.stride(0),
            HAS_RES=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
        )
    return out, new_res


# ----------------------------------------------------------------------------------------------
# rotary embedding (rotate-half)
# ----------------------------------------------------------------------------------------------


def ref_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference rotate-half rotary embedding (new tensors).

    Args:
        q: ``[T, Hq, D]``, k: ``[T, Hk, D]`` model dtype. positions: int64 ``[T]``.
        cos_sin_cache: float32 ``[max_pos, D]``: columns ``[:D/2]`` cos, ``[D/2:]`` sin of each frequency.
    Returns:
        ``(q_rot, k_rot)`` with the shapes and dtype of ``q``, ``k``.
    """
    half = q.shape[-1] // 2
    cs = cos_sin_cache[positions.long()]
    cos = torch.cat([cs[:, :half], cs[:, :half]], -1)[:, None, :].to(q.dtype)
    sin = torch.cat([cs[:, half:], cs[:, half:]], -1)[:, None, :].to(q.dtype)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., :half], x[..., half:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    return rot(q), rot(k)


@triton.jit
def _round_as(x, dt: tl.constexpr):
    """Round float32 ``x`` to ``dt`` and back to float32, opaquely for bfloat16.

    A plain ``x.to(bf16).to(f32)`` lets the compiler turn ``round(a*b) - round(c*d)`` into a bf16 FMA (seen with
    triton 3.6 on H100/H200: 1-ulp differences from torch on ~20% of elements), so bfloat16 rounds (to nearest
    even) on the bits instead. float16 keeps the plain casts (may still differ by 1 ulp on a GPU).
    """
    if dt == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dt).to(tl.float32)


@triton.jit
def _rotate_heads(base, sh, n_heads, c, s, HALF: tl.constexpr, H_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, HALF_PAD)
    mask = (offs_h < n_heads)[:, None] & (offs_d < HALF)[None, :]
    p1 = base + offs_h[:, None] * sh + offs_d[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
    dt = x1.dtype
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    a1 = _round_as(x1f * c[None, :], dt)
    b1 = _round_as(x2f * s[None, :], dt)
    a2 = _round_as(x2f * c[None, :], dt)
    b2 = _round_as(x1f * s[None, :], dt)
    tl.store(p1, _round_as(a1 - b1, dt).to(dt), mask=mask)
    tl.store(p1 + HALF, _round_as(a2 + b2, dt).to(dt), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, cs_ptr, n_q, n_k, sqt, sqh, skt, skh, scs,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, HQ_PAD: tl.constexpr, HK_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    offs_d = tl.arange(0, HALF_PAD)
    d_mask = offs_d < HALF
    c = tl.load(cs_ptr + pos * scs + offs_d, mask=d_mask, other=0.0)
    s = tl.load(cs_ptr + pos * scs + HALF + offs_d, mask=d_mask, other=0.0)
    dt = q_ptr.dtype.element_ty
    c = _round_as(c, dt)
    s = _round_as(s, dt)
    _rotate_heads(q_ptr + t * sqt, sqh, n_q, c, s, HALF, HQ_PAD, HALF_PAD)
    _rotate_heads(k_ptr + t * skt, skh, n_k, c, s, HALF, HK_PAD, HALF_PAD)


def rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton rotate-half rotary embedding, **in place**; same contract as :func:`ref_rotary`.

    Args:
        q: ``[T, Hq, D]``, k: ``[T, Hk, D]`` same model dtype, head_dim contiguous (strided views of a fused qkv ok).
        positions: int64 ``[T]``. cos_sin_cache: float32 ``[max_pos, D]`` (cos half, then sin half).
    Returns:
        ``(q, k)``, the inputs, rotated in place.
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.dtype != k.dtype:
        raise ValueError(f"rotary wants q [T, Hq, D], k [T, Hk, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    if cos_sin_cache.shape[1] != q.shape[2] or q.shape[2] % 2 or q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError(f"cos_sin_cache [max_pos, {q.shape[2]}] and contiguous even head_dim required")
    if positions.shape != (q.shape[0],):
        raise ValueError(f"positions shape {tuple(positions.shape)} != [T={q.shape[0]}]")
    half = q.shape[2] // 2
    if q.shape[0]:
        _rotary_kernel[(q.shape[0],)](
            q, k, positions, cos_sin_cache, q.shape[1], k.shape[1], q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos_sin_cache.stride(0), HALF=half, HALF_PAD=triton.next_power_of_2(half),
            HQ_PAD=triton.next_power_of_2(q.shape[1]), HK_PAD=triton.next_power_of_2(k.shape[1]), num_warps=4,
        )
    return q, k


# ----------------------------------------------------------------------------------------------
# SwiGLU
# ----------------------------------------------------------------------------------------------


def ref_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Reference ``silu(x[:, :I]) * x[:, I:]``. x: ``[T, 2I]`` model dtype. Returns ``[T, I]`` model dtype."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, n_cols, sx, so, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    g = tl.load(x_ptr + t * sx + offs, mask=mask, other=0.0)
    u = tl.load(x_ptr + t * sx + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + t * so + offs, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton SwiGLU. x: ``[T, 2I]`` model dtype, last axis contiguous; out: optional contiguous ``[T, I]``.

    Returns ``[T, I]`` in ``x.dtype`` (``out`` when given).
    """
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(1) != 1:
        raise ValueError(f"silu_and_mul wants x [T, 2I] with contiguous rows, got {tuple(x.shape)}")
    n = x.shape[1] // 2
    if out is None:
        out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    if x.shape[0] and n:
        block = min(1024, triton.next_power_of_2(n))
        _silu_mul_kernel[(x.shape[0], triton.cdiv(n, block))](x, out, n, x.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out


__all__ = ["ref_rms_norm", "ref_rotary", "ref_silu_and_mul", "rms_norm", "rotary", "silu_and_mul"]
