"""The built-in default model: a tiny random-weight Llama and a byte-level tokenizer (torch-free).

Nothing is downloaded. The weights are the loader's deterministic dummy weights with the fixed
seed :data:`BUILTIN_SEED` (independent of the engine's ``seed``, so every worker process builds
the same model). The tokenizer has ``<unk>``, ``<s>``, ``</s>`` and the 256 byte tokens
``<0x00>``..``<0xFF>`` (ids 3..258, the llama/SentencePiece byte-fallback layout) and no merges,
so any UTF-8 text round-trips exactly.
"""

from __future__ import annotations

import json

from splitserve.core.model.config import BUILTIN_PREFIX, ModelConfig

BUILTIN_NAME = "tiny-random-llama"
BUILTIN_SEED = 1234
"""Seed of the built-in model's weights."""

_SPECIALS = ("<unk>", "<s>", "</s>")
BUILTIN_VOCAB_SIZE = len(_SPECIALS) + 256

BUILTIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] | trim + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
"""A minimal chat template so chat endpoints work with the built-in model."""


def _check_name(name: str) -> None:
    if name != BUILTIN_PREFIX + BUILTIN_NAME:
        raise ValueError(f"unknown built-in model {name!r}; available: {BUILTIN_PREFIX}{BUILTIN_NAME}")


def builtin_model_config(name: str) -> ModelConfig:
    """Shape of the built-in model (``builtin:tiny-random-llama``)."""
    _check_name(name)
    return ModelConfig(
        architecture="LlamaForCausalLM",
        model_type="llama",
        vocab_size=BUILTIN_VOCAB_SIZE,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_ids=(2,),
        model_id=f"{BUILTIN_NAME} (random weights, seed {BUILTIN_SEED}; output is gibberish)",
    )


def builtin_tokenizer_json() -> str:
    """``tokenizer.json`` contents (the `tokenizers` library format) of the built-in tokenizer."""
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(_SPECIALS) + b for b in range(256)})
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, tok in enumerate(_SPECIALS)
    ]
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }
    return json.dumps(spec)


def builtin_tokenizer_config(name: str) -> dict:
    """``tokenizer_config.json`` contents of the built-in tokenizer."""
    _check_name(name)
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 2048,
        "chat_template": BUILTIN_CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
