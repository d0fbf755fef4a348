"""Random inputs shared by tests/test_kernels.py and the GPU scripts in benchmarks/ (no project imports)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedBatch:
    """A random packed batch over a shuffled page pool.

    Attributes:
        q: ``[T, Hq, D]``; k_pages / v_pages: ``[P, S, Hkv, D]``; block_tables: int32 ``[B, max_pages]``
        (padding entries point at page 0); context_lens / cu_seqlens_q: int32 ``[B]`` / ``[B + 1]``.
    """

    q: torch.Tensor
    k_pages: torch.Tensor
    v_pages: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    q_lens: list[int]
    ctx_lens: list[int]


def make_paged_batch(
    ctx_lens: list[int],
    q_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
) -> PagedBatch:
    """Random K/V pages (a few spare, pages shuffled so sequences are scattered) and queries for each sequence."""
    if any(q > c for q, c in zip(q_lens, ctx_lens)):
        raise ValueError("every q_len must be <= its context_len")
    n_pages = [(c + page_size - 1) // page_size for c in ctx_lens]
    total = sum(n_pages) + 2
    def rnd(*shape: int) -> torch.Tensor:
        if generator is None:  # draw on the device: large GPU batches would take long on the CPU
            return torch.randn(*shape, device=device, dtype=dtype)
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)
    k_pages, v_pages = rnd(total, page_size, num_kv_heads, head_dim), rnd(total, page_size, num_kv_heads, head_dim)
    perm = torch.randperm(total, generator=generator)
    tables = torch.zeros(len(ctx_lens), max(max(n_pages, default=1), 1), dtype=torch.int32)
    used = 0
    for b, n in enumerate(n_pages):
        tables[b, :n] = perm[used : used + n].to(torch.int32)
        used += n
    cu = torch.tensor([0, *torch.tensor(q_lens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)
    return PagedBatch(
        q=rnd(int(cu[-1]), num_heads, head_dim), k_pages=k_pages, v_pages=v_pages,
        block_tables=tables.to(device), context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
        cu_seqlens_q=cu.to(device), q_lens=list(q_lens), ctx_lens=list(ctx_lens),
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN anywhere gives ``inf``."""
    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return float("inf")
    return float((o - r).norm() / r.norm().clamp_min(1e-30))
