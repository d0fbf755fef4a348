"""Every Triton kernel against its torch reference on fresh random inputs.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported), so
shapes stay tiny. The interpreter (seen with triton 3.9) computes a bfloat16 ``tl.dot`` and bfloat16 arithmetic
wrongly and truncates float32 -> bfloat16 casts, so the attention kernels are checked here in float32 and float16,
bfloat16 elementwise results to within rounding; benchmarks/bench_kernels_gpu.py checks bfloat16 exactly on a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from splitserve.core.model.attention import AttentionMetadata, TorchAttentionBackend  # noqa: E402
from splitserve.core.model.attention_triton import TritonAttentionBackend, _sdpa_prefill  # noqa: E402
from splitserve.kernels import cache, elementwise  # noqa: E402
from splitserve.kernels.attention import (  # noqa: E402
    default_num_splits, default_prefill_splits, paged_decode_attention, paged_prefill_attention, ref_paged_attention,
)
from splitserve.kernels.testing import make_paged_batch, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _assert_matches(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Elementwise kernels: float32/float16 to rounding; bfloat16 to ~1 ulp (the interpreter truncates bfloat16 casts)."""
    if got.dtype == torch.bfloat16:
        assert rel_err(got, ref) < 1e-2
    else:
        torch.testing.assert_close(got, ref)


