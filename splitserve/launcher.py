"""``splitserve up``: a router plus prefill, decode and colocated workers as child processes on this machine.

1. :func:`plan_commands` builds the command lines, exactly the ones the compose files run (``splitserve router
   ...``, ``splitserve prefill ...``; the tests check both agree), and the children start, each with
   ``--keys-dir``: unless ``--keys-dir`` names a set, the launcher makes one CurveZMQ key pair per child in a
   private temporary folder (removed at exit), and each child's ``--keys-dir`` is a folder holding only its own
   secret key plus every public key (the allow-list), so only these processes reach each other's control, peer and
   KV sockets, and the router binds each worker id to its child's key. A restarted child gets the same folder, so
   the same key. Keys travel only as files: never in a child's argv or environment.
2. Start-up: once the router answers ``/health`` the stack is up; a child that exits before that is a
   configuration error and stops everything.
3. Supervision (:class:`Supervisor`): a child that exits later is restarted with the same command after a backoff
   that doubles with each recent exit, while the rest keep serving (a restarted worker registers again and the
   router counts it in ``splitserve_worker_restarts_total``; a restarted router relearns the workers from their
   heartbeats). More than ``--max-restarts`` exits of one child within ``--restart-window-s`` is a crash loop: the
   stack stops with a message naming the child and its exit code.
4. SIGTERM / SIGINT: every child gets SIGTERM (workers drain), and SIGKILL after a timeout.

HTTPS: ``--tls-certfile`` / ``--tls-keyfile`` go to the router (checked before any child starts: a missing or
invalid file exits with status 2); the launcher then polls ``https://.../health`` without verifying the certificate
(its own child, on its own host).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from splitserve.core.config import BUILTIN_MODEL
from splitserve.transfer.registry import BACKENDS as TRANSFER_BACKENDS

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=BUILTIN_MODEL,
                   help="HF model dir, Hugging Face repo id (local cache; downloaded unless HF_HUB_OFFLINE=1), "
                        "dummy:<shape>, or the built-in random model")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="names clients may use in 'model', the first one in responses (default: --model)")
    p.add_argument("--chat-template", default=None, help="jinja chat template file for the router (default: the model's)")
    p.add_argument("--tool-call-parser", choices=["llama3_json", "hermes"], default=None,
                   help="how the router finds tool calls in chat output for tool_choice=auto (default: none)")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers")
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    p.add_argument("--colocated", type=int, default=0, help="colocated (prefill+decode) workers")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device the workers run on")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs to spread workers over (default: all visible)")
    p.add_argument("--transfer", choices=list(TRANSFER_BACKENDS), default="auto",
                   help="KV transfer backend (auto: one-sided cuda_ipc/shm writes on one host, zmq otherwise)")
    p.add_argument("--host", default="127.0.0.1", help="host every listener binds (HTTP, control, peer, KV)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the router")
    p.add_argument("--control-port", type=int, default=0, help="router control port (0: any free port)")
    p.add_argument("--extra-arg", action="append", default=[], help="extra flag passed to every worker (repeatable)")
    p.add_argument("--ready-timeout-s", type=float, default=300.0, help="start-up deadline (default 300)")
    p.add_argument("--keys-dir", default=None,
                   help="CurveZMQ keys for the control plane (default: a fresh set in a private temporary folder)")
    p.add_argument("--max-restarts", type=int, default=5,
                   help="exits of one child within --restart-window-s that make a crash loop (default 5)")
    p.add_argument("--restart-window-s", type=float, default=60.0, help="crash-loop window in seconds (default 60)")
    p.add_argument("--restart-backoff-s", type=float, default=1.0,
                   help="delay before the first restart of a child, doubled for each recent exit (default 1)")
    from splitserve.router.main import add_tls_arguments

    add_tls_arguments(p, client_certs=False)


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
    router = ["splitserve", "router", "--model", args.model, "--host", args.host, "--port", str(args.port),
              "--control-host", args.host, "--control-port", str(control_port)]
    if getattr(args, "served_model_name", None):
        router += ["--served-model-name", *args.served_model_name]
    for flag in ("tls_certfile", "tls_keyfile", "chat_template"):
        if getattr(args, flag, None):
            router += ["--" + flag.replace("_", "-"), os.path.abspath(getattr(args, flag))]
    if getattr(args, "tool_call_parser", None):
        router += ["--tool-call-parser", args.tool_call_parser]
    children = [Child("router", router, {})]
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


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5
    window_s: float = 60.0
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0


@dataclass
class _Supervised:
    child: Child
    proc: subprocess.Popen | None = None
    exits: deque[float] = field(default_factory=deque)
    """Exit times within the crash-loop window."""
    restart_at: float | None = None


class Supervisor:
    """Keeps every child running (step 3 of the module's flow). ``spawn`` starts one; ``clock`` is injectable."""

    def __init__(self, children: list[Child], spawn: Callable[[Child], subprocess.Popen], policy: RestartPolicy,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.items = [_Supervised(c) for c in children]
        self.spawn, self.policy, self.clock = spawn, policy, clock

    def start_all(self) -> None:
        for s in self.items:
            logger.info("starting %s: %s", s.child.name, " ".join(s.child.argv))
            s.proc = self.spawn(s.child)

    def procs(self) -> list[subprocess.Popen]:
        return [s.proc for s in self.items if s.proc is not None]

    def check(self) -> str | None:
        """Restart what exited (after its backoff); returns why the stack must stop (a crash loop), else ``None``."""
        now = self.clock()
        for s in self.items:
            if s.proc is not None and s.proc.poll() is not None:
                error = self._on_exit(s, now)
                if error is not None:
                    return error
            if s.proc is None and s.restart_at is not None and now >= s.restart_at:
                s.proc, s.restart_at = self.spawn(s.child), None
                logger.warning("restarted %s (pid %d, restart %d within %.0f s)", s.child.name, s.proc.pid,
                               len(s.exits), self.policy.window_s)
        return None

    def _on_exit(self, s: _Supervised, now: float) -> str | None:
        code = s.proc.returncode if s.proc is not None else None
        s.proc = None
        s.exits.append(now)
        while s.exits and now - s.exits[0] > self.policy.window_s:
            s.exits.popleft()
        if len(s.exits) > self.policy.max_restarts:
            return (f"{s.child.name} exited {len(s.exits)} times within {self.policy.window_s:g} s (last exit code "
                    f"{code}): crash loop, stopping SplitServe")
        delay = min(self.policy.backoff_s * 2 ** (len(s.exits) - 1), self.policy.max_backoff_s)
        s.restart_at = now + delay
        logger.warning("%s exited with code %s; restarting it in %.1f s while the rest keep serving", s.child.name,
                       code, delay)
        return None


ROUTER_SECRETS = ("SPLITSERVE_ADMIN_TOKEN", "SPLITSERVE_API_KEY")
"""Variables only the router reads: workers do not get them in their environment."""


def _spawn(child: Child) -> subprocess.Popen:
    argv = [sys.executable, "-m", "splitserve.cli", *child.argv[1:]]
    env = {**os.environ, **child.env}
    if child.name != "router":
        for name in ROUTER_SECRETS:
            env.pop(name, None)
    return subprocess.Popen(argv, env=env, start_new_session=True)


def _probe_context(url: str) -> ssl.SSLContext | None:
    """For ``https``: a client context that does not verify (the router is this launcher's child)."""
    if not url.startswith("https:"):
        return None
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def wait_healthy(url: str, procs: list[subprocess.Popen], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    ctx = _probe_context(url)
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2, context=ctx) as resp:
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


def with_keys(children: list[Child], keys_dir: str | dict[str, str]) -> list[Child]:
    """Every child authenticates on the control plane with the keys in ``keys_dir`` (one folder for all, or
    ``{child name: its own folder}`` from :func:`splitserve.core.keys.write_process_sets`)."""
    folder = (lambda c: keys_dir[c.name]) if isinstance(keys_dir, dict) else (lambda c: keys_dir)
    return [Child(c.name, [*c.argv, "--keys-dir", folder(c)], c.env) for c in children]


def preflight(args: argparse.Namespace) -> str | None:
    """Why ``splitserve up`` cannot start (a port in use, a model path that does not exist), checked before any child
    starts; ``None`` when it can."""
    from splitserve.core.hub import ModelNotFound, is_local, resolve_model

    if args.device == "cuda":
        import torch  # only with --device cuda

        if not torch.cuda.is_available():
            return (f"--device cuda: torch {torch.__version__} sees no CUDA device on this machine "
                    "(use --device cpu, or install a CUDA build of torch)")

    if not is_local(args.model):  # a Hugging Face repo id: fetched (or found in the cache) once, here
        try:
            path = resolve_model(args.model)
        except ModelNotFound as exc:
            return str(exc)
        args.served_model_name = args.served_model_name or [args.model]
        args.model = path
    from splitserve.router.main import tls_context, tls_files

    files = tls_files(args)
    if files["tls_ca_certs"]:
        return ("SPLITSERVE_TLS_CA_CERTS (client certificates) is for splitserve router only: the launcher's "
                "readiness probe has none")
    try:
        tls_context(**files)
    except ValueError as exc:
        return str(exc)
    for flag, port in (("--port", args.port), ("--control-port", args.control_port)):
        if not port:
            continue
        with socket.socket() as s:
            # as the servers bind: connections of a stopped server in TIME_WAIT do not hold the port, a listener does
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((args.host, port))
                s.listen()
            except OSError as exc:
                return f"{flag} {port}: cannot listen on {args.host}:{port} ({exc.strerror or exc})"
    return None


def main(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from splitserve.core.keys import write_process_sets

    problem = preflight(args)
    if problem is not None:
        print(f"splitserve up: {problem}", file=sys.stderr)
        return 2
    control_port = args.control_port or free_port(args.host)
    policy = RestartPolicy(args.max_restarts, args.restart_window_s, args.restart_backoff_s)
    own_keys = args.keys_dir is None
    keys_dir = tempfile.mkdtemp(prefix="splitserve-keys-") if own_keys else args.keys_dir
    try:
        children = plan_commands(args, control_port)
        folders = write_process_sets(keys_dir, [c.name for c in children]) if own_keys else keys_dir
        return _run(args, Supervisor(with_keys(children, folders), _spawn, policy))
    finally:
        if own_keys:
            shutil.rmtree(keys_dir, ignore_errors=True)


def _run(args: argparse.Namespace, sup: Supervisor) -> int:
    """Steps 2-4 of the module's flow."""
    stop = {"now": False}

    def on_signal(*_: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        sup.start_all()
        from splitserve.router.main import tls_files

        scheme = "https" if tls_files(args)["tls_certfile"] else "http"
        url = f"{scheme}://{args.host}:{args.port}"
        if not wait_healthy(url, sup.procs(), args.ready_timeout_s):
            dead = [s.child.name for s in sup.items if s.proc is not None and s.proc.poll() is not None]
            logger.error("SplitServe did not become healthy%s; stopping",
                         f" ({', '.join(dead)} exited during start-up)" if dead else "")
            return 1
        print(f"SplitServe is up at {url}/v1  (status page: {url}/status)", flush=True)
        print(
            f"  curl {url}/v1/completions -H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{(args.served_model_name or [args.model])[0]}\", \"prompt\": \"Once upon a time\", \"max_tokens\": 32}}'",
            flush=True,
        )
        while not stop["now"]:
            error = sup.check()
            if error is not None:
                logger.error("%s", error)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        stop_all(sup.procs())
