"""Prefill attention on a GPU: the paged Triton kernel against torch SDPA (causal, contiguous K/V, GQA).

Llama-3-8B heads (32 q, 8 kv, head dim 128), bf16, page 16; 1, 4 and 16 prompts of 2048 tokens, no cached prefix,
plus one chunked case (the last 512 tokens of 2048, i.e. a 1536-token cached prefix) that SDPA can only do with an
explicit mask. TFLOP/s counts the causal half of QK^T and PV (4 * Hq * D * sum over queries of visible keys).
Then an agent session's next turn: one row of 65 new tokens behind 2,000-4,000 cached ones, the keys not split
(``num_splits=1``), split (``max_context_len`` given), and split with each KV head's query heads packed into one
block as the engine runs it, with the K/V bandwidth the last reaches (the context's K and V read once) and the
largest difference from the float32 reference.

With ``--tune-turn``, only the turn row as a mixed CUDA graph launches it, over tiles, warps, stages and split
counts (:func:`tune_turn`).

    python benchmarks/bench_prefill_attention.py [--tune | --tune-turn | --turn-splits]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from splitserve.benchmarks.kernels_common import bench_ms, header, matmul_tflops
from splitserve.core.model.attention import AttentionMetadata
from splitserve.core.model.attention_triton import TritonAttentionBackend
from splitserve.kernels.attention import paged_prefill_attention
from splitserve.kernels.testing import make_paged_batch

HQ, HKV, D, PAGE = 32, 8, 128, 16


def _triton_fn(b, max_q: int | None = None, **kw):
    out = torch.empty_like(b.q)
    max_q = max(b.q_lens) if max_q is None else max_q
    return lambda: paged_prefill_attention(b.q, b.k_pages, b.v_pages, b.cu_seqlens_q, b.context_lens, b.block_tables,
                                           D**-0.5, max_q, out=out, **kw)


def _sdpa_fn(b, n: int, ctx: int, q_len: int):
    pages = b.block_tables.long()
    k = b.k_pages[pages].reshape(n, -1, HKV, D)[:, :ctx].transpose(1, 2).contiguous()
    v = b.v_pages[pages].reshape(n, -1, HKV, D)[:, :ctx].transpose(1, 2).contiguous()
    q = b.q.view(n, q_len, HQ, D).transpose(1, 2)
    if q_len == ctx:
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    pos = torch.arange(ctx - q_len, ctx, device="cuda")
    mask = pos[:, None] >= torch.arange(ctx, device="cuda")[None, :]
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _backend_fn(b):
    """TritonAttentionBackend.attend as the engine calls it (SDPA per sequence on gathered K/V when it prefers)."""
    kv = torch.stack([b.k_pages, b.v_pages])
    meta = AttentionMetadata(
        cu_seqlens_q=b.cu_seqlens_q, context_lens=b.context_lens, block_tables=b.block_tables,
        slot_mapping=torch.empty(0, dtype=torch.int64, device="cuda"), max_q_len=max(b.q_lens),
        max_context_len=max(b.ctx_lens), q_lens=b.q_lens, ctx_lens_host=b.ctx_lens, page_size=PAGE,
    )
    backend = TritonAttentionBackend()
    path = "sdpa" if backend._prefer_sdpa(b.q, meta) else "triton"
    return (lambda: backend.attend(b.q, kv, meta, D**-0.5)), path


def turn_rows() -> None:
    """Module doc, second table: a session turn's row with its keys not split, split, and split with the query heads
    of each KV head packed into one block (same run; the last is what the engine runs), as CUDA-graph replays."""
    from splitserve.benchmarks.kernels_common import graph_ms
    from splitserve.kernels.attention import ref_paged_attention

    print(f"\n{'ctx':>5} {'q_len':>5} {'one split ms':>12} {'split ms':>9} {'packed ms':>9} {'KV GB/s':>8} "
          f"{'packed vs split':>15} {'max err':>8}")
    for ctx in (2048, 3072, 4096):
        b = make_paged_batch([ctx], [65], HQ, HKV, D, PAGE, torch.bfloat16, "cuda")
        fns = (_triton_fn(b, num_splits=1, pack_gqa=False), _triton_fn(b, max_context_len=ctx, pack_gqa=False),
               _triton_fn(b, max_context_len=ctx))
        ref = ref_paged_attention(b.q, b.k_pages, b.v_pages, b.cu_seqlens_q, b.context_lens, b.block_tables, D**-0.5)
        err = max((f() - ref).abs().max().item() for f in fns)
        one, split, packed = (graph_ms(f) for f in fns)
        kv_gb = 2 * ctx * HKV * D * 2 / 1e9
        print(f"{ctx:5d} {65:5d} {one:12.3f} {split:9.3f} {packed:9.3f} {kv_gb / packed * 1e3:8.0f} "
              f"{split / packed:14.2f}x {err:8.4f}")


def _flops(n: int, ctx: int, q_len: int) -> float:
    visible = sum(ctx - q_len + i + 1 for i in range(q_len))
    return 4.0 * n * HQ * D * visible


def tune(n: int, ctx: int) -> None:
    b = make_paged_batch([ctx] * n, [ctx] * n, HQ, HKV, D, PAGE, torch.bfloat16, "cuda")
    rows = []
    for bm, bn, nw, ns in itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3, 4]):
        try:
            rows.append((bench_ms(_triton_fn(b, block_m=bm, block_n=bn, num_warps=nw, num_stages=ns), 10, 50), bm, bn, nw, ns))
        except Exception as exc:  # noqa: BLE001 -- an out-of-resources config is skipped and reported
            print(f"  skip bm={bm} bn={bn} w={nw} s={ns}: {type(exc).__name__}")
    rows.sort()
    print(f"tune {n} x {ctx}: best 5 of {len(rows)}")
    for ms, bm, bn, nw, ns in rows[:5]:
        print(f"  block_m={bm} block_n={bn} warps={nw} stages={ns}  {ms:.3f} ms  {_flops(n, ctx, ctx)/ms/1e9:.0f} TFLOP/s")


def tune_turn(ctx: int, top: int = 8) -> None:
    """A session turn's row as a mixed CUDA graph launches it (its spare prefill rows empty, the 128-query bucket,
    the 4,096 context bucket, keys split for one row), in a CUDA graph (device time, no launch cost): tiles, warps,
    stages and split counts, the default first, then the fastest."""
    from splitserve.benchmarks.kernels_common import graph_ms, kernel_us
    from splitserve.kernels.attention import ref_paged_attention

    b = make_paged_batch([ctx, 1, 1, 1], [65, 0, 0, 0], HQ, HKV, D, PAGE, torch.bfloat16, "cuda")
    ref = ref_paged_attention(b.q, b.k_pages, b.v_pages, b.cu_seqlens_q, b.context_lens, b.block_tables, D**-0.5)
    rows = []
    for bm, bn, nw, ns, splits in itertools.product([32, 64, 128], [32, 64], [4, 8], [2, 3], [None, 16, 32]):
        fn = _triton_fn(b, max_q=128, max_context_len=4096, split_rows=1, block_m=bm, block_n=bn, num_warps=nw,
                        num_stages=ns, num_splits=splits)
        try:
            err = (fn()[:65] - ref[:65]).abs().max().item()
            rows.append((graph_ms(fn), bm, bn, nw, ns, str(splits or "default"), err))
        except Exception as exc:  # noqa: BLE001 -- an out-of-resources config is skipped and reported
            print(f"  skip bm={bm} bn={bn} w={nw} s={ns} splits={splits}: {type(exc).__name__}")
    default = next(r for r in rows if r[1:6] == (64, 64, 4, 2, "default"))
    print(f"\nturn row in the mixed graph's launch, context {ctx}: {len(rows)} settings, default first, then the "
          f"fastest {top}")
    print(f"{'ms':>7} {'block_m':>7} {'block_n':>7} {'warps':>5} {'stages':>6} {'splits':>7} {'vs default':>10} "
          f"{'max err':>8}")
    for r in [default, *sorted(rows)[:top]]:
        print(f"{r[0]:7.4f} {r[1]:7d} {r[2]:7d} {r[3]:5d} {r[4]:6d} {r[5]:>7} {default[0] / r[0]:9.2f}x "
              f"{r[6]:8.4f}")
    exact = make_paged_batch([ctx], [65], HQ, HKV, D, PAGE, torch.bfloat16, "cuda")
    print("device us per kernel (torch profiler):")
    for label, fn in (("as the graph launches it, default", _triton_fn(b, max_q=128, max_context_len=4096,
                                                                        split_rows=1)),
                      ("as the graph launches it, keys not split", _triton_fn(b, max_q=128, num_splits=1)),
                      ("as the graph launches it, 32 splits", _triton_fn(b, max_q=128, max_context_len=4096,
                                                                          split_rows=1, num_splits=32)),
                      ("one row, exact bounds, default", _triton_fn(exact, max_context_len=ctx)),
                      ("one row, exact bounds, not split", _triton_fn(exact, num_splits=1))):
        times = kernel_us(fn)
        print(f"  {label}: " + ", ".join(f"{k[:40]} {v:.1f}" for k, v in sorted(times.items(), key=lambda kv: -kv[1])))


def turn_splits(ctx: int) -> None:
    """The turn row as a mixed CUDA graph launches it (as :func:`tune_turn`), default tiles, over split counts,
    then over the query heads one merge program combines: graph time and each kernel's device time."""
    from splitserve.benchmarks.kernels_common import graph_ms, kernel_us

    b = make_paged_batch([ctx, 1, 1, 1], [65, 0, 0, 0], HQ, HKV, D, PAGE, torch.bfloat16, "cuda")
    print(f"\nturn row at context {ctx} in the mixed graph's launch (bound 4,096, 128-query bucket): splits, "
          "graph us, kernel us")

    def line(label: object, **kw) -> str:
        fn = _triton_fn(b, max_q=128, max_context_len=4096, split_rows=1, **kw)
        times = sorted(kernel_us(fn).items(), key=lambda kv: -kv[1])
        return f"  {str(label):>7} {graph_ms(fn) * 1e3:7.1f}  " + ", ".join(f"{k[:24]} {v:.1f}" for k, v in times)

    for splits in (None, 2, 3, 4, 6, 8, 12, 16):
        print(line(splits or "default", num_splits=splits))
    print("  the default split count, query heads a merge program combines: graph us, kernel us")
    for heads in (1, 2, 4, 8, 16, 32):
        print(line(heads, merge_heads=heads))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tune", action="store_true")
    p.add_argument("--tune-turn", action="store_true", help="only the turn row's launch settings (tune_turn)")
    p.add_argument("--turn-splits", action="store_true", help="only the turn row's split counts (turn_splits)")
    args = p.parse_args()
    if args.turn_splits:
        for ctx in (2112, 3136):
            turn_splits(ctx)
        return
    if args.tune_turn:
        for ctx in (2112, 3136):
            tune_turn(ctx)
        return
    print(header("paged prefill attention vs torch SDPA, Llama-3-8B heads, bf16, page 16"))
    print(f"bf16 matmul 8192^3: {matmul_tflops():.0f} TFLOP/s")
    if args.tune:
        tune(4, 2048)
    print(f"{'prompts':>7} {'ctx':>5} {'q_len':>5} {'triton_ms':>9} {'TFLOP/s':>8} {'sdpa_ms':>8} {'TFLOP/s':>8} "
          f"{'triton/sdpa':>11} {'backend_ms':>10} {'path':>6} {'TFLOP/s':>8}")
    for n, ctx, q_len in [(1, 2048, 2048), (4, 2048, 2048), (16, 2048, 2048), (4, 2048, 512), (64, 256, 256)]:
        b = make_paged_batch([ctx] * n, [q_len] * n, HQ, HKV, D, PAGE, torch.bfloat16, "cuda")
        t_ms, s_ms = bench_ms(_triton_fn(b)), bench_ms(_sdpa_fn(b, n, ctx, q_len))
        fn, path = _backend_fn(b)
        b_ms = bench_ms(fn)
        fl = _flops(n, ctx, q_len)
        print(f"{n:7d} {ctx:5d} {q_len:5d} {t_ms:9.3f} {fl/t_ms/1e9:8.0f} {s_ms:8.3f} {fl/s_ms/1e9:8.0f} "
              f"{s_ms/t_ms:10.2f}x {b_ms:10.3f} {path:>6} {fl/b_ms/1e9:8.0f}")
    turn_rows()


if __name__ == "__main__":
    main()
