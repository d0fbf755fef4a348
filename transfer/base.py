"""The KV transfer contract: a decode worker *receives* a request's KV pages, a prefill worker *sends* them.

Roles and page ownership, step by step (push model):

1. **Reserve** (decode worker). The decode worker's ``KVCacheManager`` allocates destination pages for the
   request and owns them from now on. It builds a :class:`~splitserve.core.messages.KVDescriptor`
   (its own ``page_size``, ``page_ids``, ``num_tokens``, layout fields, ``receiver_addr`` =
   :attr:`KVReceiver.address`, ``lease_s``) and calls :meth:`KVReceiver.expect`, which starts the lease.
   The descriptor travels to the prefill worker inside ``PrefillReq``.
2. **Stream** (prefill worker). :meth:`KVSender.begin` checks the layout and connects;
   :meth:`KVSender.send_layer` is called once a layer's K/V for a token range is computed (several times
   per layer under chunked prefill, with consecutive ranges; layers may arrive in any order). Each call
   copies the tokens out of the sender's pages into one staging buffer before it returns, so the
   sender's pages are never read after the call returns.
3. **Land** (decode worker). Arriving K/V are scattered into the reserved pages *inside*
   :meth:`KVReceiver.poll`, on the caller's thread (the worker's main loop): the engine never observes a
   page being written concurrently, and reserved pages are not handed to the engine (nor reused) until
   :class:`TransferComplete` is returned. Sender and receiver page sizes may differ: data is sent
   token-major (``[2, tokens, num_kv_heads, head_dim]``) and each side maps tokens to its own pages.
4. **Complete.** :meth:`KVSender.finish` sends ``PrefillDone`` after all data (ordered after it).
   The receiver checks that every layer received every token ``[0, num_tokens)`` exactly once, then
   reports :class:`TransferComplete` and acknowledges; the sender's :meth:`KVSender.poll` then reports
   :class:`TransferComplete` too. From then on the pages belong to the decode engine (the request).
5. **Fail.** Any of these ends the transfer with :class:`TransferFailed` on the receiver: the sender's
   :meth:`KVSender.fail` (``PrefillFailed``), the lease expiring (no frame from the sender for
   ``lease_s`` seconds -- a dead prefill worker), a malformed frame for the transfer, a layout
   mismatch, or incomplete data at finish. After a ``TransferFailed`` (or :meth:`KVReceiver.cancel`)
   the receiver drops every later frame for that transfer, so the decode worker may free or reuse the
   pages at once. The receiver only *reports*; the decode worker applies
   ``TransferConfig.failure_policy`` per request: ``"fail"`` ends the request with a clear error,
   ``"recompute"`` prefills it locally on the decode side into the same pages.
6. **Sender side release.** After :meth:`KVSender.finish` or :meth:`KVSender.fail` returns, the prefill
   worker may free or prefix-cache its source pages (all data was already copied to staging). The
   sender reports :class:`TransferFailed` when a receiver stops answering (no acknowledgement of an
   outstanding frame within ``lease_s``) or rejects the transfer; it then drops its queued staging
   buffers for that receiver and forgets the transfer.

Leases: the receiver's lease on a transfer is renewed by every valid frame of that transfer; a
transfer whose lease runs out is failed so the decode worker reclaims its pages. The sender's
equivalent is the acknowledgement timeout above.

**The one-sided path** (transfer/direct.py; same host: CUDA IPC between GPUs, shared memory between CPU
processes). Steps 1-6 hold with these differences:

1'. The descriptor also carries ``pool`` (:class:`~splitserve.core.messages.KVPoolExport`, from
    :attr:`KVReceiver.pool_export`): what the sender needs to open the receiver's whole pool, once per pool.
2'. If the sender can open it, its ``Begin`` names the path and the sender's copy engine writes each step's
    tokens from its own pages straight into the reserved destination pages (on GPU: a Triton kernel on a side
    stream, ordered after the layer's compute by an event; the host never waits). No staging, and the receiver
    does nothing on the data path. The sender's pages are read by writes still in flight after
    :meth:`KVSender.send_layer` returns; the copy engine orders every later use of them (the engine's next
    kernels) after those writes, so the prefill engine may free them as usual.
3'. ``Landed`` frames, sent only after the writes completed, mark tokens covered. ``Finish`` and ``Abort``
    are sent only after the sender's last write completed: they also promise that nothing more is written.
    While a write may still complete the sender says so (:meth:`KVSender.writes_in_flight`): its owner keeps
    polling without an idle wait, so these frames leave as soon as the writes complete.
4'. **Write window.** The sender writes into a transfer's pages only until ``lease_s / 2`` after the send time
    of its latest acknowledged frame (before the first ack: after its ``Begin``), and sends ``Ping`` frames to
    keep the window open. The receiver renews its lease on receipt of each frame, so the window always closes
    inside the receiver's lease: after a lease expires nothing writes to those pages, even a frozen sender
    that wakes up (it checks its window before each step's writes).
5'. **Settling.** A transfer that ends early while the sender may still write (receiver :meth:`KVReceiver.cancel`,
    a rejected frame) keeps its pages reserved: :meth:`KVReceiver.cancel` returns ``False`` and the receiver
    nacks the sender, which stops writing and sends ``Abort`` after its last write completed. The receiver
    then reports :class:`TransferFailed` for it (on that ``Abort`` or at the lease deadline, whichever comes
    first); only then may the decode worker free or reuse the pages. A lease that expires while the transfer is
    active is reported at once (the window already closed).
6'. A dead sender's process takes its CUDA context with it: nothing writes after it is gone. A dead receiver's
    pool stays mapped in the sender until the sender drops the connection (no ack within ``lease_s``).

**Held prefix** (an agent session's next turn with a long new suffix). The decode worker reserves the turn's pages
with the session's pages first (the request holds a reference to them, as to any prefix hit) and sets
``KVDescriptor.held_tokens``: tokens ``[0, held_tokens)`` are in those pages already. Steps 1-6 hold for
``[held_tokens, num_tokens)`` only: the receiver counts the held tokens as covered (a frame for them is rejected),
and the sender never sends them. On the one-sided path the prefill worker may first copy the held pages into its own
pool (:meth:`KVSender.read_held`), so it computes only the suffix; the read is ordered before its later computation
and before the transfer's closing frame, so the settling rule of step 5' covers it too (the decode worker keeps the
pages until ``Finish``/``Abort``). Elsewhere the prefill worker computes what its own prefix cache lacks, and only the
suffix crosses back.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from splitserve.core.messages import KVDescriptor, KVPoolExport, PrefillDone

if TYPE_CHECKING:
    import numpy as np
    import torch

MAX_COALESCED_RUNS = 8
"""Token ranges split into at most this many contiguous slot runs are copied run by run (slices);
more scattered ranges use one index gather/scatter."""


class TransferError(RuntimeError):
    """A transfer cannot proceed (layout mismatch, bad descriptor, unknown transfer, transport error)."""


@dataclass(frozen=True)
class KVLayout:
    """Shape facts both ends must agree on (``page_size`` may differ between ends)."""

    model_id: str
    dtype: str
    """torch dtype name, e.g. ``"bfloat16"`` or ``"float32"``."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int

    def check_compatible(self, desc: KVDescriptor) -> None:
        """Raise :class:`TransferError` naming the first field where ``desc`` disagrees with this layout."""
        for name in ("model_id", "dtype", "num_layers", "num_kv_heads", "head_dim"):
            mine, theirs = getattr(self, name), getattr(desc, name)
            if mine != theirs:
                raise TransferError(
                    f"KV layout mismatch for transfer {desc.transfer_id}: {name} is {theirs!r} at the "
                    f"receiver but {mine!r} here"
                )

    @classmethod
    def from_descriptor(cls, desc: KVDescriptor) -> "KVLayout":
        return cls(desc.model_id, desc.dtype, desc.num_layers, desc.num_kv_heads, desc.head_dim, desc.page_size)

    def token_bytes(self) -> int:
        """Bytes of one token's K and V in one layer."""
        import torch

        return 2 * self.num_kv_heads * self.head_dim * torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def torch_dtype(self) -> "torch.dtype":
        import torch

        dt = getattr(torch, self.dtype, None)
        if not isinstance(dt, torch.dtype):
            raise TransferError(f"unknown KV dtype {self.dtype!r}")
        return dt

    def check_cache(self, kv_cache: "torch.Tensor") -> None:
        """Check ``kv_cache`` ``[num_layers, 2, num_pages, page_size, num_kv_heads, head_dim]`` matches."""
        shape = tuple(kv_cache.shape)
        ok = (
            len(shape) == 6
            and shape[0] == self.num_layers
            and shape[1] == 2
            and shape[3:] == (self.page_size, self.num_kv_heads, self.head_dim)
        )
        if not ok:
            raise ValueError(
                f"kv_cache shape {shape} does not match layout (num_layers={self.num_layers}, 2, pages, "
                f"page_size={self.page_size}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim})"
            )
        if kv_cache.dtype != self.torch_dtype:
            raise ValueError(f"kv_cache dtype {kv_cache.dtype} does not match layout dtype {self.dtype}")
        if not kv_cache.is_contiguous():
            raise ValueError("kv_cache must be contiguous")


