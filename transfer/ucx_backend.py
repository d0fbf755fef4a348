"""UCX transfer backend through ``ucxx`` (optional extra: ``pip install -e .[ucx]``).

Payloads travel over UCX tag messages; the small control frames (begin, chunk headers, finish, acks) use the
same ZeroMQ channel as :mod:`splitserve.transfer.zmq_backend`, which keeps one validation path for both
backends. The receiver advertises ``ucx://HOST/WORKER_ADDRESS,CONTROL_ENDPOINT`` (:func:`receiver_address`): its UCX
worker's address in hex, from which a sender makes its endpoint (:func:`split_address`).

Binding follows ``TransferConfig.host``: there is no UCX socket listener (the one ucxx offers binds every interface,
0.0.0.0, with no way to name one), and the UCX context's network devices are the interface that holds ``host``
plus the RDMA ports (:func:`net_devices`), so UCX's own TCP transport listens on that address only. A wildcard host
(``0.0.0.0``, ``::``), a host on no local interface, or ``UCX_NET_DEVICES`` set in the environment leave UCX's
choice of devices alone. The sender's devices are never restricted (it connects out, to any host; its UCX TCP
transport listens where ``UCX_NET_DEVICES`` says).

Memory: payloads are sent from and received into staging tensors on the KV cache's device -- host memory
on CPU (UCX picks shared memory or tcp), GPU memory on GPU (cuda_ipc over NVLink within a host, RDMA where
the NIC supports it). On the sender the staging tensor is one gather of the token range out of the pages
(contiguous page runs are copied as slices, scattered pages use one index gather); on the receiver the
staging tensor is scattered into the pages inside ``poll()`` (so the engine never sees a page written
concurrently, and ``cancel()`` is exact). UCX progress runs on a ucxx progress thread, so data moves into
staging while the worker's loop is busy.

When GPU memory is configured but UCX offers no CUDA transport (cuda_ipc / cuda_copy / gdr_copy), UCX moves
GPU buffers over tcp at a small fraction of NVLink speed; this is logged as a loud warning.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import random
import re
import socket
import struct
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from splitserve.core.messages import KVDescriptor
from splitserve.transfer import wire
from splitserve.transfer.base import KVLayout, TransferError, TransferEvent, TransferFailed
from splitserve.transfer.zmq_backend import StagingPool, ZmqKVReceiver, ZmqKVSender, Inbound, Outbound, Reject

if TYPE_CHECKING:
    from splitserve.core.config import TransferConfig

logger = logging.getLogger(__name__)

CUDA_TRANSPORTS = ("cuda_ipc", "cuda_copy", "gdr_copy", "rc", "dc")
"""UCX transports that move GPU memory without bouncing through tcp."""


def _import_ucxx() -> Any:
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    try:
        import ucxx._lib.libucxx as ucx_api
    except ImportError as exc:
        raise TransferError(
            f"the UCX transfer backend needs ucxx (pip install -e '.[ucx]', i.e. ucxx-cu13==0.52.0): {exc}"
        ) from exc
    return ucx_api


def ucx_unavailable_reason() -> str | None:
    """``None`` when ucxx imports and a UCX context opens here; else why not."""
    try:
        ucx_api = _import_ucxx()
        ucx_api.UCXContext(feature_flags=(ucx_api.Feature.TAG,))
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here", reported verbatim
        return f"{type(exc).__name__}: {exc}"
    return None


def active_transports(context_info: str) -> set[str]:
    """Transport names in a UCX context's info dump (``resource N : md M dev K flags -- tcp/lo`` lines)."""
    found = re.findall(r"^#\s*resource.*--\s*(\S+)/", context_info, re.MULTILINE)
    return set(found)


def warn_if_gpu_over_tcp(context_info: str, device: torch.device) -> bool:
    """Log a loud warning when GPU memory would fall back to tcp; returns True if it warned."""
    if device.type != "cuda":
        return False
    transports = active_transports(context_info)
    if transports & set(CUDA_TRANSPORTS):
        logger.info("UCX transports for GPU memory: %s", sorted(transports & set(CUDA_TRANSPORTS)))
        return False
    logger.warning(
        "!!! UCX has no CUDA transport (found %s; UCX_TLS=%s): GPU KV pages will bounce over tcp at a few "
        "hundred MB/s instead of NVLink speed. Check UCX_TLS and that ucxx-cu13 matches the CUDA driver. !!!",
        sorted(transports),
        os.environ.get("UCX_TLS", "<unset>"),
    )
    return True


WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "*"})
_SIOCGIFADDR = 0x8915


def _interface_ipv4(name: str) -> str | None:
    """The IPv4 address of interface ``name`` (Linux ``SIOCGIFADDR``), or ``None``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def interface_of(host: str) -> str | None:
    """The local network interface holding ``host`` (a name or an IPv4 address), or ``None``."""
    try:
        ip = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError):
        return None
    for _index, name in socket.if_nameindex():
        addr = _interface_ipv4(name)
        if addr is None:
            continue
        found = ipaddress.ip_address(addr)
        if found == ip or (ip.is_loopback and found.is_loopback):
            return name
    return None


def rdma_ports(root: Path = Path("/sys/class/infiniband")) -> list[str]:
    """UCX names (``mlx5_0:1``) of this host's RDMA ports: they open no TCP listener, and keep RDMA in use."""
    if not root.is_dir():
        return []
    return sorted(f"{dev.name}:{port.name}" for dev in root.iterdir() if (dev / "ports").is_dir()
                  for port in (dev / "ports").iterdir())


def net_devices(host: str, environ: dict[str, str] | None = None) -> str | None:
    """``UCX_NET_DEVICES`` for a transfer bound to ``host``: its interface plus the RDMA ports; ``None`` (UCX's
    default, every device) for a wildcard host, a host on no local interface, or when the environment sets it."""
    env = os.environ if environ is None else environ
    if host in WILDCARD_HOSTS or "UCX_NET_DEVICES" in env:
        return None
    iface = interface_of(host)
    if iface is None:
        logger.warning("transfer host %s is on no local interface: UCX uses every network device", host)
        return None
    return ",".join([iface, *rdma_ports()])


def receiver_address(host: str, worker_address: bytes, control: str) -> str:
    """``ucx://HOST/WORKER_ADDRESS_HEX,CONTROL_ENDPOINT``."""
    return f"ucx://{host}/{worker_address.hex()},{control}"


def split_address(address: str) -> tuple[str, bytes]:
    """(control endpoint, UCX worker address) of :func:`receiver_address`; ``TransferError`` if malformed."""
    data, sep, control = address.removeprefix("ucx://").partition(",")
    _host, slash, hexed = data.partition("/")
    try:
        if not address.startswith("ucx://") or not sep or not slash or not control:
            raise ValueError("expected ucx://HOST/WORKER_ADDRESS,CONTROL_ENDPOINT")
        return control, bytes.fromhex(hexed)
    except ValueError as exc:
        raise TransferError(f"not a UCX receiver address: {address[:120]!r}: {exc}") from None


class _UcxWorker:
    """One UCX context + worker with a progress thread (shared by a sender's or receiver's requests).

    ``progress``: ``polling`` (the thread busy-polls; needed for GPU memory: cuda_ipc completions raise no wakeup
    event, so a blocking progress thread can sleep through them and transfers stall -- the public ucx-py/ucxx
    reports of cuda_ipc hangs in blocking mode), ``blocking`` (sleeps until the wakeup fd fires; fine for tcp and
    shared memory), or ``auto`` (polling on CUDA, blocking elsewhere).
    """

    def __init__(self, device: torch.device, progress: str = "auto", host: str = "") -> None:
        if device.type == "cuda":  # UCX (cuda_ipc) works in the current device's context, as the probe does
            torch.cuda.set_device(device)
        self.api = _import_ucxx()
        self.polling = progress == "polling" or (progress == "auto" and device.type == "cuda")
        features = (self.api.Feature.TAG,) if self.polling else (self.api.Feature.TAG, self.api.Feature.WAKEUP)
        devices = net_devices(host)
        config = {"NET_DEVICES": devices} if devices else None
        self.ctx = self.api.UCXContext(config_dict=config, feature_flags=features)
        self.worker = self.api.UCXWorker(self.ctx)
        if device.type == "cuda":  # the progress thread must see this device's CUDA context (cuda_ipc)
            from ucxx._cuda_context import ensure_cuda_context

            index = device.index if device.index is not None else torch.cuda.current_device()
            self.worker.set_progress_thread_start_callback(ensure_cuda_context, cb_args=(index,))
        self.worker.start_progress_thread(polling_mode=self.polling)
        self.gpu_over_tcp = warn_if_gpu_over_tcp(self.ctx.info, device)

    def array(self, tensor: torch.Tensor) -> Any:
        """A ucxx ``Array`` over ``tensor``'s bytes (the caller keeps ``tensor`` alive)."""
        from ucxx._lib.arr import Array

        raw = tensor.reshape(-1).view(torch.uint8)  # 1-D: the probe's (working) GPU layout
        return Array(raw if raw.is_cuda else raw.numpy())

    def tag(self, value: int) -> Any:
        return self.api.UCXXTag(value)

    def close_endpoints(self, endpoints: list[Any]) -> None:
        """Close live endpoints while the progress thread still runs (endpoints of dead peers are left alone)."""
        for ep in endpoints:
            if ep.alive:
                ep.close()

    def stop(self) -> None:
        self.worker.stop_progress_thread()


