"""Request state shared by the engine, the workers and the tests (torch-free)."""

from __future__ import annotations

import enum
import functools
import time
from dataclasses import dataclass, field

from splitserve.core.messages import SamplingParams, TokenLogprob


PENDING_TOKEN = -1
"""Placeholder in ``Request.output_token_ids`` for a token sampled on the device but not read yet (overlapped
decode steps, see core/engine/engine.py); never a real token id."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One generation request inside an engine.

    Token accounting: ``all_token_ids`` = prompt + outputs. ``num_computed_tokens`` counts tokens whose K/V
    are in this engine's pages; the scheduler computes ``all_token_ids[num_computed_tokens:]`` (in chunks)
    and samples a new token whenever the request catches up.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 30
    prefill_only: bool = False
    """Prefill workers: finish right after the first token is sampled (KV goes to a decode worker)."""
    session_key: str | None = None
    """Agent sessions: when the request finishes, its pages stay pinned under this key for the next turn."""
    continues: str | None = None
    """Agent sessions: the pinned key whose partial last page this request may take over (its prompt continues it)."""
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    num_pending: int = 0
    """Trailing entries of ``output_token_ids`` that are :data:`PENDING_TOKEN` (their steps are still in flight)."""

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> tuple[int, ...]:
        """``all_token_ids[start:end]`` without copying the whole sequence (a decode row is one token of thousands)."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return tuple(self.output_token_ids[start - n : end - n])
        if end <= n:
            return tuple(self.prompt_token_ids[start:end])
        return tuple(self.prompt_token_ids[start:]) + tuple(self.output_token_ids[: end - n])

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @functools.cached_property
    def prompt_key(self) -> tuple[int, int]:
        """(length, hash) of the prompt: equal for the copies of one prompt (``n`` > 1)."""
        return len(self.prompt_token_ids), hash(tuple(self.prompt_token_ids))

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids are known on the host (all but the pending placeholders)."""
        return self.num_tokens - self.num_pending

    @property
    def at_length_limit(self) -> bool:
        """No further token may follow (``max_tokens`` or the context reached), whatever the pending tokens are."""
        return len(self.output_token_ids) >= self.params.max_tokens or self.num_tokens >= self.max_model_len

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

    def check_stop(self) -> str | None:
        """Finish reason after the newest output token, or None to continue."""
        return self.stop_reason_at(len(self.output_token_ids))

    def stop_reason_at(self, n_out: int) -> str | None:
        """Finish reason once the first ``n_out`` output tokens are known, or None to continue."""
        if n_out == 0:
            return None
        if self.prefill_only:
            return "length"
        last = self.output_token_ids[n_out - 1]
        if n_out >= self.params.min_tokens:
            if not self.params.ignore_eos and last in self.eos_token_ids:
                return "stop"
            if last in self.params.stop_token_ids:
                return "stop"
        if n_out >= self.params.max_tokens or self.num_prompt_tokens + n_out >= self.max_model_len:
            return "length"
        return None

    def keep_outputs(self, n_out: int) -> None:
        """Drop output tokens after the first ``n_out`` (pending tokens computed past a stop)."""
        del self.output_token_ids[n_out:]
        self.num_pending = 0
        self.num_computed_tokens = min(self.num_computed_tokens, self.num_tokens)
