"""The CUDA-graph step layout (core/engine/cuda_graphs.py), on CPU: decode rows, and decode rows with one short
prefill row (an agent session's turn, a short prompt prefilled on the decode worker).

CPU has no graphs, so :class:`EagerGraphs` replays the captured forward eagerly; everything else is the real path:
the static buffers, padding, the varlen Triton kernel (interpreted), and the hidden states handed back in the batch's
order. The same adds and steps on an engine without graphs must give the same greedy ids, and the mixed layout must
actually have run.
"""

from __future__ import annotations

import torch

from conftest import shared_model_path
from splitserve.core.config import EngineConfig
from splitserve.core.engine.cuda_graphs import DecodeGraphs
from splitserve.core.engine.engine import LLMEngine
from splitserve.core.messages import SamplingParams


class _Replay:
    def __init__(self, run) -> None:
        self.replay = run


class EagerGraphs(DecodeGraphs):
    """Captures nothing: a 'replay' runs the same forward on the static buffers and writes the static output."""

    def _capture(self, b: int, c: int, q: int):
        self._inert(b, q)  # as a real capture: its warm-up forwards must write no page
        out = self._forward(b, c, q).clone()
        return _Replay(lambda: out.copy_(self._forward(b, c, q))), out


def _engine(graphs: bool) -> LLMEngine:
    cfg = EngineConfig(model=str(shared_model_path("stories260K")), device="cpu", attention_backend="triton",
                       page_size=8, num_pages=256, async_scheduling=False)
    engine = LLMEngine(cfg)
    if graphs:
        engine.runner.graphs = EagerGraphs(engine.runner.model, engine.kv_cache, engine.runner.backend, 8,
                                           engine.info.max_model_len, 8)
    return engine


def _trace(engine: LLMEngine) -> dict[str, list[int]]:
    """Requests arriving while others decode: mixed steps with one prefill row, one behind a cached prefix."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    story = [1, 403, 407, 261, 378, 1004 % 500, 290, 263, 480, 271, 407, 323, 360, 266, 410, 263, 417]
    reqs = [engine.add_request("a", story, params)]
    for step in range(10):
        engine.step()
        if step == 2:
            reqs.append(engine.add_request("b", [1, 306, 367, 261, 402, 272], params))  # a short prompt
        if step == 5:  # a later turn of "a": its first two pages are cached, 21 tokens to compute
            reqs.append(engine.add_request("c", story + reqs[0].output_token_ids[:8] + [263, 417, 290, 410], params))
    while engine.has_unfinished():
        engine.step()
    return {r.request_id: list(r.output_token_ids) for r in reqs}


def test_mixed_steps_replayed_from_graph_layout_match_eager_steps():
    with_graphs = _engine(True)
    got = _trace(with_graphs)
    keys = set(with_graphs.runner.graphs.graphs)
    assert any(q for _b, _c, q in keys) and any(not q for _b, _c, q in keys), keys  # both layouts ran
    assert got == _trace(_engine(False))
    assert with_graphs.kv.usage().used == 0


def test_graph_keys_take_one_short_prefill_row_only():
    from splitserve.core.engine.batch import ScheduledBatch, SeqWork

    graphs = _engine(True).runner.graphs
    greedy = SamplingParams(max_tokens=1, temperature=0.0)

    def seq(rid: str, n: int, start: int = 0, logprobs: bool = False) -> SeqWork:
        return SeqWork(rid, tuple(range(3, 3 + n)), start, (1, 2, 3, 4, 5, 6), True, greedy, prompt_logprobs=logprobs)

    def key(*seqs: SeqWork):
        return graphs.key(ScheduledBatch(seqs=seqs, page_size=8))

    assert key(seq("d1", 1, 9), seq("d2", 1, 4)) == (2, graphs.ctx_buckets[0], 0)
    assert key(seq("d1", 1, 9), seq("p", 20, 16)) == (1, graphs.ctx_buckets[0], 32)
    assert key(seq("p", 5)) == (1, graphs.ctx_buckets[0], 16)  # a prompt alone: one padding decode row
    assert key(seq("p", 129)) is None  # too long for a prefill bucket
    assert key(seq("p", 5), seq("q", 5)) is None  # two prefill rows
    assert key(seq("p", 5, logprobs=True)) is None  # prompt logprobs need every position's hidden state
    assert torch.equal(graphs.static.cu_seqlens_q, torch.arange(9, dtype=torch.int32))  # decode layout untouched


def test_eager_mixed_steps_give_decode_rows_the_decode_kernel_and_match_the_torch_backend(monkeypatch):
    """Without graphs, a step of decode rows and prompt rows attends the leading one-token rows with the decode
    kernel and the rest with the varlen kernel; greedy ids equal the torch reference backend's."""
    import splitserve.core.model.attention_triton as at

    split_rows, real = [], at._split_attend
    monkeypatch.setattr(at, "_split_attend",
                        lambda q, kv, meta, scale: split_rows.append(meta.decode_rows) or real(q, kv, meta, scale))
    got = _trace(_engine(False))
    assert split_rows and min(split_rows) >= 1  # the mixed steps really split
    cfg = EngineConfig(model=str(shared_model_path("stories260K")), device="cpu", attention_backend="torch",
                       page_size=8, num_pages=256, async_scheduling=False)
    assert _trace(LLMEngine(cfg)) == got


def test_leading_decode_rows():
    from splitserve.core.engine.runner import leading_decode_rows

    assert leading_decode_rows([1, 1, 5, 1]) == 2  # decode rows, then a prompt row (and a row after it)
    assert leading_decode_rows([1, 1, 1]) == 0  # all decode: the decode-only path
    assert leading_decode_rows([7, 1]) == 0 and leading_decode_rows([4]) == 0