# --- events ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransferComplete:
    """All layers arrived (receiver) / the receiver confirmed it (sender)."""

    transfer_id: str
    done: PrefillDone


@dataclass(frozen=True)
class TransferFailed:
    """The transfer ended without data; ``reason`` says why (clear, user-facing)."""

    transfer_id: str
    request_id: str
    reason: str
    retryable: bool = True
    """False when the sender says the request itself failed (recomputing it would fail again)."""


@dataclass(frozen=True)
class LayerArrived:
    """Every token of ``layer`` has landed in the receiver's pages."""

    transfer_id: str
    layer: int


TransferEvent = TransferComplete | TransferFailed | LayerArrived


@dataclass(frozen=True)
class LayerSend:
    """One request's share of a prefill step, for :meth:`KVSender.send_step_layer`."""

    transfer_id: str
    src_page_ids: tuple[int, ...]
    """The request's block table in the sender's pool."""
    token_start: int
    token_end: int


# --- token <-> slot mapping ------------------------------------------------------------------------


def token_slots(page_ids: Sequence[int], page_size: int, token_start: int, token_end: int) -> "np.ndarray":
    """Slots (``page_id * page_size + offset``) of tokens ``[token_start, token_end)``.

    ``page_ids[i]`` holds tokens ``[i * page_size, (i + 1) * page_size)``. Returns int64 ``[token_end - token_start]``.
    Raises ``ValueError`` when the pages do not cover the range.
    """
    import numpy as np

    if not 0 <= token_start < token_end:
        raise ValueError(f"bad token range [{token_start}, {token_end})")
    if (token_end + page_size - 1) // page_size > len(page_ids):
        raise ValueError(f"{len(page_ids)} pages of {page_size} tokens do not cover token {token_end - 1}")
    tok = np.arange(token_start, token_end, dtype=np.int64)
    pages = np.asarray(page_ids, dtype=np.int64)[tok // page_size]
    return pages * page_size + tok % page_size


def slot_runs(slots: "np.ndarray") -> list[tuple[int, int, int]]:
    """Split ``slots`` into maximal contiguous runs ``(offset_in_range, first_slot, length)``."""
    import numpy as np

    if len(slots) == 0:
        return []
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(slots)]))
    return [(int(s), int(slots[s]), int(e - s)) for s, e in zip(starts, ends)]


