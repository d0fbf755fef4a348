"""What warm-up costs a worker on a GPU, with and without every mixed CUDA graph (``capture_mixed_graphs``).

1. Build an engine the way a worker does (``--shape`` with dummy weights, the KV pool sized by
   ``--kv-cache-memory-fraction``, ``--max-num-seqs``; prompts first and the prompt lane, as the agent benchmarks
   run a decode worker), and read the device's free memory.
2. ``LLMEngine.warmup(mixed_graphs=False)`` as a prefill or colocated worker runs it by default: every kernel
   variant, every decode graph, one mixed graph, the lane's graphs, a few prefills. Time it, count the graphs, read
   the free memory again.
3. Then ``DecodeGraphs.capture_all(mixed=True)``: the mixed graphs a decode worker's warm-up adds by default
   (``--capture-mixed-graphs``). Time, graphs and free memory again.
4. Print one table: each stage's seconds, graphs, and the device memory it took (the baseline is the engine as
   built, in the same run).

Usage: python -m splitserve.benchmarks.bench_warmup_gpu [--shape llama3-8b] [--kv-cache-memory-fraction 0.85]
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

from splitserve.core.config import EngineConfig
from splitserve.core.engine.engine import LLMEngine

GIB = 1 << 30


def free_gib() -> float:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0] / GIB


def graph_count(engine: LLMEngine) -> int:
    lane = engine.runner.lane().graphs if engine.cfg.prompt_lane else None
    return len(engine.runner.graphs.graphs) + (len(lane.graphs) if lane is not None else 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--kv-cache-memory-fraction", type=float, default=0.85, help="the worker default")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: the worker's")
    ap.add_argument("--max-model-len", type=int, default=None, help="default: the model's")
    args = ap.parse_args()
    sizes = {k: v for k, v in (("max_num_seqs", args.max_num_seqs), ("max_model_len", args.max_model_len)) if v}
    cfg = EngineConfig(model=f"dummy:{args.shape}", device="cuda", dtype="bfloat16", prefill_first_tokens=256,
                       kv_cache_memory_fraction=args.kv_cache_memory_fraction, prompt_lane=True, **sizes)
    engine = LLMEngine(cfg)
    rows = [("engine built", 0.0, 0, free_gib())]
    t0 = time.perf_counter()
    engine.warmup(mixed_graphs=False)
    rows.append(("warmup(mixed_graphs=False)", time.perf_counter() - t0, graph_count(engine), free_gib()))
    t0 = time.perf_counter()
    engine.runner.graphs.capture_all(mixed=True)
    rows.append(("+ every mixed graph", time.perf_counter() - t0, graph_count(engine), free_gib()))
    print(f"# Warm-up -- {torch.cuda.get_device_name(0)}, {datetime.date.today()}, dummy {args.shape} bf16, "
          f"KV fraction {args.kv_cache_memory_fraction}, {engine.info.num_pages} pages, max_num_seqs "
          f"{cfg.max_num_seqs}, max_model_len {engine.info.max_model_len}\n")
    print("| stage | seconds | graphs (lane's included) | device memory free, GiB | taken by the stage, GiB |")
    print("|---|---:|---:|---:|---:|")
    prev = rows[0][3]
    for name, secs, graphs, free in rows:
        print(f"| {name} | {secs:.1f} | {graphs} | {free:.2f} | {prev - free:.2f} |")
        prev = free


if __name__ == "__main__":
    main()
