"""The prompt lane: a short prompt's step on a high-priority CUDA stream, ahead of the decode step in flight.

With prompts first (``EngineConfig.prefill_first_tokens``) an agent session's next turn runs in a step of its own, but
that step is queued behind the decode step in flight: the turn's first token waits for the rest of that step (half a
decode step on average, 2-3 ms for an 8B model on an H200) before its own step starts. With the lane
(``EngineConfig.prompt_lane``), flow of ``LLMEngine._run_in_lane`` (core/engine/engine.py):

1. The scheduler hands out a step of prompts alone while a decode step N is in flight.
2. The engine checks that the two steps touch no page that either writes (``ScheduledBatch.shares_pages``: the
   turn's previous request still has a row in N, a chunk of the prompt is in N, or N still writes a page the prompt
   reads). If they do, the step is queued behind N as before.
3. The step runs on the lane: its own CUDA stream at the highest priority, and its own CUDA graphs
   (:attr:`PromptLane.graphs`: their own static inputs and memory pool, since N's graph reads its own while the
   lane runs). The GPU hands the lane's thread blocks the SMs ahead of N's pending ones, so the prompt's step starts
   at once and N ends after it.
4. The host waits for the lane's stream only, hands the prompt's token out before N's tokens, and leaves N in flight:
   the next step completes it as usual and reads the prompt's token from the host. N's device time now includes the
   lane's, so the step clock (core/engine/pacing.py) takes no sample from it.

Copies into the pool made outside the steps (a session restored from a tier, decode/tiers.py) are ordered before
the lane's steps as before the others' (``LLMEngine.order_pool_write``).

On the CPU there is no stream: the lane is the same step run synchronously before the step in flight's tokens are
read, so CPU tests check the host side (the order of tokens, pages, fallbacks) and CUDA tests the streams.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, ContextManager

import torch

if TYPE_CHECKING:
    from splitserve.core.engine.cuda_graphs import DecodeGraphs

logger = logging.getLogger(__name__)

HIGHEST_PRIORITY = -100
"""Asked of ``torch.cuda.Stream``: lower is more urgent, and torch maps any value past the device's range to its
most urgent level."""


class PromptLane:
    """The lane's stream (None on the CPU) and CUDA graphs (None without graphs); :attr:`steps` counts its steps."""

    def __init__(self, device: torch.device, graphs: "DecodeGraphs | None") -> None:
        self.stream = torch.cuda.Stream(device, priority=HIGHEST_PRIORITY) if device.type == "cuda" else None
        if self.stream is not None:  # copies into the pool ordered before the steps so far come before the lane's too
            self.stream.wait_stream(torch.cuda.current_stream(device))
        self.graphs = graphs
        self.steps = 0
        logger.info("prompt lane ready on %s (%s)", device,
                    "own stream and CUDA graphs" if graphs is not None else
                    "own stream" if self.stream is not None else "synchronous steps")

    def context(self) -> ContextManager:
        """Work queued inside runs on the lane's stream."""
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
