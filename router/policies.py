"""Routing policies: pick one worker of a pool for a request.

Each policy is an object with ``choose(workers, request) -> WorkerState``; ``workers`` is the
non-empty list of routable candidates (the registry's :meth:`~splitserve.router.pools.WorkerRegistry.candidates`,
sorted by worker id). Select one by name with :func:`make_policy` (``RouterConfig.prefill_policy`` /
``RouterConfig.decode_policy``):

* ``round_robin``: cycle through the candidates.
* ``least_loaded``: smallest :meth:`~splitserve.router.pools.WorkerState.load_key` (router-tracked
  in-flight requests and queued prompt tokens, combined with the last heartbeat's running/waiting/queued).
* ``prefix_aware`` (prefill): longest match of the prompt's chained page hashes against the hashes the
  worker published in ``Heartbeat.cache_events``; ties go to the least loaded.
* ``kv_aware`` (decode): most free (plus evictable cached) KV pages; ties go to the least loaded.
* ``power_of_two``: two distinct random candidates, the less loaded wins (seeded ``random.Random`` injectable).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping, Protocol, Sequence

from splitserve.core.cache.prefix import page_hashes
from splitserve.router.pools import Pool, WorkerState

HashFn = Callable[[Sequence[int], int], list[int]]


@dataclass
class RouteRequest:
    """What a policy may look at: the prompt. Page hashes are computed once per page size, lazily."""

    prompt_token_ids: Sequence[int]
    hash_fn: HashFn = page_hashes
    _hashes: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def hashes(self, page_size: int) -> list[int]:
        if page_size not in self._hashes:
            self._hashes[page_size] = self.hash_fn(self.prompt_token_ids, page_size)
        return self._hashes[page_size]


class Policy(Protocol):
    def choose(self, workers: Sequence[WorkerState], request: RouteRequest) -> WorkerState: ...


def _require(workers: Sequence[WorkerState]) -> None:
    if not workers:
        raise ValueError("no candidate workers to choose from")


class RoundRobin:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._next = 0

    def choose(self, workers: Sequence[WorkerState], request: RouteRequest) -> WorkerState:
        _require(workers)
        w = workers[self._next % len(workers)]
        self._next += 1
        return w


class LeastLoaded:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def choose(self, workers: Sequence[WorkerState], request: RouteRequest) -> WorkerState:
        _require(workers)
        return min(workers, key=lambda w: w.load_key(self.pool))


def prefix_match_pages(worker: WorkerState, request: RouteRequest) -> int:
    """Number of leading full pages of the prompt whose hashes ``worker`` holds in its prefix cache."""
    n = 0
    for h in request.hashes(worker.page_size):
        if h not in worker.cached_hashes:
            break
        n += 1
    return n


class PrefixAware:
    """Longest cached prefix (in tokens) wins; the least loaded breaks ties."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def choose(self, workers: Sequence[WorkerState], request: RouteRequest) -> WorkerState:
        _require(workers)

        def key(w: WorkerState) -> tuple:
            return (-prefix_match_pages(w, request) * w.page_size, w.load_key(self.pool))

        return min(workers, key=key)


class KVAware:
    """Most free KV pages wins; the least loaded breaks ties."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def choose(self, workers: Sequence[WorkerState], request: RouteRequest) -> WorkerState:
        _require(workers)
        return min(workers, key=lambda w: (-w.kv_free_pages(), w.load_key(self.pool)))


class PowerOfTwo:
    """Two distinct random candidates; the less loaded one wins."""

    def __init__(self, pool: Pool, rng: random.Random | None = None) -> None:
        self.pool = pool
        self._rng = rng if rng is not None else random.Random()

    def choose(self, workers: Sequence[WorkerState], request: RouteRequest) -> WorkerState:
        _require(workers)
        if len(workers) == 1:
            return workers[0]
        a, b = self._rng.sample(list(workers), 2)
        return min((a, b), key=lambda w: w.load_key(self.pool))


_POLICIES: Mapping[str, tuple[type, frozenset[str]]] = MappingProxyType({
    "round_robin": (RoundRobin, frozenset({"prefill", "decode"})),
    "least_loaded": (LeastLoaded, frozenset({"prefill", "decode"})),
    "power_of_two": (PowerOfTwo, frozenset({"prefill", "decode"})),
    "prefix_aware": (PrefixAware, frozenset({"prefill"})),
    "kv_aware": (KVAware, frozenset({"decode"})),
})

POLICY_NAMES = tuple(_POLICIES)


def make_policy(name: str, pool: Pool, rng: random.Random | None = None) -> Policy:
    """Build the policy called ``name`` for ``pool``; ``rng`` seeds ``power_of_two``."""
    if name not in _POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(POLICY_NAMES)}")
    cls, pools = _POLICIES[name]
    if pool not in pools:
        raise ValueError(f"routing policy {name!r} does not apply to the {pool} pool")
    if cls is PowerOfTwo:
        return PowerOfTwo(pool, rng)
    return cls(pool)
