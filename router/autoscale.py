"""Automatic prefill:decode ratio: watch measured TTFT/TPOT against the SLO and switch worker roles.

Every ``auto_ratio_interval_s`` the task takes the p90 TTFT and TPOT of requests finished in the last
window, feeds them to :class:`~splitserve.router.planner.AutoRatioController` (which adds hysteresis: a
streak of agreeing windows, a dead band and a cooldown), and carries out its recommendation by sending
``SetRole`` to the least-loaded worker of the donor role. Workers keep serving their in-flight requests
after a switch: a role only decides which new work a worker accepts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from splitserve.router.control import switch_role
from splitserve.router.planner import AutoRatioController, Slo, Switch, sample_quantile

logger = logging.getLogger(__name__)


def p90(values: list[float]) -> float | None:
    """Nearest-rank p90 (as the planner computes it); ``None`` for no values."""
    return sample_quantile(values, 0.9) if values else None


class AutoRatio:
    """Periodic controller loop over one :class:`RouterService` (duck-typed: registry, metrics, control)."""

    def __init__(self, svc, slo: Slo, interval_s: float, cooldown_s: float, clock: Callable[[], float] = time.time):
        self.svc = svc
        self.interval_s = interval_s
        self.clock = clock
        self.controller = AutoRatioController(slo, streak=2, cooldown_s=cooldown_s, clock=clock)
        self.switches: list[Switch] = []

    def window(self) -> tuple[float | None, float | None]:
        since = self.clock() - max(self.interval_s * 2, 1.0)
        recent = [h for h in self.svc.metrics.history if h["t"] >= since]
        return (p90([h["ttft"] for h in recent if h["ttft"] is not None]),
                p90([h["tpot"] for h in recent if h["tpot"] is not None]))

    def pools(self) -> dict[str, list]:
        out: dict[str, list] = {"prefill": [], "decode": []}
        for w in self.svc.registry.all():
            if w.routable and w.role in out:
                out[w.role].append(w)
        return out

    async def tick(self) -> Switch | None:
        ttft, tpot = self.window()
        pools = self.pools()
        switch = self.controller.observe(ttft, tpot, len(pools["prefill"]), len(pools["decode"]))
        if switch is None:
            return None
        donors = sorted(pools[switch.from_role], key=lambda w: w.inflight)
        if not donors:
            return None
        worker = donors[0]
        if await switch_role(self.svc.control, worker, switch.to_role):
            self.switches.append(switch)
            logger.info("auto ratio: worker %s %s -> %s (%s)", worker.worker_id, switch.from_role, switch.to_role,
                        switch.reason)
        return switch

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.tick()
            except Exception:  # keep the loop alive; the error is logged with its traceback
                logger.exception("auto ratio tick failed")
