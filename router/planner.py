"""Prefill:decode ratio planning (torch-free, pure).

Three parts:

* :class:`Profile`: what one prefill worker and one decode worker can do on the actual hardware,
  measured by ``splitserve bench profile``: prefill latency vs prompt length, decode step time
  (TPOT) vs batch size. Values between measured points are interpolated linearly; beyond the last
  point they are extrapolated from the last two points.
* :func:`plan`: the worker counts that meet a TTFT p90 and a TPOT p90 SLO for a workload (arrival
  rate, input and output length samples), in the spirit of DistServe and Dynamo's SLA planner.
  Prefill is a queue per worker (M/G/1: Pollaczek-Khinchine mean wait with an exponential tail),
  TTFT = queue wait + prefill time. Decode holds each request for ``output_len - 1`` steps: the
  mean batch per worker follows from Little's law (B = rate x steps x TPOT(B)), its spread is
  Poisson (M/G/infinity), and TPOT p90 is the profile's step time at the batch's p90. Because the
  two pools are independent in a disaggregated deployment, each pool is sized on its own: the
  highest rate one worker sustains within its SLO gives the count, and the ratio of the two
  per-worker rates gives the ideal prefill:decode ratio for a fixed budget of workers.
* :class:`AutoRatioController`: fed measured TTFT/TPOT p90 windows and current pool sizes, it
  recommends moving one worker between the pools when one SLO is missed while the other pool has
  slack; a dead band, a streak of agreeing windows and a cooldown keep it from flapping.

:class:`ClusterSimulator` is a discrete-event simulation of a prefill pool and a decode pool
driven by a profile (no real processes); it checks plans and the controller (``splitserve plan
--simulate`` and the tests).
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

Role = Literal["prefill", "decode"]
QUANTILE = 0.9


# ----------------------------------------------------------------------------------------------
# Profiles
# ----------------------------------------------------------------------------------------------


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear interpolation; linear extrapolation from the end segments; never below 0."""
    if len(xs) == 1:
        return ys[0] * (x / xs[0]) if xs[0] > 0 else ys[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def _points(raw: Sequence[Mapping[str, Any]], x_key: str, y_key: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pts = sorted((float(p[x_key]), float(p[y_key])) for p in raw)
    if not pts:
        raise ValueError(f"profile needs at least one {x_key} point")
    xs = tuple(x for x, _ in pts)
    if len(set(xs)) != len(xs) or xs[0] <= 0 or any(y <= 0 for _, y in pts):
        raise ValueError(f"profile {x_key} points must be distinct and positive, with positive {y_key}")
    return xs, tuple(y for _, y in pts)


@dataclass(frozen=True)
class Profile:
    """Measured capability of one worker of each role.

    ``prefill_lens``/``prefill_s``: seconds to prefill one prompt of that many tokens (to its first
    token). ``decode_batches``/``decode_s``: seconds per decode step (= TPOT) at that batch size.
    """

    prefill_lens: tuple[float, ...]
    prefill_s: tuple[float, ...]
    decode_batches: tuple[float, ...]
    decode_s: tuple[float, ...]
    max_batch_size: int = 256
    meta: Mapping[str, Any] = field(default_factory=dict)

    def prefill_time(self, input_len: float) -> float:
        """Seconds one prefill worker needs for one prompt of ``input_len`` tokens."""
        return _interp(self.prefill_lens, self.prefill_s, input_len)

    def decode_step(self, batch: float) -> float:
        """Seconds per decode step (TPOT) with ``batch`` running requests (at least one)."""
        return _interp(self.decode_batches, self.decode_s, max(1.0, batch))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Profile":
        """``{"prefill": [{"input_len", "latency_s"}...], "decode": [{"batch_size", "tpot_s"}...],
        "max_batch_size": int, "meta": {...}}``; raises ValueError on anything else."""
        unknown = set(data) - {"prefill", "decode", "max_batch_size", "meta"}
        if unknown:
            raise ValueError(f"unknown profile keys: {sorted(unknown)}")
        try:
            p_x, p_y = _points(data["prefill"], "input_len", "latency_s")
            d_x, d_y = _points(data["decode"], "batch_size", "tpot_s")
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed profile: {exc!r}") from exc
        max_batch = int(data.get("max_batch_size", 256))
        if max_batch < 1:
            raise ValueError("max_batch_size must be >= 1")
        return cls(p_x, p_y, d_x, d_y, max_batch, dict(data.get("meta", {})))

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefill": [{"input_len": x, "latency_s": y} for x, y in zip(self.prefill_lens, self.prefill_s)],
            "decode": [{"batch_size": x, "tpot_s": y} for x, y in zip(self.decode_batches, self.decode_s)],
            "max_batch_size": self.max_batch_size,
            "meta": dict(self.meta),
        }

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        return cls.from_dict(json.loads(Path(path).read_text()))


# ----------------------------------------------------------------------------------------------
# Workload, SLO and the analytic model
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slo:
    ttft_p90_s: float
    tpot_p90_s: float

    def __post_init__(self) -> None:
        if not (self.ttft_p90_s > 0 and self.tpot_p90_s > 0):
            raise ValueError("SLO bounds must be > 0")


@dataclass(frozen=True)
class Workload:
    """Arrival rate (requests/s) and samples of input and output lengths (tokens)."""

    rate: float
    input_lens: tuple[int, ...]
    output_lens: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.rate > 0 or math.isinf(self.rate):
            raise ValueError(f"workload rate must be finite and > 0, got {self.rate}")
        if not self.input_lens or not self.output_lens:
            raise ValueError("workload needs input and output length samples")
        if min(self.input_lens) < 1 or min(self.output_lens) < 1:
            raise ValueError("lengths must be >= 1")

    @classmethod
    def uniform(cls, rate: float, input_len: int, output_len: int, range_ratio: float = 0.0, n: int = 65) -> "Workload":
        """Lengths spread evenly over ``[len * (1 - r), len * (1 + r)]`` (``n`` samples)."""
        if not 0.0 <= range_ratio < 1.0:
            raise ValueError("range_ratio must be in [0, 1)")

        def spread(mean: int) -> tuple[int, ...]:
            lo, hi = mean * (1.0 - range_ratio), mean * (1.0 + range_ratio)
            return tuple(max(1, round(lo + (hi - lo) * i / (n - 1))) for i in range(n))

        return cls(rate, spread(input_len), spread(output_len))


def sample_quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank ``q``-quantile (0 < q <= 1) of a non-empty sample: the smallest value with at least
    ``q * len(values)`` values at or below it. The planner, its simulator and the live controller share it."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def prefill_ttft_p90(profile: Profile, workload: Workload, rate_per_worker: float) -> float:
    """Predicted TTFT p90 at one prefill worker receiving ``rate_per_worker`` requests/s (inf if unstable).

    M/G/1: mean wait W = rate E[S^2] / (2 (1 - rho)); the wait is 0 with probability 1 - rho and
    otherwise roughly exponential with mean W / rho, so its q-quantile is (W / rho) ln(rho / (1 - q)).
    """
    service = [profile.prefill_time(n) for n in workload.input_lens]
    mean_s = sum(service) / len(service)
    rho = rate_per_worker * mean_s
    if rho >= 1.0:
        return math.inf
    wait_q = 0.0
    if rho > 1.0 - QUANTILE:
        mean_wait = rate_per_worker * sum(s * s for s in service) / len(service) / (2.0 * (1.0 - rho))
        wait_q = mean_wait / rho * math.log(rho / (1.0 - QUANTILE))
    return wait_q + sample_quantile(service, QUANTILE)


def _poisson_quantile(mean: float, q: float) -> int:
    """Smallest k with P(N <= k) >= q for N ~ Poisson(mean)."""
    if mean <= 0:
        return 0
    if mean > 500:  # normal approximation; exp(-mean) underflows
        return math.ceil(mean + 1.2816 * math.sqrt(mean))
    k, term = 0, math.exp(-mean)
    total = term
    while total < q:
        k += 1
        term *= mean / k
        total += term
    return k


def decode_mean_batch(profile: Profile, workload: Workload, rate_per_worker: float) -> float:
    """Little's law fixed point B = rate x (output_len - 1) x TPOT(B); inf when past max_batch_size."""
    steps = sum(max(0, n - 1) for n in workload.output_lens) / len(workload.output_lens)
    load = rate_per_worker * steps
    if load == 0:
        return 0.0
    lo, hi = 0.0, float(profile.max_batch_size)
    if hi - load * profile.decode_step(hi) < 0:
        return math.inf
    for _ in range(60):  # f(B) = B - load * step(B) is increasing where it matters; bisection
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if mid - load * profile.decode_step(mid) < 0 else (lo, mid)
    return hi


def decode_tpot_p90(profile: Profile, workload: Workload, rate_per_worker: float) -> float:
    """Predicted TPOT p90 at one decode worker receiving ``rate_per_worker`` requests/s (inf if overloaded)."""
    mean_batch = decode_mean_batch(profile, workload, rate_per_worker)
    if math.isinf(mean_batch):
        return math.inf
    batch_q = min(profile.max_batch_size, max(1, _poisson_quantile(mean_batch, QUANTILE)))
    return profile.decode_step(batch_q)


def max_rate_within(predict: Callable[[float], float], bound: float, start: float = 1.0) -> float:
    """Largest rate r with predict(r) <= bound for a predict that grows with r (0.0 if none)."""
    if predict(1e-9) > bound:
        return 0.0
    lo, hi = 0.0, start
    while predict(hi) <= bound:
        lo, hi = hi, hi * 2.0
        if hi > 1e9:
            return math.inf
    for _ in range(60):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if predict(mid) <= bound else (lo, mid)
    return lo


# ----------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    n_prefill: int
    n_decode: int
    prefill_rate_per_worker: float
    """Highest request rate one prefill worker sustains within the TTFT SLO."""
    decode_rate_per_worker: float
    """Highest request rate one decode worker sustains within the TPOT SLO."""
    predicted_ttft_p90_s: float
    predicted_tpot_p90_s: float
    feasible: bool
    notes: tuple[str, ...] = ()

    @property
    def ratio(self) -> float:
        """Prefill workers per decode worker."""
        return self.n_prefill / self.n_decode

    @property
    def max_rate(self) -> float:
        """Highest request rate this split sustains within both SLOs (predicted)."""
        return min(self.n_prefill * self.prefill_rate_per_worker, self.n_decode * self.decode_rate_per_worker)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_prefill": self.n_prefill,
            "n_decode": self.n_decode,
            "ratio": self.ratio,
            "prefill_rate_per_worker": self.prefill_rate_per_worker,
            "decode_rate_per_worker": self.decode_rate_per_worker,
            "max_rate": self.max_rate,
            "predicted_ttft_p90_s": self.predicted_ttft_p90_s,
            "predicted_tpot_p90_s": self.predicted_tpot_p90_s,
            "feasible": self.feasible,
            "notes": list(self.notes),
        }


