"""Paged decode attention on a GPU: Llama-3-8B heads (32 q, 8 kv, head dim 128), bf16, page 16.

For each batch x context: the Triton flash-decoding kernel's time and achieved GB/s (K/V bytes read, the floor's
term), its ratio to a device-to-device copy measured in the same run, and its speed against torch SDPA on
K/V already gathered into contiguous tensors (the gather is not timed, which favours SDPA). Both are timed as
CUDA-graph replays (as the decode engine runs them); the eager column adds Python launch overhead.

    python benchmarks/bench_decode_attention.py [--tune | --tune-splits] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from splitserve.benchmarks.kernels_common import bench_ms, copy_bandwidth_gbs, graph_ms, header
from splitserve.kernels.attention import default_num_splits, paged_decode_attention
from splitserve.kernels.testing import make_paged_batch

HQ, HKV, D, PAGE = 32, 8, 128, 16
BATCHES = [1, 4, 8, 16, 32, 64, 128, 256]
CONTEXTS = [512, 1024, 2048, 4096, 8192, 16384, 32768]


def _setup(batch: int, ctx: int):
    return make_paged_batch([ctx] * batch, [1] * batch, HQ, HKV, D, PAGE, torch.bfloat16, "cuda")


def _sdpa_fn(b, batch: int, ctx: int):
    pages = b.block_tables.long()
    k = b.k_pages[pages].reshape(batch, -1, HKV, D)[:, :ctx].transpose(1, 2).contiguous()
    v = b.v_pages[pages].reshape(batch, -1, HKV, D)[:, :ctx].transpose(1, 2).contiguous()
    q = b.q.view(batch, HQ, 1, D)
    return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def _triton_fn(b, ctx: int, **kw):
    out = torch.empty_like(b.q)
    return lambda: paged_decode_attention(b.q, b.k_pages, b.v_pages, b.block_tables, b.context_lens, D**-0.5, ctx, out=out, **kw)


def tune(points: list[tuple[int, int]]) -> None:
    """Sweep tile/warps/stages/splits at a few points and print the best configurations."""
    for batch, ctx in points:
        b = _setup(batch, ctx)
        kv_bytes = 2 * batch * ctx * HKV * D * 2
        auto = default_num_splits(batch, HKV, ctx, torch.device("cuda"))
        rows = []
        for bn, nw, ns, sp in itertools.product([32, 64, 128], [4, 8], [2, 3, 4], sorted({1, auto, 2 * auto})):
            try:
                ms = graph_ms(_triton_fn(b, ctx, block_n=bn, num_warps=nw, num_stages=ns, num_splits=sp))
            except Exception as exc:  # noqa: BLE001 -- an out-of-resources config is skipped and reported
                print(f"  skip bn={bn} w={nw} s={ns} sp={sp}: {type(exc).__name__}")
                continue
            rows.append((ms, bn, nw, ns, sp))
        rows.sort()
        default_ms = graph_ms(_triton_fn(b, ctx))
        print(f"tune B={batch} ctx={ctx} (auto splits={auto}): defaults {default_ms*1e3:.1f} us, best 6 of {len(rows)}")
        for ms, bn, nw, ns, sp in rows[:6]:
            print(f"  block_n={bn:4d} warps={nw} stages={ns} splits={sp:2d}  {ms*1e3:8.1f} us  {kv_bytes/ms/1e6:7.0f} GB/s")
        del b
        torch.cuda.empty_cache()


SPLIT_POINTS = [(1, 4096, 4096), (4, 8192, 8192), (12, 3072, 4096), (16, 2048, 2048), (16, 4096, 4096),
                (32, 2048, 2048), (64, 1024, 1024)]
"""(batch, context, launch bound) for ``--tune-splits``; a bound above the context is a CUDA graph's bucket (12
decode rows at 3,072 keys replay the 4,096 graph)."""


def tune_splits() -> None:
    """Split counts at small and middle batches, default tiles, graph timing: the default's time and the fastest."""
    copy = copy_bandwidth_gbs()
    print(f"device-to-device copy: {copy:.0f} GB/s (read + write)")
    print(f"{'batch':>5} {'ctx':>5} {'bound':>5} {'auto':>4} {'auto_us':>8} {'%copy':>6} {'best':>4} {'best_us':>8} "
          f"{'%copy':>6} {'gain':>6}  all (splits: us)")
    for batch, ctx, bound in SPLIT_POINTS:
        b = _setup(batch, ctx)
        kv_bytes = 2 * batch * ctx * HKV * D * 2
        auto = default_num_splits(batch, HKV, bound, torch.device("cuda"))
        times = {sp: graph_ms(_triton_fn(b, bound, num_splits=sp)) * 1e3
                 for sp in sorted({auto, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64}) if sp * 64 <= bound}
        best = min(times, key=times.get)
        pct = {k: 100 * kv_bytes / (v * 1e3) / copy for k, v in times.items()}
        print(f"{batch:5d} {ctx:5d} {bound:5d} {auto:4d} {times[auto]:8.1f} {pct[auto]:5.0f}% {best:4d} "
              f"{times[best]:8.1f} {pct[best]:5.0f}% {times[auto] / times[best]:5.2f}x  "
              + " ".join(f"{k}:{v:.1f}" for k, v in times.items()))
        del b
        torch.cuda.empty_cache()


def table(max_tokens: int) -> None:
    copy = copy_bandwidth_gbs()
    print(f"device-to-device copy: {copy:.0f} GB/s (read + write)")
    print(f"{'batch':>5} {'ctx':>6} {'splits':>6} {'triton_us':>10} {'GB/s':>7} {'%copy':>6} {'eager_us':>9} {'sdpa_us':>9} {'vs_sdpa':>8}")
    for batch, ctx in itertools.product(BATCHES, CONTEXTS):
        if batch * ctx > max_tokens:
            continue
        b = _setup(batch, ctx)
        kv_bytes = 2 * batch * ctx * HKV * D * 2 + 2 * b.q.numel() * 2
        t_ms, e_ms = graph_ms(_triton_fn(b, ctx)), bench_ms(_triton_fn(b, ctx))
        try:
            s_ms = graph_ms(_sdpa_fn(b, batch, ctx))
        except torch.OutOfMemoryError:
            s_ms = float("nan")
        gbs = kv_bytes / t_ms / 1e6
        splits = default_num_splits(batch, HKV, ctx, torch.device("cuda"))
        print(f"{batch:5d} {ctx:6d} {splits:6d} {t_ms*1e3:10.1f} {gbs:7.0f} {100*gbs/copy:5.0f}% {e_ms*1e3:9.1f} {s_ms*1e3:9.1f} {s_ms/t_ms:7.2f}x")
        del b
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tune", action="store_true", help="sweep kernel configs at a few points first")
    p.add_argument("--max-tokens", type=int, default=1 << 21, help="skip batch*ctx above this (memory)")
    p.add_argument("--tune-splits", action="store_true", help="only split counts at small and middle batches")
    args = p.parse_args()
    print(header("paged decode attention, Llama-3-8B heads, bf16, page 16"))
    if args.tune_splits:
        return tune_splits()
    if args.tune:
        tune([(64, 4096), (1, 32768), (4, 8192)])
    table(args.max_tokens)


if __name__ == "__main__":
    main()
