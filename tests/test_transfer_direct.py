"""The one-sided KV path's contract (transfer/base.py steps 1'-6'), sender and receiver in this process.

The copy engine is the real shared-memory one (transfer/shm.py), wrapped so that writes stay *in flight* until a
test lets them complete: that is what a GPU copy on a side stream looks like to the host, and it lets these tests
check who may touch the pages when. Real processes over the same path: tests/test_transfer.py (``shm``) and every
end-to-end test (``--transfer auto``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from splitserve.core.config import TransferConfig
from splitserve.core.messages import KVDescriptor, PrefillDone
from splitserve.transfer import wire
from splitserve.transfer.base import KVLayout, LayerSend, TransferComplete, TransferError, TransferFailed, token_slots
from splitserve.transfer.direct import DirectKVReceiver, DirectKVSender
from splitserve.transfer.loopback import random_kv
from splitserve.transfer.shm import ShmCopyEngine

LAYOUT = KVLayout("tiny", "float32", num_layers=3, num_kv_heads=2, head_dim=4, page_size=4)
SHAPE = (3, 2, 32, 4, 2, 4)
CPU = torch.device("cpu")


@dataclass
class _Gate:
    open: bool = False
    error: str | None = None

    def done(self) -> bool:
        return self.open

    def failed(self) -> str | None:
        return self.error


@dataclass
class HeldCopies(ShmCopyEngine):
    """Shared-memory copies that happen only when the test releases them (a stand-in for an async device copy)."""

    queued: list = field(default_factory=list)
    gates: list = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def write(self, src, dst, layers, src_slots, dst_slots) -> None:
        self.queued.append((src, dst, layers, src_slots, dst_slots))

    def fence(self) -> _Gate:
        self.gates.append(_Gate())
        return self.gates[-1]

    def release(self) -> None:
        for src, dst, layers, s, d in self.queued:
            super().write(src, dst, layers, s, d)
        self.queued.clear()
        for g in self.gates:
            g.open = True


class Pair:
    """A receiver pool in shared memory and a sender with held copies, talking over loopback ZeroMQ."""

    def __init__(self, lease_s: float = 20.0) -> None:
        self.cfg = TransferConfig(backend="shm", lease_s=lease_s)
        shm = ShmCopyEngine()
        self.dst = shm.allocate(SHAPE, torch.float32, CPU)
        self.rx = DirectKVReceiver(self.cfg, self.dst, LAYOUT, shm)
        self.src = random_kv(LAYOUT, 32, seed=3)
        self.copies = HeldCopies()
        self.tx = DirectKVSender(self.cfg, self.src, LAYOUT, self.copies)
        self.rx_events: list = []
        self.tx_events: list = []

    def desc(self, tid: str, num_tokens: int, pages: tuple[int, ...], lease_s: float = 20.0, **over) -> KVDescriptor:
        fields = dict(pool=self.rx.pool_export)
        fields.update(over)
        d = KVDescriptor(tid, self.rx.address, "tiny", "float32", 3, 2, 4, 4, pages, num_tokens, lease_s, **fields)
        self.rx.expect(d, request_id=f"req-{tid}")
        return d

    def step(self, items: list[LayerSend]) -> None:
        for layer in range(LAYOUT.num_layers):
            self.tx.send_step_layer(layer, items)

    def pump(self, rounds: int = 30) -> None:
        for _ in range(rounds):
            self.tx_events += self.tx.poll()
            self.rx_events += self.rx.poll(5)

    def close(self) -> None:
        self.tx.close()
        self.rx.close()


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


def _tokens(pool: torch.Tensor, pages, n: int) -> torch.Tensor:
    slots = torch.from_numpy(token_slots(pages, LAYOUT.page_size, 0, n))
    return pool.flatten(2, 3)[:, :, slots]


def test_data_is_reported_only_after_the_writes_completed(pair):
    src_pages, dst_pages = (7, 2, 9), (30, 1, 17)
    d = pair.desc("t0", 10, dst_pages)
    pair.tx.begin(d, "req-t0")
    assert pair.rx._transfers["t0"].desc.pool is not None
    pair.step([LayerSend("t0", src_pages, 0, 6)])  # first chunk
    pair.step([LayerSend("t0", src_pages, 6, 10)])  # second chunk
    pair.tx.finish("t0", PrefillDone(request_id="req-t0", transfer_id="t0", first_token=5))
    pair.pump()
    assert not pair.rx_events  # writes in flight: no Landed, no Finish
    assert pair.tx.writes_in_flight()  # so the prefill worker's loop keeps polling instead of idling
    assert not pair.rx._transfers["t0"].covered.any()
    assert torch.count_nonzero(pair.dst) == 0  # and nothing was written yet
    pair.copies.release()
    assert pair.tx.writes_in_flight()  # complete, but Finish not sent yet: the next poll sends it
    pair.tx_events += pair.tx.poll()
    assert not pair.tx.writes_in_flight()
    assert pair.rx.wake_socket.poll(5000)  # the frames wake a decode worker waiting on its receiver's socket
    pair.pump()
    assert [type(e) for e in pair.rx_events if not hasattr(e, "layer")] == [TransferComplete]
    assert any(isinstance(e, TransferComplete) for e in pair.tx_events)
    assert torch.equal(_tokens(pair.dst, dst_pages, 10), _tokens(pair.src, src_pages, 10))


def test_step_batches_requests_into_one_copy_per_layer(pair):
    d1, d2 = pair.desc("a", 5, (3, 4)), pair.desc("b", 8, (5, 6))
    for d in (d1, d2):
        pair.tx.begin(d, f"req-{d.transfer_id}")
    pair.step([LayerSend("a", (0, 1), 0, 5), LayerSend("b", (10, 11), 0, 8)])
    assert len(pair.copies.queued) == LAYOUT.num_layers  # one copy per layer for both requests
    assert len(pair.copies.gates) == 1  # one fence for the step
    pair.copies.release()
    for tid in ("a", "b"):
        pair.tx.finish(tid, PrefillDone(request_id=f"req-{tid}", transfer_id=tid, first_token=1))
    pair.pump()
    done = {e.transfer_id for e in pair.rx_events if isinstance(e, TransferComplete)}
    assert done == {"a", "b"}
    assert torch.equal(_tokens(pair.dst, (5, 6), 8), _tokens(pair.src, (10, 11), 8))


def test_cancel_holds_pages_until_the_sender_stopped_writing(pair):
    d = pair.desc("c", 8, (8, 9))
    pair.tx.begin(d, "req-c")
    pair.step([LayerSend("c", (0, 1), 0, 4)])
    pair.pump(5)
    assert pair.rx.cancel("c") is False  # a write may be in flight: not safe yet
    pair.pump(10)
    assert not [e for e in pair.rx_events if isinstance(e, TransferFailed)]
    failed = [e for e in pair.tx_events if isinstance(e, TransferFailed)]
    assert failed and failed[0].transfer_id == "c"  # the nack reached the sender
    pair.step([LayerSend("c", (0, 1), 4, 8)])  # a later step no longer writes into those pages
    assert len(pair.copies.queued) == LAYOUT.num_layers
    pair.copies.release()  # the in-flight write completes; only now does the sender send Abort
    pair.pump()
    settled = [e for e in pair.rx_events if isinstance(e, TransferFailed)]
    assert [e.transfer_id for e in settled] == ["c"] and "cancelled" in settled[0].reason
    assert "c" not in pair.rx._transfers


def test_settling_transfer_is_released_at_the_lease_deadline_when_the_sender_is_silent():
    p = Pair(lease_s=0.6)
    try:
        d = p.desc("s", 4, (2,), lease_s=0.6)
        p.rx._transfers["s"].path = "shm"  # as if Begin had arrived from a sender that then froze
        assert p.rx.cancel("s") is False
        t0 = time.monotonic()
        while not p.rx_events and time.monotonic() - t0 < 5:
            p.rx_events += p.rx.poll(20)
        assert [type(e) for e in p.rx_events] == [TransferFailed]
        assert time.monotonic() - t0 >= 0.4  # not before the deadline that bounds the sender's window
    finally:
        p.close()


def test_write_window_closes_without_acknowledgements():
    p = Pair(lease_s=0.4)
    try:
        d = p.desc("w", 4, (2,), lease_s=0.4)
        p.tx.begin(d, "req-w")
        time.sleep(0.25)  # window = lease / 2 after Begin; the receiver never answered (not polled)
        p.step([LayerSend("w", (5,), 0, 4)])
        assert not p.copies.queued  # nothing written into pages whose lease may be over
        events = p.tx.poll()
        assert [type(e) for e in events] == [TransferFailed] and "window" in events[0].reason
    finally:
        p.close()


def test_acks_keep_the_write_window_open():
    p = Pair(lease_s=0.4)
    try:
        d = p.desc("k", 4, (2,), lease_s=0.4)
        p.tx.begin(d, "req-k")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.6:  # pings every lease / 4, acked: the window keeps moving
            p.pump(1)
        p.step([LayerSend("k", (5,), 0, 4)])
        assert len(p.copies.queued) == LAYOUT.num_layers
        assert not [e for e in p.tx_events + p.rx_events if isinstance(e, TransferFailed)]
    finally:
        p.close()


def test_pool_on_another_host_falls_back_to_inline_frames(pair):
    foreign = type(pair.rx.pool_export)(**{**_fields(pair.rx.pool_export), "host_id": "elsewhere/boot"})
    d = pair.desc("i", 6, (12, 13), pool=foreign)
    pair.tx.begin(d, "req-i")
    pair.step([LayerSend("i", (3, 4), 0, 6)])
    assert not pair.copies.queued  # inline: staged and sent as frames
    pair.tx.finish("i", PrefillDone(request_id="req-i", transfer_id="i", first_token=2))
    pair.pump()
    assert [e.transfer_id for e in pair.rx_events if isinstance(e, TransferComplete)] == ["i"]
    assert torch.equal(_tokens(pair.dst, (12, 13), 6), _tokens(pair.src, (3, 4), 6))


def _fields(export) -> dict:
    return {f: getattr(export, f) for f in export.__struct_fields__}


def test_receiver_refuses_paths_it_did_not_offer_and_bad_landed_frames(pair):
    pair.desc("u", 4, (1,), pool=None)  # inline-only transfer
    pair.desc("v", 4, (2,))
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(pair.rx.address)
    try:
        sock.send(wire.encode(wire.Begin("u", 1, "tiny", "float32", 3, 2, 4, path="shm")))
        sock.send(wire.encode(wire.Begin("v", 2, "tiny", "float32", 3, 2, 4, path="shm")))
        sock.send(wire.encode(wire.Landed("v", 3, 0, 9, 0, 4)))  # layers beyond the model
        pair.pump(10)
    finally:
        sock.close(linger=0)
    reasons = {e.transfer_id: e.reason for e in pair.rx_events if isinstance(e, TransferFailed)}
    assert "did not offer" in reasons["u"]
    assert "v" not in reasons and pair.rx._transfers["v"].settling is not None  # rejected, but may be written: settles
    assert "outside the reservation" in pair.rx._transfers["v"].settling


def test_landed_marks_exactly_the_written_tokens_and_twice_is_refused(pair):
    d = pair.desc("o", 8, (20, 21))
    pair.tx.begin(d, "req-o")
    pair.step([LayerSend("o", (0, 1), 0, 4)])
    pair.copies.release()
    pair.pump()
    cov = pair.rx._transfers["o"].covered
    assert cov[:, :4].all() and not cov[:, 4:].any()
    with pytest.raises(ValueError):
        pair.step([LayerSend("o", (0, 1), 0, 9)])  # beyond the reservation
    assert np.array_equal(cov, pair.rx._transfers["o"].covered)
    pair.tx.send_layer("o", 1, (0, 1), 2, 4)  # layer 1, tokens 2..3 again: the receiver refuses the duplicate
    pair.copies.release()
    pair.pump()
    failed = [e for e in pair.rx_events if isinstance(e, TransferFailed)]  # nacked, fenced by Abort, settled
    assert [e.transfer_id for e in failed] == ["o"] and "landed twice" in failed[0].reason


def test_sender_keeps_a_bounded_number_of_pools_mapped(pair, monkeypatch):
    """Receivers that restart leave old pools behind: the least recently used idle ones are unmapped."""
    from splitserve.transfer import direct

    monkeypatch.setattr(direct, "MAX_MAPPED_POOLS", 2)
    exports = [ShmCopyEngine() for _ in range(3)]
    pools = [e.allocate(SHAPE, torch.float32, CPU) for e in exports]
    for i, (engine, pool) in enumerate(zip(exports, pools)):
        export = engine.export(pool)
        pair.tx.begin(pair.desc(f"p{i}", 4, (1,), pool=export), f"req-p{i}")
        pair.tx.fail(f"p{i}", f"req-p{i}", "done with it")
        pair.pump(3)
    assert pair.tx.mapped_pools == 2


def test_a_failed_write_fails_its_transfer_at_once_and_fences_with_abort(pair):
    d = pair.desc("f", 8, (4, 5))
    pair.tx.begin(d, "req-f")
    pair.step([LayerSend("f", (0, 1), 0, 8)])
    pair.copies.gates[-1].error = "link down"  # every write behind the fence is final, and one failed
    pair.pump()
    sender_failed = [e for e in pair.tx_events if isinstance(e, TransferFailed)]
    assert [e.transfer_id for e in sender_failed] == ["f"] and "link down" in sender_failed[0].reason
    settled = [e for e in pair.rx_events if isinstance(e, TransferFailed)]  # Abort reached the receiver: no lease wait
    assert [e.transfer_id for e in settled] == ["f"] and "link down" in settled[0].reason
    assert not pair.rx._transfers and not [e for e in pair.rx_events if isinstance(e, TransferComplete)]


def test_shm_maps_only_a_splitserve_pool_memfd_of_the_right_size(tmp_path, pair):
    """A forged export cannot aim the sender's writes at another open file or a pool of another size."""
    import os

    from splitserve.transfer.base import TransferError

    victim = open(tmp_path / "victim.bin", "wb+")
    victim.truncate(4 * 3 * 2 * 32 * 4 * 2 * 4)
    good = pair.rx.pool_export
    for forged in (_with(good, fd=victim.fileno(), pid=os.getpid()), _with(good, shape=(3, 2, 16, 4, 2, 4))):
        with pytest.raises(TransferError, match="not a SplitServe KV pool"):
            ShmCopyEngine().open(forged)
    assert ShmCopyEngine().open(good).shape == SHAPE
    victim.close()


