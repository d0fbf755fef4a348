"""Tokenizer, chat template, incremental detokenizer and stop strings vs transformers (CPU, no torch needed)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.core.tokenizer import (
    IncrementalDetokenizer,
    NoChatTemplateError,
    StopChecker,
    decode_continuation,
    load_tokenizer,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

MODELS = ["stories260K", "TinyStories-656K"]
TEXTS = [
    "Once upon a time",
    " leading space and  double  spaces",
    "tabs\tand\nnew\n\nlines",
    "Unicode: é ü 😀 中文 ✓",
    "<s>special</s> in text",
    "Hi <|end_story|> there",
    "",
    " ",
    "The end.",
]

TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ '[SYS]' + m['content'] }}\n"
    "{% else %}{{ bos_token + m['role'] + ': ' + m['content'] | trim + eos_token }}\n{% endif %}{% endfor %}"
    "{% if tools %}{{ tools | tojson }}{% endif %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def auto_tokenizer():
    transformers = pytest.importorskip("transformers")
    return lambda path: transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("name", MODELS)
def test_ids_and_decode_match_transformers(shared_models, auto_tokenizer, name):
    path = shared_models(name)
    ours, hf = load_tokenizer(str(path)), auto_tokenizer(path)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids), text
    assert (ours.bos_token_id, ours.eos_token_ids) == (hf.bos_token_id, (hf.eos_token_id,))
    assert ours.vocab_size == len(hf)


def test_stories_reference_ids(shared_models):
    tok = load_tokenizer(str(shared_models("stories260K")))
    assert tok.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert tok.model_max_length == 512


def test_chat_template_matches_transformers(shared_models, auto_tokenizer, tmp_path):
    src = shared_models("stories260K")
    dst = tmp_path / "stories-chat"
    shutil.copytree(src, dst)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    ours, hf = load_tokenizer(str(dst)), auto_tokenizer(dst)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hello 😀 "},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Story?"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"x": "é"}}}]
    for gen in (True, False):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected
    expected = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, tools=tools) == expected
    assert ours.chat_template == TEMPLATE


def test_chat_template_raise_exception(tmp_path, shared_models):
    import jinja2

    dst = tmp_path / "m"
    shutil.copytree(shared_models("stories260K"), dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(str(dst))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(jinja2.TemplateError, match="user first"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_no_chat_template(shared_models):
    tok = load_tokenizer(str(shared_models("stories260K")))
    with pytest.raises(NoChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert issubclass(NoChatTemplateError, ValueError)


def test_builtin_tokenizer_round_trips_and_has_template():
    tok = load_tokenizer("builtin:tiny-random-llama")
    text = "héllo 😀 中文\tx  <y>"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert tok.decode(ids) == text
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s><|user|>\nhi\n<|assistant|>\n"
    assert load_tokenizer("dummy:llama3-8b").encode("a") == [1, 3 + ord("a")]


def _stream(detok: IncrementalDetokenizer, ids: list[int], step: int) -> str:
    pieces = [detok.push(ids[i:i + step]) for i in range(0, len(ids), step)]
    return "".join(pieces) + detok.finish()


@pytest.mark.parametrize("name", MODELS)
def test_incremental_detokenizer_multibyte(shared_models, name):
    tok = load_tokenizer(str(shared_models(name)))
    prompt = tok.encode("Once upon a time")
    for text in ["there was 😀 a 中文 cat", "é\n\n ü  ok", ", she said."]:
        out = tok.encode(text, add_special_tokens=False)
        full = tok.decode(prompt + out)
        expected = full[len(tok.decode(prompt)):]
        for step in (1, 2, 3):
            assert _stream(IncrementalDetokenizer(tok, prompt), out, step) == expected
        assert decode_continuation(tok, prompt, out) == expected
        # no text is emitted while a multi-byte character is incomplete
        detok = IncrementalDetokenizer(tok, prompt)
        assert all("\ufffd" not in detok.push([i]) for i in out)


def test_incremental_without_prompt_equals_decode(shared_models):
    tok = load_tokenizer(str(shared_models("stories260K")))
    out = tok.encode("Once 😀 upon a time 中文", add_special_tokens=False)
    assert _stream(IncrementalDetokenizer(tok, []), out, 1) == tok.decode(out)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=20), st.integers(min_value=1, max_value=4))
def test_incremental_random_text_builtin(text, step):
    """Any UTF-8 text, split over byte tokens in any chunking: the stream equals the continuation decode."""
    tok = load_tokenizer("builtin:tiny-random-llama")
    ids = tok.encode(text, add_special_tokens=False)
    prompt = tok.encode("ab")
    assert _stream(IncrementalDetokenizer(tok, prompt), ids, step) == tok.decode(prompt + ids)[len("ab"):]


def test_incremental_invalid_bytes_are_flushed():
    """Invalid UTF-8 (a lone lead byte) is held while it may still complete, and flushed by finish()."""
    tok = load_tokenizer("builtin:tiny-random-llama")
    detok = IncrementalDetokenizer(tok, tok.encode("a"))
    assert detok.push([3 + 0xE4]) == ""
    assert detok.push([3 + 0xB8]) == ""
    assert detok.finish() == "\ufffd\ufffd"
    assert detok.finish() == ""


def _run_stop(stops: list[str], pieces: list[str]) -> tuple[str, StopChecker]:
    checker = StopChecker(stops)
    out = "".join(checker.push(p) for p in pieces)
    return out + checker.flush(), checker


def test_stop_checker_spanning_boundaries():
    out, checker = _run_stop(["STOP"], ["hello S", "T", "O", "P and more"])
    assert out == "hello " and checker.stopped and checker.matched == "STOP"
    checker = StopChecker(["\n\n", "END"])
    assert checker.push("a\n") == "a"  # "\n" held back
    assert checker.push("b") == "\nb"
    assert checker.push("E") == ""
    assert checker.push("Nx") == "EN" + "x"
    assert checker.push("ok\n") == "ok"
    assert checker.push("\nlater") == "" and checker.matched == "\n\n"
    assert checker.push("more") == ""
    out, checker = _run_stop(["xyz"], ["abc x", "y"])
    assert out == "abc xy" and not checker.stopped
    with pytest.raises(ValueError):
        StopChecker([""])


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abc\n", max_size=40), st.lists(st.text(alphabet="abc\n", min_size=1, max_size=3),
                                                        min_size=1, max_size=3), st.data())
def test_stop_checker_property(text, stops, data):
    """Any split of the text gives the same output: generation stops where the first stop string *completes*
    (a longer stop string that began earlier but is not complete yet does not count), cut before it."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    out, checker = _run_stop(stops, pieces)
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    assert out == (text[:min(hits)[1]] if hits else text)
    assert checker.stopped == bool(hits)
