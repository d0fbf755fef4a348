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
from test_mixed_graphs import _trace, prefill_rows, record_runs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _engine(device: str, overlap: bool) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(shared_model_path("stories260K")), device=device, dtype="float32",
                                  page_size=8, num_pages=256, async_scheduling=overlap, max_num_seqs=8))


@pytest.mark.parametrize("overlap", [False, True])
def test_mixed_graphs_on_the_gpu_give_the_cpu_ids(overlap):
    gpu = _engine("cuda", overlap)
    graphs = gpu.runner.graphs
    assert graphs is not None
    runs = record_runs(graphs, lambda batch, _key, carried: (prefill_rows(batch), carried))
    got = _trace(gpu)
    assert {k for k, _ in runs} == {0, 1, 2}  # decode-only steps, steps with one and with two prefill rows
    assert any(q for _b, _c, q in graphs.graphs) and any(not q for _b, _c, q in graphs.graphs)  # real captures
    assert any(k and carried for k, carried in runs) == overlap
    assert got == _trace(_engine("cpu", False))
    assert gpu.kv.usage().used == 0


def _compiled_variants() -> dict[str, int]:
    """Triton kernel name -> variants compiled in this process so far (every ``@triton.jit`` of splitserve.kernels)."""
    import importlib

    from triton.runtime.jit import JITFunction

    counts = {}
    for name in ("attention", "cache", "elementwise", "ops"):
        module = importlib.import_module(f"splitserve.kernels.{name}")
        for attr, fn in vars(module).items():
            if isinstance(fn, JITFunction):
                counts[f"{name}.{attr}"] = sum(len(caches[0]) for caches in fn.device_caches.values())
    return counts


def _serving_mix(engine: LLMEngine) -> None:
    """What a decode worker meets: decode rows, turns arriving alone and together behind cached prefixes, short and
    long prompts next to decode rows (graph and eager mixed steps), batches and contexts of several sizes."""
    from splitserve.core.messages import SamplingParams

    story = [1, 403, 407, 261, 378, 290, 263, 480, 271, 407, 323, 360, 266, 410, 263, 417]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    for i in range(6):
        engine.add_request(f"bg{i}", story[: 4 + 2 * i], params)
    engine.step()
    arrivals = [[story + [290 + i] * (3 + i)] for i in range(3)] + [
        [story * 3 + [263] * 9, story * 20 + [417] * 7],  # two long ones together: beyond the graphs' buckets
        [story[:9] * 33 + [5], story + [271] * 40, [1, 306, 367]]]
    for k, prompts in enumerate(arrivals):
        for j, prompt in enumerate(prompts):
            engine.add_request(f"turn{k}-{j}", prompt, params)
        engine.step()
        engine.step()
    while engine.has_unfinished():
        engine.step()


def check_no_compile_while_serving(lane: bool) -> None:
    """Warm an engine up, then serve the mix: no Triton kernel may compile meanwhile (run in a fresh process, since
    compiled kernels are kept per process)."""
    extra = dict(prefill_first_tokens=64, prompt_lane=True) if lane else {}
    engine = LLMEngine(EngineConfig(model=str(shared_model_path("stories260K")), device="cuda", dtype="float32",
                                    page_size=8, num_pages=512, max_num_seqs=16, **extra))
    engine.warmup()
    before = _compiled_variants()
    _serving_mix(engine)
    grown = {k: (before[k], v) for k, v in _compiled_variants().items() if v != before[k]}
    if grown or engine.kv.usage().used:
        raise AssertionError(f"compiled while serving (kernel: variants before, after): {grown}; "
                             f"pages left: {engine.kv.usage().used}")


@pytest.mark.parametrize("asked_by", ["config", "argument"])
def test_warmup_with_every_mixed_graph_leaves_no_capture_to_serving(asked_by):
    """``capture_mixed_graphs`` (or ``warmup(mixed_graphs=True)``, as a decode worker calls it by default): warm-up
    captures every mixed graph, so the serving mix (mixed steps included) replays graphs and captures none; every
    page is free afterwards."""
    engine = LLMEngine(EngineConfig(model=str(shared_model_path("stories260K")), device="cuda", dtype="float32",
                                    page_size=8, num_pages=512, max_num_seqs=16,
                                    capture_mixed_graphs=True if asked_by == "config" else None))
    engine.warmup(mixed_graphs=None if asked_by == "config" else True)
    graphs = engine.runner.graphs
    captured = set(graphs.graphs)
    keys = record_runs(graphs, lambda _batch, key, _carried: key)
    _serving_mix(engine)
    assert any(q for _b, _c, q in keys), keys  # mixed steps ran from graphs
    assert set(graphs.graphs) == captured and set(keys) <= captured
    assert engine.kv.usage().used == 0


@pytest.mark.parametrize("lane", [False, True])
def test_warmup_compiles_what_serving_steps_launch(lane):
    """After ``warmup()`` no Triton kernel compiles while serving: a compile mid-trace stalled a step for 0.66 s in
    serving runs on fresh H200s (tenth session)."""
    import subprocess
    import sys
    from pathlib import Path

    code = f"import test_gpu_engine as t; t.check_no_compile_while_serving({lane})"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
