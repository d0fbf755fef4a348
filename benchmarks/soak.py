"""``splitserve bench soak`` (``python -m splitserve.benchmarks.soak``): a seeded, bounded load for a fixed wall
time, then a check that the stack came out of it whole.

1. Without ``--url``, :func:`start_stack` runs ``splitserve up`` (built-in model, a small KV pool so pages churn,
   the router's ``--max-queued-requests`` small through ``SPLITSERVE_MAX_QUEUED_REQUESTS``) and waits for /health.
2. A few warm-up requests, then each process's RSS (``VmRSS`` in ``/proc/PID/status``) is read.
3. :func:`run_load`: ``burst_concurrency`` client loops take jobs in order (job ``i`` comes from seed and ``i``
   alone, :func:`make_job`): streaming and non-streaming completions with mixed prompt lengths and ``max_tokens``,
   some streams closed by the client after a few chunks. ``concurrency`` loops always run; the others only during
   bursts (``burst_s`` of every ``burst_every_s``), when requests in flight exceed the router's limit, so some 429s
   happen on purpose. Loops stop at the deadline or after ``max_requests``. Every request ends as one
   :class:`Outcome`: ``ok``, ``rejected`` (429), ``disconnected`` (the client closed the stream itself) or
   ``error`` (anything else: a 5xx, a stream error event, a stream without a finish, a connection failure).
4. After the load: wait until every worker's ``kv_pages_used`` is zero, read RSS again and print the table
   (:func:`format_table`). Exit status 1 when a request erred, a process died or logged a traceback, pages stayed
   in use, or a process's RSS grew past :func:`rss_bound_mb`.

``tests/test_soak.py`` drives :func:`run_load` for 60 s in CI against a cluster of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitserve.benchmarks.serve import parse_sse_line, latency_stats_ms

WORDS = ("once upon a time there was a little girl named lily she loved to play outside in the park one day "
         "saw big red ball and her friend tom wanted sun happy dog cat ran jumped").split()
OUTCOMES = ("ok", "rejected", "disconnected", "error")
MAX_ERRORS_SHOWN = 10


@dataclass(frozen=True)
class LoadConfig:
    duration_s: float = 60.0
    seed: int = 0
    concurrency: int = 6
    """Client loops that always run (keep it at or below the router's --max-queued-requests)."""
    burst_concurrency: int = 16
    """Client loops during a burst (above the router's limit: some requests get 429)."""
    burst_every_s: float = 10.0
    burst_s: float = 2.0
    max_requests: int = 20_000
    """Hard bound on requests sent, whatever the duration."""
    prompt_words: tuple[int, int] = (1, 80)
    max_tokens: tuple[int, int] = (1, 48)
    stream_fraction: float = 0.7
    disconnect_fraction: float = 0.25
    """Of the streams: the client closes the stream after 1-4 chunks."""
    request_timeout_s: float = 120.0
    model: str | None = None
    """``None``: the first model ``/v1/models`` lists."""


@dataclass(frozen=True)
class Job:
    prompt: str
    max_tokens: int
    stream: bool
    temperature: float
    ignore_eos: bool
    disconnect_after: int | None
    """Close the stream after this many chunks; ``None``: read to the end."""


@dataclass(frozen=True)
class Outcome:
    kind: str
    """One of :data:`OUTCOMES`."""
    stream: bool
    ttft_s: float | None = None
    e2e_s: float | None = None
    detail: str = ""


def make_job(cfg: LoadConfig, i: int) -> Job:
    """Job ``i`` of the run: the same for a given seed whichever client loop sends it."""
    rng = random.Random(cfg.seed * 1_000_003 + i)
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*cfg.prompt_words)))
    stream = rng.random() < cfg.stream_fraction
    disconnect = rng.randint(1, 4) if stream and rng.random() < cfg.disconnect_fraction else None
    return Job(prompt, rng.randint(*cfg.max_tokens), stream, rng.choice([0.0, 0.8]), rng.random() < 0.7, disconnect)


