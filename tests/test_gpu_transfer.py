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


def _gpu_cluster(tmp_path, model: str, *worker_args: str) -> Cluster:
    """1P1D on GPUs in float32: prefill on GPU 0, decode on the last GPU."""
    last = torch.cuda.device_count() - 1
    return Cluster(model=model, log_dir=tmp_path,
                   worker_args=["--device", "cuda", "--dtype", "float32", "--page-size", "8", "--num-pages", "512",
                                *worker_args],
                   role_args={"prefill": ["--device-index", "0"], "decode": ["--device-index", str(last)]}).start()


def test_cuda_ipc_1p1d_greedy_matches_cpu(tmp_path):
    model = str(shared_model_path("stories260K"))
    c = _gpu_cluster(tmp_path, model, "--chunk-size", "64")
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


def _turn_ids(url: str, model: str, prompt: list[int], session: dict) -> tuple[list[int], int]:
    req = urllib.request.Request(f"{url}/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0,
                                                  "ignore_eos": True, "return_token_ids": True, **session}).encode())
    with urllib.request.urlopen(req, timeout=120) as resp:
        out = json.load(resp)
    return out["choices"][0]["token_ids"], out["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_cuda_ipc_held_session_turns_match_cpu(tmp_path):
    """A held session's turns on GPUs: a long suffix goes to the prefill worker, which reads the held pages out of the
    decode GPU's pool over CUDA IPC; a short one is prefilled on the decode worker (its partial last page taken over).
    Every turn's greedy ids equal the CPU engine's on the whole conversation."""
    model = str(shared_model_path("stories260K"))
    c = _gpu_cluster(tmp_path, model, "--session-suffix-threshold", "16")
    prompts, got, cached = [[1] + [(5 * j) % 500 + 3 for j in range(150)]], [], []
    try:
        for turn, new in enumerate((40, 40, 3)):  # long, long, short suffix
            session = {"session_id": "gpu-agent", "session_end": turn == 2}
            ids, hit = _turn_ids(c.url, model, prompts[-1], session)
            got.append(ids)
            cached.append(hit)
            prompts.append(prompts[-1] + ids + [(11 * j + turn) % 500 + 3 for j in range(new)])
        used = c.wait_pages_free()
        assert used and not any(used.values()), used
        prefill_log = (tmp_path / "prefill-0.log").read_text()
        assert "(168 held by the decode worker)" in prefill_log  # turn 2: 150 + 1 + 24 - 1 computed -> 21 pages
        assert not c.tracebacks()
    finally:
        c.stop()
    assert cached[1] >= 168  # the held pages were read, not recomputed
    assert got == _cpu_greedy(model, prompts[:3], 24)
