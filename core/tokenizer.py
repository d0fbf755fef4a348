"""Tokenizer, chat templates, incremental detokenization and stop strings (torch-free; the router uses it).

:func:`load_tokenizer` reads a Hugging Face directory (``tokenizer.json`` + ``tokenizer_config.json``
[+ ``special_tokens_map.json``, ``generation_config.json``, ``chat_template.jinja``]), the built-in
tokenizer (``builtin:...``), or, for ``dummy:<shape>`` models, the built-in tokenizer unless a
tokenizer directory is given. Encoding matches transformers 5.x ``AutoTokenizer`` ids: like
transformers, a ``LlamaTokenizer``/``LlamaTokenizerFast`` class in ``tokenizer_config.json`` gets its
pipeline rebuilt (Metaspace pre-tokenizer, no normalizer, byte-fallback BPE without an unk token).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, pre_tokenizers, processors

from splitserve.core.model.builtin import builtin_tokenizer_config, builtin_tokenizer_json
from splitserve.core.model.config import BUILTIN_PREFIX, DUMMY_PREFIX

logger = logging.getLogger(__name__)

TOKENIZER_ENV = "SPLITSERVE_TOKENIZER"
"""Tokenizer directory for ``dummy:<shape>`` models (else the built-in byte tokenizer is used)."""

_LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")
_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "pad_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class NoChatTemplateError(ValueError):
    """The tokenizer has no chat template, so chat messages cannot be rendered."""


def _token_str(value: Any) -> str | None:
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Tokenizer:
    """A `tokenizers` backend plus the special-token facts and chat template of one model."""

    def __init__(self, backend: HFTokenizer, config: Mapping[str, Any], eos_token_ids: Sequence[int] = (),
                 name: str = ""):
        """
        Args:
            backend: the fast tokenizer (pipeline already adjusted like transformers does).
            config: ``tokenizer_config.json`` contents merged with ``special_tokens_map.json``.
            eos_token_ids: extra EOS ids (e.g. from ``generation_config.json``).
            name: for messages.
        """
        self.backend, self.name = backend, name
        self.special_tokens = {a: _token_str(config.get(a)) for a in _SPECIAL_ATTRS if config.get(a) is not None}
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.bos_token_id = self._id_of(self.bos_token)
        eos = [self._id_of(self.eos_token)] + list(eos_token_ids)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in eos if i is not None))
        self.model_max_length = int(config.get("model_max_length") or 0) or None
        self.chat_template: str | None = _select_template(config.get("chat_template"))
        self._compiled_template = None

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (with BOS etc. per the tokenizer's post-processor when ``add_special_tokens``)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def set_chat_template(self, source: str) -> None:
        """Use ``source`` (a jinja chat template) instead of the model's own; ``jinja2.TemplateError`` if it does not
        compile."""
        compiled = compile_chat_template(source)
        self.chat_template, self._compiled_template = source, compiled

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, documents: list[dict] | None = None,
                            **kwargs: Any) -> str:
        """Render chat ``messages`` with the model's jinja template, as transformers does.

        The template sees ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the special
        tokens (``bos_token``, ``eos_token``, ...) and any ``kwargs`` (which override special tokens).
        Raises :class:`NoChatTemplateError` if the tokenizer has no template, ``jinja2.TemplateError``
        if the template rejects the conversation (``raise_exception``).
        """
        if self.chat_template is None:
            raise NoChatTemplateError(f"tokenizer {self.name or '(unnamed)'} has no chat template")
        if self._compiled_template is None:
            self._compiled_template = compile_chat_template(self.chat_template)
        chat = _alias_reasoning([_plain(m) for m in messages])
        for message in chat:
            if not isinstance(message, dict):
                raise TypeError(f"chat messages must be dicts, got {type(message).__name__}")
        variables = {**self.special_tokens, **_plain(kwargs)}
        return self._compiled_template.render(messages=chat, tools=_plain(tools), documents=_plain(documents),
                                              add_generation_prompt=add_generation_prompt, **variables)


def _select_template(value: Any) -> str | None:
    """``chat_template`` may be a string or a list of ``{"name", "template"}`` (we use ``default``)."""
    if value is None or isinstance(value, str):
        return value
    named = {t["name"]: t["template"] for t in value}
    return named.get("default")


def _plain(value: Any) -> Any:
    """Deep copy as plain JSON types (what the sandboxed template is allowed to see)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "model_dump"):
        return _plain(value.model_dump())
    raise TypeError(f"unsupported value of type {type(value).__name__} in chat template input")


