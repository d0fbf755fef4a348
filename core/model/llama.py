"""One decoder-only model class for the Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3.

The differences are flags on :class:`ModelConfig`: GQA (``num_kv_heads``), RoPE scaling,
tied embeddings, q/k/v bias (Qwen2) and per-head q/k RMSNorm (Qwen3). Attention goes through an
:class:`AttentionBackend` over the paged KV cache; elementwise ops through :class:`KernelOps`.

Weights are stored fused: ``qkv_proj`` = ``cat(q_proj, k_proj, v_proj)`` and ``gate_up_proj`` =
``cat(gate_proj, up_proj)`` along the output axis (the loader concatenates HF tensors; see
:meth:`LlamaForCausalLM.hf_weight_map`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.core.model.attention import AttentionBackend, AttentionMetadata
from splitserve.core.model.config import ModelConfig
from splitserve.core.model.layers import TORCH_OPS, KernelOps, build_cos_sin_cache


def _param(*shape: int, device: torch.device | str | None, dtype: torch.dtype) -> nn.Parameter:
    """Uninitialised parameter (filled by the loader); no host-side init, so big models build fast."""
    return nn.Parameter(torch.empty(*shape, device=device, dtype=dtype), requires_grad=False)


class LlamaDecoderLayer(nn.Module):
    """Attention + SwiGLU MLP with pre-RMSNorm; the residual adds are fused into the norms."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps, device: torch.device | str | None, dtype: torch.dtype):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.input_layernorm = _param(h, device=device, dtype=dtype)
        self.qkv_proj = _param(self.q_size + 2 * self.kv_size, h, device=device, dtype=dtype)
        self.qkv_bias = _param(self.q_size + 2 * self.kv_size, device=device, dtype=dtype) if cfg.qkv_bias else None
        self.o_proj = _param(h, self.q_size, device=device, dtype=dtype)
        self.q_norm = _param(cfg.head_dim, device=device, dtype=dtype) if cfg.qk_norm else None
        self.k_norm = _param(cfg.head_dim, device=device, dtype=dtype) if cfg.qk_norm else None
        self.post_attention_layernorm = _param(h, device=device, dtype=dtype)
        self.gate_up_proj = _param(2 * i, h, device=device, dtype=dtype)
        self.down_proj = _param(h, i, device=device, dtype=dtype)

    def _head_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Qwen3 per-head RMSNorm: x ``[T, H, D]`` -> ``[T, H, D]``."""
        t, heads, d = x.shape
        out, _ = self.ops.rms_norm(x.reshape(t * heads, d), weight, self.cfg.rms_norm_eps, None)
        return out.view(t, heads, d)

    def attention(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv_layer: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        """x ``[T, hidden]`` (normed) -> attention output after ``o_proj``, ``[T, hidden]``."""
        cfg = self.cfg
        t = x.shape[0]
        qkv = F.linear(x, self.qkv_proj, self.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim).contiguous()
        if self.q_norm is not None:
            q = self._head_norm(q, self.q_norm)
            k = self._head_norm(k, self.k_norm)
        q, k = self.ops.rotary(q, k, positions, cos_sin_cache)
        backend.write_kv(k, v, kv_layer, meta)
        out = backend.attend(q, kv_layer, meta, self.scale)
        return F.linear(out.reshape(t, self.q_size), self.o_proj)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[T, hidden]`` -> ``[T, hidden]``."""
        return F.linear(self.ops.silu_and_mul(F.linear(x, self.gate_up_proj)), self.down_proj)


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM over a paged KV cache (packed varlen batches, no padding)."""

    def __init__(
        self,
        cfg: ModelConfig,
        ops: KernelOps = TORCH_OPS,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        max_positions: int | None = None,
    ):
        """
        Args:
            cfg: model shape.
            ops: elementwise kernels (torch reference by default; Triton on CUDA).
            device, dtype: where and in which dtype the weights live (uninitialised until loaded).
            max_positions: rows of the RoPE cache (default ``cfg.max_position_embeddings``).
        """
        super().__init__()
        self.cfg, self.ops, self.dtype = cfg, ops, dtype
        self.embed_tokens = _param(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, ops, device, dtype) for _ in range(cfg.num_layers))
        self.norm = _param(cfg.hidden_size, device=device, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else _param(
            cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype
        )
        n_pos = max_positions or cfg.max_position_embeddings
        self.register_buffer("cos_sin_cache", build_cos_sin_cache(cfg, n_pos, device), persistent=False)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        """Run all layers on a packed batch, writing this step's K/V into the cache.

        Args:
            input_ids: int64 ``[T]``, the step's tokens of all sequences, packed (see ``meta.cu_seqlens_q``).
            positions: int64 ``[T]``, each token's absolute position in its sequence.
            kv_cache: ``[num_layers, 2, num_pages, page_size, num_kv_heads, head_dim]`` model dtype, written in place.
            meta: attention metadata for this step; ``meta.on_layer_done(l)`` is called after each layer.
            backend: attention implementation.
        Returns:
            ``[T, hidden_size]`` model dtype: final-normed hidden states (feed rows to :meth:`compute_logits`).
        """
        eps = self.cfg.rms_norm_eps
        h = F.embedding(input_ids, self.embed_tokens)
        residual = None
        for idx, layer in enumerate(self.layers):
            x, residual = self.ops.rms_norm(h, layer.input_layernorm, eps, residual)
            h = layer.attention(x, positions, kv_cache[idx], self.cos_sin_cache, meta, backend)
            x, residual = self.ops.rms_norm(h, layer.post_attention_layernorm, eps, residual)
            h = layer.mlp(x)
            if meta.on_layer_done is not None:
                meta.on_layer_done(idx)
        out, _ = self.ops.rms_norm(h, self.norm, eps, residual)
        return out

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``[N, hidden_size]`` model dtype -> float32 logits ``[N, vocab_size]``."""
        weight = self.embed_tokens if self.lm_head is None else self.lm_head
        return F.linear(hidden, weight).float()

    def hf_weight_map(self) -> dict[str, tuple[str, int, int]]:
        """HF tensor name -> (our parameter name, start row, end row) in that (possibly fused) parameter."""
        cfg = self.cfg
        q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
        h = cfg.hidden_size
        out: dict[str, tuple[str, int, int]] = {
            "model.embed_tokens.weight": ("embed_tokens", 0, cfg.vocab_size),
            "model.norm.weight": ("norm", 0, h),
        }
        if self.lm_head is not None:
            out["lm_head.weight"] = ("lm_head", 0, cfg.vocab_size)
        for i in range(cfg.num_layers):
            hf, ours = f"model.layers.{i}.", f"layers.{i}."
            out[hf + "input_layernorm.weight"] = (ours + "input_layernorm", 0, h)
            out[hf + "post_attention_layernorm.weight"] = (ours + "post_attention_layernorm", 0, h)
            for name, start, end in (("q", 0, q), ("k", q, q + kv), ("v", q + kv, q + 2 * kv)):
                out[f"{hf}self_attn.{name}_proj.weight"] = (ours + "qkv_proj", start, end)
                if cfg.qkv_bias:
                    out[f"{hf}self_attn.{name}_proj.bias"] = (ours + "qkv_bias", start, end)
            out[hf + "self_attn.o_proj.weight"] = (ours + "o_proj", 0, h)
            if cfg.qk_norm:
                out[hf + "self_attn.q_norm.weight"] = (ours + "q_norm", 0, cfg.head_dim)
                out[hf + "self_attn.k_norm.weight"] = (ours + "k_norm", 0, cfg.head_dim)
            out[hf + "mlp.gate_proj.weight"] = (ours + "gate_up_proj", 0, inter)
            out[hf + "mlp.up_proj.weight"] = (ours + "gate_up_proj", inter, 2 * inter)
            out[hf + "mlp.down_proj.weight"] = (ours + "down_proj", 0, h)
        return out
