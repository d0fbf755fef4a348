"""Our Llama-family model vs Hugging Face transformers (CPU, float32), on real and random-weight models."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

from splitserve.core.config import EngineConfig
from splitserve.core.model.config import (
    UnsupportedModelError,
    load_model_config,
    model_config_for_shape,
    model_shapes,
)
from splitserve.core.model.loader import WeightLoadError, load_model
from splitserve.core.model.reference import greedy_generate, prompt_logits

transformers = pytest.importorskip("transformers")

REL_TOL = 1e-4


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def reference_ids(model_dir) -> tuple[list[int], list[int]]:
    """(prompt ids, 32 greedy ids) as written in the model's REFERENCE.md."""
    text = (model_dir / "REFERENCE.md").read_text()
    prompt = re.search(r"prompt ids[^`]*`(\[[^`]*\])`", text).group(1)
    new = re.search(r"32 new ids: `(\[[^`]*\])`", text).group(1)
    return json.loads(prompt), json.loads(new)


def hf_model(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    model.generation_config.eos_token_id = None  # compare full length, no early stop
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_logits(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float()


@pytest.mark.parametrize("name", ["stories260K", "TinyStories-656K"])
def test_real_model_matches_reference_and_hf(shared_models, name):
    path = shared_models(name)
    prompt, expected = reference_ids(path)
    ours, cfg = load_model(EngineConfig(model=str(path)))
    assert cfg.tie_word_embeddings and cfg.num_kv_heads < cfg.num_heads
    assert greedy_generate(ours, prompt, 32) == expected
    hf = hf_model(path)
    assert hf_greedy(hf, prompt, 32) == expected
    long_prompt = prompt + expected
    ref = hf_logits(hf, long_prompt)
    assert rel_err(prompt_logits(ours, long_prompt), ref) < REL_TOL
    # chunked prefill (q_len < context_len) over pages of 4 gives the same logits
    assert rel_err(prompt_logits(ours, long_prompt, chunk=5, page_size=3), ref) < REL_TOL


def _tiny_common() -> dict:
    return dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, vocab_size=320, max_position_embeddings=256, bos_token_id=1,
                eos_token_id=2)


def _family_configs() -> dict:
    t = transformers
    llama3_rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    return {
        "llama_gqa_untied": t.LlamaConfig(**_tiny_common(), tie_word_embeddings=False),
        "llama3_rope_scaling": t.LlamaConfig(**_tiny_common(), rope_parameters=llama3_rope),
        "llama32_tied": t.LlamaConfig(**_tiny_common(), tie_word_embeddings=True),
        "mistral": t.MistralConfig(**_tiny_common(), sliding_window=None),
        "qwen2_qkv_bias": t.Qwen2Config(**_tiny_common()),
        "qwen3_qk_norm": t.Qwen3Config(**_tiny_common(), head_dim=32),
    }


def _randomize(model) -> None:
    """Non-trivial weights everywhere (norms around 1, biases nonzero) so every tensor matters."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    dirs = {}
    for name, cfg in _family_configs().items():
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        _randomize(model)
        out = tmp_path_factory.mktemp(name)
        model.save_pretrained(out)
        dirs[name] = out
    return dirs


@pytest.mark.parametrize("family", list(_family_configs()))
def test_family_matches_hf(family_dirs, family):
    path = family_dirs[family]
    ours, cfg = load_model(EngineConfig(model=str(path)))
    hf = hf_model(path)
    assert cfg.qkv_bias == (family == "qwen2_qkv_bias")
    assert cfg.qk_norm == (family == "qwen3_qk_norm")
    assert (cfg.rope_scaling is not None) == (family == "llama3_rope_scaling")
    prompt = [1, 17, 200, 5, 99, 300, 42, 7, 8, 150, 3]
    assert rel_err(prompt_logits(ours, prompt), hf_logits(hf, prompt)) < REL_TOL
    assert greedy_generate(ours, prompt, 16) == hf_greedy(hf, prompt, 16)


def test_llama3_rope_scaling_changes_output(family_dirs):
    """The scaled config differs from plain RoPE only in inv_freq, so outputs must differ at long positions."""
    scaled, _ = load_model(EngineConfig(model=str(family_dirs["llama3_rope_scaling"])))
    plain, _ = load_model(EngineConfig(model=str(family_dirs["llama_gqa_untied"])))
    assert not torch.equal(scaled.cos_sin_cache, plain.cos_sin_cache)


def test_sharded_checkpoint_loads(tmp_path):
    cfg = transformers.LlamaConfig(**_tiny_common())
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomize(model)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ours, _ = load_model(EngineConfig(model=str(tmp_path)))
    prompt = [1, 5, 9, 33, 2]
    assert rel_err(prompt_logits(ours, prompt), hf_logits(model.eval(), prompt)) < REL_TOL


def test_missing_and_unexpected_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = transformers.LlamaConfig(**_tiny_common())
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    removed = tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(WeightLoadError, match="missing tensors.*layers.1.mlp.up_proj"):
        load_model(EngineConfig(model=str(tmp_path)))
    tensors["model.layers.1.mlp.up_proj.weight"] = removed
    tensors["model.layers.1.mlp.extra.weight"] = removed.clone()
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(WeightLoadError, match="unexpected tensors.*mlp.extra"):
        load_model(EngineConfig(model=str(tmp_path)))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError) as err:
        load_model_config(str(tmp_path))
    msg = str(err.value)
    assert "GPT2LMHeadModel" in msg and "LlamaForCausalLM" in msg and "Qwen3ForCausalLM" in msg
    assert isinstance(err.value, ValueError)


def test_dummy_weights_deterministic():
    a, cfg = load_model(EngineConfig(model="dummy:tiny", seed=7))
    b, _ = load_model(EngineConfig(model="dummy:tiny", seed=7))
    c, _ = load_model(EngineConfig(model="dummy:tiny", seed=8))
    pa, pb, pc = dict(a.named_parameters()), dict(b.named_parameters()), dict(c.named_parameters())
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["layers.0.qkv_proj"], pc["layers.0.qkv_proj"])
    assert torch.equal(pa["norm"], torch.ones(cfg.hidden_size))
    logits = prompt_logits(a, [1, 2, 3, 4, 5, 6])
    assert logits.shape == (6, cfg.vocab_size) and torch.isfinite(logits).all()
    assert greedy_generate(a, [1, 2, 3], 8) == greedy_generate(b, [1, 2, 3], 8)


def test_dummy_load_format_for_hf_dir(shared_models):
    path = shared_models("stories260K")
    dummy, cfg = load_model(EngineConfig(model=str(path), load_format="dummy"))
    real, _ = load_model(EngineConfig(model=str(path)))
    assert cfg.num_layers == 5
    assert not torch.equal(dummy.embed_tokens, real.embed_tokens)


def test_builtin_model_is_random_and_deterministic():
    a, cfg = load_model(EngineConfig())
    b, _ = load_model(EngineConfig(seed=99))  # builtin weights do not depend on the engine seed
    assert "random" in cfg.model_id
    assert greedy_generate(a, [1, 72, 105], 8) == greedy_generate(b, [1, 72, 105], 8)


def test_known_shapes():
    cfg = model_config_for_shape("llama3-8b")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 4096, 32, 8, 128)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta) == (14336, 128256, 500000.0)
    assert cfg.rope_scaling.rope_type == "llama3" and cfg.rope_scaling.factor == 8.0
    assert {"llama2-7b", "qwen2.5-7b", "tiny"} <= set(model_shapes())
    assert load_model_config("dummy:qwen2.5-7b").qkv_bias
    with pytest.raises(ValueError, match="unknown model shape"):
        model_config_for_shape("gpt-5")


def test_sliding_window_limits_context(tmp_path):
    cfg = transformers.MistralConfig(**_tiny_common(), sliding_window=32, architectures=["MistralForCausalLM"])
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    model_cfg = load_model_config(str(tmp_path))
    assert model_cfg.sliding_window == 32 and model_cfg.max_context_len == 32
    assert model_cfg.check_max_model_len(None) == 32
    with pytest.raises(ValueError, match="sliding window"):
        model_cfg.check_max_model_len(64)