class _RequestDone:
    """``done`` view of a UCX request, for :meth:`StagingPool.track`."""

    def __init__(self, request: Any) -> None:
        self._request = request

    @property
    def done(self) -> bool:
        return bool(self._request.completed)


@dataclass
class _PendingRecv:
    request: Any
    staging: torch.Tensor
    """uint8 ``[nbytes]`` on the KV device."""
    chunk: wire.Chunk


class UcxKVReceiver(ZmqKVReceiver):
    """UCX data + ZeroMQ control. See :class:`~splitserve.transfer.base.KVReceiver`."""

    def __init__(self, cfg: "TransferConfig", kv_cache: torch.Tensor, layout: KVLayout) -> None:
        self._ucx = _UcxWorker(kv_cache.device, cfg.ucx_progress, cfg.host)
        super().__init__(cfg, kv_cache, layout)
        self._orphans: list[_PendingRecv] = []
        self._pool = StagingPool()
        self._worker_address = self._ucx.api.UCXAddress.create_from_worker(self._ucx.worker).tobytes()
        """Senders connect to this worker by its address (no listener; data is matched by tag on the worker)."""

    @property
    def address(self) -> str:
        return receiver_address(self._cfg.host, self._worker_address, super().address)

    @property
    def gpu_over_tcp(self) -> bool:
        """True when the KV cache is on a GPU but UCX has no CUDA transport (GPU pages bounce over tcp)."""
        return self._ucx.gpu_over_tcp

    def _accept_remote_payload(self, inb: Inbound, chunk: wire.Chunk) -> None:
        staging = self._pool.take((chunk.nbytes,), torch.uint8, device=self._kv.device)
        request = self._ucx.worker.tag_recv(self._ucx.array(staging), self._ucx.tag(chunk.ucx_tag))
        inb.pending.append(_PendingRecv(request, staging, chunk))

    def _has_pending(self) -> bool:
        return any(inb.pending for inb in self._transfers.values())

    def _progress_pending(self, events: list[TransferEvent]) -> None:
        self._orphans = [p for p in self._orphans if not p.request.completed]
        for inb in [t for t in self._transfers.values() if t.pending]:
            self._guarded(inb, inb.finish_seq, events, self._land_completed, inb, events)

    def _land_completed(self, inb: Inbound, events: list[TransferEvent]) -> None:
        while inb.pending and inb.pending[0].request.completed:
            p = inb.pending.pop(0)
            try:
                p.request.check_error()
            except Exception as exc:  # noqa: BLE001 - any UCX error fails just this transfer
                raise Reject(f"UCX receive failed: {type(exc).__name__}: {exc}") from exc
            lay = self._layout
            n = p.chunk.token_end - p.chunk.token_start
            data = p.staging.view(lay.torch_dtype).view(2, n, lay.num_kv_heads, lay.head_dim)
            self._land(inb, p.chunk, data, events)
            if p.staging.is_cuda:  # the scatter is stream-ordered: finish it before UCX may reuse the buffer
                torch.cuda.current_stream(p.staging.device).synchronize()
            self._pool.track(p.staging, None)
        self._try_complete(inb, events)

    def _drop_pending(self, inb: Inbound) -> None:
        # posted receives may still write their staging buffers (never the pages): recycle only once done
        for p in inb.pending:
            self._pool.track(p.staging, _RequestDone(p.request))
        self._orphans.extend(inb.pending)
        inb.pending.clear()

    def close(self) -> None:
        super().close()
        self._ucx.stop()


