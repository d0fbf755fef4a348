"""One API request, many choices: every prompt of a completions request times ``n`` copies.

1. :func:`plan_choices`: admission for all the choices at once, then per prompt the vocabulary and context checks
   and its :class:`SamplingParams`; copy ``j`` of prompt ``i`` is choice ``i * n + j`` (vLLM's order) with seed
   ``seed + j`` (:func:`~splitserve.router.openai_api.copy_params`). Each choice is its own request on the
   workers, with its own output state and formatter; the copies of one prompt share a routing group, so they go to
   one prefill worker, which computes the prompt once and serves the other copies from its prefix cache.
2. :func:`merged`: every choice's token stream runs in its own task; their deltas come out in arrival order. The
   first failure ends the whole request, and every other choice is then aborted on its workers (closing its
   generator sends ``AbortReq``), as is every choice when the client goes away.
3. :func:`full_body` / :func:`total_usage`: the non-streamed body (choices by index) and the usage of the whole
   request: each prompt's tokens counted once (its copies share it, as vLLM counts), every choice's output tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

import msgspec

from splitserve.core.messages import SamplingParams, SessionHint
from splitserve.router.formatting import Formatter
from splitserve.router.openai_api import (
    APIError, CommonRequest, check_token_ids, copy_params, echo_only, to_sampling_params, usage,
)
from splitserve.router.output import Delta, OutputProcessor
from splitserve.router.service import RouterService


@dataclass
class Choice:
    """One choice of a response: copy ``copy`` of one prompt, run as one request on the workers."""

    index: int
    copy: int
    fmt: Formatter
    proc: OutputProcessor
    prompt_ids: list[int]
    params: SamplingParams
    session: SessionHint | None = None
    group: str | None = None
    """The copies of one prompt share it: :meth:`RouterService.pick` sends them to the same prefill worker."""


MakeFormatter = Callable[[int, int], Formatter]
"""(choice index, prompt number) -> the choice's formatter."""


def plan_choices(svc: RouterService, req: CommonRequest, prompts: Sequence[list[int]], prompt_field: str,
                 make_fmt: MakeFormatter) -> list[Choice]:
    """Step 1 of the module's flow; 400 naming the field for a bad prompt, 429/503 when it cannot be admitted."""
    if req.session_id is not None and (len(prompts) != 1 or req.n != 1):
        raise APIError(400, "session_id takes one prompt and n = 1", param="session_id")
    session = None if req.session_id is None else SessionHint(req.session_id, req.session_end, req.expected_return_s)
    svc.admit(len(prompts) * req.n)
    max_len = svc.max_model_len()
    if max_len is None:
        raise APIError(503, "no healthy workers are available", type="service_unavailable", code="no_workers")
    vocab = svc.vocab_size()
    options = {"stop_token_ids": frozenset(req.stop_token_ids or ()),
               "include_stop_str": req.include_stop_str_in_output, "echo_only": echo_only(req)}
    choices = []
    for i, ids in enumerate(prompts):
        check_token_ids(req, ids, prompt_field, vocab)
        params = _with_router_stops(svc, to_sampling_params(req, len(ids), max_len, prompt_field))
        for j in range(req.n):
            index = i * req.n + j
            fmt = make_fmt(index, i)
            proc = svc.processor(f"{fmt.id}-{index}", ids, req.stop_strings, **options)
            group = f"{fmt.id}-p{i}" if req.n > 1 else None
            choices.append(Choice(index, j, fmt, proc, ids, copy_params(params, j), session, group))
    return choices


def _with_router_stops(svc: RouterService, params: SamplingParams) -> SamplingParams:
    extra = tuple(svc.config.extra_stop_token_ids)
    if not extra:
        return params
    return msgspec.structs.replace(params, stop_token_ids=tuple(dict.fromkeys(params.stop_token_ids + extra)))


async def merged(svc: RouterService, choices: Sequence[Choice]) -> AsyncIterator[tuple[Choice, Delta]]:
    """Step 2 of the module's flow. Close it (``contextlib.aclosing``) to abort what is still running."""
    queue: asyncio.Queue[tuple[Choice, Delta | Exception | None]] = asyncio.Queue()

    async def pump(ch: Choice) -> None:
        try:
            gen = svc.generate(ch.proc, ch.prompt_ids, ch.params, admitted=True, session=ch.session, group=ch.group)
            async with contextlib.aclosing(gen):
                async for delta in gen:
                    queue.put_nowait((ch, delta))
            queue.put_nowait((ch, None))
        except Exception as exc:  # surfaces in the consumer, which then stops every choice
            queue.put_nowait((ch, exc))

    tasks = [asyncio.create_task(pump(ch)) for ch in choices]
    try:
        running = len(tasks)
        while running:
            ch, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield ch, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def total_usage(choices: Sequence[Choice]) -> dict[str, Any]:
    """Each prompt's tokens once (copy 0 holds them), the output tokens of every choice."""
    firsts = [c.proc for c in choices if c.copy == 0]
    return usage(sum(p.num_prompt_tokens for p in firsts), sum(c.proc.completion_tokens for c in choices),
                 sum(p.num_cached_tokens for p in firsts))


def full_body(choices: Sequence[Choice], deltas: dict[int, list[Delta]]) -> dict[str, Any]:
    """Step 3: the non-streamed response, choices in index order."""
    bodies = [c.fmt.full(deltas[c.index], c.proc) for c in sorted(choices, key=lambda c: c.index)]
    body = bodies[0]
    body["choices"] = [choice for b in bodies for choice in b["choices"]]
    body["usage"] = total_usage(choices)
    return body
