"""The CUDA IPC one-sided KV path on real GPUs (skipped without CUDA; run on the 2-GPU machine).

1. ``splitserve bench transfer --backend cuda_ipc`` between two processes (sender cuda:0, receiver cuda:1 when
   there are two GPUs): every byte verified.
2. A real 1P1D cluster on GPUs (stories260K in float32; prefill on GPU 0, decode on the last GPU): the prefill
   worker writes straight into the decode worker's pages; greedy ids equal the CPU engine's for long prompts
   (many pages, several prefill chunks), and every page is free afterwards.
"""

from __future__ import annotations

import argparse
import json
import urllib.request

import pytest
import torch

from cluster import Cluster
from conftest import shared_model_path
from splitserve.core.tokenizer import decode_continuation, load_tokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_pinned_uploads_ring_reuses_buffers_without_overwriting_pending_copies():
    import numpy as np

    from splitserve.transfer.cuda_ipc import PinnedUploads

    stream = torch.cuda.Stream()
    uploads = PinnedUploads(torch.device("cuda", 0), ring=3)
    rng = np.random.default_rng(0)
    wanted = [rng.integers(0, 1 << 40, size=int(n)) for n in rng.integers(1, 5000, size=20)]
    got = [uploads.upload(v, stream) for v in wanted]  # more uploads than buffers: each reuse waits for its copy
    stream.synchronize()
    for v, t in zip(wanted, got):
        assert t.dtype == torch.int64 and t.tolist() == v.tolist()


@pytest.mark.parametrize("mode", [[], ["--requests", "1", "--layers-per-call", "1"]])
def test_cuda_ipc_bench_transfer_every_byte_verified(mode):
    from splitserve.benchmarks.transfer import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--backend", "cuda_ipc", "--device", "cuda", "--model-shape", "tiny", "--tokens", "300",
                              "--src-page-size", "16", "--dst-page-size", "8", "--repeat", "2", *mode])
    result = run(args)
    assert result["verified"] and result["transport"] == "cuda_ipc"
    assert result["gbps"] > 0


def _complete(url: str, body: dict) -> str:
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.load(resp)["choices"][0]["text"]


def _cpu_greedy(model: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from splitserve.core.config import EngineConfig
    from splitserve.core.engine.engine import LLMEngine
    from splitserve.core.messages import SamplingParams

    engine = LLMEngine(EngineConfig(model=model, page_size=8, num_pages=512))
    reqs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return [list(r.output_token_ids) for r in reqs]


def test_cuda_ipc_1p1d_greedy_matches_cpu(tmp_path):
    model = str(shared_model_path("stories260K"))
    last = torch.cuda.device_count() - 1
    c = Cluster(model=model, log_dir=tmp_path,
                worker_args=["--device", "cuda", "--dtype", "float32", "--page-size", "8", "--num-pages", "512",
                             "--chunk-size", "64"],
                role_args={"prefill": ["--device-index", "0"], "decode": ["--device-index", str(last)]}).start()
    try:
        prompts = [[1] + [(7 * i + j) % 500 + 3 for j in range(n)] for i, n in enumerate((5, 150, 333, 47))]
        got = [_complete(c.url, {"model": model, "prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True})
               for p in prompts]  # plain HTTP: the GPU machine's image has no openai package
        used = c.wait_pages_free()
        assert used and not any(used.values()), used
        decode_log = (tmp_path / "decode-1.log").read_text()
        prefill_log = (tmp_path / "prefill-0.log").read_text()
        assert "KV transfer over cuda_ipc (auto), same-host peers write into this pool directly" in decode_log
        assert "for direct writes" in prefill_log and "sending inline" not in prefill_log
        assert not c.tracebacks()
    finally:
        c.stop()
    tok = load_tokenizer(model)
    want = [decode_continuation(tok, p, ids) for p, ids in zip(prompts, _cpu_greedy(model, prompts, 24))]
    assert got == want
