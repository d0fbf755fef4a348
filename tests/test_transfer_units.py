"""Transfer building blocks without processes: layout checks, token/slot maps, staging reuse, UCX helpers,
and the ``splitserve bench transfer`` command on a tiny shape."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

from splitserve.core.messages import KVDescriptor
from splitserve.transfer import wire
from splitserve.transfer.base import (
    KVLayout,
    TransferError,
    gather_tokens,
    scatter_tokens,
    slot_runs,
    token_slots,
)
from splitserve.transfer.zmq_backend import StagingPool

LAYOUT = KVLayout("m", "float32", 2, 2, 4, 8)


def desc(**over) -> KVDescriptor:
    fields = dict(transfer_id="t", receiver_addr="tcp://127.0.0.1:1", model_id="m", dtype="float32", num_layers=2,
                  num_kv_heads=2, head_dim=4, page_size=16, page_ids=(0,), num_tokens=4, lease_s=1.0)
    return KVDescriptor(**{**fields, **over})


@pytest.mark.parametrize("field,value", [("model_id", "other"), ("dtype", "bfloat16"), ("num_layers", 3),
                                         ("num_kv_heads", 8), ("head_dim", 128)])
def test_layout_mismatch_names_the_field(field, value):
    with pytest.raises(TransferError, match=field):
        LAYOUT.check_compatible(desc(**{field: value}))
    LAYOUT.check_compatible(desc(page_size=32))  # page sizes may differ


def test_check_cache_rejects_wrong_shape_and_dtype():
    LAYOUT.check_cache(torch.zeros(2, 2, 3, 8, 2, 4))
    with pytest.raises(ValueError, match="shape"):
        LAYOUT.check_cache(torch.zeros(2, 2, 3, 16, 2, 4))
    with pytest.raises(ValueError, match="dtype"):
        LAYOUT.check_cache(torch.zeros(2, 2, 3, 8, 2, 4, dtype=torch.bfloat16))


def test_token_slots_and_runs():
    slots = token_slots([5, 6, 2], 4, 2, 11)
    assert slots.tolist() == [22, 23, 24, 25, 26, 27, 8, 9, 10]
    assert slot_runs(slots) == [(0, 22, 6), (6, 8, 3)]
    with pytest.raises(ValueError, match="cover"):
        token_slots([1], 4, 0, 5)


@pytest.mark.parametrize("num_pages_used", [3, 40])  # few runs (slices) and many runs (index copy)
def test_gather_scatter_round_trip(num_pages_used):
    rng = np.random.default_rng(0)
    kv = torch.randn(2, 2, 64, 4, 2, 3)
    src_pages = rng.permutation(64)[:num_pages_used].tolist()
    n = num_pages_used * 4 - 1
    slots = token_slots(src_pages, 4, 0, n)
    out = torch.empty(2, n, 2, 3)
    gather_tokens(kv, 1, slots, out)
    expect = kv[1].reshape(2, -1, 2, 3)[:, torch.from_numpy(slots)]
    assert torch.equal(out, expect)
    dst = torch.zeros(2, 2, 64, 4, 2, 3)
    scatter_tokens(dst, 0, slots, out)
    assert torch.equal(dst[0].reshape(2, -1, 2, 3)[:, torch.from_numpy(slots)], expect)
    assert torch.count_nonzero(dst[1]) == 0


class _Tracker:
    def __init__(self) -> None:
        self.done = False


def test_staging_pool_recycles_only_released_buffers():
    pool = StagingPool()
    a = pool.take((2, 8), torch.float32)
    tracker = _Tracker()
    pool.track(a, tracker)
    b = pool.take((2, 8), torch.float32)
    assert b.data_ptr() != a.data_ptr()  # a is still in flight
    pool.track(b, None)
    tracker.done = True
    c = pool.take((4,), torch.float32)
    d = pool.take((2, 8), torch.float32)
    assert {c.data_ptr(), d.data_ptr()} == {a.data_ptr(), b.data_ptr()}


def test_wire_rejects_garbage_and_parses_ucx_addresses():
    with pytest.raises(wire.FrameError):
        wire.decode_sender_frame(b"\x93garbage")
    frame = wire.Chunk("t", 1, 0, 0, 4, 128, ucx_tag=7)
    assert wire.decode_sender_frame(wire.encode(frame)) == frame
    assert wire.split_ucx_address("ucx://10.0.0.1:4000,tcp://10.0.0.1:5000") == ("tcp://10.0.0.1:5000", "10.0.0.1", 4000)
    with pytest.raises(ValueError, match="UCX"):
        wire.split_ucx_address("tcp://10.0.0.1:5000")


def test_ucx_gpu_over_tcp_warning(caplog):
    from splitserve.transfer.ucx_backend import active_transports, warn_if_gpu_over_tcp

    tcp_only = "#      resource 1  :  md 1  dev 1  flags -- tcp/lo\n#      resource 3  :  md 2  dev 0  flags -- sysv/memory\n"
    with_ipc = tcp_only + "#      resource 6  :  md 5  dev 0  flags -- cuda_ipc/cuda\n"
    assert active_transports(with_ipc) == {"tcp", "sysv", "cuda_ipc"}
    with caplog.at_level(logging.WARNING):
        assert warn_if_gpu_over_tcp(tcp_only, torch.device("cuda", 0))
    assert "tcp" in caplog.text and "UCX has no CUDA transport" in caplog.text
    assert not warn_if_gpu_over_tcp(with_ipc, torch.device("cuda", 0))
    assert not warn_if_gpu_over_tcp(tcp_only, torch.device("cpu"))


@pytest.mark.parametrize("backend,extra", [
    ("zmq", []),  # defaults: 8 requests in flight, every layer in one call
    ("shm", ["--requests", "1", "--layers-per-call", "1"]),  # one request, layer by layer as a prefill step sends
])
def test_bench_transfer_cli_json(backend, extra):
    out = subprocess.run(
        [sys.executable, "-m", "splitserve.cli", "bench", "transfer", "--backend", backend, "--model-shape", "tiny",
         "--tokens", "40", "--src-page-size", "16", "--dst-page-size", "8", "--repeat", "1", "--json", *extra],
        capture_output=True, text=True, timeout=120, check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["verified"] is True
    assert result["requests"] == (1 if extra else 8) and result["layers_per_call"] == (1 if extra else 4)
    assert result["gbps"] > 0 and result["baseline_gbps"] > 0 and result["sender_gbps"] > 0
    assert result["ratio"] == pytest.approx(result["gbps"] / result["baseline_gbps"], rel=0.01)