def _with(export, **over):
    return type(export)(**{**_fields(export), **over})


def _fill_pages(pool: torch.Tensor, pages, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in pages:
        pool[:, :, p] = torch.randn(pool[:, :, p].shape, generator=g)


def test_held_prefix_is_read_then_only_the_suffix_lands(pair):
    """A session's prefix held by the receiver: the sender reads its pages into its own pool, then sends the suffix."""
    held_pages, fresh = (20, 21), (22,)
    _fill_pages(pair.dst, held_pages, seed=11)
    d = pair.desc("h", 10, held_pages + fresh, held_tokens=8)
    assert pair.rx._transfers["h"].covered[:, :8].all() and not pair.rx._transfers["h"].covered[:, 8:].any()
    pair.tx.begin(d, "req-h")
    assert pair.tx.read_held("h", held_pages, (5, 6))  # into the sender's pages 5 and 6, every layer
    assert len(pair.copies.queued) == 1  # one copy, every layer
    pair.step([LayerSend("h", (5, 6, 7), 8, 10)])  # the suffix only
    pair.tx.finish("h", PrefillDone(request_id="req-h", transfer_id="h", first_token=3))
    pair.pump()
    assert not pair.rx_events  # Finish waits for the read and the writes
    pair.copies.release()
    pair.pump()
    assert [e.transfer_id for e in pair.rx_events if isinstance(e, TransferComplete)] == ["h"]
    assert torch.equal(pair.src[:, :, [5, 6]], pair.dst[:, :, list(held_pages)])  # read byte for byte
    assert torch.equal(_tokens(pair.dst, held_pages + fresh, 10)[:, :, 8:], _tokens(pair.src, (5, 6, 7), 10)[:, :, 8:])


def test_held_tokens_are_never_sent_and_only_held_pages_can_be_read(pair):
    with pytest.raises(TransferError, match="held_tokens"):
        pair.desc("odd", 10, (1, 2, 3), held_tokens=6)  # not a multiple of the page size
    with pytest.raises(TransferError, match="held_tokens"):
        pair.desc("all", 8, (1, 2), held_tokens=8)  # nothing left to send
    d = pair.desc("h2", 10, (1, 2, 3), held_tokens=4)
    pair.tx.begin(d, "req-h2")
    with pytest.raises(TransferError, match="not all held"):
        pair.tx.read_held("h2", (2,), (9,))  # page 2 holds tokens 4-7: not held
    pair.step([LayerSend("h2", (7, 8, 9), 0, 10)])  # a sender that sends the held tokens too is refused
    pair.copies.release()
    pair.pump()
    failed = [e for e in pair.rx_events if isinstance(e, TransferFailed)]
    assert [e.transfer_id for e in failed] == ["h2"] and "twice" in failed[0].reason


def test_inline_transfers_cannot_read_held_pages(pair):
    foreign = type(pair.rx.pool_export)(**{**_fields(pair.rx.pool_export), "host_id": "elsewhere/boot"})
    d = pair.desc("ih", 10, (12, 13, 14), pool=foreign, held_tokens=8)
    pair.tx.begin(d, "req-ih")
    assert pair.tx.read_held("ih", (12, 13), (3, 4)) is False and not pair.copies.queued
    pair.step([LayerSend("ih", (3, 4, 5), 8, 10)])
    pair.tx.finish("ih", PrefillDone(request_id="req-ih", transfer_id="ih", first_token=2))
    pair.pump()
    assert [e.transfer_id for e in pair.rx_events if isinstance(e, TransferComplete)] == ["ih"]
    assert torch.equal(_tokens(pair.dst, (12, 13, 14), 10)[:, :, 8:], _tokens(pair.src, (3, 4, 5), 10)[:, :, 8:])