def per_worker_rates(profile: Profile, workload: Workload, slo: Slo) -> tuple[float, float]:
    """(prefill, decode) request rates one worker of each role sustains within its SLO."""
    r_p = max_rate_within(lambda r: prefill_ttft_p90(profile, workload, r), slo.ttft_p90_s)
    r_d = max_rate_within(lambda r: decode_tpot_p90(profile, workload, r), slo.tpot_p90_s)
    return r_p, r_d


def _best_split(r_p: float, r_d: float, total: int) -> int:
    """Prefill count in 1..total-1 that maximises min(n_p r_p, (total - n_p) r_d)."""
    return max(range(1, total), key=lambda n_p: (min(n_p * r_p, (total - n_p) * r_d), -abs(n_p * r_p - (total - n_p) * r_d)))


def plan(profile: Profile, workload: Workload, slo: Slo, *, total_workers: int | None = None) -> Plan:
    """Recommend pool sizes for ``workload`` under ``slo``.

    Without ``total_workers``: the fewest workers of each role that meet the SLO. With it: the
    split of exactly that many workers that sustains the highest rate (``feasible`` says whether
    it covers ``workload.rate``).
    """
    r_p, r_d = per_worker_rates(profile, workload, slo)
    notes = []
    if r_p == 0.0:
        notes.append("one prompt alone already misses the TTFT SLO on this hardware")
    if r_d == 0.0:
        notes.append("a batch of one already misses the TPOT SLO on this hardware")
    if r_p == 0.0 or r_d == 0.0:
        return Plan(1, 1, r_p, r_d, math.inf, math.inf, False, tuple(notes))
    if total_workers is None:
        n_p = max(1, math.ceil(workload.rate / r_p - 1e-9))
        n_d = max(1, math.ceil(workload.rate / r_d - 1e-9))
    else:
        if total_workers < 2:
            raise ValueError("a disaggregated deployment needs at least 2 workers")
        n_p = _best_split(r_p, r_d, total_workers)
        n_d = total_workers - n_p
    ttft = prefill_ttft_p90(profile, workload, workload.rate / n_p)
    tpot = decode_tpot_p90(profile, workload, workload.rate / n_d)
    feasible = ttft <= slo.ttft_p90_s and tpot <= slo.tpot_p90_s
    if not feasible:
        notes.append(f"{n_p + n_d} workers sustain at most {min(n_p * r_p, n_d * r_d):.3g} req/s within the SLO")
    return Plan(n_p, n_d, r_p, r_d, ttft, tpot, feasible, tuple(notes))