def _alias_reasoning(chat: list[Any]) -> list[Any]:
    """Like transformers: expose a message's reasoning as both ``reasoning_content`` and ``thinking``."""
    out = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def compile_chat_template(source: str) -> Any:
    """Compile a chat template in transformers' environment (sandboxed, trim/lstrip blocks, its globals)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body (assistant-mask tracking is not needed)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _rebuild_llama_pipeline(spec: dict[str, Any], config: Mapping[str, Any]) -> None:
    """What transformers 5.x ``LlamaTokenizer.__init__`` does to a BPE tokenizer.json (in place)."""
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    legacy = bool(config.get("legacy", False))
    scheme = ("always" if legacy else "first") if add_prefix_space else "never"
    model = spec["model"]
    model.update(unk_token=None, fuse_unk=True, byte_fallback=True, dropout=None)
    spec["normalizer"] = None
    spec["pre_tokenizer"] = json.loads(
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False).__getstate__()
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    spec["decoder"] = json.loads(decoders.Sequence(steps).__getstate__())


def _template_post_processor(backend: HFTokenizer, config: Mapping[str, Any]) -> processors.TemplateProcessing:
    """transformers' ``update_post_processor``: BOS/EOS around each sequence per add_bos/eos_token."""
    bos, eos = _token_str(config.get("bos_token")), _token_str(config.get("eos_token"))
    add_bos = bool(config.get("add_bos_token")) and bos is not None
    add_eos = bool(config.get("add_eos_token")) and eos is not None
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    special = []
    if add_bos:
        special.append((bos, backend.token_to_id(bos)))
    if add_eos:
        special.append((eos, backend.token_to_id(eos)))
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def build_tokenizer(tokenizer_json: str, config: Mapping[str, Any], eos_token_ids: Sequence[int] = (),
                    name: str = "") -> Tokenizer:
    """A :class:`Tokenizer` from ``tokenizer.json`` text and the merged tokenizer config."""
    spec = json.loads(tokenizer_json)
    if config.get("tokenizer_class") in _LLAMA_CLASSES and spec.get("model", {}).get("type") == "BPE":
        _rebuild_llama_pipeline(spec, config)
    backend = HFTokenizer.from_str(json.dumps(spec))
    missing = [
        t for t in (config.get("added_tokens_decoder") or {}).values()
        if backend.token_to_id(t["content"]) is None
    ]
    if missing:
        from tokenizers import AddedToken

        backend.add_special_tokens([AddedToken(t["content"], special=True, normalized=False) for t in missing])
    if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
        backend.post_processor = _template_post_processor(backend, config)
    return Tokenizer(backend, config, eos_token_ids, name)


