"""Agent sessions across tiers with real processes (issue 11): sessions pushed out of a small KV pool go to host
memory, then to disk, come back on their next turn, and every turn's greedy output equals a session-less run; the
admin API lists and ends sessions; a session whose holder is killed falls back to a full prefill elsewhere; a
worker switched to the prefill role drops its sessions and says so.

TinyStories-656K, CPU. KV page: 2 layers x 2 x 8 tokens x 4 heads x 16 dims x 4 bytes = 8 KiB.
"""

from __future__ import annotations

import json
import re
import urllib.request

import openai
import pytest

from conftest import shared_model_path
from fakes.router_harness import wait_for
from test_e2e import complete, model_id, start_cluster

TOKEN = "session-admin-token"
PAGE_BYTES = 8192
GIB = 1 << 30
STORY = ("Once upon a time there was a little girl named Lily. She loved to play outside in the park with her big "
         "red ball. One day she saw a small dog under a tree. The dog was sad because it was lost. Lily wanted to "
         "help the dog find its home, so she asked her mom. Her mom said they could look together. They walked "
         "down the street and knocked on every door.")


@pytest.fixture(scope="module")
def tiered(tmp_path_factory):
    disk = tmp_path_factory.mktemp("session-disk")
    worker_args = ["--page-size", "8", "--num-pages", "28", "--heartbeat-s", "0.3", "--session-kv-fraction", "0.5",
                   "--session-host-gib", str(15 * PAGE_BYTES / GIB), "--session-disk-dir", str(disk),
                   "--session-disk-gib", str((1 << 20) / GIB)]
    c = start_cluster(tmp_path_factory, "session-tiers", model=str(shared_model_path("TinyStories-656K")),
                      worker_args=worker_args, router_args=["--admin-token", TOKEN, "--heartbeat-timeout-s", "2"])
    c.disk = disk
    yield c
    c.stop()


