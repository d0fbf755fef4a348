"""``return_token_ids`` (vLLM's layout) against a real 1P1D cluster (stories260K, greedy): completions carry
``token_ids`` and ``prompt_token_ids`` on each choice, chat ``token_ids`` on each choice and ``prompt_token_ids`` at
the top level; streamed ids concatenate to the non-streamed ones; without the flag neither key is anywhere."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from conftest import shared_model_path
from test_e2e import REF_IDS, start_cluster

PROMPT, PROMPT_IDS = "Once upon a time", [1, 403, 407, 261, 378]
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}Assistant:"
KEYS = ("token_ids", "prompt_token_ids")


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(TEMPLATE)
    c = start_cluster(tmp_path_factory, "token-ids", model=str(shared_model_path("stories260K")),
                      router_args=["--chat-template", str(template)])
    yield c.url
    c.stop()


def _request(url: str, path: str, body: dict):
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=60)


def post(url: str, path: str, **body) -> dict:
    with _request(url, path, {"temperature": 0, **body}) as r:
        return json.load(r)


def tokenize(url: str, prompt: str, **body) -> list[int]:
    with _request(url, "/tokenize", {"prompt": prompt, **body}) as r:
        return json.load(r)["tokens"]


def stream(url: str, path: str, **body) -> list[dict]:
    """The stream's JSON chunks (``[DONE]`` checked and dropped)."""
    with _request(url, path, {"temperature": 0, "stream": True, **body}) as r:
        events = [line[len(b"data: "):].strip() for line in r.read().splitlines() if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    return [json.loads(e) for e in events[:-1]]


def streamed_ids(chunks: list[dict], index: int = 0) -> list[int]:
    return [t for c in chunks for ch in c["choices"] if ch["index"] == index for t in ch["token_ids"]]


def test_completions_ids_match_streamed_and_the_tokenized_prompt(url):
    full = post(url, "/v1/completions", prompt=PROMPT, max_tokens=12, return_token_ids=True)
    choice = full["choices"][0]
    assert choice["token_ids"] == REF_IDS[:12] and len(choice["token_ids"]) == full["usage"]["completion_tokens"]
    assert choice["prompt_token_ids"] == PROMPT_IDS == tokenize(url, PROMPT)
    assert "prompt_token_ids" not in full and "token_ids" not in full  # completions: on the choice only
    chunks = stream(url, "/v1/completions", prompt=PROMPT, max_tokens=12, return_token_ids=True,
                    stream_options={"include_usage": True})
    assert streamed_ids(chunks) == choice["token_ids"]
    assert "".join(ch["text"] for c in chunks for ch in c["choices"]) == choice["text"]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == PROMPT_IDS
    assert not any("prompt_token_ids" in ch for c in chunks[1:] for ch in c["choices"])
    assert chunks[-1]["choices"] == [] and "prompt_token_ids" not in chunks[-1]  # the usage chunk
    by_ids = post(url, "/v1/completions", prompt=PROMPT_IDS, max_tokens=12, return_token_ids=True)["choices"][0]
    assert by_ids["prompt_token_ids"] == PROMPT_IDS and by_ids["token_ids"] == choice["token_ids"]


def test_completions_per_choice_with_n_best_of_echo_logprobs_and_two_prompts(url):
    prompts = [PROMPT, "The little dog"]
    out = post(url, "/v1/completions", prompt=prompts, max_tokens=6, n=2, best_of=2, echo=True, logprobs=1,
               return_token_ids=True)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    for c in out["choices"]:
        prompt = prompts[c["index"] // 2]
        assert c["prompt_token_ids"] == tokenize(url, prompt)
        assert len(c["token_ids"]) == 6 and c["text"].startswith(prompt)  # the echoed prompt is not in token_ids
        assert len(c["logprobs"]["tokens"]) == len(c["prompt_token_ids"]) + 6
    assert out["choices"][0]["token_ids"] == out["choices"][1]["token_ids"] == REF_IDS[:6]  # greedy copies
    chunks = stream(url, "/v1/completions", prompt=prompts, max_tokens=6, n=2, echo=True, return_token_ids=True)
    for c in out["choices"]:
        assert streamed_ids(chunks, c["index"]) == c["token_ids"]
        firsts = [ch for k in chunks for ch in k["choices"] if ch["index"] == c["index"]]
        assert firsts[0]["prompt_token_ids"] == c["prompt_token_ids"]
        assert not any("prompt_token_ids" in ch for ch in firsts[1:])
    echo_only = post(url, "/v1/completions", prompt=PROMPT, max_tokens=0, echo=True, return_token_ids=True)
    assert echo_only["choices"][0]["token_ids"] == [] and echo_only["choices"][0]["prompt_token_ids"] == PROMPT_IDS


def test_chat_ids_on_the_choice_and_prompt_ids_at_the_top(url):
    messages = [{"role": "user", "content": "Tell me a story"}]
    rendered = tokenize(url, "user: Tell me a story\nAssistant:", add_special_tokens=False)
    full = post(url, "/v1/chat/completions", messages=messages, max_tokens=10, n=2, return_token_ids=True)
    assert full["prompt_token_ids"] == rendered and len(rendered) == full["usage"]["prompt_tokens"]
    for c in full["choices"]:
        assert len(c["token_ids"]) == 10 and "prompt_token_ids" not in c
    chunks = stream(url, "/v1/chat/completions", messages=messages, max_tokens=10, n=2, return_token_ids=True)
    roles = [c for c in chunks if c["choices"][0]["delta"].get("role")]
    assert len(roles) == 2 and all(c["prompt_token_ids"] == rendered for c in roles)
    assert not any("prompt_token_ids" in c for c in chunks if c not in roles)
    for c in full["choices"]:
        assert streamed_ids([k for k in chunks if k not in roles], c["index"]) == c["token_ids"]


def test_without_the_flag_no_key_anywhere(url):
    messages = [{"role": "user", "content": "hi"}]
    for flag in ({}, {"return_token_ids": False}):
        bodies = [post(url, "/v1/completions", prompt=PROMPT, max_tokens=4, n=2, echo=True, **flag),
                  post(url, "/v1/chat/completions", messages=messages, max_tokens=4, **flag)]
        bodies += stream(url, "/v1/completions", prompt=PROMPT, max_tokens=4, **flag)
        bodies += stream(url, "/v1/chat/completions", messages=messages, max_tokens=4, **flag)
        for body in bodies:
            assert not any(k in body for k in KEYS) and not any(k in c for c in body["choices"] for k in KEYS)
    with pytest.raises(urllib.error.HTTPError) as err:
        post(url, "/v1/completions", prompt=PROMPT, max_tokens=4, return_token_ids="yes")
    assert err.value.code == 400 and json.load(err.value)["error"]["param"] == "return_token_ids"
