"""The engine's CUDA graphs on a real GPU (skipped without CUDA): decode steps, and mixed steps of decode rows with
one or two short prefill rows, replayed from captured graphs, run synchronously and overlapped (launched behind the
step in flight). stories260K in float32: greedy ids equal the CPU engine's, and every page is free afterwards.
"""

from __future__ import annotations

import pytest
import torch

from conftest import shared_model_path
from splitserve.core.config import EngineConfig
from splitserve.core.engine.engine import LLMEngine
from test_mixed_graphs import _trace

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _engine(device: str, overlap: bool) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(shared_model_path("stories260K")), device=device, dtype="float32",
                                  page_size=8, num_pages=256, async_scheduling=overlap, max_num_seqs=8))


@pytest.mark.parametrize("overlap", [False, True])
def test_mixed_graphs_on_the_gpu_give_the_cpu_ids(overlap):
    gpu = _engine("cuda", overlap)
    graphs = gpu.runner.graphs
    assert graphs is not None
    runs = []
    real_run = graphs.run
    graphs.run = lambda batch, key, carry=None: runs.append(
        (sum(s.num_tokens != 1 for s in batch.seqs), carry is not None)) or real_run(batch, key, carry)
    got = _trace(gpu)
    assert {k for k, _ in runs} == {0, 1, 2}  # decode-only steps, steps with one and with two prefill rows
    assert any(q for _b, _c, q in graphs.graphs) and any(not q for _b, _c, q in graphs.graphs)  # real captures
    assert any(k and carried for k, carried in runs) == overlap
    assert got == _trace(_engine("cpu", False))
    assert gpu.kv.usage().used == 0