def _poison(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize(
    "dtype,page,heads,kv_heads,splits",
    [
        (torch.float32, 16, 4, 2, None),
        (torch.float32, 16, 8, 2, 3),
        (torch.float32, 1, 4, 4, 2),
        (torch.float16, 8, 6, 2, 4),
        (torch.float16, 32, 4, 1, 1),
    ],
)
def test_decode_attention_matches_reference(dtype, page, heads, kv_heads, splits):
    gen = torch.Generator().manual_seed(page * 100 + heads)
    ctx = torch.randint(1, 70, (3,), generator=gen).tolist()
    b = make_paged_batch(ctx, [1] * 3, heads, kv_heads, 32, page, dtype, DEVICE, gen)
    out = _poison(tuple(b.q.shape), dtype)
    paged_decode_attention(b.q, b.k_pages, b.v_pages, b.block_tables, b.context_lens, 0.2, max(ctx),
                           num_splits=splits, block_n=16, out=out)
    ref = ref_paged_attention(b.q, b.k_pages, b.v_pages, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.2)
    assert rel_err(out, ref) < TOL[dtype]


def test_decode_splits_cut_each_sequence_s_own_context():
    """A CUDA graph launches decode with its bucket's bound and split count; each sequence's own context is cut into
    that many whole tiles (a sequence far shorter than the bound leaves the later splits empty, one of no keys at
    all gives a zero row), and the merge still gives the reference."""
    gen = torch.Generator().manual_seed(5)
    b = make_paged_batch([3, 40, 130, 0, 17], [1, 1, 1, 0, 1], 4, 2, 16, 8, torch.float32, DEVICE, gen)
    q = torch.randn(5, 4, 16, generator=gen).to(DEVICE)
    out = paged_decode_attention(q, b.k_pages, b.v_pages, b.block_tables, b.context_lens, 0.3, 512, num_splits=8,
                                 block_n=16, out=_poison((5, 4, 16), torch.float32))
    cu = torch.arange(6, dtype=torch.int32, device=DEVICE)
    ref = ref_paged_attention(q, b.k_pages, b.v_pages, cu, b.context_lens, b.block_tables, 0.3)
    assert rel_err(out, ref) < 1e-5 and torch.equal(out[3], torch.zeros_like(out[3]))


def test_decode_split_count_fills_whole_waves():
    """Off CUDA there are 4 "multiprocessors": waves of 16 programs. The count with the fewest (waves x tiles a
    split) wins, the smaller on a tie, two at least where the context has room for them."""
    cpu = torch.device("cpu")
    assert default_num_splits(1, 2, 4096, cpu) == 8  # 16 programs, one wave of 8 tiles (16 splits: 2 x 4, a tie)
    assert default_num_splits(5, 2, 4096, cpu) == 8  # 80 programs, five full waves; 2 splits (the old rule) 2 x 32
    assert default_num_splits(4, 4, 1024, cpu) == 2  # 16 programs already fill a wave: two splits still beat one
    assert default_num_splits(64, 8, 4096, cpu) == 2
    assert default_num_splits(1, 2, 300, cpu) == 1  # no room for two splits of >= 256 keys


def test_decode_attention_zero_context_row_is_zero():
    b = make_paged_batch([5, 0], [1, 0], 4, 2, 16, 4, torch.float32, DEVICE, torch.Generator().manual_seed(1))
    q = torch.randn(2, 4, 16, device=DEVICE)
    out = paged_decode_attention(q, b.k_pages, b.v_pages, b.block_tables, b.context_lens, 0.25, 5, num_splits=2,
                                 block_n=16, out=_poison((2, 4, 16), torch.float32))
    ref = ref_paged_attention(q, b.k_pages, b.v_pages, torch.tensor([0, 1, 2], dtype=torch.int32), b.context_lens,
                              b.block_tables, 0.25)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert rel_err(out[0], ref[0]) < 1e-5


@pytest.mark.parametrize(
    "dtype,page,ctx,qlens",
    [
        (torch.float32, 16, [40, 23, 9], [40, 5, 1]),   # full prompt, cached prefix, single token
        (torch.float32, 1, [19, 33], [7, 33]),
        (torch.float16, 8, [50, 17], [20, 17]),
    ],
)
@pytest.mark.parametrize("pack", [None, False])  # None: short rows pack each KV head's query heads into a block
def test_prefill_attention_matches_reference(dtype, page, ctx, qlens, pack):
    gen = torch.Generator().manual_seed(sum(ctx))
    b = make_paged_batch(ctx, qlens, 4, 2, 32, page, dtype, DEVICE, gen)
    out = _poison(tuple(b.q.shape), dtype)
    paged_prefill_attention(b.q, b.k_pages, b.v_pages, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.2,
                            max(qlens), block_m=16, block_n=16, num_warps=4, out=out, pack_gqa=pack)
    ref = ref_paged_attention(b.q, b.k_pages, b.v_pages, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.2)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize(
    "dtype,page,ctx,qlens,splits",
    [
        (torch.float32, 16, [40, 23, 9], [40, 5, 1], 3),  # a fresh prompt: early rows see none of the later splits
        (torch.float32, 8, [150, 70], [17, 3], 5),  # short rows behind long cached prefixes (a session's next turn)
        (torch.float16, 4, [97, 64], [33, 64], 2),
        pytest.param(torch.bfloat16, 4, [97, 64], [33, 64], 2, marks=pytest.mark.skipif(
            DEVICE != "cuda", reason="bf16 dot products are not emulated by Triton's interpreter")),
        (torch.float32, 16, [600, 300], [5, 3], None),  # the default split count, from max_context_len: 2
        (torch.float32, 16, [600, 300], [5, 3], 37),  # more splits than the merge reads at once, the last ones empty
    ],
)
@pytest.mark.parametrize("pack", [None, False])
def test_prefill_attention_split_keys_match_reference(dtype, page, ctx, qlens, splits, pack):
    gen = torch.Generator().manual_seed(sum(ctx) + len(qlens))
    b = make_paged_batch(ctx, qlens, 4, 2, 32, page, dtype, DEVICE, gen)
    out = _poison(tuple(b.q.shape), dtype)
    paged_prefill_attention(b.q, b.k_pages, b.v_pages, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.2,
                            max(qlens), block_m=16, block_n=16, out=out, max_context_len=max(ctx) + 7,
                            num_splits=splits, pack_gqa=pack)
    ref = ref_paged_attention(b.q, b.k_pages, b.v_pages, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.2)
    assert rel_err(out, ref) < TOL[dtype] and not out.isnan().any()
    if splits is None and DEVICE == "cpu":
        assert default_prefill_splits(1, 2, 4, max(ctx) + 7, torch.device(DEVICE)) == 2  # the split path ran


@pytest.mark.parametrize("merge_heads", [1, 4, 8])
def test_split_merge_combines_blocks_of_heads(merge_heads):
    """The prefill split merge takes ``merge_heads`` query heads a program: 6 heads in blocks of 4 (the last block
    half empty), of 8 (one block, 2 spare), or one by one all equal the reference."""
    gen = torch.Generator().manual_seed(21)
    b = make_paged_batch([90, 40], [9, 2], 6, 2, 16, 8, torch.float32, DEVICE, gen)
    out = paged_prefill_attention(b.q, b.k_pages, b.v_pages, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.3, 9,
                                  block_m=16, block_n=16, out=_poison(tuple(b.q.shape), torch.float32),
                                  max_context_len=96, num_splits=3, merge_heads=merge_heads)
    ref = ref_paged_attention(b.q, b.k_pages, b.v_pages, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.3)
    assert rel_err(out, ref) < 1e-5 and not out.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_query_heads_cover_every_head_and_row_boundary(dtype):
    """Packed blocks of (query, head) rows: a group of 4 heads per KV head, rows of 1, 3, 5 and 17 queries (blocks
    of 16 packed rows end mid-row: 12, 20 and 68 packed rows) and an empty row (a mixed graph's spare prefill row),
    split and not split (3 splits of 16-key tiles: one, two and three tiles of keys), equal the reference and the
    unpacked kernel."""
    gen = torch.Generator().manual_seed(11)
    b = make_paged_batch([22, 3, 0, 40, 38], [17, 3, 0, 5, 1], 8, 2, 16, 8, dtype, DEVICE, gen)
    ref = ref_paged_attention(b.q, b.k_pages, b.v_pages, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.3)
    for splits in (1, 3):
        got = {}
        for pack in (True, False):
            got[pack] = paged_prefill_attention(
                b.q, b.k_pages, b.v_pages, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.3, 17, block_m=16,
                block_n=16, out=_poison(tuple(b.q.shape), dtype), max_context_len=41, num_splits=splits,
                pack_gqa=pack)
            assert rel_err(got[pack], ref) < TOL[dtype] and not got[pack].isnan().any()
        assert rel_err(got[True], got[False]) < TOL[dtype]


def test_prefill_split_count_covers_the_multiprocessors_and_needs_the_context_bound():
    cpu = torch.device("cpu")  # 4 "multiprocessors" off CUDA
    assert default_prefill_splits(2, 1, 32, 4096, cpu) == 1  # 64 programs already cover 4 x 4
    assert default_prefill_splits(1, 1, 2, 4096, cpu) == 8
    assert default_prefill_splits(1, 1, 2, 600, cpu) == 2  # each split keeps >= 256 keys
    b = make_paged_batch([20], [4], 4, 2, 32, 4, torch.float32, DEVICE, torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="max_context_len"):
        paged_prefill_attention(b.q, b.k_pages, b.v_pages, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.2, 4,
                                num_splits=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reshape_and_cache_matches_reference(dtype):
    kv = torch.randn(2, 6, 4, 3, 16, device=DEVICE).to(dtype)
    k, v = (torch.randn(5, 3, 16, device=DEVICE).to(dtype) for _ in range(2))
    slots = torch.randperm(24, device=DEVICE)[:5]
    slots[2] = -1  # padding token: skipped
    expected = kv.clone()
    cache.ref_reshape_and_cache(k, v, expected, slots)
    cache.reshape_and_cache(k, v, kv, slots)
    assert torch.equal(kv, expected)


@pytest.mark.parametrize("src_page,dst_page,layers", [(16, 8, 1), (4, 16, 3), (8, 1, 2)])
def test_gather_scatter_tokens_roundtrip(src_page, dst_page, layers):
    pool = torch.randn(layers, 2, 7, src_page, 2, 8, device=DEVICE).to(torch.bfloat16)
    n_src = 7 * src_page
    src_pages = torch.randperm(7, device=DEVICE).to(torch.int32)
    start, end = 3, n_src - 2
    buf = torch.full((layers, 2, end - start, 2, 8), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    got = cache.gather_tokens_layers(pool, src_pages, start, end, out=buf)
    assert torch.equal(got, cache.ref_gather_tokens_layers(pool, src_pages, start, end))
    n_dst_pages = (end + dst_page - 1) // dst_page + 1
    dst = torch.randn(layers, 2, n_dst_pages, dst_page, 2, 8, device=DEVICE).to(torch.bfloat16)
    dst_pages = torch.randperm(n_dst_pages, device=DEVICE).to(torch.int32)
    expected = dst.clone()
    cache.ref_scatter_tokens_layers(got, expected, dst_pages, start)
    cache.scatter_tokens_layers(got, dst, dst_pages, start)
    assert torch.equal(dst, expected)
    assert torch.equal(cache.gather_tokens_layers(dst, dst_pages, start, end), got)


def test_single_layer_gather_scatter():
    layer = torch.randn(2, 5, 4, 2, 8, device=DEVICE)
    pages = torch.tensor([4, 0, 2], dtype=torch.int32, device=DEVICE)
    got = cache.gather_tokens(layer, pages, 1, 11)
    assert torch.equal(got, cache.ref_gather_tokens(layer, pages, 1, 11))
    dst = torch.randn(2, 5, 4, 2, 8, device=DEVICE)
    expected = dst.clone()
    cache.scatter_tokens(got, dst, pages, 1)
    cache.ref_scatter_tokens(got, expected, pages, 1)
    assert torch.equal(dst, expected)


@pytest.mark.parametrize("dtype,src_page,dst_page", [(torch.bfloat16, 4, 4), (torch.float32, 4, 8), (torch.float16, 16, 2)])
def test_copy_slots_matches_reference(dtype, src_page, dst_page):
    """Pool -> pool copy (one-sided KV path): random pages, differing page sizes, the untouched rows stay."""
    tokens = 13
    src = torch.randn(2, 9, src_page, 2, 8, device=DEVICE).to(dtype)
    n_dst = (tokens + dst_page - 1) // dst_page + 3
    dst = torch.randn(2, n_dst, dst_page, 2, 8, device=DEVICE).to(dtype)
    src_slots = torch.randperm(9 * src_page, device=DEVICE)[:tokens]
    dst_slots = torch.randperm(n_dst * dst_page, device=DEVICE)[:tokens]
    before = dst.clone()
    expected = dst.clone()
    cache.ref_copy_slots(src, expected, src_slots, dst_slots)
    cache.copy_slots(src, dst, src_slots, dst_slots)
    assert torch.equal(dst, expected)
    assert not torch.equal(expected, before)  # the copy changed rows, so equality above says something
    with pytest.raises(ValueError, match="rows and dtype"):
        cache.copy_slots(src, dst.to(torch.float64), src_slots, dst_slots)


@pytest.mark.parametrize("tokens_per_program", [1, 4, 8])
def test_copy_slots_layers_copies_exactly_the_layer_range(tokens_per_program):
    src = torch.randn(5, 2, 6, 4, 2, 8, device=DEVICE)
    dst = torch.randn(5, 2, 7, 8, 2, 8, device=DEVICE)
    src_slots = torch.randperm(24, device=DEVICE)[:11]
    dst_slots = torch.randperm(56, device=DEVICE)[:11]
    expected = dst.clone()
    cache.ref_copy_slots_layers(src, expected, 1, 4, src_slots, dst_slots)
    before = dst.clone()
    cache.copy_slots_layers(src, dst, 1, 4, src_slots, dst_slots, tokens_per_program=tokens_per_program)
    assert torch.equal(dst, expected)
    assert torch.equal(dst[0], before[0]) and torch.equal(dst[4], before[4])  # layers outside the range untouched
    assert not torch.equal(dst[1:4], before[1:4])


@pytest.mark.parametrize("dtype,hidden,with_res", [(torch.float32, 48, True), (torch.bfloat16, 64, True), (torch.float16, 40, False)])
def test_rms_norm_matches_reference(dtype, hidden, with_res):
    x = torch.randn(5, hidden, device=DEVICE).to(dtype)
    w = (torch.rand(hidden, device=DEVICE) + 0.5).to(dtype)
    res = torch.randn(5, hidden, device=DEVICE).to(dtype) if with_res else None
    out, res_out = _poison((5, hidden), dtype), _poison((5, hidden), dtype)
    got, new_res = elementwise.rms_norm(x, w, 1e-5, res, out=out, residual_out=res_out)
    ref, ref_res = elementwise.ref_rms_norm(x, w, 1e-5, res)
    _assert_matches(got, ref)
    _assert_matches(new_res, ref_res)


@pytest.mark.parametrize("dtype,d", [(torch.float32, 16), (torch.bfloat16, 32)])
def test_rotary_matches_reference_on_strided_views(dtype, d):
    tokens, hq, hk = 6, 4, 2
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, device=DEVICE).to(dtype)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(tokens, hk, d)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.arange(64, dtype=torch.float32)[:, None] * inv[None, :]
    cache_cs = torch.cat([ang.cos(), ang.sin()], -1).to(DEVICE)
    pos = torch.randint(0, 64, (tokens,), device=DEVICE)
    ref_q, ref_k = elementwise.ref_rotary(q.clone(), k.clone(), pos, cache_cs)
    v_before = qkv[:, (hq + hk) * d :].clone()
    got_q, got_k = elementwise.rotary(q, k, pos, cache_cs)
    assert got_q.data_ptr() == q.data_ptr()
    if dtype == torch.bfloat16:  # rounded on the bits in the kernel: bit-exact on GPU and interpreter alike
        assert torch.equal(got_q, ref_q) and torch.equal(got_k, ref_k)
    _assert_matches(got_q, ref_q)
    _assert_matches(got_k, ref_k)
    assert torch.equal(qkv[:, (hq + hk) * d :], v_before)


@pytest.mark.parametrize("dtype,inter", [(torch.float32, 24), (torch.bfloat16, 40)])
def test_silu_and_mul_matches_reference(dtype, inter):
    x = (3 * torch.randn(7, 2 * inter, device=DEVICE)).to(dtype)
    got = elementwise.silu_and_mul(x, out=_poison((7, inter), dtype))
    _assert_matches(got, elementwise.ref_silu_and_mul(x))


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError):
        elementwise.silu_and_mul(torch.randn(3, 5, device=DEVICE))
    with pytest.raises(ValueError):
        cache.reshape_and_cache(torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.randn(2, 3, 4, 2, 8),
                                torch.zeros(2, dtype=torch.int32))
    b = make_paged_batch([4], [1], 3, 2, 16, 4, torch.float32, DEVICE)
    with pytest.raises(ValueError):
        paged_decode_attention(b.q, b.k_pages, b.v_pages, b.block_tables, b.context_lens, 1.0, 4)


def _meta(q_lens: list[int], ctx: list[int], tables: torch.Tensor, page: int) -> AttentionMetadata:
    slots = [int(tables[b, t // page]) * page + t % page for b, (ql, c) in enumerate(zip(q_lens, ctx)) for t in range(c - ql, c)]
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return AttentionMetadata(
        cu_seqlens_q=cu, context_lens=torch.tensor(ctx, dtype=torch.int32, device=DEVICE), block_tables=tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE), max_q_len=max(q_lens),
        max_context_len=max(ctx), q_lens=q_lens, ctx_lens_host=ctx, page_size=page,
    )


@pytest.mark.parametrize("q_lens,ctx", [([9, 1, 4], [9, 30, 21]), ([1, 1], [17, 40])])
def test_triton_backend_matches_torch_backend(q_lens, ctx):
    page, heads, kv_heads, d = 8, 4, 2, 32
    gen = torch.Generator().manual_seed(len(q_lens))
    b = make_paged_batch(ctx, q_lens, heads, kv_heads, d, page, torch.float32, DEVICE, gen)
    meta = _meta(q_lens, ctx, b.block_tables, page)
    k_new, v_new = (torch.randn(sum(q_lens), kv_heads, d, generator=gen).to(DEVICE) for _ in range(2))
    layers = {}
    for backend in (TorchAttentionBackend(), TritonAttentionBackend()):
        kv = torch.stack([b.k_pages, b.v_pages]).clone()
        backend.write_kv(k_new, v_new, kv, meta)
        layers[backend.name] = (kv, backend.attend(b.q, kv, meta, 0.17))
    assert torch.equal(layers["triton"][0], layers["torch"][0])
    assert rel_err(layers["triton"][1], layers["torch"][1]) < 1e-5


def test_sdpa_prefill_path_matches_torch_backend():
    page, q_lens, ctx = 4, [9, 4], [9, 21]
    gen = torch.Generator().manual_seed(7)
    b = make_paged_batch(ctx, q_lens, 4, 2, 16, page, torch.float32, DEVICE, gen)
    meta = _meta(q_lens, ctx, b.block_tables, page)
    kv = torch.stack([b.k_pages, b.v_pages])
    got = _sdpa_prefill(b.q, kv, meta, 0.3)
    assert rel_err(got, TorchAttentionBackend().attend(b.q, kv, meta, 0.3)) < 1e-5


def _shared_models() -> Path:
    return Path(os.environ.get("SPLITSERVE_SHARED_DIR", Path(__file__).resolve().parents[1].parent / "shared")) / "models"


def test_engine_greedy_with_triton_backend_matches_reference():
    """stories260K through the engine with the Triton backend: page 4 and 5-token chunks exercise cached prefixes."""
    model = _shared_models() / "stories260K"
    if not model.is_dir():
        pytest.skip(f"{model} missing")
    pytest.importorskip("pydantic")  # GPU images run the kernel tests without the project's other deps
    from splitserve.core.config import EngineConfig
    from splitserve.core.engine.engine import LLMEngine
    from splitserve.core.messages import SamplingParams

    def run(backend: str) -> list[list[int]]:
        cfg = EngineConfig(model=str(model), attention_backend=backend, page_size=4, chunk_size=5, num_pages=64,
                           extra_stop_token_ids=(1,), device=DEVICE, dtype="float32")
        engine = LLMEngine(cfg)
        prompts = [[1, 403, 407, 261, 378], [1, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421]]
        reqs = [engine.add_request(f"k{i}", p, SamplingParams(max_tokens=8, temperature=0.0)) for i, p in enumerate(prompts)]
        while engine.has_unfinished():
            engine.step()
        return [list(r.output_token_ids) for r in reqs]

    got = run("triton")
    assert got[0] == [432, 383, 286, 261, 376, 298, 315, 421]  # REFERENCE.md, "Once upon a time"
    assert got == run("torch")
