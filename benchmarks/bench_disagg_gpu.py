"""Disaggregated against colocated serving on the same 2 GPUs: goodput per GPU at a tight TPOT SLO.

1. For each topology, start ``splitserve up`` on this machine once (every worker warms up before it registers:
   CUDA graphs captured, kernels compiled), run one warm-up load of every workload, then for every workload sweep
   Poisson request rates with ``splitserve bench serve`` (each rate: ``--seconds-per-rate`` of arrivals).
2. Topologies (``--topologies``): ``1P1D`` (KV over ``--transfer``, default auto = CUDA IPC one-sided writes),
   ``1P1D+local`` (the decode worker prefills prompts shorter than ``--local-threshold`` itself),
   ``2col-c512`` / ``2col-c2048`` (two colocated workers, chunked prefill of that chunk and step budget).
3. Report per workload: a table per rate and topology (TTFT p50/p90, TPOT p50/p90, ITL p99, throughput, SLO
   attainment at each TPOT bound); then goodput per GPU = the highest swept rate with >= 90% of requests inside
   the SLO, over 2 GPUs, and 1P1D against the best colocated configuration measured in this run; the
   transfer-hidden check at the lowest rate (1P1D TTFT p50 over colocated TTFT p50, TPOT p50 of both).

Usage (2 GPUs): python -m splitserve.benchmarks.bench_disagg_gpu --workloads 4096/256,512/512 --rates 1,4,8
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any, Iterator

TOPOLOGIES = {
    "1P1D": ["--prefill", "1", "--decode", "1"],
    "1P1D+local": ["--prefill", "1", "--decode", "1", "--extra-arg=--local-prefill-threshold={local}"],
    "2col-c512": ["--prefill", "0", "--decode", "0", "--colocated", "2", "--extra-arg=--chunk-size=512",
                  "--extra-arg=--max-num-batched-tokens=512"],
    "2col-c2048": ["--prefill", "0", "--decode", "0", "--colocated", "2", "--extra-arg=--chunk-size=2048",
                   "--extra-arg=--max-num-batched-tokens=2048"],
}
NUM_GPUS = 2
GOOD_SHARE = 0.9


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> float:
    """Seconds until ``/health`` answers 200 (start-up time, warm-up included)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError("splitserve up exited during start-up")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("cluster not healthy in time")