# ----------------------------------------------------------------------------------------------
# Automatic ratio control
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Switch:
    """Move one worker from ``from_role`` to ``to_role`` (drain it first, then switch its role)."""

    from_role: Role
    to_role: Role
    reason: str


class AutoRatioController:
    """Recommends role switches from measured SLO pressure, with hysteresis.

    Pressure is measured p90 / SLO bound per role (TTFT for prefill, TPOT for decode). A switch
    towards prefill is wanted when TTFT pressure exceeds ``1 + band`` while TPOT pressure is below
    ``1 - band`` (and the decode pool keeps ``min_decode`` workers); symmetrically towards decode.
    It is recommended only after ``streak`` consecutive windows want the same switch, and never
    within ``cooldown_s`` of the previous recommendation (time from the injected ``clock``), so the
    pools settle before the next decision. Windows without data (None) reset the streak.
    """

    def __init__(
        self,
        slo: Slo,
        *,
        band: float = 0.1,
        streak: int = 3,
        cooldown_s: float = 60.0,
        min_prefill: int = 1,
        min_decode: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0.0 <= band < 1.0 or streak < 1 or cooldown_s < 0 or min_prefill < 1 or min_decode < 1:
            raise ValueError("need 0 <= band < 1, streak >= 1, cooldown_s >= 0, min_prefill/min_decode >= 1")
        self.slo, self.band, self.streak, self.cooldown_s = slo, band, streak, cooldown_s
        self.min_prefill, self.min_decode, self._clock = min_prefill, min_decode, clock
        self._want: Role | None = None
        self._count = 0
        self._last_switch: float | None = None

    def _wanted(self, ttft_p90_s: float, tpot_p90_s: float, n_prefill: int, n_decode: int) -> Role | None:
        p = ttft_p90_s / self.slo.ttft_p90_s
        d = tpot_p90_s / self.slo.tpot_p90_s
        hi, lo = 1.0 + self.band, 1.0 - self.band
        if p > hi and d < lo and n_decode > self.min_decode:
            return "prefill"
        if d > hi and p < lo and n_prefill > self.min_prefill:
            return "decode"
        return None

    def observe(
        self, ttft_p90_s: float | None, tpot_p90_s: float | None, n_prefill: int, n_decode: int
    ) -> Switch | None:
        """Feed one measurement window; returns a switch to carry out, or None."""
        if ttft_p90_s is None or tpot_p90_s is None:
            self._want, self._count = None, 0
            return None
        want = self._wanted(ttft_p90_s, tpot_p90_s, n_prefill, n_decode)
        self._count = self._count + 1 if want is not None and want == self._want else int(want is not None)
        self._want = want
        now = self._clock()
        cooling = self._last_switch is not None and now - self._last_switch < self.cooldown_s
        if want is None or self._count < self.streak or cooling:
            return None
        self._last_switch, self._want, self._count = now, None, 0
        donor: Role = "decode" if want == "prefill" else "prefill"
        reason = (
            f"TTFT p90 {ttft_p90_s * 1e3:.0f} ms vs SLO {self.slo.ttft_p90_s * 1e3:.0f} ms, "
            f"TPOT p90 {tpot_p90_s * 1e3:.1f} ms vs SLO {self.slo.tpot_p90_s * 1e3:.1f} ms"
        )
        return Switch(from_role=donor, to_role=want, reason=reason)


# ----------------------------------------------------------------------------------------------
# Discrete-event simulation (no processes: a model of the two pools driven by a profile)
# ----------------------------------------------------------------------------------------------


@dataclass
class SimRequest:
    arrival: float
    input_len: int
    output_len: int
    first_token: float | None = None
    finish: float | None = None
    tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.finish is None or self.first_token is None or self.output_len < 2:
            return None
        return (self.finish - self.first_token) / (self.output_len - 1)


@dataclass
class _SimWorker:
    role: Role
    queue: list[SimRequest] = field(default_factory=list)
    batch: list[SimRequest] = field(default_factory=list)
    busy: bool = False
    switch_to: Role | None = None

    @property
    def load(self) -> int:
        return len(self.queue) + len(self.batch) + int(self.busy and self.role == "prefill")


def poisson_arrivals(phases: Sequence[tuple[float, Workload]], seed: int) -> list[SimRequest]:
    """Requests for consecutive phases ``(duration_s, workload)``: Poisson arrivals at the workload's
    rate, lengths drawn from its samples."""
    rng, out, start = random.Random(seed), [], 0.0
    for duration, wl in phases:
        t = start + rng.expovariate(wl.rate)
        while t < start + duration:
            out.append(SimRequest(t, rng.choice(wl.input_lens), rng.choice(wl.output_lens)))
            t += rng.expovariate(wl.rate)
        start += duration
    return out


class ClusterSimulator:
    """Event-driven model of a prefill pool (FIFO, one prompt at a time per worker) and a decode
    pool (continuous batching; a step of batch B takes ``profile.decode_step(B)``), with
    least-loaded routing. Prefill produces the first token; decode produces the rest.

    With a controller (pass one built with ``clock=sim.clock`` by assigning ``sim.controller``
    before :meth:`run`, so its cooldown runs on simulated time), every ``window_s`` the p90 TTFT/TPOT of requests finished in that window
    are fed to it; a recommended switch drains the least-loaded donor (it takes no new work and
    changes role once idle). ``history`` records ``(time, n_prefill, n_decode)`` after every change.
    """

    def __init__(
        self,
        profile: Profile,
        n_prefill: int,
        n_decode: int,
        *,
        controller: AutoRatioController | None = None,
        window_s: float = 5.0,
    ) -> None:
        if n_prefill < 1 or n_decode < 1:
            raise ValueError("need at least one prefill and one decode worker")
        self.profile, self.controller, self.window_s = profile, controller, window_s
        self.workers = [_SimWorker("prefill") for _ in range(n_prefill)] + [_SimWorker("decode") for _ in range(n_decode)]
        self.now = 0.0
        self._events: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self._finished: list[SimRequest] = []
        self.history: list[tuple[float, int, int]] = [(0.0, n_prefill, n_decode)]

    def counts(self) -> tuple[int, int]:
        """(prefill, decode) workers by current role, draining workers counted in their old role."""
        n_p = sum(w.role == "prefill" for w in self.workers)
        return n_p, len(self.workers) - n_p

    def _push(self, t: float, kind: str, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, payload))

    def _pick(self, role: Role) -> _SimWorker:
        pool = [w for w in self.workers if w.role == role and w.switch_to is None]
        if not pool:  # every worker of the role is draining: use them anyway rather than drop work
            pool = [w for w in self.workers if w.role == role]
        return min(pool, key=lambda w: w.load)

    def _start_prefill(self, w: _SimWorker) -> None:
        if not w.busy and w.queue:
            w.busy = True
            req = w.queue.pop(0)
            self._push(self.now + self.profile.prefill_time(req.input_len), "prefill_done", (w, req))

    def _start_decode(self, w: _SimWorker) -> None:
        if not w.busy and (w.queue or w.batch):
            room = self.profile.max_batch_size - len(w.batch)
            w.batch.extend(w.queue[:room])
            del w.queue[:room]
            w.busy = True
            self._push(self.now + self.profile.decode_step(len(w.batch)), "step_done", w)

    def _on_prefill_done(self, w: _SimWorker, req: SimRequest) -> None:
        w.busy = False
        req.first_token, req.tokens = self.now, 1
        if req.tokens >= req.output_len:
            req.finish = self.now
            self._finished.append(req)
        else:
            d = self._pick("decode")
            d.queue.append(req)
            self._start_decode(d)
        self._start_prefill(w)
        self._maybe_switch(w)

    def _on_step_done(self, w: _SimWorker) -> None:
        w.busy = False
        still = []
        for req in w.batch:
            req.tokens += 1
            if req.tokens >= req.output_len:
                req.finish = self.now
                self._finished.append(req)
            else:
                still.append(req)
        w.batch = still
        self._start_decode(w)
        self._maybe_switch(w)

    def _maybe_switch(self, w: _SimWorker) -> None:
        if w.switch_to is not None and not w.busy and w.load == 0:
            w.role, w.switch_to = w.switch_to, None
            self.history.append((self.now, *self.counts()))

    def _on_window(self, since: float) -> None:
        done = [r for r in self._finished if r.finish is not None and r.finish >= since]
        ttfts = [r.ttft for r in done if r.ttft is not None]
        tpots = [r.tpot for r in done if r.tpot is not None]
        ttft = sample_quantile(ttfts, QUANTILE) if ttfts else None
        tpot = sample_quantile(tpots, QUANTILE) if tpots else None
        n_p, n_d = self.counts()
        switch = self.controller.observe(ttft, tpot, n_p, n_d) if self.controller else None
        if switch is not None:
            donors = [w for w in self.workers if w.role == switch.from_role and w.switch_to is None]
            donor = min(donors, key=lambda w: w.load)
            donor.switch_to = switch.to_role
            self._maybe_switch(donor)
        self._push(self.now + self.window_s, "window", self.now)

    def run(self, requests: Sequence[SimRequest]) -> list[SimRequest]:
        """Simulate until every request has finished; returns the requests with their times filled."""
        for req in requests:
            self._push(req.arrival, "arrive", req)
        if self.controller is not None:
            self._push(self.window_s, "window", 0.0)
        pending = len(requests)
        while pending and self._events:
            self.now, _, kind, payload = heapq.heappop(self._events)
            before = len(self._finished)
            if kind == "arrive":
                w = self._pick("prefill")
                w.queue.append(payload)
                self._start_prefill(w)
            elif kind == "prefill_done":
                self._on_prefill_done(*payload)
            elif kind == "step_done":
                self._on_step_done(payload)
            else:
                self._on_window(payload)
            pending -= len(self._finished) - before
        return list(requests)

    @property
    def clock(self) -> Callable[[], float]:
        """Simulated time, for an :class:`AutoRatioController` driven by this simulator."""
        return lambda: self.now


def slo_attainment(requests: Sequence[SimRequest], slo: Slo) -> float:
    """Fraction of requests whose own TTFT and TPOT are both within the SLO bounds."""
    if not requests:
        raise ValueError("no requests")
    ok = sum(
        r.ttft is not None and r.ttft <= slo.ttft_p90_s and (r.tpot is None or r.tpot <= slo.tpot_p90_s)
        for r in requests
    )
    return ok / len(requests)
