"""The CUDA-graph step layout (core/engine/cuda_graphs.py), on CPU: decode rows, and decode rows with short prefill
rows (agent sessions' turns, short prompts prefilled on the decode worker; one, or several arriving together), with
steps run synchronously and overlapped (launched behind the step in flight, their pending input ids carried on the
device into the graph's layout).

CPU has no graphs, so :class:`EagerGraphs` replays the captured forward eagerly; everything else is the real path:
the static buffers, padding, the varlen Triton kernel (interpreted), and the hidden states handed back in the batch's
order. The same adds and steps on an engine without graphs must give the same greedy ids, and the mixed layout must
actually have run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import shared_model_path
from splitserve.core.config import EngineConfig
from splitserve.core.engine.batch import ScheduledBatch, SeqWork
from splitserve.core.engine.cuda_graphs import MAX_PREFILL_ROWS, DecodeGraphs, GraphKey
from splitserve.core.engine.engine import LLMEngine
from splitserve.core.messages import SamplingParams

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the layouts on CPU tensors need the Triton interpreter, which conftest.py "
    "turns on only without CUDA; tests/test_gpu_engine.py runs them on the GPU")


class _Replay:
    def __init__(self, run) -> None:
        self.replay = run


class EagerGraphs(DecodeGraphs):
    """Captures nothing: a 'replay' runs the same forward on the static buffers and writes the static output."""

    def _capture(self, b: int, c: int, q: int):
        self._inert(b, q)  # as a real capture: its warm-up forwards must write no page
        out = self._forward(b, c, q).clone()
        return _Replay(lambda: out.copy_(self._forward(b, c, q))), out


LAYERS = 2
"""Layers of stories260K the traces run (its first ones). Every layer costs interpreted kernel launches (all 5 took
2.5x the time), and the traces compare ids end to end; a slip in the layout need not change the ids of so shallow a
model (prefill rows' positions shifted by one changed none with 2 layers, all three traces' with 3), so
:func:`test_a_mixed_step_fills_the_static_buffers_exactly` checks the buffers themselves."""

TRACE_CONTEXT = 64
"""The graphs' one context bucket in the traces: their longest request is 33 tokens (the model's 512 would have
every interpreted decode program walk 512 keys: about 3x the test's time)."""


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """stories260K cut to its first :data:`LAYERS` layers (config, weights, and its tokenizer files)."""
    src, dst = shared_model_path("stories260K"), tmp_path_factory.mktemp("stories260K-cut")
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "num_hidden_layers": LAYERS}))
    keep = tuple(f"model.layers.{i}." for i in range(LAYERS))
    weights = load_file(src / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("model.layers.") or k.startswith(keep)},
              dst / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _engine(model: Path, graphs: bool, overlap: bool = False, prefill_first: int = 0, max_context: int | None = None,
            backend: str = "triton") -> LLMEngine:
    cfg = EngineConfig(model=str(model), device="cpu", attention_backend=backend,
                       page_size=8, num_pages=256, async_scheduling=overlap, overlap_prefill="on",
                       prefill_first_tokens=prefill_first)
    engine = LLMEngine(cfg)
    if graphs:
        engine.runner.graphs = EagerGraphs(engine.runner.model, engine.kv_cache, engine.runner.backend, 8,
                                           max_context or engine.info.max_model_len, 8)
    return engine


@pytest.fixture(scope="module")
def reference(model) -> dict[str, list[int]]:
    """:func:`_trace`'s greedy ids from plain eager steps on the torch reference backend (test_eager_mixed_steps...
    shows the Triton backend's eager steps give the same)."""
    return _trace(_engine(model, False, backend="torch"))


def record_runs(graphs: DecodeGraphs, what: Callable[[ScheduledBatch, GraphKey, bool], Any]) -> list:
    """Wrap ``graphs.run``: each graph step first appends ``what(batch, key, carried)`` to the list returned."""
    runs, real_run = [], graphs.run
    graphs.run = lambda batch, key, carry=None: runs.append(what(batch, key, carry is not None)) or real_run(
        batch, key, carry)
    return runs


