"""Start a real router process plus scripted workers on loopback (router tests only)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
WORKER_SCRIPT = Path(__file__).with_name("scripted_worker.py")
BUILTIN = "builtin:tiny-random-llama"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``pred`` until truthy; fail the test (not a timing assertion: a bound on a hang)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


PORT_TAKEN = "address already in use"
"""A port picked free can be taken by another process before the router binds it: start again on new ports."""


class RouterHarness:
    ssl: Any = None
    """``ssl.SSLContext`` that :meth:`request` trusts over HTTPS (an HTTPS harness sets it)."""

    def __init__(self, tmp: Path, model: str = BUILTIN, **flags: Any) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}
        self.router_log = tmp / "router.log"
        for attempt in range(3):
            self._start_router(model, flags)
            try:
                wait_for(self._up, what="router to listen")
                return
            except AssertionError:
                if attempt == 2 or PORT_TAKEN not in self.router_log.read_text().lower():
                    raise

    def _start_router(self, model: str, flags: dict[str, Any]) -> None:
        self.port = free_port()
        self.control_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.control = f"tcp://127.0.0.1:{self.control_port}"
        cmd = [sys.executable, "-m", "splitserve.cli", "router", "--model", model, "--host", "127.0.0.1",
               "--port", str(self.port), "--control-port", str(self.control_port)]
        for k, v in flags.items():
            cmd += ["--" + k.replace("_", "-"), str(v)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITSERVE_")}
        self.router = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                       stderr=open(self.router_log, "w"))

    def _up(self) -> bool:
        if self.router.poll() is not None:
            raise AssertionError(f"router exited: {self.router_log.read_text()[-3000:]}")
        try:
            self.get("/v1/models")
            return True
        except OSError:
            return False

    def add_worker(self, worker_id: str, tokens: list[int], role: str = "both", delay: float = 0.0,
                   die_after: int = 0, max_model_len: int = 256, vocab_size: int = 0) -> Path:
        log = self.tmp / f"{worker_id}.jsonl"
        cmd = [sys.executable, str(WORKER_SCRIPT), "--router", self.control, "--worker-id", worker_id, "--role", role,
               "--tokens", ",".join(map(str, tokens)), "--log", str(log), "--token-delay", str(delay),
               "--die-after", str(die_after), "--max-model-len", str(max_model_len), "--vocab-size", str(vocab_size)]
        self.procs[worker_id] = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                                                 stderr=open(self.tmp / f"{worker_id}.err", "w"))
        wait_for(lambda: any(w["worker_id"] == worker_id and w["healthy"] for w in self.status()["workers"]),
                 what=f"worker {worker_id} to register")
        return log

    def events(self, worker_id: str) -> list[dict]:
        path = self.tmp / f"{worker_id}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.ssl) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)

    def status(self) -> dict:
        return self.get("/status.json")[1]

    def client(self) -> Any:
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=30)

    def stop(self) -> None:
        for p in list(self.procs.values()) + [self.router]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in list(self.procs.values()) + [self.router]:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