def _flat_layer(kv_cache: "torch.Tensor", layer: int) -> "torch.Tensor":
    """``[2, num_pages * page_size, H, D]`` view of one layer."""
    _, two, pages, ps, h, d = kv_cache.shape
    return kv_cache[layer].view(two, pages * ps, h, d)


def gather_tokens(kv_cache: "torch.Tensor", layer: int, slots: "np.ndarray", out: "torch.Tensor") -> None:
    """Copy the K/V of ``slots`` of ``layer`` into ``out`` (token-major).

    Args:
        kv_cache: ``[num_layers, 2, num_pages, page_size, H, D]``.
        slots: int64 ``[T]`` source slots.
        out: ``[2, T, H, D]``, same dtype and device as ``kv_cache``.
    """
    import torch

    flat = _flat_layer(kv_cache, layer)
    runs = slot_runs(slots)
    if len(runs) <= MAX_COALESCED_RUNS:
        for off, first, n in runs:
            out[:, off : off + n].copy_(flat[:, first : first + n])
    else:
        idx = torch.from_numpy(slots).to(flat.device)
        torch.index_select(flat, 1, idx, out=out)


def scatter_tokens(kv_cache: "torch.Tensor", layer: int, slots: "np.ndarray", data: "torch.Tensor") -> None:
    """Write token-major ``data`` ``[2, T, H, D]`` (any device, ``kv_cache`` dtype) into ``slots`` of ``layer``.

    Args:
        kv_cache: ``[num_layers, 2, num_pages, page_size, H, D]``, written in place.
        slots: int64 ``[T]`` destination slots.
    """
    import torch

    flat = _flat_layer(kv_cache, layer)
    data = data.to(flat.device, non_blocking=False)
    runs = slot_runs(slots)
    if len(runs) <= MAX_COALESCED_RUNS:
        for off, first, n in runs:
            flat[:, first : first + n].copy_(data[:, off : off + n])
    else:
        flat.index_copy_(1, torch.from_numpy(slots).to(flat.device), data)