def prefill_rows(batch: ScheduledBatch) -> int:
    return sum(s.num_tokens != 1 for s in batch.seqs)


def _trace(engine: LLMEngine) -> dict[str, list[int]]:
    """Requests arriving while others decode: mixed steps with one prefill row (one behind a cached prefix), then
    with two (two turns arriving together)."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    story = [1, 403, 407, 261, 378, 1004 % 500, 290, 263, 480, 271, 407, 323, 360, 266, 410, 263, 417]
    reqs = [engine.add_request("a", story, params)]
    for step in range(14):
        engine.step()
        if step == 2:
            reqs.append(engine.add_request("b", [1, 306, 367, 261, 402, 272], params))  # a short prompt
        if step == 5:  # a later turn of "a": its first two pages are cached, 13 tokens to compute
            reqs.append(engine.add_request("c", story + reqs[0].output_token_ids[:4] + [263, 417, 290, 410], params))
        if step == 9:  # two at once: one step with two prefill rows
            reqs.append(engine.add_request("d", [1, 306, 367, 261, 402, 272, 290, 263], params))
            reqs.append(engine.add_request("e", story + [290, 410, 263], params))
    while engine.has_unfinished():
        engine.step()
    return {r.request_id: list(r.output_token_ids) for r in reqs}


@pytest.mark.parametrize("overlap", [False, True])
def test_mixed_steps_replayed_from_graph_layout_match_eager_steps(overlap, model, reference):
    with_graphs = _engine(model, True, overlap, max_context=TRACE_CONTEXT)
    graphs = with_graphs.runner.graphs
    runs = record_runs(graphs, lambda batch, _key, carried: (prefill_rows(batch), carried))
    got = _trace(with_graphs)
    keys = set(graphs.graphs)
    assert {k for k, _ in runs} == {0, 1, 2}  # decode-only steps, steps with one and with two prefill rows
    assert any(q for _b, _c, q in keys) and any(not q for _b, _c, q in keys), keys  # replayed from both layouts
    assert any(k and carried for k, carried in runs) == overlap  # mixed steps read pending ids on the device
    assert got == reference
    assert with_graphs.kv.usage().used == 0


def test_graph_keys_take_a_few_short_prefill_rows(model):
    graphs = _engine(model, True).runner.graphs
    greedy = SamplingParams(max_tokens=1, temperature=0.0)

    def seq(rid: str, n: int, start: int = 0, logprobs: bool = False) -> SeqWork:
        return SeqWork(rid, tuple(range(3, 3 + n)), start, (1, 2, 3, 4, 5, 6), True, greedy, prompt_logprobs=logprobs)

    def key(*seqs: SeqWork):
        return graphs.key(ScheduledBatch(seqs=seqs, page_size=8))

    c0 = graphs.ctx_buckets[0]
    assert key(seq("d1", 1, 9), seq("d2", 1, 4)) == (2, c0, 0)
    assert key(seq("d1", 1, 9), seq("p", 20, 16)) == (1, c0, 32)
    assert key(seq("p", 5)) == (1, c0, 16)  # a prompt alone: one padding decode row
    assert key(seq("p", 257)) is None  # too long for a prefill bucket
    assert key(seq("d", 1, 9), seq("p", 5), seq("q", 20)) == (1, c0, 32)  # two prefill rows: 25 tokens together
    assert key(seq("p", 65)) == (1, c0, 128)  # a session turn of 64 new tokens and its last generated one
    assert key(seq("p", 65), seq("q", 65)) == (1, c0, 256)  # two such turns
    assert key(seq("p", 130), seq("q", 130)) is None  # 260 tokens together
    assert key(*(seq(f"p{i}", 2) for i in range(MAX_PREFILL_ROWS + 1))) is None  # too many prefill rows
    assert key(seq("p", 5, logprobs=True)) is None  # prompt logprobs need every position's hidden state
    assert torch.equal(graphs.static.cu_seqlens_q, torch.arange(9, dtype=torch.int32))  # decode layout untouched


def test_a_mixed_step_fills_the_static_buffers_exactly(model):
    """Two decode rows, then a turn behind a cached prefix (5 tokens from position 16) and a fresh 3-token prompt, in
    a graph of 2 decode rows and 16 prefill tokens: every static buffer holds exactly the layout the kernels read
    (the traces compare ids only, and a shallow model's ids did not change with the prefill positions shifted)."""
    graphs = _engine(model, True).runner.graphs
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    batch = ScheduledBatch(page_size=8, seqs=(
        SeqWork("a", (41,), 9, (1, 2), True, greedy), SeqWork("b", (42,), 4, (3,), True, greedy),
        SeqWork("p", (50, 51, 52, 53, 54), 16, (7, 8, 9), True, greedy),
        SeqWork("q", (60, 61, 62), 0, (4,), True, greedy)))
    key = graphs.key(batch)
    assert key == (2, graphs.ctx_buckets[0], 16)
    graphs._fill(batch, key[0], key[2])
    st, n = graphs.static, 2 + 16
    assert st.input_ids[:n].tolist() == [41, 42, 50, 51, 52, 53, 54, 60, 61, 62] + [0] * 8
    assert st.positions[:n].tolist() == [9, 4, 16, 17, 18, 19, 20, 0, 1, 2] + [0] * 8
    assert st.slot_mapping[:n].tolist() == [17, 28, 72, 73, 74, 75, 76, 32, 33, 34] + [-1] * 8
    assert st.context_lens[: 2 + MAX_PREFILL_ROWS].tolist() == [10, 5, 21, 3, 0, 0]  # the spare prefill rows: empty
    assert st.cu_mixed[: 3 + MAX_PREFILL_ROWS].tolist() == [0, 1, 2, 7, 10, 10, 10]
    assert st.block_tables[2, :3].tolist() == [7, 8, 9] and st.block_tables[3, 0].item() == 4
    assert graphs._mixed_order(batch, key[0]) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_eager_mixed_steps_give_decode_rows_the_decode_kernel_and_match_the_torch_backend(monkeypatch, model,
                                                                                          reference):
    """Without graphs, a step of decode rows and prompt rows attends the leading one-token rows with the decode
    kernel and the rest with the varlen kernel; greedy ids equal the torch reference backend's."""
    import splitserve.core.model.attention_triton as at

    split_rows, real = [], at._split_attend
    monkeypatch.setattr(at, "_split_attend",
                        lambda q, kv, meta, scale: split_rows.append(meta.decode_rows) or real(q, kv, meta, scale))
    got = _trace(_engine(model, False))
    assert split_rows and min(split_rows) >= 1  # the mixed steps really split
    assert got == reference


def test_leading_decode_rows():
    from splitserve.core.engine.runner import leading_decode_rows

    assert leading_decode_rows([1, 1, 5, 1]) == 2  # decode rows, then a prompt row (and a row after it)
    assert leading_decode_rows([1, 1, 1]) == 0  # all decode: the decode-only path
    assert leading_decode_rows([7, 1]) == 0 and leading_decode_rows([4]) == 0


def test_static_page_tables_follow_every_step_uploading_only_what_changed(monkeypatch, model):
    """Steps whose rows gain pages, shift up when a request leaves, or give a decode row's place to a prefill row:
    each row of the static block tables starts with its sequence's page table, and unchanged rows are not uploaded."""
    from splitserve.core.engine import cuda_graphs
    graphs = _engine(model, True).runner.graphs
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    uploads, real_put = [], graphs._put_table

    def put(row: int, table: tuple[int, ...]) -> None:
        if graphs._tables[row] != table:
            uploads.append(row)
        real_put(row, table)

    graphs._put_table = put

    def step(*rows: tuple[str, int, tuple[int, ...]], prefill: tuple[int, ...] | None = None) -> list[int]:
        seqs = [SeqWork(rid, (5,), start, table, True, greedy) for rid, start, table in rows]
        if prefill is not None:
            seqs.append(SeqWork("p", (5, 6, 7), 0, prefill, True, greedy))
        batch = ScheduledBatch(seqs=tuple(seqs), page_size=8)
        uploads.clear()
        key = graphs.key(batch)
        graphs._fill(batch, key[0], key[2])
        tables = graphs.static.block_tables
        long = [s for s in seqs if s.num_tokens != 1]
        for i, s in enumerate([s for s in seqs if s.num_tokens == 1] + [None] * (key[0] - len(seqs) + len(long))):
            if s is not None:
                assert tables[i, : len(s.page_table)].tolist() == list(s.page_table), i
        for i, s in enumerate(long):
            assert tables[key[0] + i, : len(s.page_table)].tolist() == list(s.page_table)
        return sorted(set(uploads))

    a, b, c = ("a", 9, (1, 2)), ("b", 4, (3,)), ("c", 12, (4, 5))
    assert step(a, b, c) == [0, 1, 2]
    assert step(a, b, c) == []  # nothing changed
    assert step(a, ("b", 8, (3, 6)), c) == [1]  # b gained a page
    assert step(a, c) == [1]  # b left: c moved up a row
    assert step(a, prefill=(7, 8)) == [1]  # one decode row (bucket 1): the prefill row's table goes in row 1
    assert step(a, c) == [1]  # row 1 held the prefill row's table: c's goes up again
    many = [(f"m{i}", 8 * i + 1, tuple(range(10 * i, 10 * i + i + 1))) for i in range(8)]
    monkeypatch.setattr(cuda_graphs, "TABLE_ROWS_ONE_BY_ONE", 4)
    assert step(*many) == []  # 8 rows changed, more than 4: all at once, as one table
    assert step(*many[:3], ("m3", 36, (99, 98, 97, 96, 95)), *many[4:]) == [3]


def test_prompts_first_steps_replay_the_mixed_layout_without_decode_rows(model, reference):
    """With ``prefill_first_tokens`` the short prompts run in steps of their own (no decode row: one padding row,
    then the prefill rows), the decode rows skip those steps, and the ids are those of plain eager steps (overlapped
    steps here; tests/test_async_decode.py runs prompts first synchronously too)."""
    with_graphs = _engine(model, True, True, prefill_first=16, max_context=TRACE_CONTEXT)
    runs = record_runs(with_graphs.runner.graphs, lambda batch, key, _carried: (
        len(batch.seqs) - prefill_rows(batch), prefill_rows(batch), key[0]))
    got = _trace(with_graphs)
    alone = [r for r in runs if r[1] and not r[0]]
    # a's prompt (nothing else runs yet), then b, c, and d with e together, each with one padding decode row
    assert [(p, b) for _d, p, b in alone] == [(1, 1), (1, 1), (1, 1), (2, 1)], runs
    assert not any(d and p for d, p, _b in runs), runs  # no step mixed the short prompts with decode rows
    assert got == reference


def test_capture_all_takes_the_decode_buckets_and_one_mixed_graph(model):
    """Warm-up captures every decode bucket and one mixed graph, whose capture compiles the kernels only mixed
    steps launch (on a GPU), so a session turn's first step does not (the layouts' replays are tested above)."""
    engine = _engine(model, True, overlap=True, prefill_first=16, max_context=TRACE_CONTEXT)
    graphs = engine.runner.graphs
    assert graphs.capture_all() == len(graphs.batch_buckets) * len(graphs.ctx_buckets) + 1
    assert {k for k in graphs.graphs if k[2]} == {(1, graphs.ctx_buckets[0], 16)}


def test_capture_all_mixed_takes_every_mixed_graph_too(model):
    """``capture_mixed_graphs`` (warm-up): every batch, context and prefill bucket, so serving captures none."""
    graphs = _engine(model, True, max_context=TRACE_CONTEXT).runner.graphs
    graphs.prefill_buckets = (16, 32)  # each interpreted capture runs a forward
    every = {(b, c, q) for b in graphs.batch_buckets for c in graphs.ctx_buckets for q in (0, 16, 32)}
    assert graphs.capture_all(mixed=True) == len(every) and set(graphs.graphs) == every