def job_body(model: str, job: Job, i: int) -> dict[str, Any]:
    body = {"model": model, "prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": job.temperature,
            "seed": i, "ignore_eos": job.ignore_eos, "stream": job.stream}
    if job.stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def _read_stream(resp: Any, job: Job, start: float) -> Outcome:
    """Read an SSE completion stream to its end, or close it after ``job.disconnect_after`` chunks."""
    chunks, ttft, finish = 0, None, None
    async for raw in resp.content:
        chunk = parse_sse_line(raw)
        if chunk is None:
            continue
        if "error" in chunk:
            return Outcome("error", True, ttft, detail=f"stream error event: {json.dumps(chunk['error'])[:200]}")
        for choice in chunk.get("choices") or ():
            chunks += 1
            ttft = ttft if ttft is not None else time.perf_counter() - start
            finish = choice.get("finish_reason") or finish
        if job.disconnect_after is not None and chunks >= job.disconnect_after:
            resp.close()
            return Outcome("disconnected", True, ttft)
    if finish not in ("length", "stop"):
        return Outcome("error", True, ttft, detail=f"stream ended without a finish (finish_reason={finish})")
    return Outcome("ok", True, ttft, time.perf_counter() - start)


async def send_job(session: Any, url: str, model: str, job: Job, i: int) -> Outcome:
    """Send job ``i``; every failure becomes an ``error`` outcome (never raised)."""
    import aiohttp

    start = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/completions", json=job_body(model, job, i)) as resp:
            if resp.status == 429:
                return Outcome("rejected", job.stream)
            if resp.status != 200:
                return Outcome("error", job.stream, detail=f"HTTP {resp.status}: {(await resp.text())[:200]}")
            if job.stream:
                return await _read_stream(resp, job, start)
            body = await resp.json()
            finish = body["choices"][0]["finish_reason"]
            if finish not in ("length", "stop"):
                return Outcome("error", False, detail=f"finish_reason={finish}")
            e2e = time.perf_counter() - start
            return Outcome("ok", False, None, e2e)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, IndexError) as exc:
        return Outcome("error", job.stream, detail=f"job {i}: {type(exc).__name__}: {exc}"[:200])


def _active(cfg: LoadConfig, loop: int, elapsed: float) -> bool:
    return loop < cfg.concurrency or elapsed % cfg.burst_every_s < cfg.burst_s


async def _client_loop(cfg: LoadConfig, loop: int, session: Any, url: str, model: str, state: dict) -> None:
    start, deadline = state["start"], state["start"] + cfg.duration_s
    while time.monotonic() < deadline and state["next"] < cfg.max_requests:
        if not _active(cfg, loop, time.monotonic() - start):
            await asyncio.sleep(0.1)
            continue
        i = state["next"]
        state["next"] += 1
        outcome = await send_job(session, url, model, make_job(cfg, i), i)
        state["outcomes"].append(outcome)
        if outcome.kind == "rejected":
            await asyncio.sleep(0.25)  # a client backing off, so bursts do not spin


async def run_load(url: str, cfg: LoadConfig) -> list[Outcome]:
    """Step 3 of the module's flow: every request's outcome, in the order they ended."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        model = cfg.model or await _first_model(session, url)
        state: dict[str, Any] = {"start": time.monotonic(), "next": 0, "outcomes": []}
        loops = [_client_loop(cfg, n, session, url, model, state) for n in range(max(cfg.burst_concurrency,
                                                                                       cfg.concurrency))]
        await asyncio.gather(*loops)
    return state["outcomes"]


async def _first_model(session: Any, url: str) -> str:
    async with session.get(f"{url}/v1/models") as resp:
        resp.raise_for_status()
        return str((await resp.json())["data"][0]["id"])


# --- the stack's state ---------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MB (``VmRSS`` from /proc); ``nan`` once the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) / 1024 if match else float("nan")


def rss_bound_mb(warm_mb: float) -> float:
    """Largest RSS accepted at the end for a process that had ``warm_mb`` after warm-up: 1.5x + 50 MB.

    Generous on purpose: allocator arenas, torch's caching and Python's free lists grow in steps under load and
    are not returned to the OS, so a healthy process ends some tens of MB above its warm value; a leak per request
    (hundreds of requests) or per page churn grows without bound and crosses it.
    """
    return 1.5 * warm_mb + 50.0


def worker_gauge(url: str, name: str) -> dict[str, float]:
    """``splitserve_worker_<name>`` per worker id, from the router's /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    pat = re.compile(r'^splitserve_worker_' + name + r'\{[^}]*worker="([^"]+)"[^}]*\}\s+([0-9.eE+-]+)$', re.M)
    return {wid: float(val) for wid, val in pat.findall(text)}


