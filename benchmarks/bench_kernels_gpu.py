"""Every splitserve kernel against its torch reference on a GPU, on fresh random inputs of several shapes.

Prints max relative error (``||out - ref|| / ||ref||``) per case and PASS/FAIL against a per-dtype bound; the
elementwise kernels also report whether they match the reference bit for bit. Exit status 1 on any failure.

    python benchmarks/bench_kernels_gpu.py
"""

from __future__ import annotations

import sys

import torch

from splitserve.benchmarks.kernels_common import header
from splitserve.kernels import cache, elementwise
from splitserve.kernels.attention import paged_decode_attention, paged_prefill_attention, ref_paged_attention
from splitserve.kernels.testing import make_paged_batch, rel_err

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _report(rows: list, name: str, err: float, tol: float, exact: str = "") -> None:
    ok = err < tol
    rows.append(ok)
    print(f"{'PASS' if ok else 'FAIL'}  {name:58s} rel_err={err:.2e} (< {tol:.0e}) {exact}")


def check_attention(rows: list) -> None:
    cases = [  # dtype, page, heads, kv_heads, head_dim, ctx lens, q lens (decode when all 1), splits
        (torch.bfloat16, 16, 32, 8, 128, [1, 100, 4096, 777], [1, 1, 1, 1], None),
        (torch.bfloat16, 16, 32, 8, 128, [9000, 33, 5000], [1, 1, 1], 8),
        (torch.float16, 1, 28, 4, 128, [300, 65], [1, 1], 3),
        (torch.float32, 8, 16, 16, 64, [513, 2], [1, 1], None),
        (torch.bfloat16, 32, 64, 8, 128, [2048, 70], [1, 1], 2),
        (torch.bfloat16, 16, 32, 8, 128, [2048, 1500, 300], [2048, 200, 1], None),
        (torch.float32, 16, 32, 8, 128, [700, 129], [700, 64], None),
        (torch.float16, 8, 12, 4, 64, [1000, 333], [17, 333], None),
    ]
    for dtype, page, hq, hkv, d, ctx, ql, splits in cases:
        b = make_paged_batch(ctx, ql, hq, hkv, d, page, dtype, "cuda")
        out = torch.full_like(b.q, float("nan"))
        if max(ql) == 1:
            paged_decode_attention(b.q, b.k_pages, b.v_pages, b.block_tables, b.context_lens, d**-0.5, max(ctx),
                                   num_splits=splits, out=out)
            kind = f"decode splits={splits}"
        else:
            paged_prefill_attention(b.q, b.k_pages, b.v_pages, b.cu_seqlens_q, b.context_lens, b.block_tables, d**-0.5,
                                    max(ql), out=out)
            kind = "prefill"
        ref = ref_paged_attention(b.q.double(), b.k_pages.double(), b.v_pages.double(), b.cu_seqlens_q.cpu(),
                                  b.context_lens.cpu(), b.block_tables.cpu(), d**-0.5)
        _report(rows, f"{kind} {DT[dtype]} page={page} {hq}/{hkv}x{d} ctx={ctx} q={ql}"[:58], rel_err(out, ref), TOL[dtype])


def _exact(got: torch.Tensor, ref: torch.Tensor) -> str:
    return "bit-exact" if torch.equal(got, ref) else f"max|diff|={(got.float() - ref.float()).abs().max().item():.1e}"


def check_elementwise(rows: list) -> None:
    for dtype, t, h in [(torch.bfloat16, 7, 4096), (torch.float16, 33, 896), (torch.float32, 5, 3000)]:
        x, res = torch.randn(t, h, device="cuda", dtype=dtype), torch.randn(t, h, device="cuda", dtype=dtype)
        w = (torch.rand(h, device="cuda") + 0.5).to(dtype)
        got, new_res = elementwise.rms_norm(x, w, 1e-6, res)
        ref, ref_res = elementwise.ref_rms_norm(x, w, 1e-6, res)
        _report(rows, f"rms_norm+residual {DT[dtype]} [{t},{h}]", rel_err(got, ref), TOL[dtype], _exact(got, ref))
        _report(rows, f"rms_norm new_residual {DT[dtype]} [{t},{h}]", rel_err(new_res, ref_res), TOL[dtype], _exact(new_res, ref_res))
        g = elementwise.silu_and_mul(torch.cat([x, res], 1))
        r = elementwise.ref_silu_and_mul(torch.cat([x, res], 1))
        _report(rows, f"silu_and_mul {DT[dtype]} [{t},{2*h}]", rel_err(g, r), TOL[dtype], _exact(g, r))
    for dtype, t, hq, hk, d in [(torch.bfloat16, 9, 32, 8, 128), (torch.float32, 4, 14, 2, 64), (torch.float16, 300, 8, 8, 64)]:
        qkv = torch.randn(t, (hq + 2 * hk) * d, device="cuda", dtype=dtype)
        q, k = qkv[:, : hq * d].view(t, hq, d), qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
        inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float32) / d))
        ang = torch.arange(8192, device="cuda", dtype=torch.float32)[:, None] * inv[None, :]
        cs = torch.cat([ang.cos(), ang.sin()], -1)
        pos = torch.randint(0, 8192, (t,), device="cuda")
        rq, rk = elementwise.ref_rotary(q.clone(), k.clone(), pos, cs)
        elementwise.rotary(q, k, pos, cs)
        _report(rows, f"rotary q {DT[dtype]} [{t},{hq},{d}]", rel_err(q, rq), TOL[dtype], _exact(q, rq))
        _report(rows, f"rotary k {DT[dtype]} [{t},{hk},{d}]", rel_err(k, rk), TOL[dtype], _exact(k, rk))


def check_cache(rows: list) -> None:
    kv = torch.randn(2, 300, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 1000, 8, 128, device="cuda", dtype=torch.bfloat16).unbind(0)
    slots = torch.randperm(300 * 16, device="cuda")[:1000]
    expected = kv.clone()
    cache.ref_reshape_and_cache(k, v, expected, slots)
    cache.reshape_and_cache(k, v, kv, slots)
    _report(rows, "reshape_and_cache bf16 1000 tok page 16", 0.0 if torch.equal(kv, expected) else 1.0, 1e-12, "bit-exact required")
    pool = torch.randn(4, 2, 200, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    pages = torch.randperm(200, device="cuda")[:130].to(torch.int32)
    got = cache.gather_tokens_layers(pool, pages, 5, 2050)
    ok = torch.equal(got, cache.ref_gather_tokens_layers(pool, pages, 5, 2050))
    dst = torch.randn(4, 2, 300, 8, 8, 128, device="cuda", dtype=torch.bfloat16)
    dpages = torch.randperm(300, device="cuda")[:257].to(torch.int32)
    exp = dst.clone()
    cache.scatter_tokens_layers(got, dst, dpages, 5)
    cache.ref_scatter_tokens_layers(got, exp, dpages, 5)
    ok = ok and torch.equal(dst, exp)
    _report(rows, "gather 4 layers page 16 -> scatter page 8, 2045 tok", 0.0 if ok else 1.0, 1e-12, "bit-exact required")


def main() -> int:
    print(header("kernel correctness vs torch references"))
    rows: list[bool] = []
    check_attention(rows)
    check_elementwise(rows)
    check_cache(rows)
    torch.cuda.synchronize()
    print(f"{sum(rows)}/{len(rows)} passed")
    return 0 if all(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
