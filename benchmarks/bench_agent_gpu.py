"""Agent sessions on GPUs (issue 11): sessions on against off, and the return-time-aware policy against LRU.

1. ``on_off``: start ``splitserve up`` (1 prefill + 1 decode worker, ``--model``, default pools), warm it with a
   small trace, then run ``splitserve bench agent --compare --hints --token-ids``: ``--sessions`` concurrent
   sessions of ``--turns`` turns, each starting from ``--shared-tokens`` ids of context every session shares and
   ``--own-tokens`` ids of its own, with
   ``--turn-tokens`` new tool/user ids per turn and ``--max-tokens`` generated. Token-id prompts, because a
   random-weight model's text does not re-tokenize to the ids it generated. The sessions-off run uses another
   salt (no cache left by the first run helps it); the replay checks every turn's ids against a session-less run.
   ``on_off_small`` repeats it with ``--small-pages`` KV pages per worker and a ``--small-host-gib`` host tier for
   sessions: many agents on a small pool, where a prefix cache alone forgets contexts that sessions keep.
2. ``pressure``: for each of ``--policies``, a fresh cluster whose workers hold ``--pressure-pages`` KV pages
   (at most ``--session-kv-fraction`` of them kept for idle sessions), the same heavy-tailed trace with hints
   (``--pressure-sessions`` x ``--pressure-turns``, lognormal pauses), sessions on.
2'. ``turn_step``: sessions on only, the same trace as ``on_off`` on a fresh cluster per setting of the decode
   worker's turn step (:data:`TURN_STEPS`): run synchronously after the step in flight (the baseline), queued behind
   it (``--overlap-prefill``), queued with the step window (``--step-window``), and that in a step of its own
   ahead of the decode rows (``--prefill-first-tokens``); ``--turn-steps`` picks them, ``--rounds`` rounds,
   alternating.
3. Print one table per part: TTFT of turn 1 and of turns 2+ (client side, ``--client-procs`` client processes; and
   the router's own TTFT of turns 2+, found in its access log by each turn's response id), prefill tokens computed
   (server counters over all turns: prefill workers plus decode workers' local prefills; and turns 2+ alone, from each
   response's usage), session hits; ratios against the baseline measured in the same run (sessions off; LRU).
   JSON of every run lands in ``--log-dir``.

Usage (2 GPUs): python -m splitserve.benchmarks.bench_agent_gpu --log-dir /tmp/agent
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from typing import Any

from splitserve.benchmarks.agent import TURN_STEPS, TurnStep
from splitserve.benchmarks.bench_disagg_gpu import add_server_arguments, running_server


def agent_cmd(url: str, args: argparse.Namespace, *extra: str) -> list[str]:
    return [sys.executable, "-m", "splitserve.cli", "bench", "agent", "--url", url, "--token-ids", "--hints",
            "--shared-tokens", str(args.shared_tokens), "--own-tokens", str(args.own_tokens),
            "--turn-tokens", str(args.turn_tokens),
            "--max-tokens", str(args.max_tokens), "--vocab-size", str(args.vocab_size), "--json", *extra]


def run_agent(cmd: list[str], timeout_s: float) -> dict[str, Any]:
    """The report of one ``bench agent`` run. It exits 1 when a turn failed or an output differed from the
    session-less replay; the report says which, and the tables print both."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    lines = out.stdout.strip().splitlines()
    if out.returncode not in (0, 1) or not lines:
        raise RuntimeError(f"bench agent failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def up_cmd(args: argparse.Namespace, *worker_args: str) -> list[str]:
    return [sys.executable, "-m", "splitserve.cli", "up", "--model", args.model, "--device", args.device,
            "--port", str(args.port), "--prefill", "1", "--decode", "1",
            *(f"--extra-arg={a}" for a in (*args.worker_arg, *worker_args))]


def measure(args: argparse.Namespace, name: str, workers: tuple[str, ...], *trace: str) -> dict[str, Any]:
    """A fresh cluster (extra worker flags ``workers``, log ``agent_<name>.log``), a small warm-up trace of other
    ids over both paths, then ``bench agent`` with ``trace``: its report, with the start-up time."""
    log = os.path.join(args.log_dir, f"agent_{name}.log")
    with running_server(up_cmd(args, *workers), log, args.port, args.start_timeout_s) as (url, startup_s):
        run_agent(agent_cmd(url, args, "--sessions", "4", "--turns", "2", "--pause-scale", "0.05",
                            "--seed", str(args.seed + 1000)), args.timeout_s)
        report = run_agent(agent_cmd(url, args, *trace, "--seed", str(args.seed), "--server-log", log,
                                     "--client-procs", str(args.client_procs)), args.timeout_s)
    report["startup_s"] = startup_s
    return report


def run_on_off(args: argparse.Namespace, part: str) -> dict[str, Any]:
    workers = () if part == "on_off" else (f"--num-pages={args.small_pages}", f"--session-host-gib={args.small_host_gib}")
    return measure(args, part, workers, "--compare", "--sessions", str(args.sessions), "--turns", str(args.turns),
                   "--pause-scale", str(args.pause_scale), "--max-pause-s", str(args.max_pause_s))


def run_pressure(args: argparse.Namespace, policy: str) -> dict[str, Any]:
    workers = (f"--num-pages={args.pressure_pages}", f"--session-kv-fraction={args.session_kv_fraction}",
               f"--session-policy={policy}")
    return measure(args, f"pressure_{policy}", workers, "--sessions", str(args.pressure_sessions), "--turns",
                   str(args.pressure_turns), "--pause-scale", str(args.pressure_pause_scale), "--pause-shape", "2.0",
                   "--max-pause-s", str(args.pressure_max_pause_s))


def turn_step_flags(step: TurnStep) -> tuple[str, ...]:
    """The decode worker's flags for one of :data:`~splitserve.benchmarks.agent.TURN_STEPS`."""
    return (f"--overlap-prefill={'on' if step.overlap_prefill else 'off'}",
            "--step-window" if step.step_window else "--no-step-window",
            f"--prefill-first-tokens={step.prefill_first_tokens}",
            "--prompt-lane" if step.prompt_lane else "--no-prompt-lane",
            "--capture-mixed-graphs" if step.capture_mixed_graphs else "--no-capture-mixed-graphs")


def run_turn_step(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    labels = args.turn_steps.split(",")
    unknown = sorted(set(labels) - set(TURN_STEPS))
    if unknown:
        raise SystemExit(f"--turn-steps: unknown {unknown}; choose from {sorted(TURN_STEPS)}")
    out: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for i in range(args.rounds):
        for label in labels:
            flags = turn_step_flags(TURN_STEPS[label])
            out[label].append(measure(args, f"{label}_{i}", flags, "--sessions", str(args.sessions), "--turns",
                                      str(args.turns), "--pause-scale", str(args.pause_scale), "--max-pause-s",
                                      str(args.max_pause_s)))
    return out


def print_turn_step(reps: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    print(f"\n## A session turn's step (sessions on; {args.sessions} sessions x {args.turns} turns, a fresh cluster "
          f"per run, alternating)")
    print("\n".join([*HEAD, *(row(f"{label} #{i + 1}", rs[i]["sessions_on"]) for i in range(args.rounds)
                               for label, rs in reps.items()),
                     *(stages(f"{label} #{i + 1}", r["sessions_on"]) for label, rs in reps.items()
                       for i, r in enumerate(rs))]))


def row(label: str, s: dict[str, Any]) -> str:
    server = s.get("server") or {}
    t1, tl, later = s["ttft_turn1_ms"], s["ttft_later_ms"], s.get("computed_later") or {}
    routed = s.get("server_ttft_later_ms") or {}
    return (f"| {label} | {s['turns_ok']} / {s['turns_ok'] + s['turns_failed']} | {t1['p50']:.1f} | {tl['p50']:.1f} | "
            f"{tl['p90']:.1f} | {ms(routed.get('p50'))} | {ms(routed.get('p90'))} | "
            f"{server.get('prefill_tokens', 0):.0f} | {later.get('computed_tokens', '-')} / "
            f"{later.get('prompt_tokens', '-')} | {server.get('session_hits', 0):.0f} |")


HEAD = ["| run | turns ok | TTFT turn 1 p50 ms | TTFT turns 2+ p50 ms | turns 2+ p90 ms | router's TTFT turns 2+ p50 ms "
        "| router's p90 ms | prefill tokens (all turns) | turns 2+ computed / prompt tokens | session hits |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}x" if num and den else "-"


def times(x: float | None) -> str:
    """A ratio ``bench agent`` computed (its ``speedup``), as printed here."""
    return "-" if x is None else f"{x:.2f}x"


def stages(label: str, s: dict[str, Any]) -> str:
    parts = [f"{k} {v:.1f}" for k, v in (s.get("server_breakdown_ms") or {}).items() if v is not None]
    return f"  {label}: server time per request, mean ms: {', '.join(parts) or '-'}"


def print_on_off(rep: dict[str, Any], part: str, args: argparse.Namespace) -> None:
    on, off = rep["sessions_on"], rep["sessions_off"]
    pool = "default KV pools" if part == "on_off" else \
        f"{args.small_pages} KV pages per worker, session host tier {args.small_host_gib} GiB"
    print(f"\n## Sessions on vs off, {pool}: {rep['config']['sessions']} sessions x {rep['config']['turns']} turns, "
          f"{args.shared_tokens} shared + {args.own_tokens} own ids, {args.turn_tokens} new ids per turn, "
          f"{args.max_tokens} generated "
          f"(start-up {rep['startup_s']:.0f} s)")
    print("\n".join([*HEAD, row("sessions on", on), row("sessions off", off), stages("sessions on", on),
                     stages("sessions off", off)]))
    x = rep["speedup"]
    print(f"turns 2+ TTFT p50 off / on = {times(x['ttft_later_p50_x'])} (target >= 3x; the router's own: "
          f"{times(x.get('server_ttft_later_p50_x'))}); prefill tokens off / on = "
          f"{times(x['prefill_tokens_x'])} (target >= 5x); turns 2+ computed off / on = "
          f"{times(x['computed_later_x'])}; every turn's ids equal a "
          f"session-less replay: {rep['outputs_match']} (turns that differ: {rep['mismatch_count']} of {off['turns_ok']}"
          f"{', first ' + ', '.join(rep['mismatches'][:5]) if rep['mismatches'] else ''})")


def print_pressure(reps: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\n## Under memory pressure: {args.pressure_pages} pages per worker, session share "
          f"{args.session_kv_fraction}, {args.pressure_sessions} sessions x {args.pressure_turns} turns, "
          f"lognormal pauses (scale {args.pressure_pause_scale} s, cap {args.pressure_max_pause_s} s)")
    print("\n".join([*HEAD, *(row(p, r["sessions_on"]) for p, r in reps.items()),
                     *(stages(p, r["sessions_on"]) for p, r in reps.items())]))
    if "lru" in reps and "expected_return" in reps:
        lru, er = reps["lru"]["sessions_on"], reps["expected_return"]["sessions_on"]
        print(f"turns 2+ TTFT p50 lru / expected_return = {ratio(lru['ttft_later_ms']['p50'], er['ttft_later_ms']['p50'])}, "
              f"p90 {ratio(lru['ttft_later_ms']['p90'], er['ttft_later_ms']['p90'])}")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dummy:llama3-8b")
    ap.add_argument("--parts", default="on_off,on_off_small,pressure",
                    help="on_off (default pools), on_off_small (--small-pages, a host tier), turn_step (how the "
                         "decode worker runs a turn's step), pressure")
    ap.add_argument("--sessions", type=int, default=32)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--shared-tokens", type=int, default=2048)
    ap.add_argument("--own-tokens", type=int, default=0, help="ids of context each session has alone")
    ap.add_argument("--turn-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--pause-scale", type=float, default=0.5)
    ap.add_argument("--max-pause-s", type=float, default=10.0)
    ap.add_argument("--small-pages", type=int, default=4096, help="KV pages per worker in on_off_small")
    ap.add_argument("--small-host-gib", type=float, default=16.0, help="session host tier in on_off_small")
    ap.add_argument("--policies", default="expected_return,lru")
    ap.add_argument("--pressure-pages", type=int, default=2048)
    ap.add_argument("--session-kv-fraction", type=float, default=0.4)
    ap.add_argument("--pressure-sessions", type=int, default=16)
    ap.add_argument("--pressure-turns", type=int, default=6)
    ap.add_argument("--pressure-pause-scale", type=float, default=1.0)
    ap.add_argument("--pressure-max-pause-s", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--client-procs", type=int, default=4, help="client processes of the measured trace")
    ap.add_argument("--rounds", type=int, default=1, help="runs per setting in the turn_step part")
    ap.add_argument("--turn-steps", default=",".join(TURN_STEPS),
                    help="the settings of the turn_step part, in order (keys of benchmarks/agent.py TURN_STEPS)")
    add_server_arguments(ap, port=8310)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    os.makedirs(args.log_dir, exist_ok=True)
    parts = args.parts.split(",")
    card = "CPU"
    if args.device == "cuda":
        import torch

        card = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    print(f"# Agent sessions -- {card}, {datetime.date.today()}, model {args.model}, 1 prefill + 1 decode worker")
    results: dict[str, Any] = {}
    for part in (p for p in parts if p in ("on_off", "on_off_small")):
        results[part] = run_on_off(args, part)
        print_on_off(results[part], part, args)
    if "turn_step" in parts:
        results["turn_step"] = run_turn_step(args)
        print_turn_step(results["turn_step"], args)
    if "pressure" in parts:
        results["pressure"] = {p: run_pressure(args, p) for p in args.policies.split(",")}
        print_pressure(results["pressure"], args)
    with open(os.path.join(args.log_dir, "agent_results.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