@dataclass
class _PendingSend:
    request: Any
    staging: torch.Tensor
    transfer_id: str


class UcxKVSender(ZmqKVSender):
    """UCX data + ZeroMQ control. See :class:`~splitserve.transfer.base.KVSender`."""

    def __init__(self, cfg: "TransferConfig", kv_cache: torch.Tensor, layout: KVLayout) -> None:
        self._ucx = _UcxWorker(kv_cache.device, cfg.ucx_progress)  # devices unrestricted: it reaches out
        super().__init__(cfg, kv_cache, layout)
        self._eps: dict[bytes, Any] = {}
        """Endpoints by the receiver's UCX worker address."""
        self._inflight: list[_PendingSend] = []
        self._sender_id = random.SystemRandom().getrandbits(31)
        self._tag_seq = 0

    def begin(self, desc: KVDescriptor, request_id: str = "") -> None:
        _, peer = split_address(desc.receiver_addr)
        if peer not in self._eps:
            try:
                address = self._ucx.api.UCXAddress.create_from_buffer(peer)
                self._eps[peer] = self._ucx.api.UCXEndpoint.create_from_worker_address(
                    self._ucx.worker, address, endpoint_error_handling=True)
            except Exception as exc:  # noqa: BLE001 - ucxx raises its own types for a bad or unreachable address
                raise TransferError(f"cannot reach UCX receiver {desc.receiver_addr[:80]}...: "
                                    f"{type(exc).__name__}: {exc}") from exc
        super().begin(desc, request_id)

    def _control_addr(self, desc: KVDescriptor) -> str:
        return split_address(desc.receiver_addr)[0]

    def _stage(self, layer: int, slots: Any) -> torch.Tensor:
        """Gather into a staging tensor on the KV device (UCX reads GPU memory directly)."""
        from splitserve.transfer.base import gather_tokens

        lay = self._layout
        shape = (2, len(slots), lay.num_kv_heads, lay.head_dim)
        buf = self._staging.take(shape, self._kv.dtype, device=self._kv.device)
        gather_tokens(self._kv, layer, slots, buf)
        if buf.is_cuda:
            torch.cuda.current_stream(buf.device).synchronize()  # UCX reads it from another stream/thread
        return buf

    def _send_payload(
        self, out: Outbound, layer: int, start: int, end: int, nbytes: int, staging: torch.Tensor
    ) -> None:
        tid = out.desc.transfer_id
        _, peer = split_address(out.desc.receiver_addr)
        self._tag_seq = (self._tag_seq + 1) & 0xFFFFFFFF
        tag = (self._sender_id << 32) | self._tag_seq
        request = self._eps[peer].tag_send(self._ucx.array(staging), self._ucx.tag(tag))
        self._inflight.append(_PendingSend(request, staging, tid))
        self._staging.track(staging, _RequestDone(request))
        self._send(tid, lambda seq: wire.Chunk(tid, seq, layer, start, end, nbytes, ucx_tag=tag))

    def _progress_sends(self, events: list[TransferEvent]) -> None:
        still: list[_PendingSend] = []
        for p in self._inflight:
            if not p.request.completed:
                still.append(p)
                continue
            try:
                p.request.check_error()
            except Exception as exc:  # noqa: BLE001 - any UCX error fails just this transfer
                out = self._out.get(p.transfer_id)
                if out is not None:
                    reason = f"UCX send failed: {type(exc).__name__}: {exc}"
                    logger.warning("request %s: transfer %s: %s", out.request_id, p.transfer_id, reason)
                    events.append(TransferFailed(p.transfer_id, out.request_id, reason))
                    self._forget(p.transfer_id)
        self._inflight = still

    def close(self) -> None:
        super().close()
        self._ucx.close_endpoints(list(self._eps.values()))
        self._ucx.stop()
        self._eps.clear()
        self._inflight.clear()
