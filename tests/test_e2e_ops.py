"""Operating the real stack: `splitserve up`, the admin API on live workers, routing policies end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

from cluster import Cluster, free_port, poll_until
from conftest import shared_model_path

TOKEN = "test-admin-token"


def admin(c: Cluster, method: str, path: str, body: dict | None = None, token: str = TOKEN) -> tuple[int, dict]:
    req = urllib.request.Request(f"{c.url}{path}", method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_splitserve_up_serves_and_stops_on_sigterm():
    """The README's main command: router + 1 prefill + 1 decode, built-in model, SIGTERM stops everything."""
    port, ctrl = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "splitserve.cli", "up", "--port", str(port), "--control-port", str(ctrl)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "is up at" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        assert "is up at" in line, "splitserve up did not report readiness"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        assert "random" in model
        out = client.completions.create(model=model, prompt="Hello", max_tokens=8, temperature=0)
        assert out.usage.completion_tokens == 8
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, temperature=0)  # the built-in model has a chat template
        assert chat.usage.completion_tokens == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    for pattern in (f"--control-port {ctrl}", f"127.0.0.1:{ctrl}"):  # the router; the workers
        left = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        assert [p for p in left if int(p) != os.getpid()] == [], f"processes left running: {left}"


@pytest.fixture(scope="module")
def ops_cluster(tmp_path_factory):
    c = Cluster(model=str(shared_model_path("stories260K")), prefill=2, decode=1,
                worker_args=["--page-size", "8", "--num-pages", "256", "--heartbeat-s", "0.3"],
                router_args=["--admin-token", TOKEN, "--prefill-policy", "prefix_aware"],
                log_dir=tmp_path_factory.mktemp("ops")).start()
    yield c
    c.stop()


def test_admin_lists_workers_and_rejects_bad_token(ops_cluster):
    code, body = admin(ops_cluster, "GET", "/admin/workers")
    assert code == 200
    roles = {w["worker_id"]: w["role"] for w in body["workers"]}
    assert roles == {"prefill-0": "prefill", "prefill-1": "prefill", "decode-2": "decode"}
    assert all("kv_pages_used" in json.dumps(w) for w in body["workers"])
    assert admin(ops_cluster, "GET", "/admin/workers", token="wrong")[0] == 401


