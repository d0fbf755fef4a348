"""Start real SplitServe processes on loopback for end-to-end tests, and read their state over HTTP."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def poll_until(pred, timeout_s: float = 15.0, interval_s: float = 0.05) -> bool:
    """Whether ``pred()`` became truthy within ``timeout_s`` (polled; a bound on a wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval_s)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    """A router plus workers, each its own process, started the way ``splitserve up`` starts them."""

    model: str
    prefill: int = 1
    decode: int = 1
    colocated: int = 0
    worker_args: list[str] = field(default_factory=list)
    router_args: list[str] = field(default_factory=list)
    role_args: dict[str, list[str]] = field(default_factory=dict)
    """Extra flags for the workers of one role (``prefill``, ``decode``, ``both``), after ``worker_args``."""
    log_dir: Path | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.port = free_port()
        self.control_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "wb") if self.log_dir else subprocess.DEVNULL
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "splitserve.cli", *argv], stdout=log, stderr=subprocess.STDOUT, env=env
        )

    def start(self, timeout_s: float = 120.0) -> "Cluster":
        self._start_router()
        roles = ["prefill"] * self.prefill + ["decode"] * self.decode + ["both"] * self.colocated
        for i, role in enumerate(roles):
            self.start_worker(f"{role}-{i}", role)
        self.wait_workers(len(roles), timeout_s)
        return self

    def _start_router(self, attempts: int = 3) -> None:
        """Start the router; a port picked free but taken meanwhile by another process: again on new ports."""
        for attempt in range(attempts):
            self._spawn("router", ["router", "--model", self.model, "--port", str(self.port),
                                   "--control-port", str(self.control_port), *self.router_args])
            deadline = time.monotonic() + 60
            while self.procs["router"].poll() is None and time.monotonic() < deadline:
                try:
                    self.health()
                    return
                except OSError:
                    time.sleep(0.1)
            log = (self.log_dir / "router.log").read_text().lower() if self.log_dir else ""
            if attempt == attempts - 1 or "address already in use" not in log:
                raise RuntimeError(f"router did not start (logs in {self.log_dir})")
            self.port, self.control_port = free_port(), free_port()
            self.url = f"http://127.0.0.1:{self.port}"

    def start_worker(self, worker_id: str, role: str) -> None:
        cmd = "worker" if role == "both" else role
        self._spawn(worker_id, [cmd, "--role", role, "--worker-id", worker_id, "--model", self.model,
                                "--router-addr", f"tcp://127.0.0.1:{self.control_port}", *self.worker_args,
                                *self.role_args.get(role, [])])

    def wait_workers(self, n: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [k for k, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"processes exited during start-up: {dead} (logs in {self.log_dir})")
            try:
                if len(self.worker_gauge("kv_pages_free")) >= n and self.health() == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"cluster not ready after {timeout_s}s (logs in {self.log_dir})")

    def health(self) -> int:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as r:
            return r.read().decode()

    def worker_gauge(self, name: str) -> dict[str, float]:
        """``splitserve_worker_<name>`` per worker id, from the router's /metrics."""
        pat = re.compile(r'^splitserve_worker_' + name + r'\{([^}]*)\}\s+([0-9.eE+-]+)$', re.M)
        out = {}
        for labels, val in pat.findall(self.metrics()):
            wid = re.search(r'worker="([^"]+)"', labels).group(1)
            out[wid] = float(val)
        return out

    def wait_pages_free(self, timeout_s: float = 15.0, settle_s: float = 1.5,
                        ignore: frozenset[str] = frozenset()) -> dict[str, float]:
        """Wait until every worker (but ``ignore``: dead ones) reports zero KV pages in use; returns the last reading.

        Gauges come from heartbeats (every second by default), so the first ``settle_s`` are waited out: a
        reading taken before the workers' next heartbeat could predate the request and show zero falsely.
        """
        time.sleep(settle_s)
        deadline = time.monotonic() + timeout_s
        used: dict[str, float] = {}
        while time.monotonic() < deadline:
            used = {w: n for w, n in self.worker_gauge("kv_pages_used").items() if w not in ignore}
            if used and not any(used.values()):
                return used
            time.sleep(0.25)
        return used

    def tracebacks(self) -> list[str]:
        """Names of the processes whose log holds a Python traceback (a failure handled nowhere)."""
        if self.log_dir is None:
            return []
        return sorted(f.stem for f in self.log_dir.glob("*.log") if "Traceback" in f.read_text(errors="replace"))

    def restart_router(self) -> None:
        """Kill the router and start a new one on the same ports (workers keep running)."""
        self.kill("router")
        self._spawn("router", ["router", "--model", self.model, "--port", str(self.port),
                               "--control-port", str(self.control_port), *self.router_args])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.procs[name].send_signal(sig)
        self.procs[name].wait(30)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
