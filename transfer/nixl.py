"""NIXL: the one-sided KV path across hosts (UCX one-sided RDMA WRITE/READ; host memory on CPUs, GPU memory on GPUs).

1. One NIXL agent per :class:`NixlCopyEngine`: a unique name, the UCX backend, no listen thread (agent metadata
   travels inside our own :class:`~splitserve.core.messages.KVDescriptor`, never over NIXL's socket). Given a
   ``host`` (the worker's transfer host), the agent's UCX network devices are that host's interface plus the RDMA
   ports (:func:`~splitserve.transfer.ucx_backend.net_devices`), so UCX's TCP transport listens on that address
   only (NIXL's ``ucx_devices`` parameter does not restrict it: ``UCX_NET_DEVICES`` is set while the agent is made).
2. Receiver :meth:`NixlCopyEngine.export`: the whole pool is registered once (at :meth:`NixlCopyEngine.allocate`,
   else here); the export carries the agent's metadata for that one registration (plus its connection info), the
   pool's address, memory type and device. It grants reads and writes of that pool only.
3. Sender :meth:`NixlCopyEngine.open`: loads the receiver agent's metadata once per pool and returns a ``meta``
   placeholder of the pool's shape (no memory); the engine keeps the peer pool's address under ``id()`` of that
   placeholder. The sender's own pool is registered once (at allocate, else at its first write or read).
4. :meth:`NixlCopyEngine.write`: descriptor pairs for the token rows of layers ``[l0, l1)``, K and V planes; rows
   contiguous in *both* pools merge into one descriptor (:func:`coalesce_runs`: a page is one run, adjacent pages in
   both pools one longer run). One WRITE request per call, posted at once (GPU source: once the event recorded
   after the layer's kernels has completed, since NIXL reads the source when the request is posted).
5. :meth:`NixlCopyEngine.fence`: NIXL reads the source pages asynchronously and nothing orders the engine's next
   kernels after it, so the fence waits (at most ``fence_wait_s``) until every request issued since the previous
   fence is final: later computation on the source pool (pages freed and reused) then cannot race the reads.
   ``done()`` is True once all of them reported ``DONE``; handles are released as they finish.
6. Failure: a request that cannot be created or posted, reports ``ERR``, or is not final within ``fence_wait_s`` is
   logged and makes its fence never done. Once every request behind it is final, the fence reports the error
   (``failed()``): :class:`~splitserve.transfer.direct.DirectKVSender` fails those transfers at once and sends
   ``Abort`` (nothing writes any more). An abandoned fence (requests still in flight) reports nothing: the
   receiver fails its transfers when their lease expires. Either way the decode worker applies its ``failure_policy``.
7. :meth:`NixlCopyEngine.read` (a held prefix, transfer/base.py): the same descriptor pairs with the roles swapped
   (the local pool is the destination), one READ request, posted once the kernels queued on the local pool's device
   completed (they may still use those pages), and waited for right there: the caller computes on the pages as
   soon as it returns, so it is never left to a fence (nor counted by one). ``DONE``: True. ``ERR``, or not final
   within ``fence_wait_s`` (:data:`READ_WAIT_S` when that is 0): :class:`TransferError` (the prefill worker then
   frees the pages and computes the prefix itself); a late request is aborted by releasing its handle, and logged
   as an error either way (NIXL's UCX backend cancels the request best-effort: data already on the wire may land).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch

from splitserve.core.messages import KVPoolExport
from splitserve.transfer.base import TransferError
from splitserve.transfer.direct import CopyEngine, host_id

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[nixl]'"
FENCE_POLL_S = 50e-6
"""Sleep between two completion checks while a fence or a read waits (NIXL's progress thread moves the data)."""
READ_WAIT_S = 5.0
"""How long :meth:`NixlCopyEngine.read` waits for its READ when ``fence_wait_s`` is 0 (a read is always waited for)."""


class _Nixl(NamedTuple):
    """The parts of the NIXL API this module uses (imported on first use: nixl is an optional extra)."""

    agent: Any
    """``nixl._api.nixl_agent``."""
    config: Any
    """``nixl._api.nixl_agent_config``."""
    errors: tuple[type[Exception], ...]
    """The exceptions NIXL's bindings raise (``nixlNotFoundError``, ``nixlBackendError``, ...)."""


def load_nixl() -> _Nixl:
    """Import NIXL; raises :class:`TransferError` naming the install command when it is missing."""
    try:
        import nixl
        from nixl._api import nixl_agent, nixl_agent_config
    except (ImportError, OSError) as exc:
        raise TransferError(f"the nixl transfer backend needs NIXL: {INSTALL_HINT} ({exc})") from exc
    bindings = nixl._bindings
    errors = tuple(getattr(bindings, n) for n in dir(bindings) if n.startswith("nixl") and n.endswith("Error"))
    return _Nixl(nixl_agent, nixl_agent_config, errors)


@contextlib.contextmanager
def _ucx_devices_for(host: str | None) -> Iterator[None]:
    """``UCX_NET_DEVICES`` for ``host`` while the agent's UCX context is made (UCX reads it then), restored after."""
    from splitserve.transfer.ucx_backend import net_devices

    devices = net_devices(host) if host is not None else None
    if devices is None:
        yield
        return
    os.environ["UCX_NET_DEVICES"] = devices
    try:
        yield
    finally:
        os.environ.pop("UCX_NET_DEVICES", None)


def coalesce_runs(src_slots: np.ndarray, dst_slots: np.ndarray) -> np.ndarray:
    """Maximal runs where both slot vectors step by one: int64 ``[runs, 3]`` rows ``(src_start, dst_start, length)``.

    Args:
        src_slots: int64 ``[T]`` source slots.
        dst_slots: int64 ``[T]`` destination slots (token ``i`` goes from ``src_slots[i]`` to ``dst_slots[i]``).
    """
    src = np.asarray(src_slots, dtype=np.int64)
    dst = np.asarray(dst_slots, dtype=np.int64)
    if src.ndim != 1 or src.shape != dst.shape:
        raise ValueError(f"slot vectors of shapes {src.shape} and {dst.shape}: need two 1-d ones of one length")
    if len(src) == 0:
        return np.empty((0, 3), dtype=np.int64)
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    lengths = np.diff(np.append(starts, len(src)))
    return np.stack((src[starts], dst[starts], lengths), axis=1)


@dataclass(frozen=True)
class _Region:
    """Where a contiguous ``[L, 2, P, S, H, D]`` pool lives, as NIXL addresses it."""

    addr: int
    mem_type: str
    """``DRAM`` or ``VRAM``."""
    device_id: int
    plane_rows: int
    """Rows (token slots) of one layer's K or V: ``P * S``."""
    row_bytes: int
    """One token's K (or V) of one layer: ``H * D * element_size``."""

    @classmethod
    def of(cls, shape: tuple[int, ...], dtype: torch.dtype, addr: int, mem_type: str, device_id: int) -> "_Region":
        _, _, pages, page_size, heads, dim = shape
        row_bytes = heads * dim * torch.empty((), dtype=dtype).element_size()
        return cls(addr, mem_type, device_id, pages * page_size, row_bytes)

    def descs(self, planes: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """uint64 ``[planes * runs, 3]`` (address, bytes, device) of rows ``[starts[r], starts[r] + lengths[r])``.

        Args:
            planes: int64 ``[planes]`` plane numbers ``layer * 2 + kv``.
            starts: int64 ``[runs]`` first slot of each run; ``lengths``: int64 ``[runs]`` its slots.
        """
        rows = planes[:, None] * self.plane_rows + starts[None, :]
        out = np.empty((rows.size, 3), dtype=np.uint64)
        out[:, 0] = (self.addr + rows * self.row_bytes).ravel()
        out[:, 1] = np.broadcast_to(lengths * self.row_bytes, rows.shape).ravel()
        out[:, 2] = self.device_id
        return out


def _poll_until(done: Callable[[], bool], wait_s: float) -> bool:
    """Call ``done`` every :data:`FENCE_POLL_S` until it says True (True) or ``wait_s`` has passed (False)."""
    deadline = time.monotonic() + wait_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(FENCE_POLL_S)
    return True


def _region_of(pool: torch.Tensor) -> _Region:
    device_id = pool.get_device()
    mem_type = "DRAM" if device_id < 0 else "VRAM"
    return _Region.of(tuple(pool.shape), pool.dtype, pool.data_ptr(), mem_type, max(device_id, 0))


@dataclass(frozen=True)
class _Remote:
    """A peer's pool opened for writing and reading."""

    pool_id: str
    agent: str
    """The peer's NIXL agent name."""
    target: torch.Tensor
    """The ``meta`` placeholder :meth:`NixlCopyEngine.open` returned (``[L, 2, P, S, H, D]``)."""
    region: _Region


@dataclass
class _Xfer:
    """One WRITE or READ request."""

    handle: Any
    """``nixl_xfer_handle``; ``None`` when the request could not be created."""
    pool_id: str
    op: str = "WRITE"
    """``WRITE`` (into the peer's pool ``pool_id``) or ``READ`` (out of it)."""
    ready: Any = None
    """``torch.cuda.Event`` after the kernels queued on the local pool (GPU pool): the request is posted once it
    completed (a WRITE's source rows are computed, a READ's destination rows no longer used)."""
    posted: bool = False
    state: str = "PROC"
    """``PROC``, then ``DONE`` or ``ERR`` (final)."""
    error: str = ""

    @property
    def what(self) -> str:
        """``WRITE into pool <id>`` or ``READ from pool <id>``."""
        return f"{self.op} {'into' if self.op == 'WRITE' else 'from'} pool {self.pool_id}"


class _NixlFence:
    """See :class:`~splitserve.transfer.direct.Fence`: the WRITE requests issued since the previous fence."""

    def __init__(self, engine: "NixlCopyEngine", xfers: list[_Xfer]) -> None:
        self._engine = engine
        self._pending = xfers
        self.error: str | None = None
        """Why this fence will never be done (a request failed or was abandoned); ``None`` otherwise."""
        self._abandoned = False

    def settled(self) -> bool:
        """Advance every pending request; True once each is final (``DONE`` or ``ERR``)."""
        still = []
        for x in self._pending:
            if not self._engine.advance(x):
                still.append(x)
            elif x.state == "ERR" and self.error is None:
                self.error = x.error
        self._pending = still
        return not still

    def done(self) -> bool:
        return self.settled() and self.error is None

    def failed(self) -> str | None:
        """The error once every request is final (an abandoned fence may still write: never)."""
        return None if self._abandoned or not self.settled() else self.error

    def abandon(self, reason: str) -> None:
        """Never report done (requests still in flight may read source pages the engine reuses)."""
        self.error = self.error or reason
        self._abandoned = True


class NixlCopyEngine(CopyEngine):
    """See :class:`~splitserve.transfer.direct.CopyEngine`; opens pools of any host.

    Args:
        name: the NIXL agent's name (unique among the agents that talk; default: host, pid and a random suffix).
        fence_wait_s: how long :meth:`fence` waits for the writes it covers (0: it does not wait, so the caller must
            not touch the source pages before ``done()``; for benchmarks).
        host: the address UCX's TCP transport listens on (``None`` or a wildcard: every device, UCX's default).
    """

    kind = "nixl"
    cross_host = True

    def __init__(self, name: str | None = None, fence_wait_s: float = 5.0, host: str | None = None) -> None:
        api = load_nixl()
        self._errors = api.errors
        self.name = name or f"splitserve-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.fence_wait_s = fence_wait_s
        config = api.config(enable_prog_thread=True, enable_listen_thread=False, backends=["UCX"])
        try:
            with _ucx_devices_for(host):
                self._agent = api.agent(self.name, config)
        except (RuntimeError, *self._errors) as exc:
            raise TransferError(f"cannot create NIXL agent {self.name}: {exc}") from exc
        if "UCX" not in self._agent.backends:
            raise TransferError(f"NIXL agent {self.name}: the UCX backend plugin is not available here")
        self._registered: dict[int, tuple[torch.Tensor, Any]] = {}
        """data_ptr of a local pool -> (the pool, its NIXL registration)."""
        self._exports: dict[int, KVPoolExport] = {}
        self._remote: dict[int, _Remote] = {}
        """``id()`` of a placeholder returned by :meth:`open` -> the peer pool."""
        self._opened: dict[str, _Remote] = {}
        """pool_id -> the peer pool."""
        self._issued: list[_Xfer] = []
        """Requests issued since the last fence."""
        self.last_descriptor_count = 0
        """Descriptors of the last :meth:`write` or :meth:`read` (after coalescing; both sides have this many)."""

    # -- local pools --

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        pool = super().allocate(shape, dtype, device)
        self._register(pool)  # at start-up: pinning a large pool takes a while
        return pool

    def _register(self, pool: torch.Tensor) -> _Region:
        if not pool.is_contiguous():
            raise TransferError(f"NIXL agent {self.name}: the KV pool must be contiguous")
        if pool.data_ptr() not in self._registered:
            try:
                reg = self._agent.register_memory(pool)
            except self._errors as exc:
                raise TransferError(f"NIXL agent {self.name}: cannot register the KV pool: {exc}") from exc
            self._registered[pool.data_ptr()] = (pool, reg)
            logger.info("NIXL agent %s registered a KV pool of %.1f MiB on %s", self.name,
                        pool.numel() * pool.element_size() / 2**20, pool.device)
        return _region_of(pool)

    def export(self, kv_cache: torch.Tensor) -> KVPoolExport | None:
        found = self._exports.get(kv_cache.data_ptr())
        if found is not None:
            return found
        try:
            region = self._register(kv_cache)
            reg = self._registered[kv_cache.data_ptr()][1]
            metadata = self._agent.get_partial_agent_metadata(reg, inc_conn_info=True, backends=["UCX"])
        except (TransferError, *self._errors) as exc:
            logger.warning("NIXL agent %s: KV pool not exported (%s); peers will send inline", self.name, exc)
            return None
        export = KVPoolExport(
            kind="nixl", pool_id=uuid.uuid4().hex, host_id=host_id(), pid=os.getpid(), shape=tuple(kv_cache.shape),
            dtype=str(kv_cache.dtype).removeprefix("torch."), handle=bytes(metadata), addr=region.addr,
            device_id=region.device_id, mem_type=region.mem_type,
        )
        self._exports[kv_cache.data_ptr()] = export
        logger.info("NIXL agent %s exports KV pool %s (%s, %d bytes of metadata)", self.name, export.pool_id,
                    region.mem_type, len(export.handle))
        return export

    # -- peer pools --

    def open(self, export: KVPoolExport) -> torch.Tensor:
        """A ``meta`` tensor ``[L, 2, P, S, H, D]`` standing for the peer's pool: pass it to :meth:`write` (as
        ``dst``) or :meth:`read` (as ``src``) only."""
        known = self._opened.get(export.pool_id)
        if known is not None:
            return known.target
        dtype = getattr(torch, export.dtype, None)
        if (export.kind != self.kind or not isinstance(dtype, torch.dtype) or export.mem_type not in ("DRAM", "VRAM")
                or not export.handle or len(export.shape) != 6):
            raise TransferError(f"bad NIXL pool export {export.pool_id} ({export.kind}, {export.dtype}, "
                                f"{export.mem_type or 'no memory type'}, shape {export.shape})")
        try:
            agent = self._agent.add_remote_agent(export.handle)
        except self._errors as exc:
            raise TransferError(f"NIXL agent {self.name}: cannot load the metadata of pool {export.pool_id} "
                                f"(pid {export.pid} on {export.host_id}): {exc}") from exc
        agent = agent.decode() if isinstance(agent, bytes) else str(agent)
        target = torch.empty(tuple(export.shape), dtype=dtype, device="meta")
        region = _Region.of(tuple(export.shape), dtype, export.addr, export.mem_type, export.device_id)
        remote = _Remote(export.pool_id, agent, target, region)
        self._remote[id(target)] = remote
        self._opened[export.pool_id] = remote
        logger.info("NIXL agent %s opened pool %s of agent %s (pid %d on %s) for writes and reads", self.name,
                    export.pool_id, agent, export.pid, export.host_id)
        return target

    # -- writing and reading --

    # slots(): the base class's host tensor (NIXL addresses rows from the host)

    def _peer(self, target: torch.Tensor, what: str) -> _Remote:
        remote = self._remote.get(id(target))
        if remote is None or remote.target is not target:
            raise TransferError(f"NIXL agent {self.name}: {what} a pool this engine did not open")
        return remote

    def _descs(self, local: _Region, remote: _Remote, layers: tuple[int, int], local_slots: torch.Tensor,
               remote_slots: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(local, remote) descriptors of rows ``local_slots[i]`` <-> ``remote_slots[i]``, layers ``[l0, l1)``, K
        and V, runs contiguous in both pools merged; sets :attr:`last_descriptor_count`."""
        if local.row_bytes != remote.region.row_bytes:
            raise ValueError(f"token rows of {local.row_bytes} bytes here, {remote.region.row_bytes} in pool "
                             f"{remote.pool_id}")
        runs = coalesce_runs(local_slots.numpy(), remote_slots.numpy())
        planes = np.arange(2 * layers[0], 2 * layers[1], dtype=np.int64)
        local_descs = local.descs(planes, runs[:, 0], runs[:, 2])
        remote_descs = remote.region.descs(planes, runs[:, 1], runs[:, 2])
        self.last_descriptor_count = len(local_descs)
        return local_descs, remote_descs

    def read(
        self, src: torch.Tensor, dst: torch.Tensor, layers: tuple[int, int], src_slots: torch.Tensor,
        dst_slots: torch.Tensor,
    ) -> bool:
        """See :meth:`CopyEngine.read`; ``src`` is a placeholder from :meth:`open`, ``dst`` this process's pool,
        slots are int64 CPU ``[T]``. One READ request, posted after the kernels queued so far on ``dst``'s device,
        and *complete when this returns True* (it waits up to ``fence_wait_s``, :data:`READ_WAIT_S` when that is 0;
        no later :meth:`fence` covers it). Raises :class:`TransferError` when the READ fails or is late (then
        aborted): rows of ``dst_slots`` hold nothing usable (module doc, step 7)."""
        remote = self._peer(src, "read from")
        local = self._register(dst)
        local_descs, remote_descs = self._descs(local, remote, layers, dst_slots, src_slots)
        if len(local_descs):
            self._wait_read(self._start("READ", remote, local, dst, local_descs, remote_descs))
        return True

    def _wait_read(self, x: _Xfer) -> None:
        wait_s = self.fence_wait_s if self.fence_wait_s > 0 else READ_WAIT_S
        if not _poll_until(lambda: self.advance(x), wait_s):
            self._abort_read(x, wait_s)
        if x.state == "ERR":
            raise TransferError(f"NIXL agent {self.name}: {x.error}")

    def _abort_read(self, x: _Xfer, wait_s: float) -> None:
        """Release a late READ (NIXL cancels a request still in flight) and raise :class:`TransferError`."""
        x.state, x.error = "ERR", f"NIXL {x.what} not completed within {wait_s:g}s"
        if self._release(x):
            logger.error("NIXL agent %s: %s; aborted (UCX cancels best-effort: bytes already on the wire may still "
                         "land in the destination pages)", self.name, x.error)
        else:
            logger.error("NIXL agent %s: %s and it could not be aborted: its destination pages may still be "
                         "written", self.name, x.error)
        raise TransferError(f"NIXL agent {self.name}: {x.error}")

    def write(
        self, src: torch.Tensor, dst: torch.Tensor, layers: tuple[int, int], src_slots: torch.Tensor,
        dst_slots: torch.Tensor,
    ) -> None:
        """See :meth:`CopyEngine.write`; ``dst`` is a placeholder from :meth:`open`, slots are int64 CPU ``[T]``."""
        remote = self._peer(dst, "write into")
        local = self._register(src)
        src_descs, dst_descs = self._descs(local, remote, layers, src_slots, dst_slots)
        for x in self._issued:  # post earlier requests whose source became ready (in stream order)
            if x.state == "PROC" and not x.posted and not self.advance(x) and not x.posted:
                break
        if len(src_descs):
            self._issued.append(self._start("WRITE", remote, local, src, src_descs, dst_descs))

    def _start(self, op: str, remote: _Remote, local: _Region, pool: torch.Tensor, local_descs: np.ndarray,
               remote_descs: np.ndarray) -> _Xfer:
        """Create request ``op`` between ``pool`` (``local``) and ``remote``; post it now, or once the kernels queued
        on ``pool``'s device completed (NIXL touches the local rows as soon as the request is posted)."""
        try:
            handle = self._agent.initialize_xfer(  # READ: the local descriptors are the destination
                op, self._agent.get_xfer_descs(local_descs, local.mem_type),
                self._agent.get_xfer_descs(remote_descs, remote.region.mem_type), remote.agent,
            )
        except self._errors as exc:
            xfer = _Xfer(None, remote.pool_id, op, state="ERR")
            xfer.error = f"cannot create a NIXL {xfer.what} of {len(local_descs)} descriptors: {exc}"
            logger.error("NIXL agent %s -> agent %s: %s", self.name, remote.agent, xfer.error)
            return xfer
        xfer = _Xfer(handle, remote.pool_id, op)
        if pool.is_cuda:
            xfer.ready = torch.cuda.Event()
            xfer.ready.record(torch.cuda.current_stream(pool.device))
        self.advance(xfer)
        return xfer

    def advance(self, x: _Xfer) -> bool:
        """Post ``x`` once its source is ready, check it; True once it is final (its handle is then released)."""
        if x.state != "PROC":
            return True
        try:
            if x.posted:
                status = self._agent.check_xfer_state(x.handle)
            elif x.ready is not None and not x.ready.query():
                return False
            else:
                status = self._agent.transfer(x.handle)
                x.posted = True
        except self._errors as exc:
            status = f"ERR ({exc})"
        if status == "PROC":
            return False
        x.state = "DONE" if status == "DONE" else "ERR"
        if x.state == "ERR":
            x.error = f"NIXL {x.what} failed: {status}"
            logger.error("NIXL agent %s: %s", self.name, x.error)
        self._release(x)
        return True

    def _release(self, x: _Xfer) -> bool:
        """Free ``x``'s handle (NIXL first cancels a request still in flight); False when NIXL refused."""
        try:
            x.handle.release()
        except self._errors as exc:  # NIXL keeps such a handle and retries when the agent goes
            logger.warning("NIXL agent %s: %s request not released: %s", self.name, x.what, exc)
            return False
        return True

    def fence(self) -> _NixlFence:
        """A fence after every write issued so far; waits up to ``fence_wait_s`` for them (see the module doc)."""
        fence = _NixlFence(self, self._issued)
        self._issued = []
        if self.fence_wait_s > 0 and not _poll_until(fence.settled, self.fence_wait_s):
            reason = f"WRITE requests not completed within {self.fence_wait_s:g}s"
            logger.error("NIXL agent %s: %s; the transfers behind them will not complete", self.name, reason)
            fence.abandon(reason)
        return fence

    def close(self) -> None:
        """Forget peers and registrations (call once nothing writes any more; the agent goes with the object)."""
        for x in self._issued:
            if x.state == "PROC" and x.handle is not None:
                self._release(x)
        self._issued.clear()
        try:
            for agent in {r.agent for r in self._opened.values()}:
                self._agent.remove_remote_agent(agent)
            for _pool, reg in self._registered.values():
                self._agent.deregister_memory(reg)
        except self._errors as exc:
            logger.warning("NIXL agent %s: incomplete clean-up at close: %s", self.name, exc)
        self._remote.clear()
        self._opened.clear()
        self._registered.clear()
        self._exports.clear()
