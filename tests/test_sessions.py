"""Agent sessions (issue 11, first part): a session's turns go to the decode worker that keeps its KV, which then
computes only the new suffix; outputs equal session-less runs; ending a session frees everything it held.

The pure part (which sessions a worker lets go first) runs on a real KVCacheManager with exact page counts.
"""

from __future__ import annotations

import re

import pytest

from splitserve.core.cache.manager import KVCacheManager
from splitserve.core.messages import SessionHint
from splitserve.decode.sessions import SessionKeeper
from test_e2e import complete, model_id, start_cluster
from conftest import shared_model_path


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _pin(kv: KVCacheManager, session: str, tokens: int) -> None:
    rid = f"turn-{session}"
    kv.allocate_slots(rid, tokens)
    kv.pin(rid, session)
    kv.free(rid)


def test_keeper_releases_the_session_expected_back_last_then_the_least_recently_used():
    kv, clock = KVCacheManager(num_pages=20, page_size=4), Clock()
    keeper = SessionKeeper(kv, kv.release_pinned, max_fraction=0.5, clock=clock)
    for name, back in (("soon", 5.0), ("later", 600.0), ("hintless", None)):
        keeper.touch(SessionHint(name, expected_return_s=back))
        _pin(kv, name, 12)  # 3 pages each
        clock.t += 1
    assert keeper.victims() == ["later", "hintless", "soon"]  # back at 601, 62 (default 60 s), 5
    keeper.enforce_cap()  # 9 pinned pages <= 10: nothing released
    assert sorted(kv.pinned_keys()) == ["hintless", "later", "soon"]
    keeper.touch(SessionHint("big"))
    _pin(kv, "big", 16)  # 13 pinned > 10: the session expected back last goes first
    keeper.enforce_cap()
    assert sorted(kv.pinned_keys()) == ["big", "hintless", "soon"] and kv.usage().pinned == 10
    keeper.end("soon")
    assert "soon" not in kv.pinned_keys() and keeper.release_one("test") and keeper.release_one("test")
    assert not keeper.release_one("test") and kv.usage().pinned == 0
    kv.check_integrity()


@pytest.fixture(scope="module")
def sess(tmp_path_factory):
    c = start_cluster(tmp_path_factory, "sessions", model=str(shared_model_path("stories260K")),
                      worker_args=["--page-size", "8", "--num-pages", "512", "--heartbeat-s", "0.3"])
    yield c
    c.stop()


def _hits(c) -> tuple[float, float]:
    return (sum(c.worker_gauge("session_hits_total").values()),
            sum(c.worker_gauge("session_tokens_reused_total").values()))


def test_turns_of_a_session_reuse_its_kv_and_match_a_run_without_sessions(sess):
    import openai

    client = openai.OpenAI(base_url=f"{sess.url}/v1", api_key="unused", max_retries=0, timeout=60)
    m = model_id(sess)
    text, outputs = "Once upon a time, there was a dog named Max.", []
    for turn in range(3):
        body = {"session_id": "agent-1", "session_end": turn == 2, "expected_return_s": 5.0}
        out = complete(client, m, text, max_tokens=24, extra_body=body).choices[0].text
        assert out == complete(client, m, text, max_tokens=24).choices[0].text  # same as without a session
        outputs.append(out)
        text += out + " The next day,"
    sess.wait_pages_free()  # heartbeats carry the counters
    hits, reused = _hits(sess)
    assert hits >= 2 and reused >= 2 * 8  # turns 2 and 3 found their KV on the decode worker
    used = sess.wait_pages_free()
    assert used and not any(used.values()), used  # the last turn ended the session: nothing stays pinned
    assert len(set(outputs)) == 3
    local = re.search(r"^splitserve_local_prefill_seconds_count (\S+)$", sess.metrics(), re.M)
    assert local and float(local.group(1)) >= 2  # turns 2 and 3 were prefilled on the decode worker, and timed


def test_a_session_holds_pages_between_turns_until_it_ends(sess):
    import time

    import openai

    client = openai.OpenAI(base_url=f"{sess.url}/v1", api_key="unused", max_retries=0, timeout=60)
    m = model_id(sess)
    first = complete(client, m, "Lily wanted", max_tokens=8, extra_body={"session_id": "agent-2"}).choices[0].text
    deadline = time.monotonic() + 10
    while sess.worker_gauge("kv_pages_used").get("decode-1", 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sess.worker_gauge("kv_pages_used")["decode-1"] > 0  # kept for the next turn
    with pytest.raises(openai.BadRequestError) as exc:
        complete(client, m, ["a", "b"], max_tokens=2, extra_body={"session_id": "agent-2"})
    assert exc.value.body["param"] == "session_id"
    body = {"session_id": "agent-2", "session_end": True}
    end = complete(client, m, "Lily wanted" + first, max_tokens=8, extra_body=body)
    assert end.choices[0].text == complete(client, m, "Lily wanted" + first, max_tokens=8).choices[0].text
    used = sess.wait_pages_free()
    assert used and not any(used.values()), used
