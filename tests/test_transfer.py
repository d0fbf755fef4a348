"""KV transfer between real processes on loopback (ZeroMQ; UCX where ``ucxx`` imports).

The receiver runs in the test process; senders run in spawned child processes
(:func:`splitserve.transfer.loopback.run_sender`) over real sockets.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import re
import time

import pytest
import torch
import zmq

from splitserve.core.config import TransferConfig
from splitserve.core.messages import KVDescriptor, PrefillDone
from splitserve.transfer import wire
from splitserve.transfer.base import (
    KVLayout,
    LayerArrived,
    TransferComplete,
    TransferError,
    TransferFailed,
    gather_tokens,
    token_slots,
)
from splitserve.transfer.registry import make_copy_engine, make_receiver, make_sender
from splitserve.transfer.loopback import SenderJob, SenderProcess, SenderSpec, random_kv, recv_msg, send_msg

CTX = mp.get_context("spawn")
SHAPE = dict(model_id="tiny", dtype="float32", num_layers=4, num_kv_heads=2, head_dim=8)
SRC_PAGES = 64
DST_PAGES = 128


def _ucx_available() -> str | None:
    try:
        from splitserve.transfer.ucx_backend import ucx_unavailable_reason
    except ImportError as exc:  # pragma: no cover - depends on the machine
        return str(exc)
    return ucx_unavailable_reason()


def _nixl_available() -> str | None:
    try:
        from splitserve.transfer.nixl import load_nixl

        load_nixl()
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here", reported as the skip reason
        return f"{type(exc).__name__}: {exc}"
    return None


BACKENDS = [
    "zmq",
    "shm",
    pytest.param("nixl", marks=pytest.mark.skipif(_nixl_available() is not None, reason=f"nixl: {_nixl_available()}")),
    pytest.param("ucx", marks=pytest.mark.skipif(_ucx_available() is not None, reason=f"ucx: {_ucx_available()}")),
]


def layout(page_size: int, **over) -> KVLayout:
    return KVLayout(**{**SHAPE, "page_size": page_size, **over})


class Receiver:
    """A receiver in this process plus the bookkeeping to check every landed byte."""

    def __init__(self, backend: str, page_size: int, **cfg) -> None:
        self.layout = layout(page_size)
        shape = (SHAPE["num_layers"], 2, DST_PAGES, page_size, SHAPE["num_kv_heads"], SHAPE["head_dim"])
        copy = make_copy_engine(backend, torch.device("cpu"))  # shm: the pool lives in shared memory
        self.kv = copy.allocate(shape, torch.float32, torch.device("cpu")) if copy else torch.zeros(shape)
        self.cfg = TransferConfig(backend=backend, **cfg)
        self.rx = make_receiver(self.cfg, self.kv, self.layout, copy)
        self.free = list(range(DST_PAGES))
        random.Random(0).shuffle(self.free)

    def reserve(self, tid: str, num_tokens: int, lease_s: float = 20.0) -> KVDescriptor:
        n = -(-num_tokens // self.layout.page_size)
        pages, self.free = tuple(self.free[:n]), self.free[n:]
        lay = self.layout
        desc = KVDescriptor(
            tid, self.rx.address, lay.model_id, lay.dtype, lay.num_layers, lay.num_kv_heads, lay.head_dim,
            lay.page_size, pages, num_tokens, lease_s, pool=self.rx.pool_export,
        )
        self.rx.expect(desc)
        return desc

    def pump(self, ids: set[str], timeout_s: float = 30.0) -> dict[str, object]:
        """Poll until every id in ``ids`` has a final event; return them by id."""
        final: dict[str, object] = {}
        deadline = time.monotonic() + timeout_s
        while ids - final.keys() and time.monotonic() < deadline:
            for ev in self.rx.poll(20):
                if isinstance(ev, (TransferComplete, TransferFailed)):
                    final[ev.transfer_id] = ev
        return final

    def tokens(self, desc: KVDescriptor, layer: int) -> torch.Tensor:
        out = torch.empty(2, desc.num_tokens, SHAPE["num_kv_heads"], SHAPE["head_dim"])
        gather_tokens(self.kv, layer, token_slots(desc.page_ids, desc.page_size, 0, desc.num_tokens), out)
        return out


def src_tokens(src_layout: KVLayout, job: SenderJob, seed: int, layer: int) -> torch.Tensor:
    kv = random_kv(src_layout, SRC_PAGES, seed)
    out = torch.empty(2, job.desc.num_tokens, SHAPE["num_kv_heads"], SHAPE["head_dim"])
    gather_tokens(kv, layer, token_slots(job.src_page_ids, src_layout.page_size, 0, job.desc.num_tokens), out)
    return out


def make_job(desc: KVDescriptor, src_ps: int, rng: random.Random, chunk: int = 13) -> SenderJob:
    n = -(-desc.num_tokens // src_ps)
    src_pages = tuple(rng.sample(range(SRC_PAGES), n))
    order = list(range(SHAPE["num_layers"]))
    rng.shuffle(order)  # layers out of order
    return SenderJob(desc=desc, request_id=f"req-{desc.transfer_id}", src_page_ids=src_pages, layer_order=tuple(order), chunk_tokens=chunk)


@pytest.fixture(scope="module")
def sender():
    proc = SenderProcess(CTX)
    yield proc
    proc.stop()


def spec_for(rx: Receiver, jobs, src_ps: int, seed: int, backend: str, **kw) -> SenderSpec:
    cfg = {"backend": backend, **kw.pop("cfg", {})}
    return SenderSpec(
        transfer_cfg=cfg, layout={**SHAPE, "page_size": src_ps}, num_pages=SRC_PAGES, seed=seed, jobs=tuple(jobs), **kw
    )


def run_round_trip(sender: SenderProcess, rx: Receiver, backend: str, src_ps: int, sizes: list[int], seed: int, **kw):
    rng = random.Random(seed)
    jobs = [make_job(rx.reserve(f"t{i}", n), src_ps, rng) for i, n in enumerate(sizes)]
    sender.start(spec_for(rx, jobs, src_ps, seed, backend, **kw))
    final = rx.pump({j.desc.transfer_id for j in jobs}, timeout_s=60)
    return jobs, final, sender.report()


def check_landed(rx: Receiver, jobs, src_ps: int, seed: int, final, report) -> None:
    assert sorted(report.completed) == sorted(j.desc.transfer_id for j in jobs), report.failed
    for job in jobs:
        ev = final[job.desc.transfer_id]
        assert isinstance(ev, TransferComplete) and ev.done.request_id == job.request_id
        for layer in range(SHAPE["num_layers"]):
            assert torch.equal(rx.tokens(job.desc, layer), src_tokens(layout(src_ps), job, seed, layer))
    used = {p for j in jobs for p in j.desc.page_ids}
    untouched = [p for p in range(DST_PAGES) if p not in used]
    assert torch.count_nonzero(rx.kv[:, :, untouched]) == 0, "bytes landed outside the reserved pages"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("src_ps,dst_ps,use_ipc", [(16, 8, False), (16, 32, True), (16, 16, False)])
def test_round_trip_mismatched_page_sizes_out_of_order(sender, backend, src_ps, dst_ps, use_ipc):
    if backend == "ucx" and use_ipc:
        pytest.skip("ipc:// applies to the ZeroMQ channel only")
    rx = Receiver(backend, dst_ps, use_ipc=use_ipc)
    try:
        jobs, final, report = run_round_trip(sender, rx, backend, src_ps, [1, 16, 37, 100], seed=dst_ps)
        check_landed(rx, jobs, src_ps, dst_ps, final, report)
    finally:
        rx.rx.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hundred_concurrent_transfers(sender, backend):
    rx = Receiver(backend, 8)
    try:
        rng = random.Random(5)
        jobs, final, report = run_round_trip(sender, rx, backend, 16, [rng.randint(1, 10) for _ in range(100)], seed=3)
        check_landed(rx, jobs, 16, 3, final, report)
    finally:
        rx.rx.close()


def test_curve_round_trip_and_unkeyed_sender_refused(sender):
    server_pub, server_sec = (k.decode() for k in zmq.curve_keypair())
    client_pub, client_sec = (k.decode() for k in zmq.curve_keypair())
    rx = Receiver("zmq", 8, curve_public_key=server_pub, curve_secret_key=server_sec)
    try:
        client = {"curve_server_key": server_pub, "curve_public_key": client_pub, "curve_secret_key": client_sec}
        jobs, final, report = run_round_trip(sender, rx, "zmq", 16, [40], seed=9, cfg=client)
        check_landed(rx, jobs, 16, 9, final, report)
        # a sender without the server key cannot deliver anything: it times out, the receiver's lease expires
        desc = rx.reserve("plain", 10, lease_s=1.0)
        job = make_job(desc, 16, random.Random(1))
        sender.start(spec_for(rx, [job], 16, 1, "zmq", cfg={"lease_s": 1.0}, wait_s=10))
        final = rx.pump({"plain"}, timeout_s=20)
        report = sender.report()
        assert "lease" in final["plain"].reason
        assert report.completed == () and re.search("did not acknowledge|unreachable", report.failed[0][1])
    finally:
        rx.rx.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sender_killed_mid_transfer_lease_expires(sender, backend):
    rx = Receiver(backend, 8)
    try:
        desc = rx.reserve("dies", 64, lease_s=3.0)  # the lease runs from here: room for a slow process start
        job = make_job(desc, 16, random.Random(2))
        doomed = SenderProcess(CTX)
        doomed.start(spec_for(rx, [job], 16, 2, backend, stall_after_chunks=3))
        deadline = time.monotonic() + 30
        arrived = []
        while not doomed.conn.poll(0) and time.monotonic() < deadline:
            arrived += rx.rx.poll(20)
        assert recv_msg(doomed.conn)["event"] == "stalled"
        doomed.proc.kill()
        doomed.proc.join(10)
        # On a loaded machine the lease can already run out between two of the sender's frames.
        early = [e for e in arrived if isinstance(e, TransferFailed) and e.transfer_id == "dies"]
        ev = early[0] if early else rx.pump({"dies"}, timeout_s=20).get("dies")
        assert isinstance(ev, TransferFailed) and "lease" in ev.reason and "expired" in ev.reason
        # the pages are reclaimable: a new transfer reusing them succeeds
        rx.free = list(desc.page_ids) + rx.free
        jobs, final, report = run_round_trip(sender, rx, backend, 16, [64], seed=4)
        assert jobs[0].desc.page_ids == desc.page_ids
        check_landed(rx, jobs, 16, 4, final, report)
    finally:
        rx.rx.close()


def _receiver_child(conn, backend: str) -> None:
    """Child: expect one transfer, report the descriptor, then wait to be killed."""
    rx = Receiver(backend, 8)
    desc = rx.reserve("orphan", 50)
    send_msg(conn, desc)
    while True:
        rx.rx.poll(50)


@pytest.mark.parametrize("backend", BACKENDS)
def test_receiver_killed_sender_reports_failure(backend):
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=_receiver_child, args=(child, backend), daemon=True)
    proc.start()
    desc = recv_msg(parent, KVDescriptor)
    lay = layout(16)
    kv = random_kv(lay, SRC_PAGES, 0)
    tx = make_sender(TransferConfig(backend=backend, lease_s=1.0), kv, lay)
    try:
        tx.begin(desc, "req-orphan")
        tx.send_layer("orphan", 0, list(range(4)), 0, 50)
        time.sleep(0.3)
        assert tx.poll() == []  # acks of a live receiver: no failure
        assert getattr(tx, "mapped_pools", 1) == 1  # one-sided backends mapped the receiver's pool
        proc.kill()
        proc.join(10)
        tx.send_layer("orphan", 1, list(range(4)), 0, 50)
        events = []
        deadline = time.monotonic() + 20
        while not events and time.monotonic() < deadline:
            events = tx.poll()
            time.sleep(0.05)
        assert len(events) == 1 and isinstance(events[0], TransferFailed), events
        assert events[0].request_id == "req-orphan" and re.search("did not acknowledge|unreachable|UCX send failed|one-sided write failed", events[0].reason)
        with pytest.raises(TransferError, match="not active"):
            tx.send_layer("orphan", 2, list(range(4)), 0, 50)  # the sender forgot it (its side is freed)
        deadline = time.monotonic() + 20
        while getattr(tx, "mapped_pools", 0) and time.monotonic() < deadline:  # and lets go of the dead receiver's pool
            tx.poll()
            time.sleep(0.05)
        assert getattr(tx, "mapped_pools", 0) == 0
    finally:
        tx.close()


def test_layout_mismatch_refused_with_clear_error():
    rx = Receiver("zmq", 8)
    tx_layout = layout(16, num_kv_heads=4)
    kv = torch.zeros(4, 2, 4, 16, 4, 8)
    tx = make_sender(TransferConfig(), kv, tx_layout)
    try:
        desc = rx.reserve("m", 10)
        with pytest.raises(TransferError, match="num_kv_heads"):
            tx.begin(desc)
        with pytest.raises(TransferError, match="dtype"):
            layout(16, dtype="bfloat16").check_compatible(desc)
        # a sender that lies past its own check is refused by the receiver too
        raw = _raw_dealer(rx)
        raw.send(wire.encode(wire.Begin("m", 1, "tiny", "float32", 4, 4, 8)))
        ev = rx.pump({"m"}, timeout_s=10)["m"]
        assert isinstance(ev, TransferFailed) and "num_kv_heads" in ev.reason
        assert not wire.decode_ack(raw.recv()).ok
        raw.close(linger=0)
    finally:
        tx.close()
        rx.rx.close()


def _raw_dealer(rx: Receiver) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(rx.rx.address)
    return sock


def test_garbage_and_truncated_frames_rejected_without_crash(sender):
    rx = Receiver("zmq", 8)
    raw = _raw_dealer(rx)
    try:
        rx.reserve("g", 20)
        rx.reserve("h", 20)
        raw.send(b"\x00garbage\xff" * 10)  # undecodable header: dropped
        raw.send_multipart([b"", b"", b""])  # empty frames
        raw.send(wire.encode(wire.Chunk("nobody", 1, 0, 0, 4, 4 * 128)))  # unknown transfer
        good = wire.Chunk("g", 2, 0, 0, 20, 20 * 2 * 2 * 8 * 4)
        raw.send_multipart([wire.encode(good), b"\x01" * (good.nbytes - 3)])  # truncated payload
        bad_range = wire.Chunk("h", 3, 1, 10, 30, 20 * 2 * 2 * 8 * 4)
        raw.send_multipart([wire.encode(bad_range), b"\x01" * bad_range.nbytes])  # beyond the reservation
        final = rx.pump({"g", "h"}, timeout_s=10)
        assert "truncated" in final["g"].reason and "outside the reservation" in final["h"].reason
        assert torch.count_nonzero(rx.kv) == 0
        # the receiver still works
        jobs, final, report = run_round_trip(sender, rx, "zmq", 16, [33], seed=6)
        check_landed(rx, jobs, 16, 6, final, report)
    finally:
        raw.close(linger=0)
        rx.rx.close()


def test_cancel_drops_late_frames_and_incomplete_finish_fails():
    rx = Receiver("zmq", 8)
    lay = layout(16)
    kv = random_kv(lay, SRC_PAGES, 0)
    tx = make_sender(TransferConfig(), kv, lay)
    try:
        a, b = rx.reserve("a", 30), rx.reserve("b", 30)
        tx.begin(a)
        tx.begin(b)
        rx.rx.cancel("a")
        tx.send_layer("a", 0, [0, 1], 0, 30)
        tx.send_layer("b", 0, [0, 1], 0, 30)
        tx.finish("b", PrefillDone(request_id="rb", transfer_id="b", first_token=1))  # layers 1..3 missing
        events: list = []
        deadline = time.monotonic() + 10
        while len([e for e in events if not isinstance(e, LayerArrived)]) < 1 and time.monotonic() < deadline:
            events += rx.rx.poll(20)
        assert [type(e) for e in events] == [LayerArrived, TransferFailed]
        assert "incomplete" in events[1].reason and events[1].request_id == "rb"
        assert torch.count_nonzero(rx.kv[:, :, list(a.page_ids)]) == 0
        sender_events: list = []
        while len(sender_events) < 2 and time.monotonic() < deadline:
            sender_events += tx.poll()
        assert sorted(e.transfer_id for e in sender_events) == ["a", "b"]
        assert all(isinstance(e, TransferFailed) for e in sender_events)
    finally:
        tx.close()
        rx.rx.close()


def test_ucx_polling_progress_round_trip(sender):
    """The GPU default (busy-polling progress thread), exercised on host memory."""
    if _ucx_available() is not None:
        pytest.skip(f"ucx: {_ucx_available()}")
    rx = Receiver("ucx", 8, ucx_progress="polling")
    try:
        assert rx.rx._ucx.polling
        jobs, final, report = run_round_trip(sender, rx, "ucx", 16, [5, 40], seed=11)
        check_landed(rx, jobs, 16, 11, final, report)
    finally:
        rx.rx.close()


def test_ucx_probe_ladder_moves_unexpected_messages_on_cpu():
    """The GPU diagnostic (benchmarks/ucx_gpu_probe.py) on host memory: data sent before any receive exists."""
    if _ucx_available() is not None:
        pytest.skip(f"ucx: {_ucx_available()}")
    from splitserve.benchmarks.ucx_gpu_probe import Variant, probe, table

    res = probe(Variant("polling", "send-first", ""), "cpu", nbytes=1 << 20, messages=3)
    assert res.ok, res
    assert (res.completed, res.messages, res.data_ok, res.gpu_over_tcp) == (3, 3, True, False)
    assert "| polling | send-first | default | 3/3 | True |" in table([res], 1 << 20)