def admin(c, method: str, path: str) -> dict:
    req = urllib.request.Request(f"{c.url}{path}", method=method, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def admin_json(c, method: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"{c.url}{path}", method=method, data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def session_metrics(c) -> dict[str, float]:
    """``splitserve_worker_session_*`` summed over workers, keyed by name plus its tier/reason label."""
    out: dict[str, float] = {}
    for name, labels, value in re.findall(r'^splitserve_worker_session_(\w+)\{([^}]*)\}\s+(\S+)$', c.metrics(), re.M):
        extra = re.search(r'(?:tier|reason)="([^"]+)"', labels)
        key = f"{name}:{extra.group(1)}" if extra else name
        out[key] = out.get(key, 0.0) + float(value)
    return out


class Agent:
    """One agent session: each turn sends the whole conversation so far plus new text."""

    def __init__(self, client, model: str, name: str, back_s: float) -> None:
        self.client, self.model, self.name, self.back_s = client, model, name, back_s
        self.text, self.turns = STORY, []

    def turn(self, new_text: str, end: bool = False) -> str:
        self.text += new_text
        body = {"session_id": self.name, "expected_return_s": self.back_s, "session_end": end}
        out = complete(self.client, self.model, self.text, max_tokens=24, extra_body=body).choices[0].text
        self.turns.append((self.text, out))
        self.text += out
        return out


def test_sessions_go_to_host_then_disk_and_come_back_with_identical_outputs(tiered):
    client = openai.OpenAI(base_url=f"{tiered.url}/v1", api_key="unused", max_retries=0, timeout=120)
    m = model_id(tiered)
    a, b, c = Agent(client, m, "agent-a", 600), Agent(client, m, "agent-b", 5), Agent(client, m, "agent-c", 300)
    a.turn(" Then")
    b.turn(" Later that day,")  # a and b pin more than half the pool: a (back last) goes to host memory
    c.turn(" The next morning")  # c goes to host too; the host tier (15 pages) spills a (back last) to disk
    listed = wait_for(lambda: {s["session_id"]: s for s in admin(tiered, "GET", "/admin/sessions")["sessions"]
                               if s["session_id"].startswith("agent-") and s["tier"]} or None, timeout=30.0, what="session reports")
    wait_for(lambda: {s["session_id"]: s["tier"] for s in admin(tiered, "GET", "/admin/sessions")["sessions"]}
             == {"agent-a": "disk", "agent-b": "gpu", "agent-c": "host"}, timeout=30.0, what="sessions in gpu, host and disk")
    assert all(s["worker"] == "decode-1" and s["tokens"] > 0 for s in listed.values())
    wait_for(lambda: list(tiered.disk.glob("*.kv")), timeout=30.0, what="agent-a's file (written in the background)")
    a.turn(" When they got home,")  # restored from disk
    c.turn(" At the end,")  # restored from host memory
    b.turn(" Finally,", end=True)  # held in the pool all along; its last turn
    stats = wait_for(lambda: (s := session_metrics(tiered)).get("turns_total") == 6 and s, timeout=30.0, what="a heartbeat after turn 6")
    assert stats["restores_total"] == 2 and stats["restore_bytes_total"] > 0
    assert stats["evictions_total:to_host"] >= 2 and stats["evictions_total:to_disk"] >= 1
    log = (tiered.log_dir / "decode-1.log").read_text()
    assert "restored from disk" in log and "restored from host" in log
    for agent in (a, c):
        assert admin(tiered, "DELETE", f"/admin/sessions/{agent.name}")["workers"] == {"decode-1": True}
    with pytest.raises(urllib.error.HTTPError) as missing:
        admin(tiered, "DELETE", "/admin/sessions/agent-unknown")
    assert missing.value.code == 404
    for agent in (a, b, c):  # the same prompts without sessions, after the fact: the same greedy text
        for prompt, out in agent.turns:
            assert complete(client, m, prompt, max_tokens=24).choices[0].text == out
    used = tiered.wait_pages_free()
    assert used and not any(used.values()), used
    wait_for(lambda: sum(tiered.worker_gauge("sessions").values()) == 0, timeout=30.0, what="no live sessions")
    left = session_metrics(tiered)
    assert left["pages:gpu"] == left["pages:host"] == left["pages:disk"] == 0
    assert list(tiered.disk.glob("*")) == [] and admin(tiered, "GET", "/admin/sessions")["sessions"] == []


def test_a_session_whose_holder_is_killed_falls_back_to_a_full_prefill_elsewhere(tiered):
    tiered.start_worker("decode-2", "decode")
    tiered.wait_workers(3)
    client = openai.OpenAI(base_url=f"{tiered.url}/v1", api_key="unused", max_retries=0, timeout=120)
    m = model_id(tiered)
    d = Agent(client, m, "agent-d", 60)
    d.turn(" Then")
    holder = wait_for(lambda: next((s["worker"] for s in admin(tiered, "GET", "/admin/sessions")["sessions"]
                                    if s["session_id"] == "agent-d" and s["tier"]), None), timeout=30.0, what="the holder's report")
    tiered.kill(holder)
    wait_for(lambda: tiered.worker_gauge("healthy").get(holder) == 0, timeout=30.0, what="the router to see the holder gone")
    d.turn(" The next day,", end=True)  # routed to the other decode worker: a full prefill there
    for prompt, out in d.turns:
        assert complete(client, m, prompt, max_tokens=24).choices[0].text == out
    used = tiered.wait_pages_free(ignore=frozenset({holder}))
    assert used and not any(used.values()), used


def test_a_worker_switched_to_prefill_drops_its_sessions_and_their_next_turn_is_prefilled_elsewhere(tiered):
    """Runs after the holder was killed: one decode worker is left."""
    survivor = next(w for w, up in tiered.worker_gauge("healthy").items() if up and w.startswith("decode"))
    client = openai.OpenAI(base_url=f"{tiered.url}/v1", api_key="unused", max_retries=0, timeout=120)
    m = model_id(tiered)
    f = Agent(client, m, "agent-f", 60)
    f.turn(" Then")
    wait_for(lambda: any(s["session_id"] == "agent-f" and s["worker"] == survivor and s["tier"]
                         for s in admin(tiered, "GET", "/admin/sessions")["sessions"]), timeout=30.0, what="agent-f held")
    admin_json(tiered, "POST", f"/admin/workers/{survivor}/role", {"role": "prefill"})
    wait_for(lambda: session_metrics(tiered).get("evictions_total:role_change", 0) >= 1, timeout=30.0, what="the drop reported")
    admin_json(tiered, "POST", f"/admin/workers/{survivor}/role", {"role": "decode"})
    wait_for(lambda: tiered.health() == 200 and tiered.worker_gauge("healthy").get(survivor) == 1, timeout=30.0, what="decode again")
    f.turn(" The next day,", end=True)  # the router still names the survivor, which no longer holds it: full prefill
    for prompt, out in f.turns:
        assert complete(client, m, prompt, max_tokens=24).choices[0].text == out
    assert "session agent-f dropped: role change" in (tiered.log_dir / f"{survivor}.log").read_text()
