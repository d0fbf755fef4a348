"""Host shared memory: the one-sided KV path between CPU worker processes of one host.

1. :meth:`ShmCopyEngine.allocate`: the worker's KV pool lives in a memfd (anonymous shared memory that the kernel
   frees when the last process mapping it exits, so a killed worker leaves nothing behind) mapped by torch.
2. :meth:`ShmCopyEngine.export`: the owner's pid and the memfd's number; a peer of the same host opens
   ``/proc/PID/fd/FD`` and maps the same pages (another container or host cannot, and falls back to inline). It
   maps only a SplitServe KV memfd of exactly the pool's size, so a forged export cannot point its writes at any
   other file a process of the same user has open.
3. :meth:`ShmCopyEngine.write` copies rows with torch on the calling thread: writes complete before it
   returns, so every fence is already done.
"""

from __future__ import annotations

import logging
import math
import os
import uuid

import torch

from splitserve.core.messages import KVPoolExport
from splitserve.kernels.cache import ref_copy_slots_layers
from splitserve.transfer.base import TransferError
from splitserve.transfer.direct import CopyEngine, host_id

logger = logging.getLogger(__name__)

MEMFD_PREFIX = "splitserve-kv-"
"""Name prefix of every KV pool memfd (``/proc/PID/fd/FD`` reads ``/memfd:splitserve-kv-... (deleted)``)."""


class _Done:
    def done(self) -> bool:
        return True

    def failed(self) -> str | None:
        return None


class ShmCopyEngine(CopyEngine):
    """See :class:`~splitserve.transfer.direct.CopyEngine`; pools that this engine allocated can be exported."""

    kind = "shm"

    def __init__(self) -> None:
        self._memfds: dict[int, tuple[int, str]] = {}
        """data_ptr of a pool this engine allocated -> (memfd, pool id)."""

    @staticmethod
    def available() -> bool:
        """memfd and /proc exist here (Linux)."""
        return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if device.type != "cpu" or not self.available():
            return super().allocate(shape, dtype, device)
        pool_id = uuid.uuid4().hex
        numel = math.prod(shape)
        fd = os.memfd_create(f"{MEMFD_PREFIX}{pool_id[:8]}", os.MFD_CLOEXEC)
        os.ftruncate(fd, numel * torch.empty((), dtype=dtype).element_size())
        pool = torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=numel, dtype=dtype).view(shape)
        self._memfds[pool.data_ptr()] = (fd, pool_id)
        logger.info("KV pool of %.1f MiB in shared memory (memfd %d)", numel * pool.element_size() / 2**20, fd)
        return pool

    def export(self, kv_cache: torch.Tensor) -> KVPoolExport | None:
        found = self._memfds.get(kv_cache.data_ptr())
        if found is None:
            return None
        fd, pool_id = found
        return KVPoolExport(kind="shm", pool_id=pool_id, host_id=host_id(), pid=os.getpid(),
                            shape=tuple(kv_cache.shape), dtype=str(kv_cache.dtype).removeprefix("torch."), fd=fd)

    def open(self, export: KVPoolExport) -> torch.Tensor:
        dtype = getattr(torch, export.dtype, None)
        if not isinstance(dtype, torch.dtype) or export.fd < 0:
            raise TransferError(f"bad shm pool export {export.pool_id}")
        path = f"/proc/{export.pid}/fd/{export.fd}"
        numel = math.prod(export.shape)
        try:
            target, size = os.readlink(path), os.stat(path).st_size
        except OSError as exc:
            raise TransferError(f"cannot open {path}: {exc}") from exc
        if not target.startswith(f"/memfd:{MEMFD_PREFIX}") or size != numel * torch.empty((), dtype=dtype).element_size():
            raise TransferError(f"{path} is not a SplitServe KV pool of that shape ({target}, {size} bytes)")
        try:
            pool = torch.from_file(path, shared=True, size=numel, dtype=dtype)
        except (RuntimeError, OSError) as exc:
            raise TransferError(f"cannot map {path}: {exc}") from exc
        return pool.view(tuple(export.shape))

    def write(
        self, src: torch.Tensor, dst: torch.Tensor, layers: tuple[int, int], src_slots: torch.Tensor,
        dst_slots: torch.Tensor,
    ) -> None:
        ref_copy_slots_layers(src, dst, layers[0], layers[1], src_slots, dst_slots)

    def fence(self) -> _Done:
        return _Done()
