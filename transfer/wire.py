"""Framing of the KV transfer channel (msgpack through msgspec; never pickle).

Sender -> receiver, one multipart message each (ZeroMQ DEALER -> ROUTER):

* ``[Begin]``: opens a transfer; carries the sender's layout so the receiver can refuse a mismatch.
* ``[Chunk, payload]``: tokens ``[token_start, token_end)`` of one layer, payload = ``nbytes`` raw bytes of a
  token-major ``[2, tokens, num_kv_heads, head_dim]`` tensor in the layout dtype. With the UCX backend the
  payload travels over UCX under ``ucx_tag`` instead, and the message has no payload frame.
* ``[Landed]``: one-sided path (transfer/direct.py): tokens ``[token_start, token_end)`` of layers
  ``[layer_start, layer_end)`` were written straight into the receiver's pages, and the writes have completed.
* ``[Ping]``: one-sided path: keeps the receiver's lease (and so the sender's write window) open while nothing lands.
* ``[Finish]`` (wraps ``PrefillDone``) or ``[Abort]`` (wraps ``PrefillFailed``). On the one-sided path both are
  sent only after the sender's last write into the pages completed: they are also its promise to write no more.

Receiver -> sender: ``[Ack]`` for every frame (``ok=False`` + ``error`` when the transfer was refused or failed).
Every sender frame carries a per-connection sequence number ``seq`` that the ack echoes.
"""

from __future__ import annotations

from typing import Union

import msgspec

from splitserve.core.messages import DECODE_ERRORS, PrefillDone, PrefillFailed


class _Frame(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """Base: tag = class name."""


class Begin(_Frame, frozen=True):
    transfer_id: str
    seq: int
    model_id: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    path: str = "inline"
    """``inline`` (payload frames or UCX), or the kind of the receiver's pool export (``cuda_ipc``, ``shm``)."""


class Chunk(_Frame, frozen=True):
    transfer_id: str
    seq: int
    layer: int
    token_start: int
    token_end: int
    nbytes: int
    ucx_tag: int | None = None


class Landed(_Frame, frozen=True):
    transfer_id: str
    seq: int
    layer_start: int
    layer_end: int
    token_start: int
    token_end: int


class Ping(_Frame, frozen=True):
    transfer_id: str
    seq: int


class Finish(_Frame, frozen=True):
    transfer_id: str
    seq: int
    done: PrefillDone


class Abort(_Frame, frozen=True):
    transfer_id: str
    seq: int
    failed: PrefillFailed


class Ack(_Frame, frozen=True):
    transfer_id: str
    seq: int
    ok: bool = True
    error: str | None = None
    complete: bool = False
    """True on the ack of a :class:`Finish` whose data all landed."""


SenderFrame = Union[Begin, Chunk, Landed, Ping, Finish, Abort]

_ENCODER = msgspec.msgpack.Encoder()
_SENDER_DECODER = msgspec.msgpack.Decoder(SenderFrame)
_ACK_DECODER = msgspec.msgpack.Decoder(Ack)


class FrameError(ValueError):
    """A frame is not a valid transfer frame."""


def encode(frame: _Frame) -> bytes:
    return _ENCODER.encode(frame)


def decode_sender_frame(data: bytes | memoryview) -> SenderFrame:
    """Parse a sender frame; raises :class:`FrameError` on garbage."""
    try:
        return _SENDER_DECODER.decode(data)
    except DECODE_ERRORS as exc:
        raise FrameError(f"bad transfer frame: {exc}") from exc


def decode_ack(data: bytes | memoryview) -> Ack:
    """Parse an ack; raises :class:`FrameError` on garbage."""
    try:
        return _ACK_DECODER.decode(data)
    except DECODE_ERRORS as exc:
        raise FrameError(f"bad ack frame: {exc}") from exc


def split_ucx_address(address: str) -> tuple[str, str, int]:
    """``ucx://HOST:PORT,CONTROL_ENDPOINT`` -> (control endpoint, ucx host, ucx port)."""
    if not address.startswith("ucx://") or "," not in address:
        raise ValueError(f"not a UCX transfer address: {address!r} (expected ucx://HOST:PORT,tcp://HOST:PORT)")
    data, control = address[len("ucx://") :].split(",", 1)
    host, _, port = data.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad UCX host:port in {address!r}")
    return control, host, int(port)