# --- the interface ---------------------------------------------------------------------------------


class KVReceiver(abc.ABC):
    """Decode side. Used from ONE thread (the decode worker's main loop).

    Args:
        cfg: transfer settings (backend, bind host/port, lease, CurveZMQ keys).
        kv_cache: the decode worker's pool ``[num_layers, 2, num_pages, page_size, H, D]`` (layout dtype);
            pages are written only inside :meth:`poll`.
        layout: this worker's layout (its ``page_size`` is the pool's).
    """

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """Bound endpoint that senders connect to (put it in ``KVDescriptor.receiver_addr``)."""

    @abc.abstractmethod
    def expect(self, desc: KVDescriptor, request_id: str = "") -> None:
        """Register reserved pages for ``desc.transfer_id`` and start its lease.

        Raises :class:`TransferError` for a layout mismatch, a duplicate id, or pages that do not cover
        ``desc.num_tokens``. The caller keeps owning the pages; it must not reuse them until this
        transfer produced :class:`TransferComplete` or :class:`TransferFailed`, or :meth:`cancel` returned.
        """

    @abc.abstractmethod
    def poll(self, timeout_ms: int = 0) -> list[TransferEvent]:
        """Receive pending frames, write their K/V into the reserved pages, expire leases; return events.

        Waits at most ``timeout_ms`` for the first frame (0: do not wait).
        """

    @abc.abstractmethod
    def cancel(self, transfer_id: str) -> bool:
        """Stop a transfer. ``True``: nothing lands in its pages any more, reuse them now (late frames are
        dropped). ``False`` (one-sided path): the sender may still be writing; the receiver reports
        :class:`TransferFailed` for it once the pages are safe to reuse (step 5')."""

    @property
    def pool_export(self) -> KVPoolExport | None:
        """What a same-host sender needs to write into this pool directly (``None``: inline data only)."""
        return None

    @property
    def wake_socket(self) -> object | None:
        """A ZeroMQ socket (or file descriptor) that becomes readable when :meth:`poll` has frames to take: an
        idle owner waits on it with its own sockets, so a transfer that completes wakes it at once."""
        return None

    @abc.abstractmethod
    def close(self) -> None:
        """Release sockets; outstanding transfers are forgotten (no events)."""


