"""Helpers for the GPU kernel benchmarks (benchmarks/bench_*.py): header line, timing, copy-bandwidth baseline.

Scripts import only torch, triton and ``splitserve.kernels`` so they run on the GPU image without project deps.
"""

from __future__ import annotations

import datetime
from typing import Callable

import torch


def header(title: str) -> str:
    """One line naming the benchmark, the card, the date and the software versions."""
    import triton

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return f"# {title} | card: {card} | date: {datetime.date.today()} | torch {torch.__version__} | triton {triton.__version__}"


def bench_ms(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of ``fn`` timed with CUDA events (triton.testing.do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy of ``nbytes``: GB/s counting bytes read plus bytes written (the memory ceiling)."""
    bufs = [torch.randn(nbytes // 4, device="cuda")]
    bufs.append(torch.empty_like(bufs[0]))
    ms = bench_ms(lambda: bufs[1].copy_(bufs[0]))
    bufs.clear()
    torch.cuda.empty_cache()
    return 2 * nbytes / ms / 1e6


def matmul_tflops(n: int = 8192) -> float:
    """bf16 ``n x n x n`` matmul rate in TFLOP/s on random data (the compute ceiling)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


def kernel_us(fn: Callable[[], object], calls: int = 20) -> dict[str, float]:
    """Device microseconds per call of each kernel ``fn`` launches (torch profiler; launch gaps not counted)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / calls for e in prof.key_averages() if e.device_time_total > 0}


def graph_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of one CUDA-graph replay of ``fn`` (how the decode engine runs it: no launch overhead)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay)
