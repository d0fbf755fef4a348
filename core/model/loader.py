"""Build a :class:`LlamaForCausalLM` from an :class:`EngineConfig`: safetensors, dummy or built-in weights."""

from __future__ import annotations

import json
import logging
import os
import time
from types import MappingProxyType

import torch

from splitserve.core.config import EngineConfig
from splitserve.core.model.builtin import BUILTIN_SEED
from splitserve.core.model.config import BUILTIN_PREFIX, DUMMY_PREFIX, ModelConfig, load_model_config
from splitserve.core.model.layers import TORCH_OPS, KernelOps
from splitserve.core.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

DUMMY_STD = 0.02
"""Standard deviation of dummy weights (small, so activations stay finite in deep models)."""

_DTYPES = MappingProxyType({"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16})


class WeightLoadError(ValueError):
    """A checkpoint's tensors do not match the model (missing, unexpected or wrongly shaped)."""


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` is float32 on CPU and bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (expected auto, {', '.join(_DTYPES)})")
    return _DTYPES[dtype]


def resolve_device(cfg: EngineConfig) -> torch.device:
    return torch.device("cuda", cfg.device_index) if cfg.device == "cuda" else torch.device("cpu")


def load_model(cfg: EngineConfig, ops: KernelOps = TORCH_OPS) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Build the model named by ``cfg.model`` on ``cfg.device`` with its weights.

    ``cfg.model``: a local HF directory (safetensors, or dummy weights with ``load_format="dummy"``),
    ``builtin:tiny-random-llama``, or ``dummy:<shape>`` (see ``model_config_for_shape``).
    """
    start = time.perf_counter()
    model_cfg = load_model_config(cfg.model)
    context_len = model_cfg.check_max_model_len(cfg.max_model_len)
    device, dtype = resolve_device(cfg), resolve_dtype(cfg.dtype, cfg.device)
    model = LlamaForCausalLM(model_cfg, ops=ops, device=device, dtype=dtype,
                             max_positions=max(context_len, model_cfg.max_position_embeddings))
    if cfg.model.startswith(BUILTIN_PREFIX):
        init_dummy_weights(model, BUILTIN_SEED)
    elif cfg.model.startswith(DUMMY_PREFIX) or cfg.load_format == "dummy":
        init_dummy_weights(model, cfg.seed)
    else:
        load_safetensors_weights(model, cfg.model)
    model.eval()
    logger.info("loaded %s (%s, %s) in %.2fs", model_cfg.model_id, device, dtype, time.perf_counter() - start)
    return model, model_cfg


def _is_norm(name: str) -> bool:
    return name.endswith("norm")


@torch.no_grad()
def init_dummy_weights(model: LlamaForCausalLM, seed: int, std: float = DUMMY_STD) -> None:
    """Deterministic random weights, generated on the model's device: N(0, std) everywhere, norms = 1."""
    device = model.embed_tokens.device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for name, param in model.named_parameters():
        if _is_norm(name):
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=gen)


def _safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir!r} (use load_format='dummy' for random weights)")
    return [os.path.join(model_dir, f) for f in files]


@torch.no_grad()
def load_safetensors_weights(model: LlamaForCausalLM, model_dir: str) -> None:
    """Copy every HF tensor into its (possibly fused) parameter slice; strict about names and shapes."""
    from safetensors import safe_open

    wanted = model.hf_weight_map()
    params = dict(model.named_parameters())
    seen: set[str] = set()
    unexpected: list[str] = []
    for path in _safetensors_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name not in wanted:
                    unexpected.append(name)
                    continue
                param_name, start, end = wanted[name]
                dst = params[param_name][start:end]
                src = f.get_tensor(name)
                if tuple(src.shape) != tuple(dst.shape):
                    raise WeightLoadError(
                        f"{model_dir}: tensor {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
                    )
                dst.copy_(src)
                seen.add(name)
    _check_names(model_dir, wanted, seen, unexpected)


def _check_names(model_dir: str, wanted: dict, seen: set[str], unexpected: list[str]) -> None:
    # Tied checkpoints sometimes carry a redundant lm_head copy; rotary inv_freq buffers are derived.
    unexpected = [n for n in unexpected if n != "lm_head.weight" and not n.endswith("rotary_emb.inv_freq")]
    missing = sorted(set(wanted) - seen)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {', '.join(missing[:8])}")
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {', '.join(sorted(unexpected)[:8])}")
        raise WeightLoadError(f"{model_dir}: checkpoint does not match the model config; " + "; ".join(parts))