class KVSender(abc.ABC):
    """Prefill side. Used from ONE thread (the prefill worker's main loop).

    Args:
        cfg: transfer settings.
        kv_cache: the prefill worker's pool ``[num_layers, 2, num_pages, page_size, H, D]`` (layout dtype).
        layout: this worker's layout.
    """

    @abc.abstractmethod
    def begin(self, desc: KVDescriptor, request_id: str = "") -> None:
        """Validate ``desc`` against this layout (raises :class:`TransferError`) and connect to
        ``desc.receiver_addr`` (connections are cached per address)."""

    @abc.abstractmethod
    def send_layer(
        self, transfer_id: str, layer: int, src_page_ids: Sequence[int], token_start: int, token_end: int
    ) -> None:
        """Send tokens ``[token_start, token_end)`` of ``layer``.

        ``src_page_ids`` is the request's block table in the sender's pool (``src_page_ids[i]`` holds
        tokens ``[i * page_size, (i + 1) * page_size)``). The data is copied into a staging buffer before
        this returns; the sender's pages are not read afterwards.
        """

    def send_layers(
        self, transfer_id: str, layer_start: int, layer_end: int, src_page_ids: Sequence[int], token_start: int,
        token_end: int,
    ) -> None:
        """:meth:`send_layer` for every layer of ``[layer_start, layer_end)`` (computed already); the one-sided
        backends move them in one copy."""
        for layer in range(layer_start, layer_end):
            self.send_layer(transfer_id, layer, src_page_ids, token_start, token_end)

    def send_step_layer(self, layer: int, items: Sequence[LayerSend]) -> None:
        """Send ``layer`` of every request in one engine step.

        Called for layers ``0 .. num_layers - 1`` in order, with the same ``items`` object each time (one step's
        batch), right after the layer's K/V were written. Backends that batch writes across requests override it.
        """
        for it in items:
            self.send_layer(it.transfer_id, layer, it.src_page_ids, it.token_start, it.token_end)

    @abc.abstractmethod
    def finish(self, transfer_id: str, done: PrefillDone) -> None:
        """Send ``done`` after all data. The source pages may be freed or cached once this returns."""

    @abc.abstractmethod
    def fail(self, transfer_id: str, request_id: str, error: str, retryable: bool = True) -> None:
        """Tell the receiver this transfer will not complete; source pages may be freed once this returns.
        ``retryable=False``: the request itself failed, and the receiver reports so (no recompute)."""

    @abc.abstractmethod
    def poll(self) -> list[TransferEvent]:
        """Process acknowledgements; report completed transfers and failures (receiver gone or refusing)."""

    def read_held(self, transfer_id: str, src_page_ids: Sequence[int], dst_page_ids: Sequence[int]) -> bool:
        """Copy held pages of the receiver into this pool, every layer (see "Held prefix" above).

        ``src_page_ids[i]`` is a page of the receiver's pool (its page size), every token of it inside
        ``desc.held_tokens``; ``dst_page_ids[i]`` is a page of this pool. Only for equal page sizes. The copy is
        ordered before any computation this process issues later and before the transfer's closing frame.
        Returns ``False`` (nothing copied) when this transfer cannot read the receiver's pool (inline path); raises
        :class:`TransferError` when the read failed (the pages in ``dst_page_ids`` then hold nothing usable).
        """
        return False

    def writes_in_flight(self) -> bool:
        """True while a write this sender issued will complete without any message arriving (a device copy behind
        a fence): its owner then calls :meth:`poll` again without blocking, so that ``Landed``/``Finish`` leave as
        soon as the copy completes instead of after the owner's idle wait."""
        return False

    @abc.abstractmethod
    def close(self) -> None:
        """Drop connections and any queued data."""
