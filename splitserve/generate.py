"""``splitserve generate``: offline generation in one process (no router, no workers)."""

from __future__ import annotations

import argparse
import json
import sys

from splitserve.core.config import BUILTIN_MODEL, EngineConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=BUILTIN_MODEL, help="HF model dir, Hugging Face repo id (from the local cache; "
                   "downloaded unless HF_HUB_OFFLINE=1), or the built-in random model (default)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: none, not reproducible)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-token-id", type=int, action="append", default=[], help="extra stop token id (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS up to --max-tokens")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device to run on")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto", help="weights and KV dtype (auto: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--load-format", choices=["auto", "safetensors", "dummy"], default="auto", help="how weights load; dummy: random weights of the model's shape")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    from splitserve.core.engine.offline import generate_text
    from splitserve.core.hub import ModelNotFound, resolve_model
    from splitserve.core.messages import SamplingParams

    try:
        model = resolve_model(args.model)
    except ModelNotFound as exc:
        print(f"splitserve generate: {exc}", file=sys.stderr)
        return 2
    cfg = EngineConfig(
        model=model, device=args.device, dtype=args.dtype, load_format=args.load_format, page_size=args.page_size
    )
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop_token_ids=tuple(args.stop_token_id),
        ignore_eos=args.ignore_eos,
    )
    result = generate_text(cfg, args.prompt, params, stop=args.stop)
    if args.json:
        print(json.dumps(result))
    else:
        sys.stdout.write(args.prompt + result["text"] + "\n")
    return 0
