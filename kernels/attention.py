"""Paged attention kernels (Triton) for GQA models, with torch references.

KV pages layout (one layer, K and V separately)::

    k_pages, v_pages: [num_pages, page_size, num_kv_heads, head_dim]   (model dtype)

Token ``i`` of sequence ``b`` lives at ``page = block_tables[b, i // page_size]``, row ``i % page_size``.
Query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)`` (Hugging Face ``repeat_kv`` order).

Queries are packed along the token axis (varlen): sequence ``b`` owns query rows
``cu_seqlens_q[b]:cu_seqlens_q[b+1]``, which are the *last* ``q_len_b`` of its ``context_lens[b]`` tokens,
so query ``i`` sits at position ``context_lens[b] - q_len_b + i`` and sees keys ``0..`` that position.

Two kernels:

* :func:`paged_decode_attention` (one query per sequence): flash-decoding. The grid is
  ``(batch, kv_heads, num_splits)``; each program loads one KV head's pages once for all the query heads
  of its group (``tl.dot`` over the group padded to 16 rows), keeps an online softmax over its share of
  the context, and a second small kernel merges the splits by their log-sum-exp. The split count is fixed per
  launch from its longest context (a CUDA graph's bucket) to fill whole waves of programs
  (:func:`default_num_splits`); each sequence's own context is cut into that many shares.
* :func:`paged_prefill_attention` (any query lengths, causal, cached prefix): flash attention over the
  pages, grid ``(q_blocks * num_splits, batch, num_heads)``; key blocks entirely below the causal diagonal run
  without masks. Few query blocks over a long cached context (an agent session's next turn: 65 new tokens behind
  3,000 held ones) would leave most multiprocessors idle while each program walks the whole context, so, given
  the context bound, the keys are split as in decode (:func:`default_prefill_splits`) and a second kernel merges
  each row's splits by their log-sum-exp (:func:`_merge_splits`, shared with decode), :data:`MERGE_HEADS` query
  heads a program. Launches of short rows
  (:data:`PACK_GQA_MAX_Q`) pack the query heads of each KV head into one block of (query, head) rows, grid
  ``(q_blocks * num_splits, batch, kv_heads)``: each KV tile is read once for its group, and the blocks carry less
  padding (a turn's 65 tokens took two blocks of 64 per head).

Split counts and query bounds are runtime arguments that Triton does not specialize on (only whether the keys are
split at all is a compile-time constant, and the decode merge's padded split count; the prefill merge reads
:data:`MERGE_CHUNK` splits at a time), nor are the page tables' row stride and the alignment of the per-sequence
arrays, which a mixed step passes from its first prefill row on (an offset of as many rows as it has decode rows):
a worker compiles each kernel a few times at warm-up (:func:`compile_variants` launches every variant once), never
again for a new batch size while it serves (one compile of the decode kernel mid-serving stalled every request of a
step for 1-2 s on an H200, and one of the prefill kernel 0.66 s in the tenth session).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_MIN_SPLIT_TOKENS = 256
MAX_DECODE_SPLITS = 128
"""Most key splits of a decode launch (:func:`default_num_splits`)."""
MAX_PREFILL_SPLITS = 64
"""Most key splits of a prefill launch. The split count, the query bound and the split length are runtime
arguments, so a serving worker compiles the prefill kernel twice (split or not) and its merge once, not once per
step shape."""
MERGE_CHUNK = 16
"""Splits a prefill launch's merge reads at a time (its loop runs over the launch's split count, a runtime value)."""
MERGE_HEADS = 8
"""Query heads one program of a prefill launch's split merge combines. A session turn's row in a mixed graph's launch
(a 128-query bucket, 4 row slots, 32 heads) merged in 12.0 us a layer one head a program, 4.6 us with 8 (2: 7.5, 4:
5.4, 16: 6.2, 32: 82; H200, eleventh session)."""
PACK_GQA_MAX_Q = 256
"""Prefill launches of at most this many queries a sequence pack each KV head's query heads into one block (a
session turn's 65 new tokens behind thousands held: per layer, each KV tile is read once for its 4 query heads, and
65 x 4 rows fill 5 blocks of 64 where 65 queries took 2 blocks, mostly padding, for each of 32 heads)."""


# ----------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------


def ref_paged_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Reference causal attention over pages, computed in float32 (float64 for float64 q) one sequence at a time.

    Args:
        q: ``[T, Hq, D]`` packed queries (any float dtype).
        k_pages, v_pages: ``[P, S, Hkv, D]`` (``Hq % Hkv == 0``).
        cu_seqlens_q: int32 ``[B + 1]``; context_lens: int32 ``[B]``; block_tables: int32 ``[B, max_pages]``.
        scale: softmax scale.
    Returns:
        ``[T, Hq, D]`` in ``q.dtype``.
    """
    out = torch.zeros_like(q)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    page_size, group = k_pages.shape[1], q.shape[1] // k_pages.shape[2]
    cu, ctxs = cu_seqlens_q.tolist(), context_lens.tolist()
    for b, ctx in enumerate(ctxs):
        q_start, q_len = cu[b], cu[b + 1] - cu[b]
        if q_len == 0 or ctx == 0:
            continue
        pages = block_tables[b, : (ctx + page_size - 1) // page_size].long()
        k = k_pages[pages].reshape(-1, *k_pages.shape[2:])[:ctx].to(acc_dtype).repeat_interleave(group, dim=1)
        v = v_pages[pages].reshape(-1, *v_pages.shape[2:])[:ctx].to(acc_dtype).repeat_interleave(group, dim=1)
        qb = q[q_start : q_start + q_len].to(k.dtype)
        scores = torch.einsum("qhd,khd->hqk", qb, k) * scale
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(ctx, device=q.device)[None, :] > q_pos, float("-inf"))
        out[q_start : q_start + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out


# ----------------------------------------------------------------------------------------------
# shared inner loop
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attn_blocks(
    q, m_i, l_i, acc, k_base, v_base, bt_row, lo, hi, q_pos,
    sk_p, sk_s, sv_p, sv_s, offs_d, d_mask, scale_log2,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Online-softmax accumulation of keys ``[lo, hi)`` of one KV head into ``(m_i, l_i, acc)``.

    ``q`` is ``[M, D_PAD]``; ``q_pos`` ``[M]`` the query positions (used when ``MASK``: key <= q_pos and
    key < hi). Without ``MASK`` every key in ``[lo, hi)`` must be visible to every row.

    A tile's K and V loads are issued together, their page ids loaded one tile ahead. On an H200 that was 1-5%
    faster than page ids, K, then V in turn (a session turn's row, decode rows); loading the next tile's K and V a
    whole tile ahead was slower (benchmarks/RESULTS.md, ninth session). A few programs with many tiles each (a
    session turn's row behind a long context) are bound by each tile's arithmetic, about 1.7 us a 64 x 64 tile.
    """
    offs_b = tl.arange(0, BLOCK_N)
    page = tl.load(bt_row + (lo + offs_b) // PAGE, mask=lo + offs_b < hi, other=0).to(tl.int64)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + offs_b
        n_mask = offs_n < hi
        row = (offs_n % PAGE).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + (page * sk_p + row * sk_s)[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + (page * sv_p + row * sv_s)[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        nxt = offs_n + BLOCK_N
        page = tl.load(bt_row + nxt // PAGE, mask=nxt < hi, other=0).to(tl.int64)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        if MASK:
            visible = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = m_new
        if MASK:  # a row may see none of these keys (a split past its position): keep it at zero, not NaN
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _split_len(ctx, num_splits, BLOCK_N: tl.constexpr):
    """Keys a split of a sequence of ``ctx`` keys takes: its own context cut in ``num_splits``, in whole tiles. The
    split count is fixed at launch from the launch's longest context (a CUDA graph's bucket); cutting each
    sequence's own context keeps every split busy, where cutting the bound left a sequence shorter than it the first
    splits only (a decode row of 3,072 keys in a 4,096 graph of 6 splits: 4 full, a fifth of 256 keys, a sixth
    empty)."""
    return tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 models must match the CPU path: no tf32 in the matrix units.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_paged_args(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_tables: torch.Tensor) -> None:
    if q.dim() != 3 or k_pages.dim() != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"bad shapes: q {tuple(q.shape)}, k_pages {tuple(k_pages.shape)}, v_pages {tuple(v_pages.shape)}")
    if q.shape[1] % k_pages.shape[2] != 0 or q.shape[2] != k_pages.shape[3]:
        raise ValueError(f"q heads/dim {tuple(q.shape[1:])} incompatible with kv {tuple(k_pages.shape[2:])}")
    if q.stride(2) != 1 or k_pages.stride(3) != 1 or v_pages.stride(3) != 1:
        raise ValueError("q, k_pages and v_pages need a contiguous last (head_dim) axis")
    if block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32, got {block_tables.dtype}")


# ----------------------------------------------------------------------------------------------
# decode (flash-decoding)
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_splits", "sbt"], do_not_specialize_on_alignment=["bt_ptr", "ctx_ptr"])
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, out_ptr, mid_o_ptr, mid_lse_ptr,
    scale_log2, num_splits,
    sq_b, sq_h, sk_p, sk_s, sk_h, sv_p, sv_s, sv_h, sbt, so_b, so_h,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    split_len = _split_len(ctx, num_splits, BLOCK_N)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, ctx)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D_PAD)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    q_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + offs_d[None, :], mask=q_mask, other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    k_base = k_ptr + kvh * sk_h
    v_base = v_ptr + kvh * sv_h
    bt_row = bt_ptr + b.to(tl.int64) * sbt
    full_hi = tl.maximum(lo + ((hi - lo) // BLOCK_N) * BLOCK_N, lo)
    q_pos = tl.zeros([GROUP_PAD], tl.int32) + (hi - 1)
    m_i, l_i, acc = _attn_blocks(q, m_i, l_i, acc, k_base, v_base, bt_row, lo, full_hi, q_pos,
                                 sk_p, sk_s, sv_p, sv_s, offs_d, d_mask, scale_log2,
                                 PAGE, BLOCK_N, False, DOT_PREC)
    m_i, l_i, acc = _attn_blocks(q, m_i, l_i, acc, k_base, v_base, bt_row, full_hi, hi, q_pos,
                                 sk_p, sk_s, sv_p, sv_s, offs_d, d_mask, scale_log2,
                                 PAGE, BLOCK_N, True, DOT_PREC)
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if not SPLIT:
        tl.store(out_ptr + b * so_b + heads[:, None] * so_h + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        row = (b * (GROUP * tl.num_programs(1)) + heads) * num_splits + split
        tl.store(mid_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=q_mask)
        tl.store(mid_lse_ptr + row, lse, mask=g_mask)


@triton.jit
def _merge_splits(mid_o_ptr, mid_lse_ptr, first, h_mask, out_ptr, out_offs, num_splits, HEAD_DIM: tl.constexpr,
                  D_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """Merge, for a block of heads at once, each head's ``num_splits`` partial rows ``first[h] ..`` of ``mid_o``
    [*, HEAD_DIM] (fp32, each normalised over its split) by their log2-sum-exp in ``mid_lse`` into ``out_ptr +
    out_offs[h]``; ``first``, ``h_mask`` and ``out_offs`` are ``[H]``. ``CHUNK`` splits at a time (a running max
    and sum, so the work follows ``num_splits`` rather than a padded bound); splits with no keys (-inf) weigh
    nothing."""
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    mx = tl.full(first.shape, float("-inf"), tl.float32)
    denom = tl.zeros(first.shape, tl.float32)
    acc = tl.zeros([first.shape[0], D_PAD], tl.float32)
    for s0 in range(0, num_splits, CHUNK):
        offs_s = s0 + tl.arange(0, CHUNK)
        row = first[:, None] + offs_s[None, :]  # [H, CHUNK]
        hs_mask = h_mask[:, None] & (offs_s < num_splits)[None, :]
        lse = tl.load(mid_lse_ptr + row, mask=hs_mask, other=float("-inf"))
        new = tl.maximum(mx, tl.max(lse, 1))
        use = tl.where(new == float("-inf"), 0.0, new)
        w = tl.math.exp2(lse - use[:, None])
        o = tl.load(mid_o_ptr + row[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                    mask=hs_mask[:, :, None] & d_mask[None, None, :], other=0.0)  # [H, CHUNK, D_PAD]
        rescale = tl.math.exp2(mx - use)
        acc = acc * rescale[:, None] + tl.sum(w[:, :, None] * o, 1)
        denom = denom * rescale + tl.sum(w, 1)
        mx = new
    res = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    tl.store(out_ptr + out_offs[:, None] + offs_d[None, :], res.to(out_ptr.dtype.element_ty),
             mask=h_mask[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    mid_o_ptr, mid_lse_ptr, out_ptr, so_b, so_h, num_splits,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CHUNK: tl.constexpr,
):
    # One head a program, as a block of one: blocks of up to 8 heads were up to 6% slower at batches of 1-8 (and
    # up to 2% faster at 128-256) on an H200; even the block of one cost up to 0.65 us (1 x 4,096) against the
    # scalar merge this replaced, median 0.7% over the decode table (eleventh session).
    b = tl.program_id(0)
    h = tl.program_id(1) + tl.zeros([1], tl.int32)
    _merge_splits(mid_o_ptr, mid_lse_ptr, (b * NUM_HEADS + h) * num_splits, h < NUM_HEADS, out_ptr,
                  b * so_b + h * so_h, num_splits, HEAD_DIM, D_PAD, CHUNK)


@functools.lru_cache(maxsize=16)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4


DECODE_PROGRAMS_PER_SM = 4
"""Decode programs a multiprocessor runs at once, as :func:`default_num_splits` counts waves."""


def default_num_splits(batch: int, num_kv_heads: int, max_context_len: int, device: torch.device,
                       block_n: int = 64) -> int:
    """Key splits of a decode launch of ``batch * kv_heads`` programs a split, each split >= 256 keys: the count
    with the fewest rounds of key tiles, counted as (waves of :data:`DECODE_PROGRAMS_PER_SM` programs a
    multiprocessor) x (tiles a split); a tie goes to fewer splits, and two at least where the context allows (the
    unsplit kernel was 1.17x slower than two splits at 64 x 1,024 on an H200).

    A count that spills a few programs into a second wave pays a whole extra round: on an H200 at 16 x 4,096, 5
    splits (640 programs) took 95 us and 4 (512) 82 us; the earlier rule (cover the multiprocessors about 4 times,
    rounding up) picked 5 (benchmarks/RESULTS.md, eleventh session)."""
    cap = max(1, min(max_context_len // _MIN_SPLIT_TOKENS, MAX_DECODE_SPLITS))
    return _wave_splits(batch * num_kv_heads, triton.cdiv(max(max_context_len, 1), block_n), cap,
                        DECODE_PROGRAMS_PER_SM * _num_sms(device))


@functools.lru_cache(maxsize=4096)
def _wave_splits(programs: int, tiles: int, cap: int, slots: int) -> int:
    """:func:`default_num_splits`' choice: ``s`` in [min(2, cap), cap] with the fewest ceil(programs * s / slots)
    * ceil(tiles / s); the smallest such ``s``."""
    return min(range(min(2, cap), cap + 1),
               key=lambda s: (triton.cdiv(max(programs, 1) * s, slots) * triton.cdiv(tiles, s), s))


def paged_decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_context_len: int,
    num_splits: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention (one query token per sequence) over paged KV, GQA, split-K.

    Args:
        q: ``[B, Hq, D]`` model dtype (float32, float16 or bfloat16), head_dim contiguous.
        k_pages, v_pages: ``[P, S, Hkv, D]`` model dtype, ``Hq % Hkv == 0``; any page size S.
        block_tables: int32 ``[B, max_pages]``; context_lens: int32 ``[B]`` (KV tokens, the query's own included;
            0 gives a zero output row, e.g. for padded CUDA-graph batches).
        scale: softmax scale. max_context_len: host int >= every context_lens entry (fixes the grid; a
            CUDA-graph runner passes its capture bound).
        num_splits: context splits per (sequence, kv head); None picks :func:`default_num_splits`.
        out: optional ``[B, Hq, D]`` output buffer (model dtype).
    Returns:
        ``[B, Hq, D]`` in ``q.dtype``.
    """
    _check_paged_args(q, k_pages, v_pages, block_tables)
    batch, num_heads, head_dim = q.shape
    num_kv = k_pages.shape[2]
    group = num_heads // num_kv
    if out is None:
        out = torch.empty_like(q)
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv, max_context_len, q.device, block_n)
    d_pad = max(16, triton.next_power_of_2(head_dim))
    mid_o = mid_lse = out  # unused placeholders when there is a single split
    if num_splits > 1:
        mid_o = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(batch, num_kv, num_splits)](
        q, k_pages, v_pages, block_tables, context_lens, out, mid_o, mid_lse,
        scale * LOG2E, num_splits,
        q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, D_PAD=d_pad,
        PAGE=k_pages.shape[1], BLOCK_N=block_n, SPLIT=num_splits > 1, DOT_PREC=_dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            mid_o, mid_lse, out, out.stride(0), out.stride(1), num_splits,
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, D_PAD=d_pad,
            CHUNK=max(2, triton.next_power_of_2(num_splits)), num_warps=4,
        )
    return out


# ----------------------------------------------------------------------------------------------
# prefill (causal, varlen, cached prefix)
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_splits", "max_q", "sbt"],
            do_not_specialize_on_alignment=["cu_q_ptr", "ctx_ptr", "bt_ptr"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, cu_q_ptr, ctx_ptr, bt_ptr, mid_o_ptr, mid_lse_ptr, scale_log2, split_len,
    num_splits, max_q,
    sq_t, sq_h, sk_p, sk_s, sk_h, sv_p, sv_s, sv_h, sbt, so_t, so_h,
    GROUP: tl.constexpr, PACK: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    # A block's rows are (query, head) pairs: PACK heads of one query after another (PACK == GROUP: the heads of one
    # KV head, which is then loaded once for all of them; PACK == 1: one head, as program_id(2) says).
    mb = tl.program_id(0) // num_splits
    split = tl.program_id(0) % num_splits
    b = tl.program_id(1)
    hb = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    if mb * BLOCK_M < q_len * PACK:
        ctx = tl.load(ctx_ptr + b)
        prefix = ctx - q_len
        offs_r = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_m = offs_r // PACK
        heads = hb * PACK + offs_r % PACK
        offs_d = tl.arange(0, D_PAD)
        d_mask = offs_d < HEAD_DIM
        io_mask = (offs_m < q_len)[:, None] & d_mask[None, :]
        rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * sq_t + heads[:, None] * sq_h + offs_d[None, :], mask=io_mask, other=0.0)
        kvh = (hb * PACK) // GROUP
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        q_pos = prefix + offs_m
        hi = tl.minimum(prefix + ((mb + 1) * BLOCK_M - 1) // PACK + 1, ctx)
        full_hi = ((prefix + (mb * BLOCK_M) // PACK) // BLOCK_N) * BLOCK_N
        lo = 0
        if SPLIT:  # this program's share of the keys: [lo, hi)
            lo = split * split_len
            hi = tl.minimum(lo + split_len, hi)
        k_base = k_ptr + kvh * sk_h
        v_base = v_ptr + kvh * sv_h
        bt_row = bt_ptr + b.to(tl.int64) * sbt
        m_i, l_i, acc = _attn_blocks(q, m_i, l_i, acc, k_base, v_base, bt_row, lo, tl.minimum(full_hi, hi), q_pos,
                                     sk_p, sk_s, sv_p, sv_s, offs_d, d_mask, scale_log2,
                                     PAGE, BLOCK_N, False, DOT_PREC)
        m_i, l_i, acc = _attn_blocks(q, m_i, l_i, acc, k_base, v_base, bt_row, tl.maximum(full_hi, lo), hi, q_pos,
                                     sk_p, sk_s, sv_p, sv_s, offs_d, d_mask, scale_log2,
                                     PAGE, BLOCK_N, True, DOT_PREC)
        has = l_i > 0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        if not SPLIT:
            tl.store(o_ptr + rows[:, None] * so_t + heads[:, None] * so_h + offs_d[None, :],
                     o.to(o_ptr.dtype.element_ty), mask=io_mask)
        else:  # partial row (b, i, h, split) of mid_o [B, max_q, H, num_splits, HEAD_DIM]; merged by the next kernel
            lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf"))
            mid = ((b * max_q + offs_m).to(tl.int64) * (tl.num_programs(2) * PACK) + heads) * num_splits + split
            tl.store(mid_o_ptr + mid[:, None] * HEAD_DIM + offs_d[None, :], o, mask=io_mask)
            tl.store(mid_lse_ptr + mid, lse, mask=offs_m < q_len)


@triton.jit(do_not_specialize=["num_splits", "max_q"], do_not_specialize_on_alignment=["cu_q_ptr"])
def _prefill_reduce_kernel(
    mid_o_ptr, mid_lse_ptr, cu_q_ptr, out_ptr, so_t, so_h, num_splits, max_q,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CHUNK: tl.constexpr, HEADS: tl.constexpr,
):
    i = tl.program_id(0)
    b = tl.program_id(1)
    q_start = tl.load(cu_q_ptr + b)
    if i < tl.load(cu_q_ptr + b + 1) - q_start:
        heads = tl.program_id(2) * HEADS + tl.arange(0, HEADS)
        first = ((b * max_q + i).to(tl.int64) * NUM_HEADS + heads) * num_splits
        _merge_splits(mid_o_ptr, mid_lse_ptr, first, heads < NUM_HEADS, out_ptr,
                      (q_start + i).to(tl.int64) * so_t + heads * so_h, num_splits, HEAD_DIM, D_PAD, CHUNK)


def default_prefill_splits(q_blocks: int, batch: int, num_heads: int, max_context_len: int,
                           device: torch.device) -> int:
    """Key splits for a prefill launch of ``q_blocks * batch * num_heads`` programs: enough to cover the
    multiprocessors about 4 times, each split >= 256 keys, at most :data:`MAX_PREFILL_SPLITS`; 1 (no split) when
    the query blocks already cover them. (The decode rule, :func:`default_num_splits`, was measured on decode
    launches only; a session turn's row at 2,112 and 3,136 keys in a 4,096 graph was no faster with other counts
    by more than a few us a layer, eleventh session.)"""
    wanted = triton.cdiv(4 * _num_sms(device), max(q_blocks * batch * num_heads, 1))
    return int(max(1, min(wanted, max_context_len // _MIN_SPLIT_TOKENS, MAX_PREFILL_SPLITS)))


def _prefill_split_count(num_splits: int | None, max_context_len: int | None, q_blocks: int, rows: int, heads: int,
                         device: torch.device) -> int:
    """:func:`paged_prefill_attention`'s split count: as given (checked), else 1 without the context bound, else
    :func:`default_prefill_splits`."""
    if num_splits is not None and num_splits > 1 and max_context_len is None:
        raise ValueError("num_splits > 1 needs max_context_len (the splits divide it)")
    if num_splits is None:
        num_splits = 1 if max_context_len is None else default_prefill_splits(q_blocks, rows, heads, max_context_len,
                                                                               device)
    if not 1 <= num_splits <= MAX_PREFILL_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_PREFILL_SPLITS}], got {num_splits}")
    return num_splits


def paged_prefill_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_q_len: int,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    out: torch.Tensor | None = None,
    max_context_len: int | None = None,
    num_splits: int | None = None,
    split_rows: int | None = None,
    pack_gqa: bool | None = None,
    merge_heads: int = MERGE_HEADS,
) -> torch.Tensor:
    """Causal attention of packed varlen queries over paged KV that already holds them (cached prefixes ok).

    Args:
        q: ``[T, Hq, D]`` model dtype, head_dim contiguous; rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` are the last
            ``q_len_b`` tokens of sequence ``b``.
        k_pages, v_pages: ``[P, S, Hkv, D]`` model dtype.
        cu_seqlens_q: int32 ``[B + 1]``; context_lens: int32 ``[B]`` (>= q_len_b); block_tables: int32 ``[B, max_pages]``.
        scale: softmax scale. max_q_len: host int >= every q_len_b (fixes the grid).
        block_m / block_n: query / key tile (powers of two >= 16).
        out: optional ``[T, Hq, D]`` output buffer.
        max_context_len: host int >= every context_lens entry; given, the keys may be split (module doc).
        num_splits: key splits per query block; None picks :func:`default_prefill_splits` (1 without
            ``max_context_len``) for ``split_rows`` sequences (None: all ``B``; fewer when most are empty, as in a
            mixed CUDA graph's spare prefill rows).
        pack_gqa: a query block holds the query heads of one KV head for fewer queries (each KV tile is loaded once
            for the group); None: when ``max_q_len <= PACK_GQA_MAX_Q``.
        merge_heads: query heads one program of the split merge combines (a power of two).
    Returns:
        ``[T, Hq, D]`` in ``q.dtype``.
    """
    _check_paged_args(q, k_pages, v_pages, block_tables)
    if cu_seqlens_q.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("cu_seqlens_q and context_lens must be int32")
    num_heads, head_dim = q.shape[1], q.shape[2]
    batch = context_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if q.shape[0] == 0 or batch == 0:
        return out
    group = num_heads // k_pages.shape[2]
    pack = group if (max_q_len <= PACK_GQA_MAX_Q if pack_gqa is None else pack_gqa) else 1
    q_blocks = triton.cdiv(max(max_q_len, 1) * pack, block_m)
    num_splits = _prefill_split_count(num_splits, max_context_len, q_blocks, batch if split_rows is None else split_rows,
                                      num_heads // pack, q.device)
    max_q = triton.cdiv(q_blocks * block_m, pack)
    split_len = triton.cdiv(triton.cdiv(max(max_context_len or 1, 1), num_splits), block_n) * block_n
    d_pad = max(16, triton.next_power_of_2(head_dim))
    mid_o = mid_lse = out  # unused placeholders when the keys are not split
    if num_splits > 1:
        mid_o = torch.empty(batch, max_q, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(batch, max_q, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _prefill_kernel[(q_blocks * num_splits, batch, num_heads // pack)](
        q, k_pages, v_pages, out, cu_seqlens_q, context_lens, block_tables, mid_o, mid_lse, scale * LOG2E, split_len,
        num_splits, max_q, q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, PACK=pack, HEAD_DIM=head_dim, D_PAD=d_pad,
        PAGE=k_pages.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, DOT_PREC=_dot_precision(q.dtype),
        SPLIT=num_splits > 1, num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _prefill_reduce_kernel[(max_q, batch, triton.cdiv(num_heads, merge_heads))](
            mid_o, mid_lse, cu_seqlens_q, out, out.stride(0), out.stride(1), num_splits, max_q,
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, D_PAD=d_pad, CHUNK=MERGE_CHUNK, HEADS=merge_heads, num_warps=4,
        )
    return out


def compile_variants(k_pages: torch.Tensor, v_pages: torch.Tensor, num_heads: int) -> int:
    """Launch each compile-time variant of the kernels above once, so that a serving worker never compiles one
    mid-step; returns the number of launches. Throwaway queries attend to contexts of one token on page 0 of the real
    pool (``k_pages`` / ``v_pages`` ``[P, S, Hkv, D]``; nothing is written to them).

    Variants: decode unsplit, and split with each padded merge width (2 to 128 splits); prefill split or not, with
    packed query heads or not. The split counts, query bounds, page-table strides and row offsets that vary per step
    are not specialized on (module doc)."""
    dev, dtype, head_dim = k_pages.device, k_pages.dtype, k_pages.shape[-1]
    q = torch.zeros(2, num_heads, head_dim, dtype=dtype, device=dev)
    tables = torch.zeros(2, 1, dtype=torch.int32, device=dev)
    ones = torch.ones(2, dtype=torch.int32, device=dev)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=dev)
    launches = 0
    for splits in [1] + [1 << k for k in range(1, MAX_DECODE_SPLITS.bit_length())]:  # each padded merge width
        paged_decode_attention(q, k_pages, v_pages, tables, ones, 1.0, 512, num_splits=splits)
        launches += 1
    for pack in (True, False):
        for splits in (1, 2):
            paged_prefill_attention(q, k_pages, v_pages, cu, ones, tables, 1.0, 1, max_context_len=512,
                                    num_splits=splits, pack_gqa=pack)
            launches += 1
    return launches


__all__ = [
    "compile_variants",
    "default_num_splits",
    "default_prefill_splits",
    "paged_decode_attention",
    "paged_prefill_attention",
    "ref_paged_attention",
]
