"""Which KV transfer backend a worker uses, and the objects it needs (kept outside the contract in base.py).

1. :func:`resolve`: ``auto`` (the default) becomes ``cuda_ipc`` for a GPU pool and ``shm`` for a CPU pool where the
   OS has memfd; otherwise ``zmq``. Either one-sided backend still sends inline (ZeroMQ frames), per transfer,
   to a peer it cannot reach directly (another host or container): the worker logs which it uses. ``nixl``
   (transfer/nixl.py, chosen explicitly, never by ``auto``) writes one-sided across hosts too.
2. :func:`make_copy_engine`: the one-sided backends' copy engine. The worker allocates its KV pool through it
   (``shm`` needs the pool in shared memory) and hands the same engine to its receiver and sender.
3. :func:`make_sender` / :func:`make_receiver`: the backend's two ends.
"""

from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from splitserve.transfer.base import KVLayout, KVReceiver, KVSender

if TYPE_CHECKING:
    import torch

    from splitserve.core.config import TransferConfig
    from splitserve.transfer.direct import CopyEngine

BACKENDS = ("auto", "zmq", "ucx", "cuda_ipc", "shm", "nixl")
DIRECT_BACKENDS = ("cuda_ipc", "shm", "nixl")


def resolve(backend: str, device_type: str) -> str:
    """The concrete backend for ``backend`` on a pool of ``device_type`` (``cpu`` or ``cuda``)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown transfer backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    if backend != "auto":
        return backend
    if device_type == "cuda":
        return "cuda_ipc"
    from splitserve.transfer.shm import ShmCopyEngine

    return "shm" if ShmCopyEngine.available() else "zmq"


def make_copy_engine(backend: str, device: "torch.device", host: str | None = None) -> "CopyEngine | None":
    """The copy engine of a one-sided ``backend`` (already resolved) for a pool on ``device``; ``None`` otherwise.
    ``host``: the transfer host, where a NIXL agent's UCX transport listens (``None``: every device)."""
    if backend == "cuda_ipc":
        if device.type != "cuda":
            raise ValueError("--transfer cuda_ipc needs --device cuda")
        from splitserve.transfer.cuda_ipc import CudaIpcCopyEngine

        return CudaIpcCopyEngine(device)
    if backend == "shm":
        from splitserve.transfer.shm import ShmCopyEngine

        return ShmCopyEngine()
    if backend == "nixl":  # needs the nixl extra; raises TransferError naming it
        from splitserve.transfer.nixl import NixlCopyEngine

        return NixlCopyEngine(host=host)
    return None


_ENDS = MappingProxyType({
    "direct": ("splitserve.transfer.direct", "DirectKVSender", "DirectKVReceiver"),
    "ucx": ("splitserve.transfer.ucx_backend", "UcxKVSender", "UcxKVReceiver"),
    "zmq": ("splitserve.transfer.zmq_backend", "ZmqKVSender", "ZmqKVReceiver"),
})
"""Module, sender class and receiver class of each family (imported on use: ucx needs ucxx)."""


def _build(end: int, cfg: "TransferConfig", kv_cache: "torch.Tensor", layout: KVLayout, engine: "CopyEngine | None") -> Any:
    backend = resolve(cfg.backend, kv_cache.device.type)
    copy = engine if engine is not None else make_copy_engine(backend, kv_cache.device)
    family = "direct" if copy is not None else ("ucx" if backend == "ucx" else "zmq")
    module, *classes = _ENDS[family]
    cls = getattr(importlib.import_module(module), classes[end])
    return cls(cfg, kv_cache, layout, copy) if copy is not None else cls(cfg, kv_cache, layout)


def make_sender(
    cfg: "TransferConfig", kv_cache: "torch.Tensor", layout: KVLayout, engine: "CopyEngine | None" = None
) -> KVSender:
    """The sender of ``cfg.backend`` over ``kv_cache`` ``[L, 2, P, S, H, D]`` (one-sided ones fall back to inline)."""
    return _build(0, cfg, kv_cache, layout, engine)


def make_receiver(
    cfg: "TransferConfig", kv_cache: "torch.Tensor", layout: KVLayout, engine: "CopyEngine | None" = None
) -> KVReceiver:
    """The receiver of ``cfg.backend``; a one-sided one offers its pool only if ``engine`` can export it."""
    return _build(1, cfg, kv_cache, layout, engine)
