"""Host-memory and disk tiers for agent sessions' KV pages, below the GPU pool (see decode/sessions.py).

1. :meth:`SessionTiers.offload` copies a session's pages out of the KV pool (``[layers, 2, pages, page_size, heads,
   head_dim]``) into one host tensor: on CUDA a pinned buffer filled by a side stream that first waits for the
   current stream (so it sees every write a step made to those pages), ``non_blocking``, with an event recorded
   after it; on CPU a plain copy. The buffer is a run of the :class:`HostArena`, host memory of the tier's budget
   allocated once when the tier starts (pinned on CUDA). With a fresh pinned buffer per offload, offloads of 291 MB
   ran 200-220 ms apart on an H200 (the likely cost: allocating it on the worker's loop). A buffer goes back to the arena
   when its last holder lets go of it (a copy still in flight holds it: :meth:`PageCopier.keep_until_done`); when
   no run is free the buffer is allocated as before. Until :meth:`SessionTiers.offloaded` says the copy is done,
   the caller keeps the GPU pages pinned.
2. :meth:`SessionTiers.settle` keeps the budgets: while the host tier holds more than ``host_bytes``, victims (the
   caller's order) move to the disk tier (one raw file each, ``disk_dir``) while it has room, else are dropped;
   the disk tier over ``disk_bytes`` drops its victims. Each move is reported as an eviction with its reason.
   Files are written by one background thread; an entry keeps its host tensor until :meth:`SessionTiers.poll` sees
   its write done (a failed write drops the entry), so the worker's loop never waits on the disk to offload.
3. :meth:`SessionTiers.restore_into` writes a stored session back into freshly allocated pool pages: disk files
   are read into a (pinned) host tensor first (synchronously: the turn that needs them waits); on CUDA the host-to-device copy runs on the side stream and the
   current stream waits on its event, so the next step reads restored KV without the host thread blocking. The
   host buffer is kept until that event completes (:meth:`PageCopier.poll`).
4. :meth:`SessionTiers.drop` forgets a session (its file deleted); :meth:`SessionTiers.close` deletes every file.

Nothing here decides which session goes where: decode/sessions.py does.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

logger = logging.getLogger(__name__)

Tier = Literal["host", "disk"]


class HostArena:
    """Host memory allocated once (pinned when ``pin``), handed out as tensors over runs of whole ``unit_bytes`` units.

    1. :meth:`take` carves the first free run long enough (first fit) and returns a contiguous tensor viewing it, or
       ``None`` when no run is (the caller allocates on its own then).
    2. The run comes back when that tensor object is collected (``weakref.finalize``): holders keep the tensor
       itself (not a derived view) for as long as anything reads or writes it. Returned runs merge with their free
       neighbours. A lock guards the runs: the last holder may be a disk-writer thread.
    """

    def __init__(self, capacity_bytes: int, unit_bytes: int, pin: bool) -> None:
        if pin and capacity_bytes > 0:  # pinned blocks are rounded up to a power of two: never pin more than asked
            capacity_bytes = 1 << (capacity_bytes.bit_length() - 1)
        self.unit_bytes = unit_bytes
        self.units = capacity_bytes // unit_bytes if unit_bytes > 0 else 0
        self._buf = torch.empty(self.units * unit_bytes, dtype=torch.uint8, pin_memory=pin)
        self._free: list[list[int]] = [[0, self.units]] if self.units else []
        """Free runs ``[start, length]`` in units, ascending, never adjacent."""
        self._lock = threading.Lock()

    def free_units(self) -> int:
        with self._lock:
            return sum(n for _, n in self._free)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """A contiguous tensor of ``shape`` and ``dtype`` on a free run, or ``None``."""
        nbytes = math.prod(shape) * dtype.itemsize
        units = -(-nbytes // self.unit_bytes) if self.unit_bytes else 0
        if units == 0:
            return None
        with self._lock:
            found = next((run for run in self._free if run[1] >= units), None)
            if found is None:
                return None
            start = found[0]
            found[0] += units
            found[1] -= units
            if found[1] == 0:
                self._free.remove(found)
        begin = start * self.unit_bytes
        out = self._buf[begin:begin + nbytes].view(dtype).view(shape)
        weakref.finalize(out, self._give_back, start, units)
        return out

    def _give_back(self, start: int, units: int) -> None:
        with self._lock:
            i = next((k for k, run in enumerate(self._free) if run[0] > start), len(self._free))
            self._free.insert(i, [start, units])
            if i + 1 < len(self._free) and start + units == self._free[i + 1][0]:  # merge with the run after
                self._free[i][1] += self._free.pop(i + 1)[1]
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:  # and with the run before
                self._free[i - 1][1] += self._free.pop(i)[1]


class PageCopier:
    """Page copies between one KV pool and host tensors; asynchronous on CUDA (a side stream and events)."""

    def __init__(self, kv_cache: torch.Tensor, order_steps: Callable[[Any], None] | None = None) -> None:
        """``order_steps(event)``: makes every step launched afterwards start after ``event`` (the engine's
        ``order_pool_write``, which covers the prompt lane's stream too); default: the current stream waits."""
        self.kv_cache = kv_cache
        self.cuda = kv_cache.is_cuda
        self.side = torch.cuda.Stream(device=kv_cache.device) if self.cuda else None
        self.order_steps = order_steps
        self.arena: HostArena | None = None
        """Where host buffers come from first (set by :class:`SessionTiers`)."""
        self._in_flight: list[tuple[Any, torch.Tensor]] = []
        """(event, host buffer) of copies not known to be done (restores; offloads of sessions dropped meanwhile):
        the buffer must outlive the copy."""

    def page_bytes(self) -> int:
        per_page = self.kv_cache[:, :, :1]
        return per_page.numel() * per_page.element_size()

    def _index(self, pages: list[int]) -> torch.Tensor:
        return torch.tensor(pages, dtype=torch.long, device=self.kv_cache.device)

    def host_buffer(self, num_pages: int) -> torch.Tensor:
        """A host tensor ``[layers, 2, num_pages, ...]`` of the pool's dtype: from the arena, else a new one."""
        shape = (*self.kv_cache.shape[:2], num_pages, *self.kv_cache.shape[3:])
        buf = self.arena.take(shape, self.kv_cache.dtype) if self.arena is not None else None
        if buf is None:
            buf = torch.empty(shape, dtype=self.kv_cache.dtype, pin_memory=self.cuda)
        return buf

    def to_host(self, pages: list[int]) -> tuple[torch.Tensor, Any]:
        """The pages' KV as one host tensor ``[layers, 2, len(pages), ...]`` and the event that says it is filled."""
        buf = self.host_buffer(len(pages))
        if not self.cuda:
            torch.index_select(self.kv_cache, 2, self._index(pages), out=buf)
            return buf, None
        self.side.wait_stream(torch.cuda.current_stream(self.kv_cache.device))
        with torch.cuda.stream(self.side):
            gathered = self.kv_cache.index_select(2, self._index(pages))
            buf.copy_(gathered, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.side)
        return buf, event

    def to_pool(self, pages: list[int], data: torch.Tensor) -> None:
        """Write ``data`` (``[layers, 2, len(pages), ...]``, host) into ``pages``; later steps see it (CUDA: ordered)."""
        if not self.cuda:
            self.kv_cache.index_copy_(2, self._index(pages), data)
            return
        current = torch.cuda.current_stream(self.kv_cache.device)
        self.side.wait_stream(current)  # the pages' previous owners' steps finished writing them
        with torch.cuda.stream(self.side):
            dev = data.to(self.kv_cache.device, non_blocking=True)
            self.kv_cache.index_copy_(2, self._index(pages), dev)
            event = torch.cuda.Event()
            event.record(self.side)
        if self.order_steps is None:
            current.wait_event(event)
        else:
            self.order_steps(event)
        self._in_flight.append((event, data))

    def keep_until_done(self, event: Any, data: torch.Tensor) -> None:
        """Hold ``data`` until ``event`` (a copy into or out of it) completes: an arena run must not be handed out
        again while a device copy may still write it."""
        if not self.done(event):
            self._in_flight.append((event, data))

    @staticmethod
    def done(event: Any) -> bool:
        return event is None or bool(event.query())

    def poll(self) -> None:
        """Let go of host buffers whose copies to the pool have finished."""
        self._in_flight = [(e, d) for e, d in self._in_flight if not self.done(e)]


@dataclass
class Stored:
    """One session's pages outside the pool: their prefix-cache hashes (in order) and the KV of each."""

    hashes: tuple[int, ...]
    nbytes: int
    tier: Tier
    data: torch.Tensor | None = None
    event: Any = None
    """CUDA event of the device-to-host copy still in flight (``None``: done)."""
    path: Path | None = None
    write: Future | None = None
    """The background write of ``path`` while it runs (``data`` is kept until it is done)."""


def _write(data: torch.Tensor, path: Path) -> None:
    data.contiguous().view(torch.uint8).numpy().tofile(path)


def _arena(host_bytes: int, page_bytes: int, pin: bool) -> HostArena | None:
    """The host tier's arena, allocated now; ``None`` (buffers allocated per offload) when the host refuses it."""
    started = time.monotonic()
    try:
        arena = HostArena(host_bytes, page_bytes, pin=pin)
    except RuntimeError as exc:  # out of (pinnable) host memory: the tier still works, each offload allocates
        logger.warning("session host tier: could not allocate %d bytes up front (%s); allocating per offload",
                       host_bytes, exc)
        return None
    logger.info("session host tier: %d bytes of %shost memory allocated in %.1f s", arena.units * page_bytes,
                "pinned " if pin else "", time.monotonic() - started)
    return arena


class SessionTiers:
    """The host and disk tiers of one decode worker; ``host_bytes`` / ``disk_bytes`` of 0 turn a tier off."""

    def __init__(self, copier: PageCopier, host_bytes: int, disk_dir: str | None = None, disk_bytes: int = 0) -> None:
        self.copier, self.host_bytes = copier, host_bytes
        self.disk_dir = Path(disk_dir) if disk_dir and disk_bytes > 0 else None
        self.disk_bytes = disk_bytes if self.disk_dir is not None else 0
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
        self.page_bytes = copier.page_bytes()
        if host_bytes > 0 and copier.arena is None:
            copier.arena = _arena(host_bytes, self.page_bytes, copier.cuda)
        self.stored: dict[str, Stored] = {}
        self._files = itertools.count()
        self._prefix = f"{os.getpid()}-{int(time.time())}"
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="session-disk") if self.disk_dir is not None else None

    @property
    def enabled(self) -> bool:
        return self.host_bytes > 0 or self.disk_bytes > 0

    def tier(self, session_id: str) -> Tier | None:
        entry = self.stored.get(session_id)
        return None if entry is None else entry.tier

    def used(self, tier: Tier) -> int:
        return sum(e.nbytes for e in self.stored.values() if e.tier == tier)

    def pages(self, tier: Tier) -> int:
        return sum(len(e.hashes) for e in self.stored.values() if e.tier == tier)

    def fits(self, num_pages: int) -> bool:
        """Whether a session of ``num_pages`` pages can be kept by some tier at all."""
        nbytes = num_pages * self.page_bytes
        return nbytes <= self.host_bytes or nbytes <= self.disk_bytes

    def offload(self, session_id: str, pages: list[int], hashes: list[int]) -> None:
        """Start copying ``pages`` (holding ``hashes``) to the host tier; see :meth:`offloaded`."""
        data, event = self.copier.to_host(pages)
        self.stored[session_id] = Stored(tuple(hashes), len(pages) * self.page_bytes, "host", data, event)
        logger.info("session %s: %d pages (%d bytes) offloading to host memory", session_id, len(pages),
                    len(pages) * self.page_bytes)

    def offloaded(self, session_id: str) -> bool:
        """Whether the session's copy out of the pool has finished (its pool pages may be released)."""
        entry = self.stored.get(session_id)
        if entry is None or not self.copier.done(entry.event):
            return False
        entry.event = None
        return True

    def settle(self, order: Callable[[list[str]], list[str]]) -> list[tuple[str, str]]:
        """Bring both tiers within budget, victims first in ``order``; returns ``[(session, reason)]`` of the moves."""
        moves: list[tuple[str, str]] = []
        while self.used("host") > self.host_bytes:
            ready = [s for s, e in self.stored.items() if e.tier == "host" and e.event is None]
            if not ready:
                break  # only copies in flight: settled once they finish
            victim = order(ready)[0]
            entry = self.stored[victim]
            if entry.nbytes <= self.disk_bytes:
                self._to_disk(victim, entry)
                moves.append((victim, "to_disk"))
            else:
                self.drop(victim)
                moves.append((victim, "dropped"))
        while self.used("disk") > self.disk_bytes:
            victim = order([s for s, e in self.stored.items() if e.tier == "disk"])[0]
            self.drop(victim)
            moves.append((victim, "dropped"))
        return moves

    def _to_disk(self, session_id: str, entry: Stored) -> None:
        digest = hashlib.blake2b(session_id.encode(), digest_size=8).hexdigest()
        path = self.disk_dir / f"{self._prefix}-{next(self._files)}-{digest}.kv"
        entry.path, entry.tier, entry.write = path, "disk", self._writer.submit(_write, entry.data, path)
        logger.info("session %s: %d bytes moving to disk", session_id, entry.nbytes)

    def poll(self) -> list[str]:
        """Let go of the host tensors of finished disk writes; returns sessions dropped because their write failed."""
        failed = []
        for session_id, entry in list(self.stored.items()):
            if entry.write is None or not entry.write.done():
                continue
            exc, entry.write = entry.write.exception(), None
            if exc is None:
                entry.data = None
                continue
            logger.warning("session %s: writing its KV to %s failed (%s); dropped", session_id, entry.path, exc)
            self.drop(session_id)
            failed.append(session_id)
        return failed

    def flush(self) -> None:
        """Wait for every disk write (tests); :meth:`poll` then settles them."""
        for entry in list(self.stored.values()):
            if entry.write is not None:
                entry.write.exception()

    def _load(self, entry: Stored) -> torch.Tensor:
        """The entry's KV as a host tensor (read from its file for the disk tier)."""
        if entry.data is not None:
            return entry.data
        data = self.copier.host_buffer(len(entry.hashes))
        with open(entry.path, "rb") as f:
            read = f.readinto(memoryview(data.view(-1).view(torch.uint8).numpy()))
        if read != data.nbytes:
            raise OSError(f"{entry.path}: {read} bytes, expected {data.nbytes}")
        return data

    def restore_into(self, session_id: str, pages: list[int], indices: list[int]) -> int:
        """Write stored pages ``indices`` of the session into pool ``pages``; returns the bytes copied."""
        entry = self.stored[session_id]
        if not pages:
            return 0
        data = self._load(entry)
        picked = data
        if len(indices) != len(entry.hashes):  # some pages are still cached: copy only the others (pinned on CUDA)
            picked = self.copier.host_buffer(len(indices))
            torch.index_select(data, 2, torch.tensor(indices, dtype=torch.long), out=picked)
        self.copier.to_pool(pages, picked)
        return len(pages) * self.page_bytes

    def drop(self, session_id: str) -> Stored | None:
        entry = self.stored.pop(session_id, None)
        if entry is not None and entry.data is not None:  # ended while its copy out of the pool still runs
            self.copier.keep_until_done(entry.event, entry.data)
        if entry is None or entry.path is None:
            return entry
        if entry.write is not None and not entry.write.cancel():  # running: delete the file once it is written
            path = entry.path
            entry.write.add_done_callback(lambda _f: path.unlink(missing_ok=True))
        else:
            entry.path.unlink(missing_ok=True)
        return entry

    def close(self) -> None:
        for session_id in list(self.stored):
            self.drop(session_id)
        if self._writer is not None:
            self._writer.shutdown(wait=True)
