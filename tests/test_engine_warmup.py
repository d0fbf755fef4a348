"""Start-up warm-up: real prefills and decode steps before a worker registers, leaving the pool as it was."""

from __future__ import annotations

from splitserve.core.config import EngineConfig
from splitserve.core.engine.engine import LLMEngine
from splitserve.core.messages import SamplingParams


def test_warmup_runs_every_length_that_fits_and_leaves_no_page_behind():
    engine = LLMEngine(EngineConfig(page_size=8, num_pages=64))
    before = engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    engine.kv.reset_prefix_cache()
    report = engine.warmup(prompt_lens=(16, 200, 5000))
    assert "0 CUDA graphs" in report and "[16, 200]" in report  # 5000 tokens do not fit in 64 pages of 8
    usage = engine.kv.usage()
    assert usage.used == 0 and usage.cached == 0
    engine.kv.check_integrity()
    after = engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert after[0].output_token_ids == before[0].output_token_ids
