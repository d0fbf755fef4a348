"""CUDA IPC: the one-sided KV path between GPUs of one host (NVLink or PCIe peer access).

1. The decode worker's pool is one allocation of its own (the engine allocates it whole, before anything else;
   expandable segments cannot be shared). :meth:`CudaIpcCopyEngine.export` takes the CUDA IPC handle of that
   allocation through torch's storage sharing (handle, offsets, reference counter, event).
2. :meth:`CudaIpcCopyEngine.open` maps it on the *prefill* worker's own device (the driver enables peer access),
   so kernels there write through the link straight into the decode GPU's pages.
3. :meth:`CudaIpcCopyEngine.write`: an event recorded on the compute stream right after the layer; a side
   stream waits on it and runs one Triton copy (kernels/cache.py ``copy_slots_layers``) for every token of every
   request bound for that pool (and every layer of the range). Compute goes on meanwhile; the host never waits.
   The per-call host cost is kept to an event record, a stream wait and a launch (events come from a ring).
   Slot vectors reach the device through a ring of reused pinned buffers (:class:`PinnedUploads`): no pinned
   allocation per step.
4. :meth:`CudaIpcCopyEngine.fence`: an event on the side stream, which the compute stream also waits on, so the
   source pages are never rewritten (freed, then reused by a later step) before the copies have read them.
   ``done()`` is ``event.query()``.
"""

from __future__ import annotations

import logging
import os
import uuid

import numpy as np
import torch

from splitserve.core.messages import KVPoolExport
from splitserve.kernels.cache import copy_slots_layers
from splitserve.transfer.base import TransferError
from splitserve.transfer.direct import CopyEngine, host_id

logger = logging.getLogger(__name__)


class _EventFence:
    def __init__(self, event: torch.cuda.Event) -> None:
        self._event = event

    def done(self) -> bool:
        return self._event.query()

    def failed(self) -> str | None:
        """Never: a failed device copy is a sticky CUDA error that ends the process (and its writes)."""
        return None


class PinnedUploads:
    """Small host vectors -> device tensors through a ring of reused pinned buffers.

    Buffer ``i`` is rewritten only after the copy that last read it completed (an event per buffer), so an upload
    never waits for anything but a copy queued ``ring`` uploads ago. Used from one thread.
    """

    def __init__(self, device: torch.device, ring: int = 8) -> None:
        self.device = device
        self._bufs: list[torch.Tensor | None] = [None] * ring
        self._events: list[torch.cuda.Event | None] = [None] * ring
        self._next = 0

    def upload(self, values: np.ndarray, stream: torch.cuda.Stream) -> torch.Tensor:
        """int64 ``[N]`` ``values`` -> a ``[N]`` int64 tensor on the device, copied on ``stream`` (not waited for)."""
        i, n = self._next, int(values.size)
        self._next = (i + 1) % len(self._bufs)
        event, buf = self._events[i], self._bufs[i]
        if event is None:
            event = self._events[i] = torch.cuda.Event()
        else:
            event.synchronize()  # the copy that read this buffer last (queued ``ring`` uploads ago)
        if buf is None or buf.numel() < n:
            buf = self._bufs[i] = torch.empty(max(1024, 1 << max(n - 1, 0).bit_length()), dtype=torch.int64,
                                              pin_memory=True)
        np.copyto(buf[:n].numpy(), values, casting="unsafe")
        with torch.cuda.stream(stream):
            out = buf[:n].to(self.device, non_blocking=True)
        event.record(stream)
        return out


class CudaIpcCopyEngine(CopyEngine):
    """See :class:`~splitserve.transfer.direct.CopyEngine`. ``device``: this worker's GPU."""

    kind = "cuda_ipc"

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA IPC needs a CUDA device, got {device}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        self._side: torch.cuda.Stream | None = None
        self._ready: list[torch.cuda.Event] = []
        self._next = 0
        self._uploads = PinnedUploads(self.device)

    @property
    def side(self) -> torch.cuda.Stream:
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side

    def export(self, kv_cache: torch.Tensor) -> KVPoolExport | None:
        if not kv_cache.is_cuda:
            return None
        try:
            (_dev, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync) = kv_cache.untyped_storage()._share_cuda_()
        except RuntimeError as exc:  # e.g. expandable segments: the pool stays inline-only
            logger.warning("KV pool cannot be shared over CUDA IPC (%s); peers will send inline", exc)
            return None
        return KVPoolExport(
            kind="cuda_ipc", pool_id=uuid.uuid4().hex, host_id=host_id(), pid=os.getpid(), shape=tuple(kv_cache.shape),
            dtype=str(kv_cache.dtype).removeprefix("torch."), handle=bytes(handle), storage_size=int(size),
            storage_offset=int(offset), tensor_offset=kv_cache.storage_offset(), ref_counter_handle=bytes(rc_handle),
            ref_counter_offset=int(rc_offset), event_handle=bytes(ev_handle or b""), event_sync_required=bool(ev_sync),
        )

    def open(self, export: KVPoolExport) -> torch.Tensor:
        dtype = getattr(torch, export.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise TransferError(f"bad CUDA IPC pool export {export.pool_id}: dtype {export.dtype!r}")
        try:
            storage = torch.UntypedStorage._new_shared_cuda(
                self.device.index, export.handle, export.storage_size, export.storage_offset,
                export.ref_counter_handle, export.ref_counter_offset, export.event_handle, export.event_sync_required,
            )
        except RuntimeError as exc:
            raise TransferError(f"cannot open the CUDA IPC handle of pool {export.pool_id}: {exc}") from exc
        pool = torch.empty(0, dtype=dtype, device=self.device)
        shape = tuple(export.shape)
        stride = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        pool.set_(storage, export.tensor_offset, shape, stride)
        return pool

    def slots(self, values: np.ndarray) -> torch.Tensor:
        return self._uploads.upload(values, self.side)  # on the side stream: ordered before its copies

    def write(
        self, src: torch.Tensor, dst: torch.Tensor, layers: tuple[int, int], src_slots: torch.Tensor,
        dst_slots: torch.Tensor,
    ) -> None:
        if not self._ready:  # a ring of reusable events: a recorded event may be re-recorded once waited on
            self._ready = [torch.cuda.Event() for _ in range(64)]
        ready = self._ready[self._next]
        self._next = (self._next + 1) % len(self._ready)
        ready.record(torch.cuda.current_stream(self.device))
        self.side.wait_event(ready)
        with torch.cuda.stream(self.side):
            copy_slots_layers(src, dst, layers[0], layers[1], src_slots, dst_slots, check=False)

    def fence(self) -> _EventFence:
        done = torch.cuda.Event()
        done.record(self.side)
        torch.cuda.current_stream(self.device).wait_event(done)
        return _EventFence(done)