def wait_pages_free(url: str, timeout_s: float = 30.0, settle_s: float = 1.5) -> dict[str, float]:
    """Every worker's ``kv_pages_used`` once all are zero, or the last reading at the deadline."""
    time.sleep(settle_s)  # gauges come with heartbeats: a reading older than the load could show zero falsely
    deadline, used = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        used = worker_gauge(url, "kv_pages_used")
        if used and not any(used.values()):
            break
        time.sleep(0.25)
    return used


# --- the report ----------------------------------------------------------------------------------


def summarize(outcomes: list[Outcome], duration_s: float) -> dict[str, Any]:
    kinds = Counter(o.kind for o in outcomes)
    done = [o for o in outcomes if o.kind == "ok"]
    return {
        "requests": len(outcomes),
        "duration_s": duration_s,
        "outcomes": {k: kinds.get(k, 0) for k in OUTCOMES},
        "streams": sum(o.stream for o in outcomes),
        "ttft_ms": latency_stats_ms(o.ttft_s for o in done if o.ttft_s is not None),
        "e2e_ms": latency_stats_ms(o.e2e_s for o in done if o.e2e_s is not None),
        "errors": [o.detail for o in outcomes if o.kind == "error"][:MAX_ERRORS_SHOWN],
    }


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def format_table(summary: dict[str, Any], rss: dict[str, tuple[float, float]], pages: dict[str, float]) -> str:
    """Markdown tables: outcomes, latency percentiles, RSS per process at start and end, KV pages at the end."""
    o = summary["outcomes"]
    lines = [f"{summary['requests']} requests in {summary['duration_s']:.0f} s ({summary['streams']} streamed)", "",
             "| outcome | " + " | ".join(OUTCOMES) + " |", "|---|" + "---:|" * len(OUTCOMES),
             "| requests | " + " | ".join(str(o[k]) for k in OUTCOMES) + " |", "",
             "| latency (ms, ok requests) | mean | p50 | p90 | p99 |", "|---|---:|---:|---:|---:|"]
    for name in ("ttft_ms", "e2e_ms"):
        s = summary[name]
        lines.append(f"| {name[:-3].upper()} | " + " | ".join(_fmt(s[k]) for k in ("mean", "p50", "p90", "p99")) + " |")
    if rss:
        lines += ["", "| process | RSS after warm-up (MB) | RSS at end (MB) | bound (MB) |", "|---|---:|---:|---:|"]
        lines += [f"| {p} | {a:.0f} | {b:.0f} | {rss_bound_mb(a):.0f} |" for p, (a, b) in sorted(rss.items())]
    lines += ["", "KV pages used at the end: " + ", ".join(f"{w}={v:.0f}" for w, v in sorted(pages.items()))]
    if summary["errors"]:
        lines += ["", "errors:", *(f"- {e}" for e in summary["errors"])]
    return "\n".join(lines)


def problems(summary: dict[str, Any], rss: dict[str, tuple[float, float]], pages: dict[str, float]) -> list[str]:
    """What makes the soak fail, one line each (empty: it passed)."""
    out = []
    if summary["outcomes"]["error"]:
        out.append(f"{summary['outcomes']['error']} requests failed")
    if not pages or any(pages.values()):
        out.append(f"KV pages still in use: {pages}")
    out += [f"{p}: RSS {b:.0f} MB > bound {rss_bound_mb(a):.0f} MB" for p, (a, b) in rss.items()
            if not b <= rss_bound_mb(a)]
    return out


# --- running it ----------------------------------------------------------------------------------


