"""A held session's turn with a long new suffix (issue 11): the decode worker keeps the conversation, a prefill worker
computes only the suffix, given the held prefix, and sends only the suffix back.

Real router and workers (stories260K, greedy, token-id prompts so every turn continues the exact ids of the last):

* one-sided path (``--transfer auto``: shared memory between the CPU processes): the prefill worker reads the held
  pages out of the decode worker's pool, so the turn's prompt tokens not computed (``cached_tokens``) cover the
  previous turn's output too, which its own prefix cache never had;
* one-sided path over NIXL (``--transfer nixl``, as across hosts): the same, the held pages read by a NIXL READ;
* inline path (``--transfer zmq``): the prefill worker cannot read the pool and computes what its cache lacks;
  only the suffix is sent back.

Either way every turn's ids equal a run without sessions, nothing is prefilled on the decode worker (the suffix is
over ``--session-suffix-threshold``), and after the session ends no worker holds a page (the prefill worker's pin of
the pages it read included).
"""

from __future__ import annotations

import re

import pytest

from conftest import shared_model_path
from test_e2e import start_cluster
from test_return_token_ids import post, tokenize

PAGE = 8
NEW_TEXT = (" The next day, the little dog went to the big park with his best friend the cat, and they played"
            " in the warm sun until it was time to go home.")


@pytest.fixture(scope="module", params=["auto", "nixl", "zmq"])
def cluster(request, tmp_path_factory):
    if request.param == "nixl":
        pytest.importorskip("nixl", reason="--transfer nixl needs the nixl extra")
    c = start_cluster(tmp_path_factory, f"suffix-{request.param}", model=str(shared_model_path("stories260K")),
                      worker_args=["--page-size", str(PAGE), "--num-pages", "512", "--heartbeat-s", "0.3",
                                   "--transfer", request.param, "--session-suffix-threshold", "16"])
    c.transfer = request.param
    yield c
    c.stop()


def _turn(url: str, prompt: list[int], **body) -> dict:
    out = post(url, "/v1/completions", prompt=prompt, max_tokens=24, return_token_ids=True, **body)
    choice = out["choices"][0]
    return {"ids": choice["token_ids"], "prompt_tokens": out["usage"]["prompt_tokens"],
            "cached": (out["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)}


def _local_prefills(c) -> float:
    found = re.search(r"^splitserve_local_prefill_seconds_count (\S+)$", c.metrics(), re.M)
    return float(found.group(1)) if found else 0.0


def test_long_suffix_is_prefilled_by_the_prefill_worker_given_the_held_prefix(cluster):
    url, new = cluster.url, tokenize(cluster.url, NEW_TEXT)
    assert len(new) >= 16
    prompt = tokenize(cluster.url, "Once upon a time, there was a dog named Max.")
    for turn in range(3):
        hint = {"session_id": f"suffix-{cluster.transfer}", "session_end": turn == 2, "expected_return_s": 5.0}
        got = _turn(url, prompt, **hint)
        assert got["ids"] == _turn(url, prompt)["ids"]  # the same as without a session (asked second: no warm-up)
        if turn:
            held = (len(prompt) - len(new) - 1) // PAGE * PAGE  # the last turn's prompt and output, in full pages
            computed = got["prompt_tokens"] - got["cached"]
            if cluster.transfer != "zmq":  # the held pages were read: only the suffix (and a partial page) computed
                assert got["cached"] >= held and computed <= len(new) + PAGE, got
            else:  # inline: the prefill worker's own cache has the last prompt only, not the output after it
                assert got["cached"] <= held - 24 + PAGE and computed >= len(new) + 24 - PAGE, got
        prompt = prompt + got["ids"] + new
    assert _local_prefills(cluster) == 0  # every suffix went to the prefill worker
    used = cluster.wait_pages_free()  # (heartbeats carry the counters: read them after)
    assert used and not any(used.values()), used  # the session ended; the prefill worker's held pages are gone
    assert sum(cluster.worker_gauge("session_hits_total").values()) == 2
