"""When the overlapped step in flight will end, so that a worker takes in new work before launching the next step.

An overlapped decode step N+1 is queued on the device before the host waits for step N (core/engine/engine.py), so a
request that arrives while N runs cannot join N+1: it waits for N, then N+1, then runs in the step after. A prompt
whose step is short (an agent session's next turn on the worker that holds its KV) pays a whole decode step for
that. Flow of :class:`StepClock`:

1. The engine notes when it launched each overlapped step (:meth:`StepClock.launched`, with the host time scheduling
   and launching it took: one sample of the host's share of a step). Steps run in order on the device, so a step
   starts at the later of its launch and the end of the step before it.
2. When the engine waits for a step that has not completed yet, the wait ends when the device does
   (:meth:`StepClock.completed`): the end less the step's start is one sample of a step's device time. A step found
   already complete says nothing about either (the host came late), and the next step's start is then taken to be
   its launch (early, so the window below errs short).
3. Before scheduling the next step, the engine asks :meth:`StepClock.window`: the seconds until the step in flight is
   expected to end (:data:`DEVICE_SHARE` of its average), less what the host needs to schedule and launch the next
   one (its average, plus :data:`MARGIN_S`). While the window is open the worker waits on its sockets instead of
   launching; work that arrives then joins the very next step (a prompt is queued right behind the step in flight,
   with the decode rows: ``overlap_prefill``).
4. With no samples yet, and on devices whose steps complete at launch (CPU: the host never waits), the window is 0:
   the engine launches at once, as without the clock.

Averages are exponential (:attr:`StepClock.alpha`), so the window follows the batch as it grows and shrinks.
Pure Python: times are ``time.monotonic()`` seconds passed in, never read here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MARGIN_S = 0.7e-3
"""Slack left between the end of the window and the step's expected end, seconds. A prompt that arrives after the
window waits for a whole further step (about 5 ms for an 8B model), while a host that launches late idles the
device. Serving on an H200 (ninth session) caught 1.6x more session turns in windows, and answered them 2.3 ms
sooner at the router, with 0.2 ms asked and :data:`DEVICE_SHARE` 1.0 than with 0.5 ms and 0.9. The worker's wait then
polled whole milliseconds only (ZeroMQ cut 2.7 ms to 2), so the windows of those runs ended about 0.5 ms earlier
than asked on average; the wait now ends when asked, and this margin is what those runs had on average."""
STATS = ("waited", "late", "shared", "windows", "window_s", "arrivals")
DEVICE_SHARE = 1.0
"""Of a step's average device time, the share the window may take (the average follows the batch as it changes)."""


@dataclass
class StepClock:
    alpha: float = 0.2
    """Weight of a new sample in the averages."""
    device_s: float | None = None
    """Average device time of one overlapped step, seconds (None: no sample yet)."""
    host_s: float | None = None
    """Average host time to schedule and launch one overlapped step, seconds."""
    last_end: float = 0.0
    """When the last completed step ended on the device (0: unknown)."""
    stats: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STATS, 0.0))
    """Counts since the last :meth:`report`: steps waited for, steps found complete (the host came late), windows
    opened, their total seconds, and windows that work arrived in."""

    def _average(self, old: float | None, sample: float) -> float:
        return sample if old is None else (1.0 - self.alpha) * old + self.alpha * sample

    def launched(self, scheduled_at: float, now: float) -> float:
        """A step was launched at ``now``, its scheduling having begun at ``scheduled_at``; returns ``now`` (its launch
        time, kept by the caller for :meth:`start_of`)."""
        self.host_s = self._average(self.host_s, max(0.0, now - scheduled_at))
        return now

    def start_of(self, launched_at: float) -> float:
        """When a step launched at ``launched_at`` starts on the device (flow, step 1)."""
        return max(launched_at, self.last_end)

    def completed(self, launched_at: float, end: float, waited: bool, shared: bool = False) -> None:
        """The step launched at ``launched_at`` was waited for and found complete at ``end``; ``waited``: it was not
        complete when the wait began, so ``end`` is when the device finished it (flow, step 2); ``shared``: a prompt
        lane's step ran during it (core/engine/lane.py), so its time is no sample of a step's."""
        self.stats["waited" if waited else "late"] += 1
        self.stats["shared"] += shared
        if waited:
            if not shared:
                self.device_s = self._average(self.device_s, max(0.0, end - self.start_of(launched_at)))
            self.last_end = end
        else:
            self.last_end = 0.0

    def opened(self, window_s: float, arrived: bool) -> None:
        """A window of ``window_s`` was offered; ``arrived``: work came in it."""
        self.stats["windows"] += 1
        self.stats["window_s"] += window_s
        self.stats["arrivals"] += arrived

    def report(self) -> str:
        """One line on the steps since the last report (then counted afresh)."""
        st, self.stats = self.stats, dict.fromkeys(STATS, 0.0)
        ms = lambda v: "-" if v is None else f"{v * 1e3:.2f} ms"  # noqa: E731
        mean = st["window_s"] / st["windows"] if st["windows"] else 0.0
        return (f"{st['waited']:.0f} overlapped steps waited for, {st['late']:.0f} found complete, {st['shared']:.0f} "
                f"shared with a prompt lane's step; device "
                f"{ms(self.device_s)}, host {ms(self.host_s)} a step; {st['windows']:.0f} windows (mean "
                f"{mean * 1e3:.2f} ms), work came in {st['arrivals']:.0f}")

    def window(self, launched_at: float, now: float) -> float:
        """Seconds the host may wait for new work before it must launch the next step (flow, step 3); 0 or less:
        launch now."""
        if self.device_s is None or self.host_s is None:
            return 0.0
        expected_end = self.start_of(launched_at) + DEVICE_SHARE * self.device_s
        return expected_end - (self.host_s + MARGIN_S) - now
