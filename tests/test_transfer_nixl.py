"""The NIXL copy engine (transfer/nixl.py): the one-sided KV path over NIXL/UCX WRITEs (and READs of a held prefix).

In this process (a receiver and a sender, two NIXL agents, the real ZeroMQ control channel of
tests/test_transfer_direct.py's ``Pair``) and across processes (a sender in a spawned child, with
tests/test_transfer.py's jobs and byte checks). Skipped where NIXL does not import or cannot create a UCX agent.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import random
import time

import msgspec
import numpy as np
import pytest
import torch

from splitserve.core.config import TransferConfig
from splitserve.core.messages import PrefillDone
from splitserve.transfer.base import KVLayout, LayerSend, TransferComplete, TransferError, token_slots
from splitserve.transfer.direct import DirectKVReceiver, DirectKVSender
from splitserve.transfer.loopback import SenderReport, SenderSpec, _run_jobs, random_kv, recv_msg, send_msg
from splitserve.transfer.nixl import NixlCopyEngine, coalesce_runs


def _nixl_unavailable() -> str | None:
    try:
        NixlCopyEngine().close()
    except TransferError as exc:
        return str(exc)
    return None


_WHY = _nixl_unavailable()
if _WHY is not None:
    pytest.skip(f"nixl: {_WHY}", allow_module_level=True)

from test_transfer import DST_PAGES, Receiver, check_landed, layout, make_job, spec_for  # noqa: E402
from test_transfer_direct import LAYOUT, SHAPE, Pair, _fields, _fill_pages, _tokens  # noqa: E402

CPU = torch.device("cpu")
CTX = mp.get_context("spawn")


class NixlPair(Pair):
    """``Pair`` with a NIXL engine on each side: the sender's writes really go through NIXL (nothing held)."""

    def __init__(self) -> None:
        self.cfg = TransferConfig(lease_s=20.0)
        self.rx_engine, self.copies = NixlCopyEngine(), NixlCopyEngine()
        self.dst = self.rx_engine.allocate(SHAPE, torch.float32, CPU)
        self.rx = DirectKVReceiver(self.cfg, self.dst, LAYOUT, self.rx_engine)
        self.src = random_kv(LAYOUT, SHAPE[2], seed=3)
        self.tx = DirectKVSender(self.cfg, self.src, LAYOUT, self.copies)
        self.rx_events: list = []
        self.tx_events: list = []

    def pump_until_complete(self, tid: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not all(
            any(isinstance(e, TransferComplete) and e.transfer_id == tid for e in events)
            for events in (self.rx_events, self.tx_events)
        ):
            self.pump(1)

    def close(self) -> None:
        super().close()
        self.copies.close()
        self.rx_engine.close()


@pytest.fixture
def pair():
    p = NixlPair()
    yield p
    p.close()


def test_two_steps_land_every_byte(pair):
    src_pages, dst_pages = (7, 2, 9), (30, 1, 17)
    d = pair.desc("t0", 10, dst_pages)
    assert d.pool is not None and d.pool.kind == "nixl"
    pair.tx.begin(d, "req-t0")
    assert "t0" in pair.tx._direct  # the one-sided path, not inline frames
    pair.step([LayerSend("t0", src_pages, 0, 6)])
    pair.step([LayerSend("t0", src_pages, 6, 10)])
    pair.tx.finish("t0", PrefillDone(request_id="req-t0", transfer_id="t0", first_token=5))
    pair.pump_until_complete("t0")
    assert [type(e) for e in pair.rx_events if not hasattr(e, "layer")] == [TransferComplete]
    assert any(isinstance(e, TransferComplete) for e in pair.tx_events)
    assert torch.equal(_tokens(pair.dst, dst_pages, 10), _tokens(pair.src, src_pages, 10))
    untouched = [p for p in range(SHAPE[2]) if p not in dst_pages]
    assert torch.count_nonzero(pair.dst[:, :, untouched]) == 0


@pytest.mark.parametrize("over,direct", [
    ({"host_id": "elsewhere/boot"}, True),  # NIXL reaches other hosts: still one-sided
    ({"handle": b"not nixl metadata"}, False),  # cannot be loaded: inline frames instead
])
def test_pool_on_another_host_is_written_directly_and_bad_metadata_goes_inline(pair, over, direct):
    pool = type(pair.rx.pool_export)(**{**_fields(pair.rx.pool_export), **over})
    d = pair.desc("h", 6, (12, 13), pool=pool)
    pair.tx.begin(d, "req-h")
    assert ("h" in pair.tx._direct) is direct
    pair.step([LayerSend("h", (3, 4), 0, 6)])
    pair.tx.finish("h", PrefillDone(request_id="req-h", transfer_id="h", first_token=2))
    pair.pump_until_complete("h")
    assert [e.transfer_id for e in pair.rx_events if isinstance(e, TransferComplete)] == ["h"]
    assert torch.equal(_tokens(pair.dst, (12, 13), 6), _tokens(pair.src, (3, 4), 6))


def test_coalesce_runs_merges_rows_contiguous_in_both_pools():
    assert coalesce_runs(np.arange(8, 24), np.arange(40, 56)).tolist() == [[8, 40, 16]]
    src, dst = token_slots((2, 3), 4, 0, 8), token_slots((10, 12), 4, 0, 8)  # dst breaks between its pages
    assert coalesce_runs(src, dst).tolist() == [[8, 40, 4], [12, 48, 4]]
    src, dst = token_slots((1, 2), 8, 0, 16), token_slots((6, 7, 8, 9), 4, 0, 16)  # page sizes differ
    assert coalesce_runs(src, dst).tolist() == [[8, 24, 16]]
    assert coalesce_runs(np.array([5, 6, 9]), np.array([1, 2, 3])).tolist() == [[5, 1, 2], [9, 3, 1]]
    assert coalesce_runs(np.array([], dtype=np.int64), np.array([], dtype=np.int64)).shape == (0, 3)
    with pytest.raises(ValueError):
        coalesce_runs(np.arange(3), np.arange(4))


@pytest.fixture
def opened():
    """(sender engine, receiver pool, the sender's placeholder for it, source pool)."""
    rx_engine, tx_engine = NixlCopyEngine(), NixlCopyEngine()
    try:
        dst = rx_engine.allocate(SHAPE, torch.float32, CPU)
        target = tx_engine.open(rx_engine.export(dst))
        assert target.device.type == "meta" and tuple(target.shape) == SHAPE
        yield tx_engine, dst, target, random_kv(LAYOUT, SHAPE[2], seed=1)
    finally:
        tx_engine.close()
        rx_engine.close()


RUNS = [  # (pages on one side, pages on the other, descriptors per K or V plane)
    ((2, 3, 4, 5), (10, 11, 12, 13), 1),  # adjacent pages in both pools: one run
    ((2, 7, 4, 9), (10, 3, 12, 20), 4),  # scattered: one run per page
    ((2, 3, 4, 5), (10, 11, 20, 21), 2),  # adjacent on one side only where the other is too
]


@pytest.mark.parametrize("src_pages,dst_pages,per_plane", RUNS)
def test_write_uses_one_descriptor_per_run_and_plane(opened, src_pages, dst_pages, per_plane):
    tx, dst, target, src = opened
    n = 4 * LAYOUT.page_size
    s = tx.slots(token_slots(src_pages, LAYOUT.page_size, 0, n))
    d = tx.slots(token_slots(dst_pages, LAYOUT.page_size, 0, n))
    tx.write(src, target, (1, 2), s, d)
    assert tx.last_descriptor_count == 2 * per_plane  # K and V of one layer
    tx.write(src, target, (0, LAYOUT.num_layers), s, d)
    assert tx.last_descriptor_count == 2 * LAYOUT.num_layers * per_plane
    assert tx.fence().done()
    assert torch.equal(_tokens(dst, dst_pages, n), _tokens(src, src_pages, n))


def test_failed_write_is_logged_and_its_fence_never_done(opened, caplog):
    tx, dst, target, src = opened
    plane_rows = SHAPE[2] * SHAPE[3]
    beyond = tx.slots(np.arange(plane_rows, plane_rows + 4))  # the last V plane's rows past the pool's end
    with caplog.at_level(logging.ERROR, logger="splitserve.transfer.nixl"):
        tx.write(src, target, (LAYOUT.num_layers - 1, LAYOUT.num_layers), tx.slots(np.arange(4)), beyond)
        fence = tx.fence()
    assert not fence.done() and not fence.done() and "WRITE" in fence.error
    assert any("pool" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert torch.count_nonzero(dst) == 0
    ok = tx.slots(np.arange(4))
    tx.write(src, target, (0, 1), ok, ok)  # the engine still works for later writes
    assert tx.fence().done()


def test_held_prefix_is_read_over_nixl_then_only_the_suffix_lands(pair):
    """tests/test_transfer_direct.py's held-prefix test, the read a real NIXL READ: complete once read_held returns."""
    held_pages, fresh = (20, 21), (22,)
    _fill_pages(pair.dst, held_pages, seed=11)
    d = pair.desc("h", 10, held_pages + fresh, held_tokens=8)
    pair.tx.begin(d, "req-h")
    assert "h" in pair.tx._direct and not torch.equal(pair.src[:, :, [5, 6]], pair.dst[:, :, list(held_pages)])
    before = pair.src.clone()
    assert pair.tx.read_held("h", held_pages, (5, 6))  # into the sender's pages 5 and 6, every layer
    assert torch.equal(pair.src[:, :, [5, 6]], pair.dst[:, :, list(held_pages)])  # byte for byte, K and V, already
    others = [p for p in range(SHAPE[2]) if p not in (5, 6)]
    assert torch.equal(pair.src[:, :, others], before[:, :, others])
    assert pair.copies.last_descriptor_count == 2 * LAYOUT.num_layers  # adjacent in both pools: one run a plane
    pair.step([LayerSend("h", (5, 6, 7), 8, 10)])  # the suffix only
    pair.tx.finish("h", PrefillDone(request_id="req-h", transfer_id="h", first_token=3))
    pair.pump_until_complete("h")
    assert [e.transfer_id for e in pair.rx_events if isinstance(e, TransferComplete)] == ["h"]
    assert any(isinstance(e, TransferComplete) for e in pair.tx_events)
    assert torch.equal(_tokens(pair.dst, held_pages + fresh, 10)[:, :, 8:], _tokens(pair.src, (5, 6, 7), 10)[:, :, 8:])
    assert torch.equal(pair.src[:, :, [5, 6]], pair.dst[:, :, list(held_pages)])  # the held pages were not rewritten


@pytest.mark.parametrize("dst_pages,src_pages,per_plane", RUNS)
def test_read_uses_one_descriptor_per_run_and_plane(opened, src_pages, dst_pages, per_plane):
    tx, peer, target, local = opened
    _fill_pages(peer, src_pages, seed=5)
    before = local.clone()
    n = 4 * LAYOUT.page_size
    s = tx.slots(token_slots(src_pages, LAYOUT.page_size, 0, n))
    d = tx.slots(token_slots(dst_pages, LAYOUT.page_size, 0, n))
    assert tx.read(target, local, (1, 2), s, d)  # one layer: the others stay as they were
    assert tx.last_descriptor_count == 2 * per_plane
    assert torch.equal(_tokens(local, dst_pages, n)[1], _tokens(peer, src_pages, n)[1])
    assert torch.equal(local[[0, 2]], before[[0, 2]])
    assert tx.read(target, local, (0, LAYOUT.num_layers), s, d)
    assert tx.last_descriptor_count == 2 * LAYOUT.num_layers * per_plane
    assert torch.equal(_tokens(local, dst_pages, n), _tokens(peer, src_pages, n))
    others = [p for p in range(SHAPE[2]) if p not in dst_pages]
    assert torch.equal(local[:, :, others], before[:, :, others])
    assert tx.fence().done()  # a read is never left to a fence


def test_failed_read_raises_naming_the_pool_and_leaves_the_destination_alone(opened, caplog):
    tx, peer, target, local = opened
    peer.fill_(1.0)
    before = local.clone()
    plane_rows = SHAPE[2] * SHAPE[3]
    beyond = tx.slots(np.arange(plane_rows, plane_rows + 4))  # the last V plane's rows past the pool's end
    pool_id = tx._remote[id(target)].pool_id
    with caplog.at_level(logging.ERROR, logger="splitserve.transfer.nixl"), pytest.raises(TransferError) as err:
        tx.read(target, local, (LAYOUT.num_layers - 1, LAYOUT.num_layers), beyond, tx.slots(np.arange(4)))
    assert "READ" in str(err.value) and pool_id in str(err.value)
    assert any(pool_id in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert torch.equal(local, before)
    assert tx.fence().done()  # nothing left behind for the next fence
    ok = tx.slots(np.arange(4))
    assert tx.read(target, local, (0, 1), ok, ok)  # the engine still reads afterwards
    assert torch.equal(local[0, :, 0], peer[0, :, 0])


@pytest.mark.parametrize("released", [True, False])
def test_late_read_is_aborted_and_raises(opened, monkeypatch, caplog, released):
    """A READ not final within ``fence_wait_s`` (here never posted, always in progress): released, then an error."""
    tx, _peer, target, local = opened
    before = local.clone()
    tx.fence_wait_s = 0.05
    monkeypatch.setattr(tx._agent, "transfer", lambda handle, notif_msg=b"": "PROC")
    monkeypatch.setattr(tx._agent, "check_xfer_state", lambda handle: "PROC")
    if not released:
        monkeypatch.setattr(tx, "_release", lambda x: False)
    slots = tx.slots(np.arange(8))
    with caplog.at_level(logging.ERROR, logger="splitserve.transfer.nixl"), pytest.raises(TransferError,
                                                                                          match="within 0.05s"):
        tx.read(target, local, (0, 1), slots, slots)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(("aborted" if released else "may still be written") in m for m in errors), errors
    assert torch.equal(local, before) and not tx._issued


def test_read_from_a_pool_this_engine_did_not_open_is_refused(opened):
    tx, peer, target, local = opened
    slots = tx.slots(np.arange(4))
    for foreign in (torch.empty(SHAPE, device="meta"), peer):  # another placeholder; a real pool
        with pytest.raises(TransferError, match="did not open"):
            tx.read(foreign, local, (0, 1), slots, slots)


def _sender_child(conn) -> None:
    """Child: run one :class:`SenderSpec` through a NIXL sender as transfer/loopback.py's child does; report."""
    spec = recv_msg(conn, SenderSpec)
    lay = KVLayout(**spec.layout)
    engine = NixlCopyEngine()
    tx = DirectKVSender(TransferConfig.from_mapping(spec.transfer_cfg), random_kv(lay, spec.num_pages, spec.seed),
                        lay, engine)
    try:
        events = _run_jobs(tx, spec, spec.jobs, conn)
        report = SenderReport(
            completed=tuple(e.transfer_id for e in events if isinstance(e, TransferComplete)),
            failed=tuple((e.transfer_id, e.reason) for e in events if not isinstance(e, TransferComplete)),
            seconds=0.0,
        )
        send_msg(conn, {"report": report, "descriptors": engine.last_descriptor_count})
    finally:
        tx.close()
        engine.close()


class NixlReceiver(Receiver):
    """tests/test_transfer.py's receiver over a NIXL-exported pool."""

    def __init__(self, page_size: int) -> None:
        self.layout = layout(page_size)
        self.engine = NixlCopyEngine()
        shape = (self.layout.num_layers, 2, DST_PAGES, page_size, self.layout.num_kv_heads, self.layout.head_dim)
        self.kv = self.engine.allocate(shape, torch.float32, CPU)
        self.rx = DirectKVReceiver(TransferConfig(), self.kv, self.layout, self.engine)
        self.free = list(range(DST_PAGES))
        random.Random(0).shuffle(self.free)


def test_round_trip_across_processes_mismatched_page_sizes_out_of_order():
    rx = NixlReceiver(8)
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=_sender_child, args=(child,), daemon=True)
    proc.start()
    try:
        rng = random.Random(4)
        jobs = [make_job(rx.reserve(f"t{i}", n), 16, rng) for i, n in enumerate([1, 16, 37, 100])]
        send_msg(parent, spec_for(rx, jobs, 16, 4, "auto"))
        final = rx.pump({j.desc.transfer_id for j in jobs}, timeout_s=60)
        reply = recv_msg(parent, timeout_s=60)
        assert reply["descriptors"] > 0  # the data went through NIXL, not inline frames
        check_landed(rx, jobs, 16, 4, final, msgspec.convert(reply["report"], SenderReport))
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        rx.rx.close()
        rx.engine.close()