@dataclass
class Stack:
    """A ``splitserve up`` started by :func:`start_stack`: the launcher and its log."""

    proc: subprocess.Popen
    url: str
    log: Path

    def children(self) -> dict[str, int]:
        """Child name (``router``, ``prefill-0``, ...) -> pid, from the launcher's children in /proc."""
        try:
            pids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return {}
        out = {}
        for pid in map(int, pids):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            name = argv[argv.index("--worker-id") + 1] if "--worker-id" in argv else "router"
            out[name] = pid
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_stack(args: argparse.Namespace, log: Path) -> Stack:
    """Step 1 of the module's flow; raises ``RuntimeError`` (naming the log) when the stack does not come up."""
    port = _free_port()
    cmd = [sys.executable, "-m", "splitserve.cli", "up", "--model", args.model, "--port", str(port),
           "--extra-arg=--num-pages", f"--extra-arg={args.num_pages}", "--extra-arg=--page-size", "--extra-arg=8"]
    env = {**os.environ, "SPLITSERVE_MAX_QUEUED_REQUESTS": str(args.max_queued_requests), "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    stack = Stack(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if "SplitServe is up at" in log.read_text(errors="replace"):
            return stack
        time.sleep(0.5)
    stack.stop()
    raise RuntimeError(f"splitserve up did not come up (log: {log})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration-s", type=float, default=600.0, help="wall time of the load (default 600)")
    parser.add_argument("--url", default=None, help="an already running server (default: start one with "
                        "`splitserve up`; RSS is reported only for a stack started here)")
    parser.add_argument("--model", default="builtin:tiny-random-llama", help="model of the stack started here")
    parser.add_argument("--num-pages", type=int, default=96, help="KV pages per worker (small: pages churn)")
    parser.add_argument("--max-queued-requests", type=int, default=8, help="the router's in-flight limit")
    parser.add_argument("--concurrency", type=int, default=6, help="client loops that always run")
    parser.add_argument("--burst-concurrency", type=int, default=16, help="client loops during bursts")
    parser.add_argument("--max-requests", type=int, default=None,
                        help="hard bound on requests sent (default: 100 per second of --duration-s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the job sequence (job i depends on seed and i only)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON after the table")


def _warm_up(url: str) -> None:
    warm = LoadConfig(duration_s=3600, concurrency=2, burst_concurrency=2, max_requests=8, seed=12345,
                      disconnect_fraction=0.0)
    outcomes = asyncio.run(run_load(url, warm))
    bad = [o.detail for o in outcomes if o.kind != "ok"]
    if bad:
        raise RuntimeError(f"warm-up requests failed: {bad}")


def soak(url: str, cfg: LoadConfig, pids: dict[str, int]) -> tuple[dict, dict, dict]:
    """Steps 2-4 against a running server: (summary, RSS per process (warm, end), KV pages used at the end)."""
    _warm_up(url)
    warm = {name: rss_mb(pid) for name, pid in pids.items()}
    start = time.monotonic()
    outcomes = asyncio.run(run_load(url, cfg))
    summary = summarize(outcomes, time.monotonic() - start)
    pages = wait_pages_free(url)
    rss = {name: (warm[name], rss_mb(pid)) for name, pid in pids.items()}
    return summary, rss, pages


def main(args: argparse.Namespace) -> int:
    max_requests = args.max_requests if args.max_requests is not None else int(100 * args.duration_s) + 100
    cfg = LoadConfig(duration_s=args.duration_s, seed=args.seed, concurrency=args.concurrency,
                     burst_concurrency=args.burst_concurrency, max_requests=max_requests)
    stack = None
    if args.url is None:
        log = Path(tempfile.mkdtemp(prefix="splitserve-soak-")) / "up.log"
        stack = start_stack(args, log)
        print(f"soak: started `splitserve up` at {stack.url} (log: {log})", flush=True)
    url = args.url or stack.url
    try:
        pids = stack.children() if stack else {}
        summary, rss, pages = soak(url, cfg, pids)
        bad = problems(summary, rss, pages)
        if stack is not None:
            bad += [f"{name} (pid {pid}) is gone" for name, pid in pids.items() if not Path(f"/proc/{pid}").exists()]
            if "Traceback" in stack.log.read_text(errors="replace"):
                bad.append(f"a traceback in {stack.log}")
    finally:
        if stack is not None:
            stack.stop()
    print(format_table(summary, rss, pages))
    if args.json:
        print(json.dumps({"summary": summary, "rss_mb": rss, "kv_pages_used": pages}))
    for line in bad:
        print(f"soak FAILED: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