def bench(url: str, args: argparse.Namespace, workload: tuple[int, int], rate: float, num_prompts: int,
          max_concurrency: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "splitserve.cli", "bench", "serve", "--url", url, "--dataset", "random",
           "--input-len", str(workload[0]), "--output-len", str(workload[1]), "--num-prompts", str(num_prompts),
           "--request-rate", str(rate), "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms),
           "--slo-tpot-sweep-ms", args.tpot_sweep_ms, "--vocab-size", str(args.vocab_size), "--seed", str(0 if rate == float("inf") else int(rate * 7)),
           "--json", *(["--max-concurrency", str(max_concurrency)] if max_concurrency else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"bench serve failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def running_server(cmd: list[str], log_path: str, port: int, start_timeout_s: float) -> Iterator[tuple[str, float]]:
    """Run ``splitserve up`` (``cmd``), logging to ``log_path``; yields (URL, start-up seconds, warm-up included).

    A server that does not become healthy prints the end of its log to stderr; the whole process group is stopped
    on the way out (SIGTERM, then SIGKILL after 60 s)."""
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            startup_s = wait_healthy(url, proc, start_timeout_s)
        except (RuntimeError, TimeoutError):
            log.flush()
            with open(log_path, encoding="utf-8", errors="replace") as f:
                print(f"splitserve up did not start; the end of {log_path}:\n" + "".join(f.readlines()[-20:]),
                      file=sys.stderr, flush=True)
            raise
        yield url, startup_s
    finally:
        stop_server(proc)
        log.close()


def run_topology(name: str, args: argparse.Namespace, workloads: list[tuple[int, int]], rates: list[float]) -> dict:
    topo = [a.format(local=args.local_threshold) for a in TOPOLOGIES[name]]
    cmd = [sys.executable, "-m", "splitserve.cli", "up", "--model", args.model, "--device", args.device,
           "--port", str(args.port), "--transfer", args.transfer, *topo, *(f"--extra-arg={a}" for a in args.worker_arg)]
    result: dict[str, Any] = {}
    with running_server(cmd, os.path.join(args.log_dir, f"{name}.log"), args.port, args.start_timeout_s) as (url, up_s):
        result["startup_s"] = up_s
        for w in workloads:  # warm-up: every path (prompts alone and batched, transfers, decode batches)
            bench(url, args, w, float("inf"), 4)
            bench(url, args, w, 2.0, 4, max_concurrency=1)
        for w in workloads:
            key = f"{w[0]}/{w[1]}"
            result[key] = {}
            for r in rates:
                result[key][r] = bench(url, args, w, r, max(8, int(r * args.seconds_per_rate)))
                rep = result[key][r]
                print(f"  {name} {key} rate {r:g}: attainment {rep['slo_attainment']:.0%}, TTFT p90 "
                      f"{rep['ttft_ms']['p90']:.0f} ms, TPOT p90 {rep['tpot_ms']['p90']:.1f} ms, breakdown "
                      f"{rep.get('server_breakdown_ms')}", flush=True)
                with open(os.path.join(args.log_dir, f"partial_{name}.json"), "w") as f:  # survives a cut-off run
                    json.dump({k: ({str(x): y for x, y in v.items()} if isinstance(v, dict) else v)
                               for k, v in result.items()}, f)
    return result


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the whole ``splitserve up`` process group (it drains), SIGKILL it after 60 s; gone already is fine."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def goodput_per_gpu(by_rate: dict[float, dict], tpot_ms: str) -> float:
    """Highest rate whose SLO attainment (TPOT bound ``tpot_ms``) is >= 90%, per GPU (0 if none)."""
    ok = [r for r, rep in by_rate.items() if rep["attainment_by_tpot_ms"][tpot_ms] >= GOOD_SHARE]
    return max(ok, default=0.0) / NUM_GPUS


def _cell(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def workload_table(results: dict[str, dict], key: str, rates: list[float], sweep: list[str]) -> list[str]:
    head = "| rate | topology | TTFT p50 | TTFT p90 | TPOT p50 | TPOT p90 | ITL p99 | out tok/s | " + \
           " | ".join(f"SLO@{t}ms" for t in sweep) + " |"
    rows = [head, "|" + "---|" * (8 + len(sweep))]
    for r in rates:
        for name, res in results.items():
            rep = res[key][r]
            att = " | ".join(f"{rep['attainment_by_tpot_ms'][t]:.0%}" for t in sweep)
            rows.append(f"| {r:g} | {name} | {_cell(rep['ttft_ms']['p50'], '.0f')} | {_cell(rep['ttft_ms']['p90'], '.0f')} | "
                        f"{_cell(rep['tpot_ms']['p50'], '.1f')} | {_cell(rep['tpot_ms']['p90'], '.1f')} | "
                        f"{_cell(rep['itl_ms']['p99'], '.1f')} | {rep['output_throughput']:.0f} | {att} |")
    return rows


def summary(results: dict[str, dict], key: str, rates: list[float], sweep: list[str]) -> list[str]:
    rows = [f"goodput per GPU (req/s/GPU, highest swept rate with >= {GOOD_SHARE:.0%} inside the SLO):"]
    for t in sweep:
        per = {n: goodput_per_gpu(res[key], t) for n, res in results.items()}
        col = {n: g for n, g in per.items() if n.startswith("2col")}
        best_col = max(col.values(), default=None)
        ratio = "" if not best_col or "1P1D" not in per else f"  1P1D / best colocated = {per['1P1D'] / best_col:.2f}x"
        if best_col == 0 and per.get("1P1D"):
            ratio = "  1P1D / best colocated = inf (no colocated rate met the SLO)"
        rows.append(f"  TPOT <= {t} ms: " + ", ".join(f"{n} {g:.2f}" for n, g in per.items()) + ratio)
    low = min(rates)
    if "1P1D" in results and any(n.startswith("2col") for n in results):
        d = results["1P1D"][key][low]
        for n in (n for n in results if n.startswith("2col")):
            c = results[n][key][low]
            rows.append(f"  transfer hidden at {low:g} req/s vs {n}: TTFT p50 {d['ttft_ms']['p50']:.0f} / "
                        f"{c['ttft_ms']['p50']:.0f} ms = {d['ttft_ms']['p50'] / c['ttft_ms']['p50']:.2f}x (target <= 1.15x); "
                        f"TPOT p50 {d['tpot_ms']['p50']:.2f} vs {c['tpot_ms']['p50']:.2f} ms")
    return rows


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dummy:llama3-8b")
    ap.add_argument("--workloads", default="4096/256,2048/256,512/512", help="input/output token lengths")
    ap.add_argument("--rates", default="1,2,4,6,8")
    ap.add_argument("--topologies", default="1P1D,2col-c512,2col-c2048", help=f"subset of {', '.join(TOPOLOGIES)}")
    ap.add_argument("--slo-ttft-ms", type=float, default=1500.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=10.0)
    ap.add_argument("--tpot-sweep-ms", default="10,15,20")
    ap.add_argument("--seconds-per-rate", type=float, default=30.0)
    ap.add_argument("--local-threshold", type=int, default=1024)
    ap.add_argument("--transfer", default="auto")
    ap.add_argument("--vocab-size", type=int, default=32000, help="token-id prompts are drawn below this")
    add_server_arguments(ap, port=8300)
    return ap.parse_args()


def add_server_arguments(ap: argparse.ArgumentParser, port: int) -> None:
    """Flags of every GPU serving benchmark: where the workers run, extra worker flags, the port and the limits."""
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script on a machine without GPUs")
    ap.add_argument("--worker-arg", action="append", default=[], help="extra worker flag, e.g. --worker-arg=--seed=1")
    ap.add_argument("--port", type=int, default=port)
    ap.add_argument("--start-timeout-s", type=float, default=300.0)
    ap.add_argument("--timeout-s", type=float, default=400.0, help="limit of one benchmark client run")
    ap.add_argument("--log-dir", default="/tmp")


def main() -> None:
    args = parse_args()
    workloads = [tuple(int(x) for x in w.split("/")) for w in args.workloads.split(",")]
    rates = [float(x) for x in args.rates.split(",")]
    sweep = [f"{float(t):g}" for t in args.tpot_sweep_ms.split(",")]
    import torch

    card = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if args.device == "cuda" else "CPU"
    names = [n for n in args.topologies.split(",") if n in TOPOLOGIES]
    results = {name: run_topology(name, args, workloads, rates) for name in names}
    print(f"# Disaggregated vs colocated -- {card}, {datetime.date.today()}, model {args.model}, transfer "
          f"{args.transfer}, Poisson, {args.seconds_per_rate:g} s of arrivals per rate, SLO TTFT p90-style bound "
          f"{args.slo_ttft_ms:g} ms and TPOT {args.slo_tpot_ms:g} ms per request")
    print("start-up (s, warm-up included): " + ", ".join(f"{n} {r['startup_s']:.0f}" for n, r in results.items()))
    for w in workloads:
        key = f"{w[0]}/{w[1]}"
        print(f"\n## {key}")
        print("\n".join(workload_table(results, key, rates, sweep)))
        print("\n".join(summary(results, key, rates, sweep)))
    with open(os.path.join(args.log_dir, "disagg_results.json"), "w") as f:
        json.dump({n: {k: ({str(r): v for r, v in res.items()} if isinstance(res, dict) else res)
                       for k, res in r.items()} for n, r in results.items()}, f)


if __name__ == "__main__":
    main()
