"""Model shape and hyper-parameters, read from a Hugging Face ``config.json`` (torch-free).

:class:`ModelConfig` is the one place the rest of the engine learns a model's shape (layer count,
heads, head dim, vocabulary, RoPE settings, stop ids). It is built from

* a local Hugging Face directory (``config.json`` + optional ``generation_config.json``),
* ``builtin:<name>`` (see :mod:`splitserve.core.model.builtin`), or
* ``dummy:<shape>``: a well-known real shape (:func:`model_config_for_shape`) for benchmarks
  with random weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
"""HF ``architectures`` entries this engine runs."""

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "dynamic")

BUILTIN_PREFIX = "builtin:"
DUMMY_PREFIX = "dummy:"


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture (or one of its features) is not implemented here."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (HF ``rope_scaling`` / ``rope_parameters``).

    ``rope_type``: ``llama3`` (Llama 3.1+: per-frequency interpolation), ``linear`` (positions
    divided by ``factor``) or ``dynamic`` (NTK; identical to unscaled RoPE up to
    ``original_max_position_embeddings``, which is the only range we support for it).
    """

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model code and the engine need to know about one checkpoint."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None
    """Mistral-style sliding window. We implement full attention only, so the usable context is
    capped at the window (see :attr:`max_context_len`)."""
    model_id: str = ""
    torch_dtype: str = "float32"
    """Dtype the checkpoint was saved in (HF ``torch_dtype`` / ``dtype``)."""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(_unsupported_message(self.architecture))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def max_context_len(self) -> int:
        """Longest sequence we can run exactly (full attention; capped by a sliding window)."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    def check_max_model_len(self, max_model_len: int | None) -> int:
        """The context length to use; raises ``ValueError`` if ``max_model_len`` exceeds what we run exactly."""
        if max_model_len is None:
            return self.max_context_len
        if self.sliding_window is not None and max_model_len > self.sliding_window:
            raise ValueError(
                f"max_model_len {max_model_len} exceeds the model's sliding window {self.sliding_window}; "
                "SplitServe implements full attention only, so use max_model_len <= the window"
            )
        if max_model_len > self.max_position_embeddings:
            raise ValueError(
                f"max_model_len {max_model_len} exceeds max_position_embeddings {self.max_position_embeddings}"
            )
        return max_model_len

    def with_model_id(self, model_id: str) -> "ModelConfig":
        return replace(self, model_id=model_id)


def _unsupported_message(architecture: str) -> str:
    return (
        f"unsupported model architecture {architecture!r}; SplitServe supports: "
        + ", ".join(SUPPORTED_ARCHITECTURES)
    )


def _parse_rope(cfg: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from transformers 4.x (``rope_theta``/``rope_scaling``) or 5.x (``rope_parameters``)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    orig = merged.get("original_max_position_embeddings") or cfg.get("max_position_embeddings", 8192)
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(orig),
    )


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _sliding_window(cfg: Mapping[str, Any]) -> int | None:
    window = cfg.get("sliding_window")
    if window is None:
        return None
    if cfg.get("model_type") in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        return None
    return int(window)


def model_config_from_dict(
    cfg: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None, model_id: str = ""
) -> ModelConfig:
    """Build a :class:`ModelConfig` from parsed ``config.json`` (+ ``generation_config.json``) contents."""
    archs = cfg.get("architectures") or []
    if len(archs) != 1:
        raise UnsupportedModelError(
            f"config.json must list exactly one architecture, got {archs!r}; supported: "
            + ", ".join(SUPPORTED_ARCHITECTURES)
        )
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(_unsupported_message(arch))
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"unsupported hidden_act {cfg.get('hidden_act')!r} (only silu)")
    theta, scaling = _parse_rope(cfg)
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    gen = generation_config or {}
    eos = _as_id_tuple(cfg.get("eos_token_id")) + _as_id_tuple(gen.get("eos_token_id"))
    bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    return ModelConfig(
        architecture=arch,
        model_type=str(cfg.get("model_type", "")),
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or hidden // num_heads),
        intermediate_size=int(cfg["intermediate_size"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(dict.fromkeys(eos)),
        sliding_window=_sliding_window(cfg),
        model_id=model_id,
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        extra={"attention_bias": bool(cfg.get("attention_bias", False)), "mlp_bias": bool(cfg.get("mlp_bias", False))},
    )


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_hf_model_config(model_dir: str) -> ModelConfig:
    """Read ``config.json`` and (if present) ``generation_config.json`` from a local HF directory."""
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in model directory {model_dir!r}")
    cfg = _read_json(cfg_path)
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"{model_dir}: mlp_bias=true is not supported")
    gen_path = os.path.join(model_dir, "generation_config.json")
    gen = _read_json(gen_path) if os.path.isfile(gen_path) else None
    return model_config_from_dict(cfg, gen, model_id=os.path.basename(os.path.normpath(model_dir)))


def load_model_config(path_or_builtin: str) -> ModelConfig:
    """``ModelConfig`` for a local HF dir, ``builtin:<name>`` or ``dummy:<shape>``."""
    if path_or_builtin.startswith(BUILTIN_PREFIX):
        from splitserve.core.model.builtin import builtin_model_config

        return builtin_model_config(path_or_builtin)
    if path_or_builtin.startswith(DUMMY_PREFIX):
        return model_config_for_shape(path_or_builtin[len(DUMMY_PREFIX):])
    if os.path.isdir(path_or_builtin):
        return load_hf_model_config(path_or_builtin)
    raise FileNotFoundError(
        f"model {path_or_builtin!r} is neither a local directory nor 'builtin:...' / 'dummy:<shape>' "
        f"(shapes: {', '.join(sorted(_SHAPES))})"
    )


_LLAMA3_SCALING = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192)

_SHAPES: Mapping[str, dict[str, Any]] = MappingProxyType({
    "llama3-8b": dict(architecture="LlamaForCausalLM", model_type="llama", vocab_size=128256, hidden_size=4096,
                      num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
                      rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_SCALING,
                      max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
                      torch_dtype="bfloat16"),
    "llama3.2-1b": dict(architecture="LlamaForCausalLM", model_type="llama", vocab_size=128256, hidden_size=2048,
                        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, intermediate_size=8192,
                        rms_norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192), tie_word_embeddings=True,
                        max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
                        torch_dtype="bfloat16"),
    "llama2-7b": dict(architecture="LlamaForCausalLM", model_type="llama", vocab_size=32000, hidden_size=4096,
                      num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, intermediate_size=11008,
                      rms_norm_eps=1e-5, max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,),
                      torch_dtype="float16"),
    "mistral-7b": dict(architecture="MistralForCausalLM", model_type="mistral", vocab_size=32768, hidden_size=4096,
                       num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
                       rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=32768, bos_token_id=1,
                       eos_token_ids=(2,), torch_dtype="bfloat16"),
    "qwen2.5-7b": dict(architecture="Qwen2ForCausalLM", model_type="qwen2", vocab_size=152064, hidden_size=3584,
                       num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, intermediate_size=18944,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True, max_position_embeddings=32768,
                       bos_token_id=151643, eos_token_ids=(151645, 151643), torch_dtype="bfloat16"),
    "qwen3-8b": dict(architecture="Qwen3ForCausalLM", model_type="qwen3", vocab_size=151936, hidden_size=4096,
                     num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=12288,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True, max_position_embeddings=40960,
                     bos_token_id=151643, eos_token_ids=(151645, 151643), torch_dtype="bfloat16"),
    "tiny": dict(architecture="LlamaForCausalLM", model_type="llama", vocab_size=512, hidden_size=64, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128, rms_norm_eps=1e-5,
                 max_position_embeddings=2048, bos_token_id=1, eos_token_ids=(2,)),
})


def model_shapes() -> tuple[str, ...]:
    """Names accepted by :func:`model_config_for_shape` (and ``dummy:<shape>``)."""
    return tuple(sorted(_SHAPES))


def model_config_for_shape(shape: str) -> ModelConfig:
    """A well-known real model's shape (for dummy-weight benchmarks), e.g. ``llama3-8b``."""
    if shape not in _SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {', '.join(model_shapes())}")
    return ModelConfig(**_SHAPES[shape], model_id=f"{DUMMY_PREFIX}{shape}")

