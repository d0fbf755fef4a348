"""``splitserve up``: a router plus prefill, decode and colocated workers as child processes on this machine.

The commands it runs are exactly the ones the compose files run (``splitserve router ...``,
``splitserve prefill ...``); :func:`plan_commands` builds them and the tests check both agree.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

from splitserve.core.config import BUILTIN_MODEL
from splitserve.transfer.registry import BACKENDS as TRANSFER_BACKENDS

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=BUILTIN_MODEL, help="HF model dir, dummy:<shape>, or the built-in random model")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers")
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    p.add_argument("--colocated", type=int, default=0, help="colocated (prefill+decode) workers")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs to spread workers over (default: all visible)")
    p.add_argument("--transfer", choices=list(TRANSFER_BACKENDS), default="auto",
                   help="KV transfer backend (auto: one-sided cuda_ipc/shm writes on one host, zmq otherwise)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the router")
    p.add_argument("--control-port", type=int, default=0, help="router control port (0: any free port)")
    p.add_argument("--extra-arg", action="append", default=[], help="extra flag passed to every worker (repeatable)")
    p.add_argument("--ready-timeout-s", type=float, default=300.0)


@dataclass(frozen=True)
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _num_gpus(args: argparse.Namespace) -> int:
    if args.num_gpus:
        return args.num_gpus
    import torch  # only with --device cuda

    return max(1, torch.cuda.device_count())


def plan_commands(args: argparse.Namespace, control_port: int) -> list[Child]:
    """The router and worker command lines (``splitserve`` first), in start order."""
    if args.prefill + args.decode + args.colocated == 0:
        raise ValueError("nothing to start: --prefill, --decode and --colocated are all 0")
    if args.colocated == 0 and (args.prefill == 0 or args.decode == 0):
        raise ValueError("disaggregated serving needs at least one --prefill and one --decode worker")
    ctrl = f"tcp://{args.host}:{control_port}"
    children = [
        Child("router", ["splitserve", "router", "--model", args.model, "--host", args.host, "--port", str(args.port),
                         "--control-host", args.host, "--control-port", str(control_port)], {})
    ]
    gpus = _num_gpus(args) if args.device == "cuda" else 0
    roles = ["prefill"] * args.prefill + ["decode"] * args.decode + ["both"] * args.colocated
    for i, role in enumerate(roles):
        cmd = "worker" if role == "both" else role
        argv = ["splitserve", cmd, "--role", role, "--worker-id", f"{role}-{i}", "--router-addr", ctrl,
                "--model", args.model, "--device", args.device, "--transfer", args.transfer, "--host", args.host]
        if gpus:
            argv += ["--device-index", str(i % gpus)]
        children.append(Child(f"{role}-{i}", argv + list(args.extra_arg), {}))
    return children


def _spawn(child: Child) -> subprocess.Popen:
    argv = [sys.executable, "-m", "splitserve.cli", *child.argv[1:]]
    return subprocess.Popen(argv, env={**os.environ, **child.env}, start_new_session=True)


def wait_healthy(url: str, procs: list[subprocess.Popen], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def stop_all(procs: list[subprocess.Popen], timeout_s: float = 30.0) -> None:
    """SIGTERM every child (workers drain), then SIGKILL what is left after ``timeout_s``."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(args: argparse.Namespace) -> int:
    control_port = args.control_port or free_port(args.host)
    children = plan_commands(args, control_port)
    procs: list[subprocess.Popen] = []
    stop = {"now": False}

    def on_signal(*_: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for child in children:
            logger.info("starting %s: %s", child.name, " ".join(child.argv))
            procs.append(_spawn(child))
        url = f"http://{args.host}:{args.port}"
        if not wait_healthy(url, procs, args.ready_timeout_s):
            logger.error("SplitServe did not become healthy; stopping")
            return 1
        print(f"SplitServe is up at {url}/v1  (status page: {url}/status)", flush=True)
        print(
            f"  curl {url}/v1/completions -H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{args.model}\", \"prompt\": \"Once upon a time\", \"max_tokens\": 32}}'",
            flush=True,
        )
        while not stop["now"]:
            dead = [c.name for c, p in zip(children, procs) if p.poll() is not None]
            if dead:
                logger.error("child process(es) exited: %s; stopping", ", ".join(dead))
                return 1
            time.sleep(0.5)
        return 0
    finally:
        stop_all(procs)
