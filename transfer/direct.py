"""The one-sided KV path: a prefill worker writes straight into a decode worker's reserved pages (same host).

transfer/base.py states the contract (steps 1'-6'); this module implements it over the ZeroMQ control channel of
:mod:`splitserve.transfer.zmq_backend`, with a :class:`CopyEngine` that moves the bytes (transfer/cuda_ipc.py on
GPUs, transfer/shm.py on CPUs). Flow of one transfer:

1. Receiver: the copy engine exports the pool once (:attr:`DirectKVReceiver.pool_export`); the decode worker puts
   the export in every descriptor.
2. Sender ``begin``: opens the pool (cached by ``pool_id``) when the export's kind is its engine's and the host is
   this one (any host for a ``cross_host`` engine: transfer/nixl.py); ``Begin(path=kind)`` tells the receiver.
   Anything else falls back to inline frames, per transfer.
3. Sender ``send_step_layer``: at layer 0 it plans the step (slot vectors per destination pool, write windows
   checked); each layer is one copy per destination pool; after the last layer one fence covers the step.
4. Sender ``poll``: ``Landed`` for every write whose fence completed, in order; ``Finish``/``Abort`` once the last
   fence completed; ``Ping`` while a window needs renewing; transfers whose window closed are failed (not written).
5. Receiver: ``Landed`` marks tokens covered (``Finish`` then completes as inline); a transfer cancelled or
   rejected while the sender may still write *settles*: nacked, reported only on the sender's ``Abort``/``Finish``
   or at its lease deadline.
"""

from __future__ import annotations

import abc
import logging
import socket
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np
import torch

from splitserve.core.messages import KVDescriptor, KVPoolExport, PrefillDone, PrefillFailed
from splitserve.transfer import wire
from splitserve.transfer.base import (
    KVLayout,
    LayerArrived,
    LayerSend,
    TransferError,
    TransferEvent,
    TransferFailed,
    token_slots,
)
from splitserve.transfer.zmq_backend import Inbound, Reject, ZmqKVReceiver, ZmqKVSender

if TYPE_CHECKING:
    from splitserve.core.config import TransferConfig

logger = logging.getLogger(__name__)

WINDOW_FRACTION = 0.5
"""The sender writes until this fraction of ``lease_s`` after its latest acknowledged frame was sent."""
MAX_MAPPED_POOLS = 32
"""Receivers' pools a sender keeps open; past this the least recently used idle one is unmapped (a receiver that
restarted quietly leaves its old pool behind, and a mapping pins the memory)."""
PING_FRACTION = 0.25
"""A direct transfer with nothing else to send pings once this fraction of ``lease_s`` passed since its last frame."""


