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
    warmup: SenderJob | None = None
    """Sent and confirmed before the clock starts (connection set-up is not timed)."""
    checksums: bool = False
    """Report a sha256 of every job's source tokens (token-major, all layers) after timing."""
    layers_per_call: int = 1
    """Above 1: send that many consecutive layers per call (``send_layers``), ignoring ``layer_order``."""
    step_layers: bool = False
    """Send as a prefill step does: per chunk, one ``send_step_layer`` per layer (in order) carrying every job."""


class SenderReport(msgspec.Struct, frozen=True):
    completed: tuple[str, ...]
    failed: tuple[tuple[str, str], ...]
    """(transfer_id, reason)."""
    seconds: float
    """From the first begin() to the last event."""
    started_at: float = 0.0
    """``time.perf_counter()`` at the first begin() (CLOCK_MONOTONIC: comparable with the parent's on one host)."""
    checksums: tuple[str, ...] = ()


def token_checksum(kv: "torch.Tensor", page_ids: Any, num_tokens: int) -> str:
    """sha256 of tokens ``[0, num_tokens)`` of every layer, token-major, whatever the page size.

    Args:
        kv: ``[L, 2, num_pages, page_size, H, D]``.
        page_ids: the request's pages (``page_ids[i]`` holds tokens ``[i * page_size, (i + 1) * page_size)``).
    """
    import hashlib

    import torch

    from splitserve.transfer.base import gather_tokens, token_slots

    h = hashlib.sha256()
    slots = token_slots(page_ids, kv.shape[3], 0, num_tokens)
    out = torch.empty((2, num_tokens, *kv.shape[4:]), dtype=kv.dtype, device=kv.device)
    for layer in range(kv.shape[0]):
        gather_tokens(kv, layer, slots, out)
        h.update(out.cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RawSpec(msgspec.Struct, frozen=True):
    """Raw baseline: send one contiguous buffer of ``nbytes`` to ``address`` ``repeat`` times (after a warm-up).

    ``address``: a ZeroMQ endpoint (the peer acks each message) or ``ucx://HOST:PORT`` (tag ``i`` for round ``i``,
    round 0 is the warm-up).
    """

    backend: str
    address: str
    nbytes: int
    device: str = "cpu"
    repeat: int = 3


def _raw_zmq(spec: RawSpec, buf: "torch.Tensor") -> list[float]:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(spec.address)
    times = []
    try:
        for i in range(spec.repeat + 1):
            t0 = time.perf_counter()
            host = buf.cpu()  # one D2H copy on GPU, free on CPU: same cost as the staging copy
            sock.send_multipart([b"raw", host.numpy()], copy=False)
            sock.recv()
            if i:
                times.append(time.perf_counter() - t0)
    finally:
        sock.close(linger=0)
        ctx.term()
    return times


def _raw_ucx(spec: RawSpec, buf: "torch.Tensor") -> list[float]:
    from splitserve.transfer.ucx_backend import _UcxWorker

    host, port = spec.address[len("ucx://") :].rsplit(":", 1)
    ucx = _UcxWorker(buf.device)
    ep = ucx.api.UCXEndpoint.create(ucx.worker, host, int(port), endpoint_error_handling=True)
    times = []
    try:
        for i in range(spec.repeat + 1):
            t0 = time.perf_counter()
            req = ep.tag_send(ucx.array(buf), ucx.tag(i))
            while not req.completed:
                time.sleep(0.0001)
            req.check_error()
            if i:
                times.append(time.perf_counter() - t0)
    finally:
        ucx.close_endpoints([ep])
        ucx.stop()
    return times


def _run_raw(spec: RawSpec) -> dict[str, list[float]]:
    import torch

    buf = torch.randint(0, 255, (spec.nbytes,), dtype=torch.uint8, device=spec.device)
    run = _raw_ucx if spec.backend == "ucx" else _raw_zmq
    return {"seconds": run(spec, buf)}


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


def _send_jobs(sender: Any, spec: SenderSpec, jobs: tuple[SenderJob, ...], conn: "Connection") -> None:
    """Send every job's layers (interleaved across jobs), chunk by chunk."""
    sent = 0
    num_layers = spec.layout["num_layers"]
    if spec.layers_per_call > 1:
        return _send_layer_ranges(sender, spec, jobs, num_layers)
    if spec.step_layers:
        return _send_steps(sender, jobs, num_layers)
    for step in range(num_layers):
        for job in jobs:
            layer = job.layer_order[step]
            for start in range(0, job.desc.num_tokens, job.chunk_tokens):
                if spec.stall_after_chunks is not None and sent >= spec.stall_after_chunks:
                    send_msg(conn, {"event": "stalled"})
                    time.sleep(3600)  # the parent kills this process
                end = min(start + job.chunk_tokens, job.desc.num_tokens)
                sender.send_layer(job.desc.transfer_id, layer, job.src_page_ids, start, end)
                sent += 1


def _send_steps(sender: Any, jobs: tuple[SenderJob, ...], num_layers: int) -> None:
    from splitserve.transfer.base import LayerSend

    longest = max(j.desc.num_tokens for j in jobs)
    chunk = min(j.chunk_tokens for j in jobs)
    for start in range(0, longest, chunk):
        items = [LayerSend(j.desc.transfer_id, j.src_page_ids, start, min(start + chunk, j.desc.num_tokens))
                 for j in jobs if start < j.desc.num_tokens]
        for layer in range(num_layers):
            sender.send_step_layer(layer, items)


def _send_layer_ranges(sender: Any, spec: SenderSpec, jobs: tuple[SenderJob, ...], num_layers: int) -> None:
    for job in jobs:
        for start in range(0, job.desc.num_tokens, job.chunk_tokens):
            end = min(start + job.chunk_tokens, job.desc.num_tokens)
            for l0 in range(0, num_layers, spec.layers_per_call):
                l1 = min(l0 + spec.layers_per_call, num_layers)
                sender.send_layers(job.desc.transfer_id, l0, l1, job.src_page_ids, start, end)


def _wait_events(sender: Any, ids: set[str], wait_s: float) -> list[TransferEvent]:
    events: list[TransferEvent] = []
    deadline = time.monotonic() + wait_s
    pending = set(ids)
    while pending and time.monotonic() < deadline:
        for ev in sender.poll():
            if isinstance(ev, (TransferComplete, TransferFailed)):
                pending.discard(ev.transfer_id)
                events.append(ev)
        if not sender.writes_in_flight():  # as a worker's loop does: no idle wait while a copy may complete
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
        if msg.get("event") == "raw":
            send_msg(conn, _run_raw(msgspec.convert(msg["spec"], RawSpec)))
            continue
        send_msg(conn, _run_spec(msgspec.convert(msg, SenderSpec), conn))


def _run_jobs(sender: Any, spec: SenderSpec, jobs: tuple[SenderJob, ...], conn: "Connection") -> list[TransferEvent]:
    for job in jobs:
        sender.begin(job.desc, job.request_id)
    _send_jobs(sender, spec, jobs, conn)
    for job in jobs:
        done = PrefillDone(request_id=job.request_id, transfer_id=job.desc.transfer_id, first_token=7)
        sender.finish(job.desc.transfer_id, done)
    return _wait_events(sender, {j.desc.transfer_id for j in jobs}, spec.wait_s)


def _run_spec(spec: SenderSpec, conn: "Connection") -> SenderReport:
    from splitserve.core.config import TransferConfig
    from splitserve.transfer.registry import make_sender

    layout = KVLayout(**spec.layout)
    kv = random_kv(layout, spec.num_pages, spec.seed, spec.device)
    sender = make_sender(TransferConfig.from_mapping(spec.transfer_cfg), kv, layout)
    try:
        send_msg(conn, {"event": "ready"})
        recv_msg(conn)  # go
        if spec.warmup is not None:
            _run_jobs(sender, spec, (spec.warmup,), conn)
        t0 = time.perf_counter()
        events = _run_jobs(sender, spec, spec.jobs, conn)
        seconds = time.perf_counter() - t0
        sums = [token_checksum(kv, j.src_page_ids, j.desc.num_tokens) for j in spec.jobs] if spec.checksums else []
        return SenderReport(
            completed=tuple(e.transfer_id for e in events if isinstance(e, TransferComplete)),
            failed=tuple((e.transfer_id, e.reason) for e in events if isinstance(e, TransferFailed)),
            seconds=seconds,
            started_at=t0,
            checksums=tuple(sums),
        )
    finally:
        sender.close()


class SenderProcess:
    """Parent-side handle of one spawned :func:`run_sender` child that runs many specs (spawning costs seconds)."""

    def __init__(self, ctx: Any = None) -> None:
        import multiprocessing as mp

        ctx = ctx or mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=run_sender, args=(child,), daemon=True)
        self.proc.start()

    def start(self, spec: SenderSpec) -> None:
        """Hand the child ``spec``; returns once its sender exists and it started sending."""
        send_msg(self.conn, spec)
        ready = recv_msg(self.conn)
        if ready.get("event") != "ready":
            raise RuntimeError(f"sender process answered {ready!r}")
        send_msg(self.conn, {"event": "go"})

    def report(self, timeout_s: float = 300.0) -> SenderReport:
        return recv_msg(self.conn, SenderReport, timeout_s)

    def raw(self, spec: RawSpec, timeout_s: float = 300.0) -> list[float]:
        """Run the raw baseline in the child; returns the timed rounds' seconds."""
        send_msg(self.conn, {"event": "raw", "spec": spec})
        return recv_msg(self.conn, timeout_s=timeout_s)["seconds"]

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                send_msg(self.conn, {"event": "exit"})
            except OSError:
                pass  # child already gone: nothing to tell it
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
