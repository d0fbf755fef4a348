"""``splitserve plan``: recommend a prefill:decode ratio and worker counts (torch-free).

Example::

    splitserve bench profile --url http://127.0.0.1:8000 --out profile.json
    splitserve plan --profile profile.json --request-rate 4 --input-len 2048 --output-len 256 \\
        --slo-ttft-ms 1000 --slo-tpot-ms 40 [--total-workers 8] [--simulate-s 300] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

from splitserve.router.planner import (
    ClusterSimulator,
    Plan,
    Profile,
    Slo,
    Workload,
    plan,
    poisson_arrivals,
    slo_attainment,
)

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", required=True, help="profile JSON written by `splitserve bench profile`")
    parser.add_argument("--request-rate", type=float, default=None, help="target requests per second (default: none; or --workload)")
    parser.add_argument("--input-len", type=int, default=None, help="mean prompt length in tokens (default: none; or --workload)")
    parser.add_argument("--output-len", type=int, default=None, help="mean output length in tokens (default: none; or --workload)")
    parser.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in [n*(1-r), n*(1+r)]")
    parser.add_argument(
        "--workload",
        default=None,
        help='JSON file {"rate": R, "input_lens": [...], "output_lens": [...]} (instead of the three flags above; default: none)',
    )
    parser.add_argument("--slo-ttft-ms", type=float, required=True, help="TTFT p90 bound")
    parser.add_argument("--slo-tpot-ms", type=float, required=True, help="TPOT p90 bound")
    parser.add_argument("--total-workers", type=int, default=None, help="split exactly this many workers (default: as many as the SLO needs)")
    parser.add_argument("--simulate-s", type=float, default=0.0, help="also simulate the plan for this many seconds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulation")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def workload_from_args(args: argparse.Namespace) -> Workload:
    """The workload from ``--workload FILE`` or from rate and length flags."""
    if args.workload:
        data = json.loads(Path(args.workload).read_text())
        if set(data) != {"rate", "input_lens", "output_lens"}:
            raise ValueError("workload JSON needs exactly the keys rate, input_lens, output_lens")
        return Workload(float(data["rate"]), tuple(map(int, data["input_lens"])), tuple(map(int, data["output_lens"])))
    missing = [f for f in ("request_rate", "input_len", "output_len") if getattr(args, f) is None]
    if missing:
        raise ValueError(f"give --workload or all of --request-rate --input-len --output-len (missing {missing})")
    return Workload.uniform(args.request_rate, args.input_len, args.output_len, args.range_ratio)


def simulate(profile: Profile, workload: Workload, slo: Slo, p: Plan, seconds: float, seed: int) -> dict[str, Any]:
    """SLO attainment of the planned split in a discrete-event simulation (no processes)."""
    requests = poisson_arrivals([(seconds, workload)], seed=seed)
    done = ClusterSimulator(profile, p.n_prefill, p.n_decode).run(requests)
    return {"seconds": seconds, "requests": len(done), "slo_attainment": slo_attainment(done, slo) if done else None}


def format_plan(result: dict[str, Any]) -> str:
    p = result["plan"]
    lines = [
        f"recommended: {p['n_prefill']} prefill + {p['n_decode']} decode workers "
        f"(ratio {p['n_prefill']}:{p['n_decode']}){'' if p['feasible'] else '  -- does NOT meet the SLO'}",
        f"per worker within SLO: prefill {p['prefill_rate_per_worker']:.3g} req/s, "
        f"decode {p['decode_rate_per_worker']:.3g} req/s; this split sustains {p['max_rate']:.3g} req/s",
        f"predicted at {result['workload']['rate']:.3g} req/s: TTFT p90 {p['predicted_ttft_p90_s'] * 1e3:.1f} ms, "
        f"TPOT p90 {p['predicted_tpot_p90_s'] * 1e3:.2f} ms",
    ]
    lines.extend(f"note: {n}" for n in p["notes"])
    if result.get("simulation"):
        sim = result["simulation"]
        lines.append(f"simulated {sim['seconds']:.0f} s, {sim['requests']} requests: SLO attainment {sim['slo_attainment']:.1%}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    profile = Profile.load(args.profile)
    workload = workload_from_args(args)
    slo = Slo(args.slo_ttft_ms / 1000.0, args.slo_tpot_ms / 1000.0)
    p = plan(profile, workload, slo, total_workers=args.total_workers)
    log.info("plan for %.3g req/s: %d prefill, %d decode", workload.rate, p.n_prefill, p.n_decode)
    result: dict[str, Any] = {
        "plan": {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in p.to_dict().items()},
        "workload": {"rate": workload.rate, "mean_input_len": sum(workload.input_lens) / len(workload.input_lens),
                     "mean_output_len": sum(workload.output_lens) / len(workload.output_lens)},
        "slo": {"ttft_p90_ms": args.slo_ttft_ms, "tpot_p90_ms": args.slo_tpot_ms},
    }
    if args.simulate_s > 0:
        result["simulation"] = simulate(profile, workload, slo, p, args.simulate_s, args.seed)
    if args.json:
        print(json.dumps(result))
    elif p.feasible or not any(v is None for v in result["plan"].values()):
        print(format_plan(result))
    else:
        print("\n".join(f"note: {n}" for n in p.notes))
    return 0 if p.feasible else 2
