"""``splitserve bench profile``: measure what the planner needs from a live server.

* Prefill: for each prompt length, requests sent one at a time with ``max_tokens=1``; the median
  TTFT is the prefill latency at that length (includes the router's overhead, as users see it).
* Decode: for each batch size B, B requests sent at once with a short prompt and a fixed number of
  output tokens (``ignore_eos``); the median per-request TPOT is the decode step time at batch B.

Run it against a deployment with one prefill and one decode worker (``splitserve up --prefill 1
--decode 1``) so the numbers are per worker. The result is a profile JSON for ``splitserve plan``
(see :class:`splitserve.router.planner.Profile`). ``--load FILE`` validates an existing profile and
prints it instead of measuring.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

from splitserve.benchmarks.serve import DatasetSpec, RequestResult, RunConfig, build_dataset, percentile, run_requests

log = logging.getLogger(__name__)


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="server base URL, e.g. http://127.0.0.1:8000 (default: none; with --load not needed)")
    parser.add_argument("--load", default=None, help="validate and print this profile JSON instead of measuring (default: none)")
    parser.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    parser.add_argument("--prefill-lens", type=_int_list, default=[128, 512, 1024, 2048], help="comma-separated prompt lengths timed")
    parser.add_argument("--batch-sizes", type=_int_list, default=[1, 2, 4, 8, 16, 32], help="comma-separated decode batch sizes timed")
    parser.add_argument("--decode-input-len", type=int, default=32, help="prompt tokens of the decode runs")
    parser.add_argument("--decode-output-len", type=int, default=32, help="tokens decoded per run")
    parser.add_argument("--repeats", type=int, default=3, help="prefill requests per length")
    parser.add_argument("--vocab-size", type=int, default=256, help="id range of the token-id prompts")
    parser.add_argument("--max-batch-size", type=int, default=256, help="decode worker's max running requests")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    parser.add_argument("--out", default=None, help="write the profile JSON here (default: stdout only)")
    parser.add_argument("--json", action="store_true", help="print the profile as one JSON object")


async def _measure(cfg: RunConfig, spec: DatasetSpec, vocab: int, seed: int) -> list[RequestResult]:
    """Send one dataset's prompts; raises when any request failed (a profile must not hide errors)."""
    prompts = build_dataset(spec, random.Random(seed), vocab)
    _, results, _, _ = await run_requests(cfg, prompts)
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} profiling requests failed; first: {failed[0].error}")
    return results


async def measure_profile(args: argparse.Namespace) -> dict[str, Any]:
    """Measure prefill latency per length and decode TPOT per batch size against ``args.url``."""
    base = args.url.rstrip("/")
    sequential = RunConfig(base_url=base, model=args.model, request_rate=math.inf, max_concurrency=1)
    prefill = []
    for i, n in enumerate(args.prefill_lens):
        spec = DatasetSpec("random", args.repeats, n, 1)
        results = await _measure(sequential, spec, args.vocab_size, args.seed + i)
        prefill.append({"input_len": n, "latency_s": percentile([r.ttft_s for r in results], 50)})
        log.info("prefill %d tokens: %.4f s", n, prefill[-1]["latency_s"])
    decode = []
    for j, b in enumerate(args.batch_sizes):
        cfg = RunConfig(base_url=base, model=args.model, request_rate=math.inf)
        spec = DatasetSpec("random", b, args.decode_input_len, args.decode_output_len)
        results = await _measure(cfg, spec, args.vocab_size, args.seed + 1000 + j)
        tpots = [r.tpot_s for r in results if r.tpot_s is not None]
        if not tpots:
            raise RuntimeError("decode profiling needs --decode-output-len >= 2")
        decode.append({"batch_size": b, "tpot_s": percentile(tpots, 50)})
        log.info("decode batch %d: %.4f s per token", b, decode[-1]["tpot_s"])
    meta = {"url": base, "model": args.model, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "decode_input_len": args.decode_input_len, "decode_output_len": args.decode_output_len}
    return {"prefill": prefill, "decode": decode, "max_batch_size": args.max_batch_size, "meta": meta}


def format_profile(data: dict[str, Any]) -> str:
    lines = [f"{'prompt tokens':>14}{'prefill s':>12}{'tokens/s':>12}"]
    lines += [f"{p['input_len']:>14.0f}{p['latency_s']:>12.4f}{p['input_len'] / p['latency_s']:>12.0f}" for p in data["prefill"]]
    lines.append(f"{'decode batch':>14}{'TPOT ms':>12}{'tokens/s':>12}")
    lines += [f"{d['batch_size']:>14.0f}{d['tpot_s'] * 1e3:>12.2f}{d['batch_size'] / d['tpot_s']:>12.0f}" for d in data["decode"]]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from splitserve.router.planner import Profile

    if args.load:
        data = Profile.load(args.load).to_dict()
    elif args.url:
        if args.repeats < 1 or args.decode_output_len < 2:
            raise ValueError("--repeats must be >= 1 and --decode-output-len >= 2")
        data = asyncio.run(measure_profile(args))
        Profile.from_dict(data)  # the planner must accept what we write
    else:
        raise ValueError("give --url to measure or --load FILE to check a profile")
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data) if args.json else format_profile(data))
    return 0
