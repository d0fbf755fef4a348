"""Elementwise building blocks of the Llama family, as plain torch functions.

The model calls them through a :class:`KernelOps` object, so a Triton implementation (from
``splitserve.kernels``) with the same signatures can be passed in on CUDA. The torch versions
here are the references: they follow Hugging Face's numerics (RMSNorm upcasts to float32; RoPE
angles are float32) so logits match transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from splitserve.core.model.config import ModelConfig


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm, optionally fused with the residual add that precedes it.

    Args:
        x: ``[T, H]`` model dtype.
        weight: ``[H]`` model dtype.
        eps: variance epsilon.
        residual: ``[T, H]`` model dtype or ``None``.
    Returns:
        ``(out, new_residual)``, both ``[T, H]`` model dtype: ``new_residual = x + residual`` (or
        ``x`` when ``residual`` is ``None``) and ``out = rmsnorm(new_residual) * weight``, with the
        normalisation computed in float32 and cast back before the weight multiply (as HF does).
    """
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), x


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half: ``[..., D]`` -> ``cat(-x[..., D/2:], x[..., :D/2])``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding in HF's rotate-half (NeoX) convention.

    Args:
        q: ``[T, Hq, D]`` model dtype.
        k: ``[T, Hk, D]`` model dtype.
        positions: int64 ``[T]``, absolute position of every token.
        cos_sin_cache: float32 ``[max_pos, D]``; row ``p`` is ``cat(cos(p * inv_freq), sin(p * inv_freq))``
            with ``inv_freq`` of length ``D / 2`` (see :func:`build_cos_sin_cache`).
    Returns:
        ``(q, k)`` rotated, same shapes and dtypes (new tensors). As in transformers, cos/sin are computed in
        float32 and cast to the model dtype, and the rotation runs in the model dtype (identical in float32;
        in bf16 this matches HF and the Triton kernel bit for bit).
    """
    half = cos_sin_cache.shape[-1] // 2
    cs = cos_sin_cache.index_select(0, positions).to(q.dtype)
    cos = torch.cat((cs[:, :half], cs[:, :half]), dim=-1)[:, None, :]
    sin = torch.cat((cs[:, half:], cs[:, half:]), dim=-1)[:, None, :]

    def rot(x: torch.Tensor) -> torch.Tensor:
        return x * cos + rotate_half(x) * sin

    return rot(q), rot(k)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation on a fused gate/up projection.

    Args:
        x: ``[T, 2I]`` model dtype, ``cat(gate, up)`` along the last axis.
    Returns:
        ``[T, I]`` model dtype: ``silu(gate) * up``.
    """
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


@dataclass(frozen=True)
class KernelOps:
    """The elementwise ops the model uses; swap in Triton versions with identical signatures."""

    rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = rms_norm
    rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]] = rotary
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul
    name: str = "torch"


TORCH_OPS = KernelOps()
"""Reference ops (immutable)."""


def rope_inv_freq(cfg: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies float32 ``[head_dim // 2]``, with llama3 / linear scaling applied.

    Computed with the same float32 operations as transformers so angles agree bit for bit.
    ``dynamic`` (NTK) scaling equals plain RoPE up to ``original_max_position_embeddings``; the
    loader caps the context there.
    """
    dim = cfg.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    sc = cfg.rope_scaling
    if sc is None or sc.rope_type == "dynamic":
        return inv_freq
    if sc.rope_type == "linear":
        return inv_freq / sc.factor
    old_len = sc.original_max_position_embeddings
    low_wavelen = old_len / sc.low_freq_factor
    high_wavelen = old_len / sc.high_freq_factor
    wavelen = 2 * torch.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / sc.factor, inv_freq)
    smooth = (old_len / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def build_cos_sin_cache(cfg: ModelConfig, max_positions: int, device: torch.device | str | None = None) -> torch.Tensor:
    """float32 ``[max_positions, head_dim]``: ``cat(cos(p * inv_freq), sin(p * inv_freq))`` per position ``p``."""
    inv_freq = rope_inv_freq(cfg, device)
    pos = torch.arange(max_positions, dtype=torch.int64, device=device).float()
    freqs = pos[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)