def test_prefix_aware_routing_keeps_a_prefix_on_one_worker(ops_cluster):
    client = openai.OpenAI(base_url=f"{ops_cluster.url}/v1", api_key="x", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    story = "Once upon a time there was a little girl named Lily. She loved to play outside in the park with her dog"
    client.completions.create(model=model, prompt=story, max_tokens=2, temperature=0)
    time.sleep(1.0)  # let the prefill workers publish their cache events

    def prefill_tokens() -> dict[str, float]:
        return ops_cluster.worker_gauge("prefill_tokens_total")

    before = prefill_tokens()
    for suffix in (". One day", ". She saw", ". Then"):
        client.completions.create(model=model, prompt=story + suffix, max_tokens=2, temperature=0)
    assert poll_until(lambda: sum(prefill_tokens().values()) > sum(before.values()))
    time.sleep(1.0)
    grew = [w for w, v in prefill_tokens().items() if v > before.get(w, 0)]
    assert len(grew) == 1, f"prefix-sharing prompts were spread over {grew}"


def test_switch_role_and_drain_on_live_workers(ops_cluster):
    c = ops_cluster
    client = openai.OpenAI(base_url=f"{c.url}/v1", api_key="x", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    story = "Once upon a time"
    turn1 = client.completions.create(model=model, prompt=story, max_tokens=8, temperature=0,
                                      extra_body={"session_id": "agent-ops"}).choices[0].text
    code, body = admin(c, "POST", "/admin/workers/decode-2/role", {"role": "prefill"})
    assert code == 200 and body["role"] == "prefill"
    assert body["sessions_dropped"] == ["agent-ops"]  # it held the session: the reply says it is dropped
    assert poll_until(lambda: c.health() == 503)  # no decode-capable worker any more
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=model, prompt="Hi", max_tokens=2)
    assert e.value.status_code == 503
    assert admin(c, "POST", "/admin/workers/prefill-1/role", {"role": "decode"})[0] == 200
    assert poll_until(lambda: c.health() == 200)
    out = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert out.choices[0].text.startswith(", there was a little")
    turn2 = client.completions.create(model=model, prompt=story + turn1, max_tokens=8, temperature=0,
                                      extra_body={"session_id": "agent-ops"})  # prefilled in full on prefill-1
    plain = client.completions.create(model=model, prompt=story + turn1, max_tokens=8, temperature=0)
    assert turn2.choices[0].text == plain.choices[0].text
    code, body = admin(c, "POST", "/admin/workers/prefill-1/drain")
    assert code == 200 and body["draining"] and body["sessions_dropped"] == ["agent-ops"]
    assert poll_until(lambda: c.health() == 503)
    assert c.wait_pages_free()["prefill-1"] == 0


def test_decode_worker_prefills_short_prompts_itself(tmp_path_factory):
    c = Cluster(model=str(shared_model_path("stories260K")), prefill=1, decode=1,
                worker_args=["--page-size", "8", "--num-pages", "256", "--heartbeat-s", "0.3",
                             "--local-prefill-threshold", "32"],
                log_dir=tmp_path_factory.mktemp("local")).start()
    try:
        client = openai.OpenAI(base_url=f"{c.url}/v1", api_key="x", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        short = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
        assert short.choices[0].text.startswith(", there was a little")
        time.sleep(1.0)
        assert c.worker_gauge("prefill_tokens_total").get("prefill-0") == 0  # 5 tokens < 32: prefilled locally
        long_prompt = "Once upon a time there was a little girl named Lily who loved to play in the park every day. " * 2
        client.completions.create(model=model, prompt=long_prompt, max_tokens=4, temperature=0)
        assert poll_until(lambda: c.worker_gauge("prefill_tokens_total").get("prefill-0", 0) > 32)
        assert c.wait_pages_free()["decode-1"] == 0
    finally:
        c.stop()


def test_workers_rejoin_a_restarted_router(tmp_path_factory):
    """Kill the router: a new one on the same ports learns the running workers from their heartbeats."""
    c = Cluster(model=str(shared_model_path("stories260K")), prefill=1, decode=1,
                worker_args=["--page-size", "8", "--num-pages", "128", "--heartbeat-s", "0.3"],
                log_dir=tmp_path_factory.mktemp("rejoin")).start()
    try:
        c.restart_router()
        c.wait_workers(2, timeout_s=60)
        client = openai.OpenAI(base_url=f"{c.url}/v1", api_key="x", max_retries=0, timeout=60)
        out = client.completions.create(model=client.models.list().data[0].id, prompt="Once upon a time",
                                        max_tokens=8, temperature=0)
        assert out.choices[0].text.startswith(", there was a little")
    finally:
        c.stop()


@pytest.mark.parametrize("start,slo,expect", [
    # decode pressure only (TPOT far over its SLO, TTFT far under): a prefill worker becomes a decode worker
    ((2, 1), ("60000", "0.001"), {"prefill": 1, "decode": 2}),
    # prefill pressure only: a decode worker becomes a prefill worker
    ((1, 2), ("0.001", "60000"), {"prefill": 2, "decode": 1}),
])
def test_auto_ratio_moves_live_workers_toward_the_pressured_pool(tmp_path_factory, start, slo, expect):
    """The router's controller on real workers and real latencies. (Which ratio wins on SLO attainment is shown by
    the planner's simulation in tests/test_planner.py; here the SLOs are set so the direction is certain.)"""
    import threading

    c = Cluster(model=str(shared_model_path("stories260K")), prefill=start[0], decode=start[1],
                worker_args=["--page-size", "8", "--num-pages", "256", "--heartbeat-s", "0.3"],
                router_args=["--auto-ratio", "--slo-ttft-ms", slo[0], "--slo-tpot-ms", slo[1],
                             "--auto-ratio-interval-s", "0.5", "--auto-ratio-cooldown-s", "60"],
                log_dir=tmp_path_factory.mktemp("auto")).start()
    stop = threading.Event()

    def load() -> None:
        client = openai.OpenAI(base_url=f"{c.url}/v1", api_key="x", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        while not stop.is_set():
            client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)

    def roles() -> dict[str, int]:
        counts = {"prefill": 0, "decode": 0}
        for w in json.loads(urllib.request.urlopen(f"{c.url}/status.json", timeout=5).read())["workers"]:
            counts[w["role"]] = counts.get(w["role"], 0) + 1
        return counts

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        assert poll_until(lambda: roles() == expect, timeout_s=30), roles()
        time.sleep(2.0)
        assert roles() == expect  # hysteresis + cooldown: no flapping back
    finally:
        stop.set()
        thread.join(30)
        c.stop()
