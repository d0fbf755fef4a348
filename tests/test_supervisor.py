"""`splitserve up` keeps serving when a worker dies (issue 12): the supervisor alone, then the real stack."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import openai

from cluster import free_port
from splitserve.launcher import Child, RestartPolicy, Supervisor


class FakeProc:
    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        return self.returncode


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_supervisor_restarts_with_doubling_backoff_and_stops_a_crash_loop():
    clock, spawned = Clock(), []

    def spawn(child: Child) -> FakeProc:
        spawned.append(FakeProc(len(spawned) + 1))
        return spawned[-1]

    sup = Supervisor([Child("router", [], {}), Child("decode-1", [], {})], spawn,
                     RestartPolicy(max_restarts=2, window_s=60.0, backoff_s=1.0), clock)
    sup.start_all()
    router, decode = spawned
    decode.returncode = -9
    assert sup.check() is None and len(spawned) == 2  # exited: restart scheduled in 1 s, the router untouched
    clock.t += 0.5
    assert sup.check() is None and len(spawned) == 2
    clock.t += 0.6
    assert sup.check() is None and len(spawned) == 3 and sup.procs() == [router, spawned[2]]
    spawned[2].returncode = 1
    sup.check()
    clock.t += 1.9  # second exit within the window: backoff doubled to 2 s
    assert sup.check() is None and len(spawned) == 3
    clock.t += 0.2
    assert sup.check() is None and len(spawned) == 4
    spawned[3].returncode = 1  # third exit within 60 s > max_restarts: a crash loop
    error = sup.check()
    assert error is not None and "decode-1 exited 3 times" in error and "exit code 1" in error


def test_supervisor_forgets_exits_older_than_the_window():
    clock = Clock()
    procs: list[FakeProc] = []
    sup = Supervisor([Child("w", [], {})], lambda c: procs.append(FakeProc(len(procs))) or procs[-1],
                     RestartPolicy(max_restarts=1, window_s=10.0, backoff_s=0.1), clock)
    sup.start_all()
    for _ in range(4):  # one exit every 20 s never makes a loop, and the backoff stays at its base
        procs[-1].returncode = 1
        assert sup.check() is None
        clock.t += 0.11
        assert sup.check() is None
        clock.t += 20
    assert len(procs) == 5


def _pid_of(pattern: str) -> int:
    out = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True).stdout.split()
    assert len(out) == 1, f"expected one process for {pattern!r}, got {out}"
    return int(out[0])


def _metric(url: str, name: str, worker: str) -> float | None:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + "{") and f'worker="{worker}"' in line:
                return float(line.rsplit(" ", 1)[1])
    return None


def test_splitserve_up_restarts_a_killed_decode_worker_and_keeps_serving(tmp_path):
    port, ctrl = free_port(), free_port()
    log = open(tmp_path / "up.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "splitserve.cli", "up", "--port", str(port), "--control-port",
                             str(ctrl), "--restart-backoff-s", "0.2", "--max-restarts", "2",
                             "--extra-arg=--heartbeat-s=0.3"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "SPLITSERVE_ADMIN_TOKEN": "only-for-the-router"})
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)
    try:
        deadline = time.monotonic() + 120
        while "is up at" not in (tmp_path / "up.log").read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            time.sleep(0.2)
        model = client.models.list().data[0].id
        assert client.completions.create(model=model, prompt="Hi", max_tokens=4, temperature=0).usage.completion_tokens == 4
        router_pid = _pid_of(f"router .*--control-port {ctrl}")
        decode = f"--worker-id decode-1 --router-addr tcp://127.0.0.1:{ctrl}"
        old = _pid_of(decode)
        environ = {p: open(f"/proc/{p}/environ", "rb").read() for p in (router_pid, old)}
        assert b"SPLITSERVE_ADMIN_TOKEN=" in environ[router_pid] and b"SPLITSERVE_ADMIN_TOKEN" not in environ[old]
        argv = open(f"/proc/{old}/cmdline", "rb").read().split(b"\0")
        keys_dir = argv[argv.index(b"--keys-dir") + 1].decode()  # per-process keys: only its own secret is there
        assert sorted(os.listdir(keys_dir)) == ["decode-1.key_secret", "public"]
        assert sorted(os.listdir(os.path.join(keys_dir, "public"))) == ["decode-1.key", "prefill-0.key", "router.key"]
        secret = [ln.split('"')[1] for ln in open(os.path.join(keys_dir, "decode-1.key_secret"))
                  if "secret-key" in ln][0].encode()
        assert secret not in b"".join(argv) and secret not in environ[old]
        subprocess.run(["kill", "-9", str(old)], check=True)
        served, deadline = None, time.monotonic() + 90
        while served is None and time.monotonic() < deadline:  # the router fails over once the worker is back
            try:
                served = client.completions.create(model=model, prompt="Hi", max_tokens=4, temperature=0)
            except (openai.APIStatusError, openai.APIConnectionError):
                time.sleep(0.3)
        assert served is not None and served.usage.completion_tokens == 4
        assert proc.poll() is None and _pid_of(f"router .*--control-port {ctrl}") == router_pid
        assert _pid_of(decode) != old
        assert _metric(url, "splitserve_worker_restarts_total", "decode-1") == 1.0
        text = (tmp_path / "up.log").read_text()
        assert "decode-1 exited with code -9; restarting it" in text and "restarted decode-1" in text
        pids = {ln.split()[3] for ln in text.splitlines() if "CurveZMQ: decode-1 uses the decode-1 key pair" in ln}
        assert len(pids) >= 2  # the restarted process loaded the same key pair
        assert "2 worker ids bound to named keys" in text and " refused: " not in text
        for _ in range(2):  # two more exits: more than --max-restarts (2) within the window is a crash loop
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                out = subprocess.run(["pgrep", "-f", "--", decode], capture_output=True, text=True).stdout.split()
                if out:
                    subprocess.run(["kill", "-9", *out], check=False)
                    break
                time.sleep(0.1)
            time.sleep(0.5)
        assert proc.wait(60) == 1
        assert "decode-1 exited 3 times within 60 s" in (tmp_path / "up.log").read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


def test_preflight_takes_a_port_whose_last_server_left_connections_in_time_wait():
    import argparse
    import socket

    from splitserve.launcher import preflight

    with socket.socket() as server:  # a server that closed its side first: its connection stays in TIME_WAIT
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()
        client.recv(1)
        client.close()
    args = argparse.Namespace(device="cpu", model="builtin:tiny-random-llama", served_model_name=None, host="127.0.0.1",
                              port=port, control_port=0, tls_certfile=None, tls_keyfile=None, tls_ca_certs=None)
    assert preflight(args) is None  # `splitserve up` right after another one stopped on the same port


def test_splitserve_up_refuses_a_port_in_use_and_a_missing_model_in_one_line():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for extra, expect in ((["--port", str(port)], f"--port {port}: cannot listen"),
                              (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such model")):
            out = subprocess.run([sys.executable, "-m", "splitserve.cli", "up", *extra], capture_output=True, text=True,
                                 timeout=60)
            assert out.returncode == 2
            lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
            assert len(lines) == 1 and expect in lines[0], out.stderr  # one clear line, no traceback, no child
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "splitserve.cli", "router", "--port", str(port), "--control-port",
                              "0"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "Traceback" not in out.stderr and "address already in use" in out.stderr
