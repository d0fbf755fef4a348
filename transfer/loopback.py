"""Run the sending side of transfers in a child process (``splitserve bench transfer`` and the tests).

The parent talks to the child over a ``multiprocessing`` pipe with msgspec-JSON bytes (no pickle):
it sends a :class:`SenderSpec`, the child replies with ``{"event": "ready"}``, optionally
``{"event": "stalled"}`` (it then waits to be killed), and finally a :class:`SenderReport`.
Source pages are filled by :func:`random_kv`, so the parent can recompute every expected byte.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec

from splitserve.core.messages import KVDescriptor, PrefillDone
from splitserve.transfer.base import KVLayout, TransferComplete, TransferEvent, TransferFailed

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    import torch


class SenderJob(msgspec.Struct, frozen=True):
    desc: KVDescriptor
    request_id: str
    src_page_ids: tuple[int, ...]
    layer_order: tuple[int, ...]
    chunk_tokens: int


class SenderSpec(msgspec.Struct, frozen=True):
    transfer_cfg: dict[str, Any]
    layout: dict[str, Any]
    num_pages: int
    seed: int
    jobs: tuple[SenderJob, ...]
    device: str = "cpu"
    stall_after_chunks: int | None = None
    """Stop after this many chunks, report ``stalled`` and wait to be killed."""
    wait_s: float = 60.0


class SenderReport(msgspec.Struct, frozen=True):
    completed: tuple[str, ...]
    failed: tuple[tuple[str, str], ...]
    """(transfer_id, reason)."""
    seconds: float
    """From the first begin() to the last event."""


def random_kv(layout: KVLayout, num_pages: int, seed: int, device: str = "cpu") -> "torch.Tensor":
    """Deterministic random pool ``[L, 2, num_pages, page_size, H, D]`` of the layout dtype."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    shape = (layout.num_layers, 2, num_pages, layout.page_size, layout.num_kv_heads, layout.head_dim)
    return torch.randn(shape, generator=gen).to(layout.torch_dtype).to(device)


def send_msg(conn: "Connection", obj: Any) -> None:
    conn.send_bytes(msgspec.json.encode(obj))


def recv_msg(conn: "Connection", typ: Any = Any, timeout_s: float = 120.0) -> Any:
    """Next message from the peer process, decoded as ``typ``; ``TimeoutError`` after ``timeout_s``."""
    if not conn.poll(timeout_s):
        raise TimeoutError(f"no message from the peer process within {timeout_s:g}s")
    return msgspec.json.decode(conn.recv_bytes(), type=typ)


def _send_jobs(sender: Any, spec: SenderSpec, conn: "Connection") -> None:
    """Send every job's layers (interleaved across jobs), chunk by chunk."""
    sent = 0
    num_layers = spec.layout["num_layers"]
    for step in range(num_layers):
        for job in spec.jobs:
            layer = job.layer_order[step]
            for start in range(0, job.desc.num_tokens, job.chunk_tokens):
                if spec.stall_after_chunks is not None and sent >= spec.stall_after_chunks:
                    send_msg(conn, {"event": "stalled"})
                    time.sleep(3600)  # the parent kills this process
                end = min(start + job.chunk_tokens, job.desc.num_tokens)
                sender.send_layer(job.desc.transfer_id, layer, job.src_page_ids, start, end)
                sent += 1


def _wait_events(sender: Any, ids: set[str], wait_s: float) -> list[TransferEvent]:
    events: list[TransferEvent] = []
    deadline = time.monotonic() + wait_s
    pending = set(ids)
    while pending and time.monotonic() < deadline:
        for ev in sender.poll():
            if isinstance(ev, (TransferComplete, TransferFailed)):
                pending.discard(ev.transfer_id)
                events.append(ev)
        time.sleep(0.0002)
    return events


def run_sender(conn: "Connection") -> None:
    """Child-process entry point: for each :class:`SenderSpec` received, send and reply a :class:`SenderReport`.

    Serves specs until the parent sends ``{"event": "exit"}`` or closes the pipe (one process, many runs).
    """
    while True:
        try:
            msg = recv_msg(conn, timeout_s=3600)
        except EOFError:
            return
        if msg.get("event") == "exit":
            return
        send_msg(conn, _run_spec(msgspec.convert(msg, SenderSpec), conn))


def _run_spec(spec: SenderSpec, conn: "Connection") -> SenderReport:
    from splitserve.core.config import TransferConfig
    from splitserve.transfer.base import make_sender

    layout = KVLayout(**spec.layout)
    kv = random_kv(layout, spec.num_pages, spec.seed, spec.device)
    sender = make_sender(TransferConfig.from_mapping(spec.transfer_cfg), kv, layout)
    try:
        send_msg(conn, {"event": "ready"})
        recv_msg(conn)  # go
        t0 = time.perf_counter()
        for job in spec.jobs:
            sender.begin(job.desc, job.request_id)
        _send_jobs(sender, spec, conn)
        for job in spec.jobs:
            done = PrefillDone(request_id=job.request_id, transfer_id=job.desc.transfer_id, first_token=7)
            sender.finish(job.desc.transfer_id, done)
        events = _wait_events(sender, {j.desc.transfer_id for j in spec.jobs}, spec.wait_s)
        return SenderReport(
            completed=tuple(e.transfer_id for e in events if isinstance(e, TransferComplete)),
            failed=tuple((e.transfer_id, e.reason) for e in events if isinstance(e, TransferFailed)),
            seconds=time.perf_counter() - t0,
        )
    finally:
        sender.close()
