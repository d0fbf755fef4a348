"""ZeroMQ transfer backend: ``tcp://`` or ``ipc://``, DEALER (sender) -> ROUTER (receiver).

Each send is one multipart message: a small msgpack header (:mod:`splitserve.transfer.wire`) plus, for data,
one raw payload frame sent with ``copy=False`` straight from the staging buffer (the only copy on the send
side is the gather out of the pages; on GPU that gather runs on the device and is followed by one
device->host copy). The receiver validates every header and payload size before it touches a page.
Optional CurveZMQ: a receiver with ``curve_secret_key``/``curve_public_key`` is a CURVE server; a sender encrypts to
the descriptor's ``receiver_key`` (else ``curve_server_key``) with its own ``curve_public_key``/``curve_secret_key``
(or a fresh pair).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import zmq

from splitserve.core.messages import KVDescriptor, PrefillDone, PrefillFailed
from splitserve.transfer import wire
from splitserve.transfer.base import (
    KVLayout,
    KVReceiver,
    KVSender,
    LayerArrived,
    TransferComplete,
    TransferError,
    TransferEvent,
    TransferFailed,
    gather_tokens,
    scatter_tokens,
    token_slots,
)

if TYPE_CHECKING:
    from splitserve.core.config import TransferConfig

logger = logging.getLogger(__name__)

MAX_MESSAGES_PER_POLL = 4096
"""Upper bound of messages one :meth:`ZmqKVReceiver.poll` handles, so a flood cannot starve the caller."""
REMEMBER_ENDED = 65536
"""How many ended transfer ids the receiver remembers (late frames for them are dropped quietly)."""


class Reject(Exception):
    """A frame ends its transfer (message is the user-facing reason)."""

    def __init__(self, reason: str, retryable: bool = True) -> None:
        super().__init__(reason)
        self.retryable = retryable


def _key(value: str | bytes) -> bytes:
    return value.encode("ascii") if isinstance(value, str) else value


def bind_endpoint(sock: zmq.Socket, cfg: "TransferConfig", name: str) -> str:
    """Bind ``sock`` as ``cfg`` says (ipc or tcp, port 0 = any) and return the concrete endpoint."""
    if cfg.use_ipc:
        path = os.path.join(tempfile.gettempdir(), f"splitserve-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock")
        sock.bind(f"ipc://{path}")
    else:
        sock.bind(f"tcp://{cfg.host}:{cfg.port or '*'}")
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def _curve_server(sock: zmq.Socket, cfg: "TransferConfig") -> None:
    if cfg.curve_secret_key is None:
        return
    if cfg.curve_public_key is None:
        raise ValueError("curve_secret_key is set but curve_public_key is not")
    sock.curve_secretkey = _key(cfg.curve_secret_key)
    sock.curve_publickey = _key(cfg.curve_public_key)
    sock.curve_server = True


def _allow_list(ctx: zmq.Context, cfg: "TransferConfig") -> Any:
    """ZAP on ``ctx``: a CURVE receiver accepts only senders whose public key is in ``cfg.curve_allowed_dir``."""
    if cfg.curve_allowed_dir is None or cfg.curve_secret_key is None:
        return None
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=cfg.curve_allowed_dir)
    return auth


def _curve_client(sock: zmq.Socket, cfg: "TransferConfig", server_key: str | None = None) -> None:
    """CURVE client of ``server_key`` (the receiver's own key, from its descriptor), else ``cfg.curve_server_key``."""
    server_key = server_key or cfg.curve_server_key
    if server_key is None:
        return
    if (cfg.curve_public_key is None) != (cfg.curve_secret_key is None):
        raise ValueError("set both curve_public_key and curve_secret_key, or neither")
    public, secret = (
        (_key(cfg.curve_public_key), _key(cfg.curve_secret_key))  # type: ignore[arg-type]
        if cfg.curve_public_key is not None
        else zmq.curve_keypair()
    )
    sock.curve_serverkey = _key(server_key)
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def payload_view(buf: memoryview | bytes, layout: KVLayout, num_tokens: int) -> torch.Tensor:
    """Read-only bytes -> token-major ``[2, num_tokens, H, D]`` tensor of the layout dtype (no copy)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we only read from it
        flat = torch.frombuffer(buf, dtype=torch.uint8)
    return flat.view(layout.torch_dtype).view(2, num_tokens, layout.num_kv_heads, layout.head_dim)


# --- receiver --------------------------------------------------------------------------------------


@dataclass
class Inbound:
    """Receiver-side state of one expected transfer."""

    desc: KVDescriptor
    request_id: str
    slots: np.ndarray
    """int64 ``[num_tokens]``: destination slot of every token."""
    covered: np.ndarray
    """bool ``[num_layers, num_tokens]``: tokens landed so far."""
    deadline: float
    peer: bytes | None = None
    done: PrefillDone | None = None
    finish_seq: int = 0
    pending: list[Any] = field(default_factory=list)
    """Backend-specific payloads still in flight (UCX)."""
    path: str | None = None
    """The data path the sender's ``Begin`` named (``None`` until it arrived)."""
    settling: str | None = None
    """One-sided path: the transfer ended early for this reason, but the sender may still be writing (direct.py)."""
    fenced: bool = False
    """One-sided path: the sender sent ``Finish`` or ``Abort``, so it writes nothing more."""


class ZmqKVReceiver(KVReceiver):
    """See :class:`~splitserve.transfer.base.KVReceiver`. ``kv_cache``: ``[L, 2, pages, page_size, H, D]``."""

    def __init__(self, cfg: "TransferConfig", kv_cache: torch.Tensor, layout: KVLayout) -> None:
        layout.check_cache(kv_cache)
        self._cfg, self._kv, self._layout = cfg, kv_cache, layout
        self._token_bytes = layout.token_bytes()
        self._ctx = zmq.Context()
        self._auth = _allow_list(self._ctx, cfg)
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        _curve_server(self._sock, cfg)
        self._control_addr = bind_endpoint(self._sock, cfg, "kv")
        self._transfers: dict[str, Inbound] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()

    @property
    def address(self) -> str:
        return self._control_addr

    @property
    def wake_socket(self) -> zmq.Socket:
        return self._sock

    def expect(self, desc: KVDescriptor, request_id: str = "") -> None:
        """See the base class; ``request_id`` (optional) labels log lines and events."""
        self._layout.check_compatible(desc)
        if desc.page_size != self._layout.page_size:
            raise TransferError(
                f"descriptor {desc.transfer_id} has page_size {desc.page_size}, this pool uses {self._layout.page_size}"
            )
        if desc.transfer_id in self._transfers:
            raise TransferError(f"transfer {desc.transfer_id} is already expected")
        if desc.num_tokens <= 0:
            raise TransferError(f"transfer {desc.transfer_id}: num_tokens must be positive")
        if not 0 <= desc.held_tokens < desc.num_tokens or desc.held_tokens % desc.page_size:
            raise TransferError(f"transfer {desc.transfer_id}: held_tokens {desc.held_tokens} must be a multiple of "
                                f"the page size below num_tokens {desc.num_tokens}")
        num_pages = self._kv.shape[2]
        if any(not 0 <= p < num_pages for p in desc.page_ids):
            raise TransferError(f"transfer {desc.transfer_id}: page id out of range [0, {num_pages})")
        try:
            slots = token_slots(desc.page_ids, desc.page_size, 0, desc.num_tokens)
        except ValueError as exc:
            raise TransferError(f"transfer {desc.transfer_id}: {exc}") from exc
        covered = np.zeros((self._layout.num_layers, desc.num_tokens), dtype=bool)
        covered[:, :desc.held_tokens] = True  # held here already: a frame for them is rejected as sent twice
        self._transfers[desc.transfer_id] = Inbound(
            desc, request_id, slots, covered, time.monotonic() + desc.lease_s
        )
        self._ended.pop(desc.transfer_id, None)
        logger.debug("request %s: expecting transfer %s (%d tokens)", request_id, desc.transfer_id, desc.num_tokens)

    def poll(self, timeout_ms: int = 0) -> list[TransferEvent]:
        events: list[TransferEvent] = []
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            self._progress_pending(events)
            # with remote payloads in flight, wait in 1 ms slices so their completion is seen promptly
            wait = max(0, min(timeout_ms, 1) if self._has_pending() else timeout_ms)
            if self._sock.poll(wait, zmq.POLLIN):
                self._drain(events)
            self._progress_pending(events)
            if events or not self._has_pending() or time.monotonic() >= deadline:
                break
        self._expire_leases(events)
        return events

    def _drain(self, events: list[TransferEvent]) -> None:
        for _ in range(MAX_MESSAGES_PER_POLL):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_message(frames, events)

    def cancel(self, transfer_id: str) -> bool:
        inb = self._transfers.get(transfer_id)
        if inb is not None:
            logger.info("request %s: transfer %s cancelled by receiver", inb.request_id, transfer_id)
            self._end(inb, ok=False, error="cancelled by the receiver", seq=-1)
        return True

    def close(self) -> None:
        for inb in list(self._transfers.values()):
            self._drop_pending(inb)
        self._transfers.clear()
        self._sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    # -- message handling --

    def _on_message(self, frames: list[zmq.Frame], events: list[TransferEvent]) -> None:
        if len(frames) < 2:
            logger.warning("dropping transfer message with %d frame(s)", len(frames))
            return
        peer = frames[0].bytes
        try:
            frame = wire.decode_sender_frame(frames[1].buffer)
        except wire.FrameError as exc:
            logger.warning("dropping undecodable transfer frame (%d bytes): %s", len(frames[1].buffer), exc)
            return
        inb = self._transfers.get(frame.transfer_id)
        if inb is None:
            level = logging.DEBUG if frame.transfer_id in self._ended else logging.WARNING
            logger.log(level, "dropping %s for unknown or ended transfer %s", type(frame).__name__, frame.transfer_id)
            self._reply(peer, wire.Ack(frame.transfer_id, frame.seq, ok=False, error="unknown or ended transfer"))
            return
        inb.peer = peer
        if inb.settling is not None:
            return self._on_settling_frame(inb, frame, events)
        inb.deadline = time.monotonic() + inb.desc.lease_s
        self._guarded(inb, frame.seq, events, self._dispatch, inb, frame, frames[2:], events)

    def _guarded(self, inb: Inbound, seq: int, events: list[TransferEvent], fn: Any, *args: Any) -> None:
        """Run ``fn(*args)``; a :class:`Reject` fails ``inb`` (event + nack) instead of propagating."""
        try:
            fn(*args)
        except Reject as exc:
            logger.warning("request %s: transfer %s failed: %s", inb.request_id, inb.desc.transfer_id, exc)
            self._fail(inb, str(exc), seq, events, exc.retryable)

    def _fail(self, inb: Inbound, reason: str, seq: int, events: list[TransferEvent], retryable: bool = True) -> None:
        """End ``inb`` unsuccessfully: report :class:`TransferFailed` and nack its sender."""
        events.append(TransferFailed(inb.desc.transfer_id, inb.request_id, reason, retryable))
        self._end(inb, ok=False, error=reason, seq=seq)

    def _dispatch(
        self, inb: Inbound, frame: wire.SenderFrame, payload: list[zmq.Frame], events: list[TransferEvent]
    ) -> None:
        if isinstance(frame, wire.Begin):
            self._accept_path(inb, frame.path)
            inb.path = frame.path
            layout = KVLayout(
                frame.model_id, frame.dtype, frame.num_layers, frame.num_kv_heads, frame.head_dim, inb.desc.page_size
            )
            try:
                layout.check_compatible(inb.desc)
            except TransferError as exc:
                raise Reject(str(exc)) from exc
            self._reply(inb.peer, wire.Ack(frame.transfer_id, frame.seq))
        elif isinstance(frame, wire.Chunk):
            self._on_chunk(inb, frame, payload, events)
            self._reply(inb.peer, wire.Ack(frame.transfer_id, frame.seq))
        elif isinstance(frame, wire.Finish):
            if frame.done.transfer_id != inb.desc.transfer_id:
                raise Reject(f"PrefillDone names transfer {frame.done.transfer_id}")
            inb.done, inb.finish_seq = frame.done, frame.seq
            inb.request_id = inb.request_id or frame.done.request_id
            self._try_complete(inb, events)
        elif isinstance(frame, wire.Abort):
            inb.request_id = inb.request_id or frame.failed.request_id
            raise Reject(f"prefill failed: {frame.failed.error}", retryable=frame.failed.retryable)
        else:
            self._on_direct_frame(inb, frame, events)

    def _on_chunk(self, inb: Inbound, chunk: wire.Chunk, payload: list[zmq.Frame], events: list[TransferEvent]) -> None:
        s, e = chunk.token_start, chunk.token_end
        if not 0 <= chunk.layer < self._layout.num_layers:
            raise Reject(f"layer {chunk.layer} out of range [0, {self._layout.num_layers})")
        if not 0 <= s < e <= inb.desc.num_tokens:
            raise Reject(f"token range [{s}, {e}) outside the reservation of {inb.desc.num_tokens} tokens")
        if chunk.nbytes != (e - s) * self._token_bytes:
            raise Reject(f"chunk declares {chunk.nbytes} bytes, expected {(e - s) * self._token_bytes}")
        if inb.covered[chunk.layer, s:e].any():
            raise Reject(f"layer {chunk.layer} tokens [{s}, {e}) sent twice")
        if chunk.ucx_tag is not None:
            if payload:
                raise Reject("UCX chunk carries an inline payload frame")
            self._accept_remote_payload(inb, chunk)
            return
        if len(payload) != 1 or len(payload[0].buffer) != chunk.nbytes:
            got = [len(p.buffer) for p in payload]
            raise Reject(f"payload frames {got} do not match the declared {chunk.nbytes} bytes (truncated?)")
        data = payload_view(payload[0].buffer, self._layout, e - s)
        self._land(inb, chunk, data, events)

    def _land(self, inb: Inbound, chunk: wire.Chunk, data: torch.Tensor, events: list[TransferEvent]) -> None:
        """Scatter ``data`` ``[2, T, H, D]`` into the reserved pages and mark it covered."""
        s, e = chunk.token_start, chunk.token_end
        scatter_tokens(self._kv, chunk.layer, inb.slots[s:e], data)
        inb.covered[chunk.layer, s:e] = True
        if inb.covered[chunk.layer].all():
            events.append(LayerArrived(inb.desc.transfer_id, chunk.layer))

    def _try_complete(self, inb: Inbound, events: list[TransferEvent]) -> None:
        if inb.done is None or inb.pending:
            return
        missing = np.flatnonzero(~inb.covered.all(axis=1))
        if len(missing):
            raise Reject(f"finished with layers {missing.tolist()[:8]} incomplete")
        events.append(TransferComplete(inb.desc.transfer_id, inb.done))
        logger.debug("request %s: transfer %s complete", inb.request_id, inb.desc.transfer_id)
        self._end(inb, ok=True, error=None, seq=inb.finish_seq)

    def _end(self, inb: Inbound, ok: bool, error: str | None, seq: int) -> None:
        tid = inb.desc.transfer_id
        self._transfers.pop(tid, None)
        self._drop_pending(inb)
        self._ended[tid] = None
        while len(self._ended) > REMEMBER_ENDED:
            self._ended.popitem(last=False)
        if inb.peer is not None:
            self._reply(inb.peer, wire.Ack(tid, seq, ok=ok, error=error, complete=ok))

    def _expire_leases(self, events: list[TransferEvent]) -> None:
        now = time.monotonic()
        for inb in [t for t in self._transfers.values() if t.deadline < now]:
            if inb.settling is not None:  # the sender's write window ended inside this lease: the pages are safe
                self._settle(inb, events)
                continue
            reason = f"KV transfer lease of {inb.desc.lease_s:g}s expired without data from the prefill worker"
            logger.warning("request %s: transfer %s: %s", inb.request_id, inb.desc.transfer_id, reason)
            events.append(TransferFailed(inb.desc.transfer_id, inb.request_id, reason))
            self._end(inb, ok=False, error=reason, seq=-1)

    def _reply(self, peer: bytes | None, ack: wire.Ack) -> None:
        if peer is None:
            return
        try:
            self._sock.send_multipart([peer, wire.encode(ack)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            logger.warning("could not ack transfer %s: %s", ack.transfer_id, exc)

    # -- hooks for the one-sided path (direct.py) --

    def _accept_path(self, inb: Inbound, path: str) -> None:
        """Refuse a ``Begin`` whose data path this receiver does not take."""
        if path != "inline":
            raise Reject(f"this receiver takes inline KV data only, not {path!r}")

    def _on_direct_frame(self, inb: Inbound, frame: wire.SenderFrame, events: list[TransferEvent]) -> None:
        raise Reject(f"{type(frame).__name__} frames belong to the one-sided path, which this receiver does not take")

    def _on_settling_frame(self, inb: Inbound, frame: wire.SenderFrame, events: list[TransferEvent]) -> None:
        """A frame for a transfer that ended early but may still be written to (never happens inline)."""

    def _settle(self, inb: Inbound, events: list[TransferEvent]) -> None:
        """A settling transfer's pages may be reused now (never happens inline)."""

    # -- hooks for backends whose payload travels elsewhere (UCX) --

    def _accept_remote_payload(self, inb: Inbound, chunk: wire.Chunk) -> None:
        raise Reject("this receiver takes inline payloads only (sender uses another backend?)")

    def _has_pending(self) -> bool:
        return False

    def _progress_pending(self, events: list[TransferEvent]) -> None:
        """Land finished remote payloads (UCX)."""

    def _drop_pending(self, inb: Inbound) -> None:
        """Forget a transfer's in-flight remote payloads; they never touch the pages."""
        inb.pending.clear()


# --- sender ----------------------------------------------------------------------------------------


class StagingPool:
    """Reusable host staging buffers: a buffer returns to the pool once ZeroMQ has released it.

    Fresh large allocations page-fault on first touch (as costly as the copy itself), so buffers are
    recycled. Pinned on GPU machines (fast device->host copies).
    """

    MAX_IDLE = 8

    def __init__(self) -> None:
        self._busy: list[tuple[torch.Tensor, Any]] = []
        self._idle: list[torch.Tensor] = []
        self._lent: dict[int, torch.Tensor] = {}

    def take(
        self, shape: tuple[int, ...], dtype: torch.dtype, pin: bool = False, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """A tensor of ``shape``/``dtype`` on ``device`` (one pool serves one device), recycled when one fits."""
        self._reclaim()
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        fits = [i for i, b in enumerate(self._idle) if b.numel() >= nbytes]
        if fits:
            buf = self._idle.pop(min(fits, key=lambda i: self._idle[i].numel()))
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pin)
        self._lent[buf.data_ptr()] = buf
        return buf[:nbytes].view(dtype).view(shape)

    def track(self, tensor: torch.Tensor, tracker: Any) -> None:
        """``tensor`` (from :meth:`take`) is in flight until ``tracker.done`` is true (``None``: free now).

        ``tracker``: a ``zmq.MessageTracker`` or any object with a boolean ``done`` attribute.
        """
        buf = self._lent.pop(tensor.data_ptr(), None)
        if buf is None:
            return  # not from this pool
        if tracker is None:
            self._idle.append(buf)
        else:
            self._busy.append((buf, tracker))

    def _reclaim(self) -> None:
        still = []
        for buf, tracker in self._busy:
            if tracker.done:
                self._idle.append(buf)
            else:
                still.append((buf, tracker))
        self._busy = still
        if len(self._idle) > self.MAX_IDLE:
            self._idle.sort(key=lambda b: b.numel())
            del self._idle[: len(self._idle) - self.MAX_IDLE]



@dataclass
class _Conn:
    """One DEALER socket per receiver address."""

    sock: zmq.Socket
    seq: int = 0
    unacked: dict[int, float] = field(default_factory=dict)
    """seq -> monotonic send time."""
    broken: str | None = None
    """Why the connection is unusable (set by a failed send; the next poll fails its transfers)."""


@dataclass
class Outbound:
    desc: KVDescriptor
    request_id: str
    done: PrefillDone | None = None


class ZmqKVSender(KVSender):
    """See :class:`~splitserve.transfer.base.KVSender`. ``kv_cache``: ``[L, 2, pages, page_size, H, D]``."""

    def __init__(self, cfg: "TransferConfig", kv_cache: torch.Tensor, layout: KVLayout) -> None:
        layout.check_cache(kv_cache)
        self._cfg, self._kv, self._layout = cfg, kv_cache, layout
        self._ctx = zmq.Context()
        self._conns: dict[str, _Conn] = {}
        self._out: dict[str, Outbound] = {}
        self._staging = StagingPool()

    def begin(self, desc: KVDescriptor, request_id: str = "") -> None:
        """See the base class; ``request_id`` (optional) labels log lines and events."""
        self._layout.check_compatible(desc)
        if desc.transfer_id in self._out:
            raise TransferError(f"transfer {desc.transfer_id} already begun")
        self._out[desc.transfer_id] = Outbound(desc, request_id)
        lay = self._layout
        path = self._choose_path(desc)
        self._send(
            desc.transfer_id,
            lambda seq: wire.Begin(
                desc.transfer_id, seq, lay.model_id, lay.dtype, lay.num_layers, lay.num_kv_heads, lay.head_dim, path
            ),
        )

    def _choose_path(self, desc: KVDescriptor) -> str:
        """The data path of a new transfer (the one-sided sender picks ``cuda_ipc``/``shm`` where it can)."""
        return "inline"

    def send_layer(
        self, transfer_id: str, layer: int, src_page_ids: Sequence[int], token_start: int, token_end: int
    ) -> None:
        out = self._outbound(transfer_id)
        if not 0 <= layer < self._layout.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self._layout.num_layers})")
        if token_end > out.desc.num_tokens:
            raise ValueError(f"token_end {token_end} beyond the reservation of {out.desc.num_tokens} tokens")
        slots = token_slots(src_page_ids, self._layout.page_size, token_start, token_end)
        staging = self._stage(layer, slots)
        nbytes = staging.numel() * staging.element_size()
        self._send_payload(out, layer, token_start, token_end, nbytes, staging)

    def finish(self, transfer_id: str, done: PrefillDone) -> None:
        out = self._outbound(transfer_id)
        out.done = done
        out.request_id = out.request_id or done.request_id
        self._send(transfer_id, lambda seq: wire.Finish(transfer_id, seq, done))

    def fail(self, transfer_id: str, request_id: str, error: str, retryable: bool = True) -> None:
        self._outbound(transfer_id)
        failed = PrefillFailed(request_id=request_id, transfer_id=transfer_id, error=error, retryable=retryable)
        self._send(transfer_id, lambda seq: wire.Abort(transfer_id, seq, failed))
        self._out.pop(transfer_id, None)

    def poll(self) -> list[TransferEvent]:
        events: list[TransferEvent] = []
        now = time.monotonic()
        for addr, conn in list(self._conns.items()):
            self._read_acks(conn, events)
            if conn.broken is not None:
                self._drop_connection(addr, conn.broken, events)
            elif conn.unacked and now - min(conn.unacked.values()) > self._cfg.lease_s:
                self._drop_connection(addr, f"receiver {addr} did not acknowledge within {self._cfg.lease_s:g}s (gone?)", events)
        self._progress_sends(events)
        return events

    def close(self) -> None:
        for conn in self._conns.values():
            conn.sock.close(linger=0)
        self._conns.clear()
        self._out.clear()
        self._ctx.term()

    # -- internals --

    def _outbound(self, transfer_id: str) -> Outbound:
        out = self._out.get(transfer_id)
        if out is None:
            raise TransferError(f"transfer {transfer_id} is not active (never begun, finished or failed)")
        return out

    def _stage(self, layer: int, slots: np.ndarray) -> torch.Tensor:
        """Gather ``slots`` of ``layer`` into one host tensor ``[2, T, H, D]`` (device gather + one D2H copy on GPU)."""
        lay = self._layout
        shape = (2, len(slots), lay.num_kv_heads, lay.head_dim)
        host = self._staging.take(shape, self._kv.dtype, pin=self._kv.is_cuda)
        if not self._kv.is_cuda:
            gather_tokens(self._kv, layer, slots, host)
            return host
        dev = torch.empty(shape, dtype=self._kv.dtype, device=self._kv.device)
        gather_tokens(self._kv, layer, slots, dev)
        host.copy_(dev)
        return host

    def _connection(self, addr: str, server_key: str | None = None) -> _Conn:
        conn = self._conns.get(addr)
        if conn is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            _curve_client(sock, self._cfg, server_key)
            sock.connect(addr)
            conn = self._conns[addr] = _Conn(sock)
        return conn

    def _control_addr(self, desc: KVDescriptor) -> str:
        return desc.receiver_addr

    def _send(self, transfer_id: str, make_frame: Any, payload: Any = None) -> None:
        """Send ``make_frame(seq)`` (plus an optional zero-copy payload) and track its ack."""
        desc = self._out[transfer_id].desc
        conn = self._connection(self._control_addr(desc), desc.receiver_key)
        conn.seq += 1
        header = wire.encode(make_frame(conn.seq))
        # the numpy view keeps ``payload`` alive until ZeroMQ has sent it
        parts = [header] if payload is None else [header, payload.view(torch.uint8).numpy()]
        try:
            tracker = conn.sock.send_multipart(parts, zmq.NOBLOCK, copy=False, track=payload is not None)
        except zmq.Again:  # no pipe at all (SNDHWM is unlimited): the receiver is unreachable
            if payload is not None:
                self._staging.track(payload, None)
            conn.broken = f"receiver {self._control_addr(self._out[transfer_id].desc)} is unreachable"
            return
        conn.unacked[conn.seq] = time.monotonic()
        if payload is not None:
            self._staging.track(payload, tracker)

    def _send_payload(
        self, out: Outbound, layer: int, start: int, end: int, nbytes: int, staging: torch.Tensor
    ) -> None:
        tid = out.desc.transfer_id
        self._send(tid, lambda seq: wire.Chunk(tid, seq, layer, start, end, nbytes), staging)

    def _read_acks(self, conn: _Conn, events: list[TransferEvent]) -> None:
        while True:
            try:
                data = conn.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                ack = wire.decode_ack(data)
            except wire.FrameError as exc:
                logger.warning("dropping bad ack: %s", exc)
                continue
            sent_at = conn.unacked.pop(ack.seq, None)
            self._on_ack(ack, events, sent_at)

    def _on_ack(self, ack: wire.Ack, events: list[TransferEvent], sent_at: float | None = None) -> None:
        """``sent_at``: when the acknowledged frame was sent (``None`` if unknown)."""
        out = self._out.get(ack.transfer_id)
        if out is None:
            return
        if not ack.ok:
            logger.warning("request %s: receiver refused transfer %s: %s", out.request_id, ack.transfer_id, ack.error)
            events.append(TransferFailed(ack.transfer_id, out.request_id, f"receiver refused the transfer: {ack.error}"))
            self._forget(ack.transfer_id)
        elif ack.complete and out.done is not None:
            events.append(TransferComplete(ack.transfer_id, out.done))
            self._forget(ack.transfer_id)

    def _forget(self, transfer_id: str) -> None:
        self._out.pop(transfer_id, None)

    def _drop_connection(self, addr: str, reason: str, events: list[TransferEvent]) -> None:
        """Receiver presumed gone: fail its transfers and drop queued staging buffers."""
        conn = self._conns.pop(addr)
        conn.sock.close(linger=0)
        for tid, out in list(self._out.items()):
            if self._control_addr(out.desc) == addr:
                logger.warning("request %s: transfer %s failed: %s", out.request_id, tid, reason)
                events.append(TransferFailed(tid, out.request_id, reason))
                self._forget(tid)

    def _progress_sends(self, events: list[TransferEvent]) -> None:
        """Release finished remote sends (UCX)."""