@cache
def host_id() -> str:
    """This host's name and kernel boot id (processes of one host share both; containers may differ in name)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"


class Fence(Protocol):
    """Marks every write a copy engine issued before it."""

    def done(self) -> bool:
        """True once all those writes completed (never blocks)."""

    def failed(self) -> str | None:
        """Why those writes will never all land, once none of them can still write; ``None`` otherwise."""


class CopyEngine(abc.ABC):
    """Moves K/V rows from this process's pool into a peer's pool on the same host.

    A sender-side engine is used from one thread (the prefill worker's loop); a receiver-side engine only exports.
    """

    kind: str
    """The ``KVPoolExport.kind`` this engine opens and exports."""
    cross_host: bool = False
    """True when :meth:`open` also works for a pool on another host (NIXL); otherwise such pools go inline."""

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A zeroed KV pool that :meth:`export` can share (the worker allocates its pool through this)."""
        return torch.zeros(shape, dtype=dtype, device=device)

    @abc.abstractmethod
    def export(self, kv_cache: torch.Tensor) -> KVPoolExport | None:
        """Receiver: how a peer opens ``kv_cache`` ``[L, 2, P, S, H, D]``; ``None`` when it cannot be shared."""

    @abc.abstractmethod
    def open(self, export: KVPoolExport) -> torch.Tensor:
        """Sender: map a peer's pool for writing (``[L, 2, P, S, H, D]``); raises :class:`TransferError`."""

    def slots(self, values: np.ndarray) -> torch.Tensor:
        """int64 ``[T]`` slot numbers -> a tensor the copies can read (here: host memory; a GPU engine uploads)."""
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))

    @abc.abstractmethod
    def write(
        self, src: torch.Tensor, dst: torch.Tensor, layers: tuple[int, int], src_slots: torch.Tensor,
        dst_slots: torch.Tensor,
    ) -> None:
        """Issue the copy of rows ``src_slots`` of pool ``src`` into rows ``dst_slots`` of pool ``dst`` for layers
        ``[layers[0], layers[1])``, ordered after every computation issued so far (their K/V); never waits for it.
        Pools are ``[L, 2, P, S, H, D]``, checked by the caller; slots come from :meth:`slots`."""

    def read(
        self, src: torch.Tensor, dst: torch.Tensor, layers: tuple[int, int], src_slots: torch.Tensor,
        dst_slots: torch.Tensor,
    ) -> bool:
        """Issue the copy of rows ``src_slots`` of a peer's pool ``src`` (opened here) into rows ``dst_slots`` of this
        process's pool ``dst``, ordered like :meth:`write`; a later :meth:`fence` orders this process's computation
        after it (an engine may also complete it before returning: NIXL does). ``False``: this engine cannot read a
        peer's pool (nothing issued); :class:`TransferError`: the read failed (the rows hold nothing usable).
        Default: the copy :meth:`write` makes, with source and destination swapped (a mapped peer pool reads as it
        writes)."""
        self.write(src, dst, layers, src_slots, dst_slots)
        return True

    @abc.abstractmethod
    def fence(self) -> Fence:
        """A fence after every write issued so far. Later computation on the source pool is ordered after them."""


@dataclass
class _Direct:
    """Sender-side state of one transfer on the one-sided path."""

    target: torch.Tensor
    lease_s: float
    window_end: float
    last_frame: float
    landed: deque[tuple[int, int, int, int, Fence]] = field(default_factory=deque)
    """Writes not yet reported: (layer_start, layer_end, token_start, token_end, fence)."""
    last_fence: Fence | None = None
    closing: Callable[[int], wire.SenderFrame] | None = None
    """``Finish`` or ``Abort`` to send once every write completed."""
    failed: bool = False
    """No more writes: the window closed, the receiver ended the transfer, or ``fail`` was called. The closing
    frame is then ``Abort`` (or a ``Finish`` already queued), and the transfer is forgotten once it is sent."""


@dataclass
class _StepPlan:
    items: Sequence[LayerSend]
    inline: list[LayerSend]
    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    """(destination pool, source slots, destination slots) per destination pool."""
    direct: list[LayerSend]


