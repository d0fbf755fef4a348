"""1P1D against 2 colocated workers on the same GPUs (issue 6): goodput over a sweep of request rates.

Starts ``splitserve up`` twice on this machine (once ``--prefill 1 --decode 1``, once ``--colocated 2``), runs
``splitserve bench serve`` at each rate against each, and prints a table: TTFT/TPOT p90 and goodput at the SLO,
with the ratio of disaggregated to colocated goodput measured in the same run.

Usage (2 GPUs): python -m splitserve.benchmarks.bench_disagg_gpu --model dummy:llama3-8b --rates 1,2,4,8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

TOPOLOGIES = {"1P1D": ["--prefill", "1", "--decode", "1"], "2 colocated": ["--prefill", "0", "--decode", "0", "--colocated", "2"]}


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("splitserve up exited during start-up")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError("cluster not healthy in time")


def bench(url: str, args: argparse.Namespace, rate: float, num_prompts: int) -> dict:
    cmd = [sys.executable, "-m", "splitserve.cli", "bench", "serve", "--url", url, "--dataset", "random",
           "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--num-prompts", str(num_prompts),
           "--request-rate", str(rate), "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms),
           "--vocab-size", str(args.vocab_size), "--seed", "1", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"bench serve failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_topology(name: str, args: argparse.Namespace, rates: list[float]) -> dict[float, dict]:
    port = args.port
    cmd = [sys.executable, "-m", "splitserve.cli", "up", "--model", args.model, "--device", args.device, "--port", str(port),
           "--transfer", args.transfer, *TOPOLOGIES[name], *sum((["--extra-arg", a] for a in args.worker_arg), [])]
    log = open(f"{args.log_dir}/{name.replace(' ', '_')}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, args.start_timeout_s)
        bench(url, args, float("inf"), 8)  # warm-up: kernels compiled, CUDA graphs captured
        return {r: bench(url, args, r, max(8, int(r * args.seconds_per_rate))) for r in rates}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def table(results: dict[str, dict[float, dict]], rates: list[float]) -> list[str]:
    rows = ["| rate (req/s) | topology | TTFT p90 ms | TPOT p90 ms | goodput (req/s) | SLO attainment | disagg / colocated |",
            "|---|---|---|---|---|---|---|"]
    for r in rates:
        base = (results["2 colocated"][r]["goodput"] or 0.0) if "2 colocated" in results else None
        for name in results:
            rep = results[name][r]
            ratio = ""
            if name == "1P1D" and base is not None:
                ratio = f"{rep['goodput'] / base:.2f}x" if base else "inf (colocated 0)"
            rows.append(f"| {r:g} | {name} | {rep['ttft_ms']['p90']:.0f} | {rep['tpot_ms']['p90']:.1f} | "
                        f"{rep['goodput']:.2f} | {rep['slo_attainment']:.0%} | {ratio} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dummy:llama3-8b")
    ap.add_argument("--rates", default="1,2,4")
    ap.add_argument("--topologies", default="1P1D,2 colocated", help="comma-separated subset of: 1P1D, 2 colocated")
    ap.add_argument("--input-len", type=int, default=2048)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=40.0)
    ap.add_argument("--seconds-per-rate", type=float, default=15.0)
    ap.add_argument("--transfer", default="ucx")
    ap.add_argument("--vocab-size", type=int, default=32000, help="token-id prompts are drawn below this")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script on a machine without GPUs")
    ap.add_argument("--worker-arg", action="append", default=[])
    ap.add_argument("--port", type=int, default=8300)
    ap.add_argument("--start-timeout-s", type=float, default=240.0)
    ap.add_argument("--timeout-s", type=float, default=300.0)
    ap.add_argument("--log-dir", default="/tmp")
    args = ap.parse_args()
    rates = [float(x) for x in args.rates.split(",")]
    import torch

    card = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if args.device == "cuda" else "CPU"
    names = [n for n in TOPOLOGIES if n in args.topologies.split(",")]
    results = {name: run_topology(name, args, rates) for name in names}
    print(f"# 1P1D vs 2 colocated -- {card}, {datetime.date.today()}, model {args.model}, "
          f"random {args.input_len} in / {args.output_len} out, SLO TTFT p90 <= {args.slo_ttft_ms:g} ms, "
          f"TPOT p90 <= {args.slo_tpot_ms:g} ms, transfer {args.transfer}")
    print("\n".join(table(results, rates)))
    with open(f"{args.log_dir}/disagg_results.json", "w") as f:
        json.dump({n: {str(r): v for r, v in res.items()} for n, res in results.items()}, f)


if __name__ == "__main__":
    main()