def _generation_eos(model_dir: str) -> list[int]:
    value = _read_json(os.path.join(model_dir, "generation_config.json")).get("eos_token_id")
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def load_hf_tokenizer(model_dir: str) -> Tokenizer:
    """Tokenizer of a local Hugging Face model directory."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer.json in {model_dir!r} (SentencePiece-only tokenizers are not supported)")
    config = {**_read_json(os.path.join(model_dir, "special_tokens_map.json")),
              **_read_json(os.path.join(model_dir, "tokenizer_config.json"))}
    jinja_path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            config["chat_template"] = f.read()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return build_tokenizer(text, config, _generation_eos(model_dir), name=os.path.basename(os.path.normpath(model_dir)))


def load_tokenizer(model: str, tokenizer: str | None = None) -> Tokenizer:
    """Tokenizer for a model name: HF dir, ``builtin:...`` or ``dummy:<shape>``.

    ``tokenizer`` (or env ``SPLITSERVE_TOKENIZER``) names a tokenizer directory to use instead;
    ``dummy:<shape>`` models otherwise get the built-in byte tokenizer (ids it cannot produce
    decode to nothing).
    """
    override = tokenizer or (os.environ.get(TOKENIZER_ENV) if model.startswith(DUMMY_PREFIX) else None)
    if override:
        return load_hf_tokenizer(override)
    if model.startswith(DUMMY_PREFIX):
        model = "builtin:tiny-random-llama"
    if model.startswith(BUILTIN_PREFIX):
        return build_tokenizer(builtin_tokenizer_json(), builtin_tokenizer_config(model), name=model)
    if os.path.isdir(model):
        return load_hf_tokenizer(model)
    raise FileNotFoundError(f"tokenizer for {model!r}: not a directory, 'builtin:...' or 'dummy:<shape>'")


class IncrementalDetokenizer:
    """Turns generated ids into text pieces as they arrive, using the prompt as left context.

    Decodes a short window of ids before the new ones and emits only the difference, so spaces
    (SentencePiece ``▁``) come out right and a character split over several byte tokens is emitted
    once complete. ``"".join(pushes) + finish()`` equals :func:`decode_continuation`, i.e. the text
    ``decode(prompt + output)`` adds after ``decode(prompt)``; this is ``decode(output)`` except that a
    leading space the decoder strips at the start of a sequence is kept (OpenAI completion semantics).
    This holds whenever the output is valid UTF-8; for invalid byte sequences the number of
    replacement characters (U+FFFD) may differ from a one-shot decode.
    """

    _CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        self.read_offset = len(self.ids)
        self.prefix_offset = max(len(self.ids) - self._CONTEXT, 0)

    def _delta(self, final: bool) -> str:
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def push(self, new_ids: Iterable[int]) -> str:
        """Add generated ids; returns the newly completed text (possibly empty)."""
        self.ids.extend(new_ids)
        return self._delta(final=False)

    def finish(self) -> str:
        """Flush text held back because it ended in an incomplete (or invalid) byte sequence."""
        if self.read_offset == len(self.ids):
            return ""
        return self._delta(final=True)


def decode_continuation(tokenizer: Tokenizer, prompt_ids: Sequence[int], output_ids: Sequence[int],
                        skip_special_tokens: bool = True) -> str:
    """The full text of ``output_ids`` as :class:`IncrementalDetokenizer` streams it (non-streamed responses)."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    return detok.push(output_ids) + detok.finish()


@dataclass
class StopChecker:
    """Finds stop strings in streamed text (OpenAI semantics: the stop string is not returned).

    Feed text pieces to :meth:`push`; it returns what may be emitted now. A tail that could be
    the start of a stop string is held back until the next piece disambiguates it. Once a stop
    string is found, :attr:`stopped` is set, :attr:`matched` names it and everything after it is
    dropped. Call :meth:`flush` when generation ends for another reason to get the held tail.
    """

    stop_strings: Sequence[str]
    stopped: bool = False
    matched: str | None = None
    _held: str = ""

    def __post_init__(self) -> None:
        if any(not s for s in self.stop_strings):
            raise ValueError("stop strings must not be empty")
        self.stop_strings = tuple(self.stop_strings)

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        buf = self._held + text
        # The stop string that completes first wins (ties: the longer one, which starts earlier); the held
        # tail contains no complete stop string, so each first occurrence ends inside the new text.
        hits = [(buf.find(s) + len(s), buf.find(s), s) for s in self.stop_strings if s in buf]
        if hits:
            _end, idx, self.matched = min(hits)
            self.stopped, self._held = True, ""
            return buf[:idx]
        keep = self._partial_len(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def _partial_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """Release the held tail (no stop string can complete any more)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