class DirectKVSender(ZmqKVSender):
    """See :class:`~splitserve.transfer.base.KVSender` (one-sided path, inline fallback per transfer)."""

    def __init__(self, cfg: "TransferConfig", kv_cache: torch.Tensor, layout: KVLayout, engine: CopyEngine) -> None:
        super().__init__(cfg, kv_cache, layout)
        self._engine = engine
        self._pools: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._pool_addrs: dict[str, str] = {}
        """pool id -> the receiver's control address: a pool is unmapped when that receiver is dropped."""
        self._refused: set[str] = set()
        """Pool ids that could not be opened here (logged once; their transfers go inline)."""
        self._direct: dict[str, _Direct] = {}
        self._plan: _StepPlan | None = None
        self._events: list[TransferEvent] = []

    @property
    def mapped_pools(self) -> int:
        """Receivers' pools this sender holds open (each pins its receiver's memory while mapped)."""
        return len(self._pools)

    # -- opening pools --

    def _open(self, pool: KVPoolExport) -> torch.Tensor | None:
        if pool.pool_id in self._pools:
            self._pools.move_to_end(pool.pool_id)
            return self._pools[pool.pool_id]
        if pool.pool_id in self._refused:
            return None
        why = None
        if pool.kind != self._engine.kind:
            why = f"pool kind {pool.kind!r} is not this sender's {self._engine.kind!r}"
        elif pool.host_id != host_id() and not self._engine.cross_host:
            why = "the receiver runs on another host"
        elif tuple(pool.shape[:2]) != (self._layout.num_layers, 2) or tuple(pool.shape[4:]) != (
            self._layout.num_kv_heads, self._layout.head_dim,
        ) or pool.dtype != self._layout.dtype:
            why = f"pool shape {pool.shape} / {pool.dtype} does not match this layout"
        if why is None:
            try:
                self._pools[pool.pool_id] = self._engine.open(pool)
                logger.info("opened KV pool %s of pid %d over %s for direct writes", pool.pool_id, pool.pid, pool.kind)
                self._unmap_idle()
                return self._pools[pool.pool_id]
            except TransferError as exc:
                why = str(exc)
        logger.info("KV pool %s: sending inline instead of %s: %s", pool.pool_id, pool.kind, why)
        self._refused.add(pool.pool_id)
        return None

    def _choose_path(self, desc: KVDescriptor) -> str:
        target = self._open(desc.pool) if desc.pool is not None else None
        if target is None:
            return "inline"
        self._pool_addrs[desc.pool.pool_id] = self._control_addr(desc)
        if any(not 0 <= p < target.shape[2] for p in desc.page_ids):  # never write outside the receiver's pool
            raise TransferError(f"transfer {desc.transfer_id}: page id outside the receiver's pool of {target.shape[2]}")
        now = time.monotonic()
        self._direct[desc.transfer_id] = _Direct(target, desc.lease_s, now + WINDOW_FRACTION * desc.lease_s, now)
        return self._engine.kind

    # -- writing --

    def send_step_layer(self, layer: int, items: Sequence[LayerSend]) -> None:
        if self._plan is None or self._plan.items is not items:
            self._plan = self._make_plan(items)
        plan = self._plan
        for it in plan.inline:
            super().send_layer(it.transfer_id, layer, it.src_page_ids, it.token_start, it.token_end)
        for dst, src_slots, dst_slots in plan.groups:
            self._engine.write(self._kv, dst, (layer, layer + 1), src_slots, dst_slots)
        if layer == self._layout.num_layers - 1:
            self._record(plan.direct, 0, self._layout.num_layers)
            self._plan = None

    def send_layer(
        self, transfer_id: str, layer: int, src_page_ids: Sequence[int], token_start: int, token_end: int
    ) -> None:
        if transfer_id not in self._direct:
            return super().send_layer(transfer_id, layer, src_page_ids, token_start, token_end)
        self._write_range(transfer_id, layer, layer + 1, src_page_ids, token_start, token_end)

    def send_layers(
        self, transfer_id: str, layer_start: int, layer_end: int, src_page_ids: Sequence[int], token_start: int,
        token_end: int,
    ) -> None:
        if transfer_id not in self._direct:  # the base loops over send_layer: inline
            return super().send_layers(transfer_id, layer_start, layer_end, src_page_ids, token_start, token_end)
        self._write_range(transfer_id, layer_start, layer_end, src_page_ids, token_start, token_end)

    def _write_range(
        self, transfer_id: str, layer_start: int, layer_end: int, src_page_ids: Sequence[int], token_start: int,
        token_end: int,
    ) -> None:
        item = LayerSend(transfer_id, tuple(src_page_ids), token_start, token_end)
        plan = self._make_plan((item,))
        for dst, src_slots, dst_slots in plan.groups:  # one copy for every layer of the range
            self._engine.write(self._kv, dst, (layer_start, layer_end), src_slots, dst_slots)
        self._record(plan.direct, layer_start, layer_end)

    def read_held(self, transfer_id: str, src_page_ids: Sequence[int], dst_page_ids: Sequence[int]) -> bool:
        d = self._direct.get(transfer_id)
        out = self._out.get(transfer_id)
        if d is None or out is None or d.failed or out.desc.page_size != self._layout.page_size or not src_page_ids:
            return False
        ps = self._layout.page_size
        held = set(out.desc.page_ids[:out.desc.held_tokens // ps])
        if len(src_page_ids) != len(dst_page_ids) or not held.issuperset(src_page_ids):
            raise TransferError(f"transfer {transfer_id}: pages to read are not all held by the receiver")
        src = token_slots(src_page_ids, ps, 0, len(src_page_ids) * ps)  # the pages as a page table: every token
        dst = token_slots(dst_page_ids, ps, 0, len(dst_page_ids) * ps)
        if not self._engine.read(d.target, self._kv, (0, self._layout.num_layers), self._engine.slots(src),
                                 self._engine.slots(dst)):
            return False
        d.last_fence = self._engine.fence()  # the closing frame waits for the read too (step 5')
        return True

    def _make_plan(self, items: Sequence[LayerSend]) -> _StepPlan:
        """Split a step into inline and direct sends; one slot-vector pair per destination pool."""
        now = time.monotonic()
        inline, direct = [], []
        by_pool: dict[int, tuple[torch.Tensor, list[np.ndarray], list[np.ndarray]]] = {}
        for it in items:
            d = self._direct.get(it.transfer_id)
            if d is None:
                inline.append(it)
                continue
            out = self._outbound(it.transfer_id)
            if d.failed:
                continue
            if now >= d.window_end:
                self._window_closed(it.transfer_id, d)
                continue
            if it.token_end > out.desc.num_tokens:
                raise ValueError(f"token_end {it.token_end} beyond the reservation of {out.desc.num_tokens} tokens")
            src = token_slots(it.src_page_ids, self._layout.page_size, it.token_start, it.token_end)
            dst = token_slots(out.desc.page_ids, out.desc.page_size, it.token_start, it.token_end)
            entry = by_pool.setdefault(id(d.target), (d.target, [], []))
            entry[1].append(src)
            entry[2].append(dst)
            direct.append(it)
        groups = [
            (target, self._engine.slots(np.concatenate(src)), self._engine.slots(np.concatenate(dst)))
            for target, src, dst in by_pool.values()
        ]
        return _StepPlan(items, inline, groups, direct)

    def _record(self, items: list[LayerSend], layer_start: int, layer_end: int) -> None:
        if not items:
            return
        fence = self._engine.fence()
        for it in items:
            d = self._direct[it.transfer_id]
            d.landed.append((layer_start, layer_end, it.token_start, it.token_end, fence))
            d.last_fence = fence

    def _window_closed(self, transfer_id: str, d: _Direct) -> None:
        out = self._outbound(transfer_id)
        reason = (f"the write window ({WINDOW_FRACTION * d.lease_s:g}s after the receiver's last acknowledgement) "
                  "closed before the prefill reached this request")
        logger.warning("request %s: transfer %s: %s", out.request_id, transfer_id, reason)
        self._events.append(TransferFailed(transfer_id, out.request_id, reason))
        self._stop_writing(transfer_id, d, reason)

    def _write_failed(self, transfer_id: str, d: _Direct, why: str) -> None:
        out = self._out[transfer_id]
        reason = f"a one-sided write failed: {why}"
        logger.warning("request %s: transfer %s: %s", out.request_id, transfer_id, reason)
        if not d.failed:
            self._events.append(TransferFailed(transfer_id, out.request_id, reason))
        self._stop_writing(transfer_id, d, reason)
        d.landed.clear()
        d.last_fence = None

    def _stop_writing(self, transfer_id: str, d: _Direct, reason: str) -> None:
        d.failed = True
        if d.closing is None:
            d.closing = _abort(transfer_id, self._out[transfer_id].request_id, reason)

    # -- ending --

    def finish(self, transfer_id: str, done: PrefillDone) -> None:
        d = self._direct.get(transfer_id)
        if d is None:
            return super().finish(transfer_id, done)
        out = self._outbound(transfer_id)
        out.done = done
        out.request_id = out.request_id or done.request_id
        if d.closing is None:
            d.closing = lambda seq: wire.Finish(transfer_id, seq, done)

    def fail(self, transfer_id: str, request_id: str, error: str, retryable: bool = True) -> None:
        d = self._direct.get(transfer_id)
        if d is None:
            return super().fail(transfer_id, request_id, error, retryable)
        self._outbound(transfer_id)
        d.failed = True
        d.closing = _abort(transfer_id, request_id, error, retryable)

    # -- progress --

    def writes_in_flight(self) -> bool:
        return any(d.landed or d.closing is not None for d in self._direct.values())

    def poll(self) -> list[TransferEvent]:
        events = super().poll()
        events.extend(self._events)
        self._events.clear()
        now = time.monotonic()
        for tid, d in list(self._direct.items()):
            if tid not in self._out:  # connection dropped: nothing to tell the receiver
                del self._direct[tid]
                continue
            self._flush(tid, d, now)
        return events

    def _flush(self, tid: str, d: _Direct, now: float) -> None:
        while d.landed and d.landed[0][4].done():
            l0, l1, s, e, _ = d.landed.popleft()
            self._send(tid, lambda seq: wire.Landed(tid, seq, l0, l1, s, e))
            d.last_frame = now
        why = d.landed[0][4].failed() if d.landed else None
        if why is not None:  # a write failed for good (e.g. the receiver is gone): fail now, fence with Abort
            self._write_failed(tid, d, why)
        if d.landed or (d.last_fence is not None and not d.last_fence.done()):
            return
        if d.closing is not None:  # every write completed: the closing frame is also the fence
            self._send(tid, d.closing)
            del self._direct[tid]
            if d.failed:  # nothing more will be acknowledged that matters to the prefill worker
                self._out.pop(tid, None)
        elif not d.failed and now - d.last_frame > PING_FRACTION * d.lease_s:
            self._send(tid, lambda seq: wire.Ping(tid, seq))
            d.last_frame = now

    def _on_ack(self, ack: wire.Ack, events: list[TransferEvent], sent_at: float | None = None) -> None:
        d = self._direct.get(ack.transfer_id)
        if d is not None and ack.ok and sent_at is not None:
            d.window_end = max(d.window_end, sent_at + WINDOW_FRACTION * d.lease_s)
        super()._on_ack(ack, events, sent_at)

    def _unmap_idle(self) -> None:
        """Keep at most ``MAX_MAPPED_POOLS`` pools mapped, unmapping the least recently used idle ones."""
        busy = {id(d.target) for d in self._direct.values()}
        for pool_id in [p for p, t in self._pools.items() if id(t) not in busy][: max(0, len(self._pools) - MAX_MAPPED_POOLS)]:
            del self._pools[pool_id]
            self._pool_addrs.pop(pool_id, None)
            logger.info("KV pool %s unmapped (least recently used of %d)", pool_id, MAX_MAPPED_POOLS + 1)

    def _drop_connection(self, addr: str, reason: str, events: list[TransferEvent]) -> None:
        super()._drop_connection(addr, reason, events)
        for pool_id in [p for p, a in self._pool_addrs.items() if a == addr]:  # a dead receiver's pool: unmap it
            del self._pool_addrs[pool_id]
            self._pools.pop(pool_id, None)
            logger.info("KV pool %s of the dropped receiver %s unmapped", pool_id, addr)

    def _forget(self, transfer_id: str) -> None:
        d = self._direct.get(transfer_id)
        out = self._out.get(transfer_id)
        if d is None or out is None or self._control_addr(out.desc) not in self._conns:  # nothing in flight / no one to tell
            self._direct.pop(transfer_id, None)
            return super()._forget(transfer_id)
        # the receiver ended the transfer while writes may be in flight: stop writing, fence with the closing frame
        self._stop_writing(transfer_id, d, "the receiver ended the transfer")

    def close(self) -> None:
        super().close()
        self._direct.clear()
        self._pools.clear()


def _abort(transfer_id: str, request_id: str, error: str, retryable: bool = True) -> Callable[[int], wire.SenderFrame]:
    """The ``Abort`` closing frame of a one-sided transfer (sent once its writes completed)."""
    failed = PrefillFailed(request_id=request_id, transfer_id=transfer_id, error=error, retryable=retryable)
    return lambda seq: wire.Abort(transfer_id, seq, failed)


class DirectKVReceiver(ZmqKVReceiver):
    """See :class:`~splitserve.transfer.base.KVReceiver`: inline frames as ZeroMQ does, plus one-sided writes."""

    def __init__(self, cfg: "TransferConfig", kv_cache: torch.Tensor, layout: KVLayout, engine: CopyEngine) -> None:
        super().__init__(cfg, kv_cache, layout)
        self._engine = engine
        self._export = engine.export(kv_cache)

    @property
    def pool_export(self) -> KVPoolExport | None:
        return self._export

    def cancel(self, transfer_id: str) -> bool:
        inb = self._transfers.get(transfer_id)
        if inb is None or not self._may_write(inb):
            return super().cancel(transfer_id)
        logger.info("request %s: transfer %s cancelled by receiver; waiting for the sender to stop writing",
                    inb.request_id, transfer_id)
        self._start_settling(inb, "cancelled by the receiver", seq=-1)
        return False

    def _may_write(self, inb: Inbound) -> bool:
        """Whether the sender may write into ``inb``'s pages (before its ``Begin`` arrives: if it was offered)."""
        return inb.desc.pool is not None and inb.path != "inline" and inb.settling is None and not inb.fenced

    def _dispatch(self, inb: Inbound, frame: wire.SenderFrame, payload: list[Any], events: list[TransferEvent]) -> None:
        if isinstance(frame, (wire.Finish, wire.Abort)):
            inb.fenced = True  # on the one-sided path both follow the sender's last write
        super()._dispatch(inb, frame, payload, events)

    def _fail(self, inb: Inbound, reason: str, seq: int, events: list[TransferEvent], retryable: bool = True) -> None:
        if not self._may_write(inb):
            return super()._fail(inb, reason, seq, events, retryable)
        self._start_settling(inb, reason, seq)

    def _start_settling(self, inb: Inbound, reason: str, seq: int) -> None:
        inb.settling = reason
        if inb.peer is not None:
            self._reply(inb.peer, wire.Ack(inb.desc.transfer_id, seq, ok=False, error=reason))

    def _on_settling_frame(self, inb: Inbound, frame: wire.SenderFrame, events: list[TransferEvent]) -> None:
        if isinstance(frame, (wire.Abort, wire.Finish)):  # sent after the sender's last write completed
            return self._settle(inb, events)
        self._reply(inb.peer, wire.Ack(frame.transfer_id, frame.seq, ok=False, error=inb.settling))

    def _settle(self, inb: Inbound, events: list[TransferEvent]) -> None:
        reason = inb.settling or "ended"
        logger.info("request %s: transfer %s settled (%s); its pages may be reused", inb.request_id,
                    inb.desc.transfer_id, reason)
        events.append(TransferFailed(inb.desc.transfer_id, inb.request_id, reason))
        self._end(inb, ok=False, error=reason, seq=-1)

    def _accept_path(self, inb: Inbound, path: str) -> None:
        if path == "inline":
            return
        if inb.desc.pool is None or path != inb.desc.pool.kind:
            raise Reject(f"the sender chose the {path!r} path, which this transfer did not offer")

    def _on_direct_frame(self, inb: Inbound, frame: Any, events: list[TransferEvent]) -> None:
        if isinstance(frame, wire.Ping):
            self._reply(inb.peer, wire.Ack(frame.transfer_id, frame.seq))
            return
        if not isinstance(frame, wire.Landed) or inb.path in (None, "inline"):
            raise Reject(f"unexpected {type(frame).__name__} on the {inb.path or 'unopened'} path")
        l0, l1, s, e = frame.layer_start, frame.layer_end, frame.token_start, frame.token_end
        if not (0 <= l0 < l1 <= self._layout.num_layers and 0 <= s < e <= inb.desc.num_tokens):
            raise Reject(f"landed layers [{l0}, {l1}) tokens [{s}, {e}) outside the reservation")
        if inb.covered[l0:l1, s:e].any():
            raise Reject(f"layers [{l0}, {l1}) tokens [{s}, {e}) landed twice")
        inb.covered[l0:l1, s:e] = True
        for layer in range(l0, l1):
            if inb.covered[layer].all():
                events.append(LayerArrived(inb.desc.transfer_id, layer))
        self._reply(inb.peer, wire.Ack(frame.transfer_id, frame.seq))
