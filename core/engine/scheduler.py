"""Continuous-batching scheduler with chunked prefill and preemption by recompute (pure Python).

Each step spends a token budget: running requests first (decode tokens and unfinished prompt chunks,
oldest first), then waiting requests (prefix-cache hits skip their cached pages). When the page pool is
full, the newest running request is preempted: its pages are freed and it waits again at the front of
the queue, to be recomputed from its prompt plus the tokens it already generated.

Overlapped steps (the engine launches step N+1 before it reads step N's tokens): :meth:`start_in_flight`
commits a launched step at once, each sampling row's token a :data:`PENDING_TOKEN` placeholder that the next step
reads on the device. While a step is in flight its requests' pages are still being written, so a request of it
that finishes or aborts gives its pages up only when the step has completed (:meth:`take_retiring`); a request
that cannot take another token (``max_tokens``, context) is not scheduled again while its last token is pending.

A waiting request whose prompt is identical to one still being prefilled (the copies of one prompt, ``n`` > 1)
waits until that prefill is done, then takes its pages from the prefix cache instead of computing them again.

Prompts first (``SchedulerLimits.prefill_first_tokens``): a short prompt -- an agent session's next turn on the
decode worker that holds its KV, a short prompt prefilled there -- runs in a step of its own, ahead of the decode
rows, which skip that step. Its first token then waits for a prompt-only step (about a pass over the weights)
instead of a decode step that also carries every running row. Flow of :meth:`Scheduler._prompts_alone`:
1. Only when the last committed step was not such a step (decode rows never skip two steps in a row) and some
   running request is past its prompt (else there is nothing to put off).
2. Its rows: running requests whose prompt is unfinished and whose rest fits the limit (one admitted by an earlier
   scheduling of this step, which the engine scheduled again), then waiting ones from the head of the queue while
   their rest after prefix-cache hits fits what is left of the limit.
3. No such row: the step is scheduled as usual. Otherwise the batch is remembered, and :meth:`commit` notes that
   the step committed was prompts alone.

Waiting requests can hold pages too: a decode worker's request whose KV arrived from a prefill worker
(``LLMEngine.add_prefilled``) waits with its reserved pages. When nothing runs and the head of the queue
cannot get pages, those holders would block it for ever, so the newest of them gives its pages up and will be
recomputed, like a preempted request; a head that cannot fit in the whole pool finishes as out of memory.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass
from typing import Iterable

from splitserve.core.cache.manager import KVCacheBlocks, KVCacheManager
from splitserve.core.engine.batch import ScheduledBatch, SeqWork
from splitserve.core.request import PENDING_TOKEN, Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    chunk_size: int
    enable_prefix_caching: bool = True
    prefill_first_tokens: int = 0
    """Prompts with at most this many tokens left to compute run in a step of their own, ahead of the decode rows
    (module doc, prompts first); 0: they join the decode rows' step."""


class Scheduler:
    """Owns the waiting queue and the running list; asks ``kv`` for pages. Collaborators are injected."""

    def __init__(self, kv: KVCacheManager, limits: SchedulerLimits) -> None:
        self.kv = kv
        self.limits = limits
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        """Times a request lost its pages to make room (it is recomputed); a counter for metrics."""
        self.out_of_memory: list[Request] = []
        """Requests that cannot grow even with the whole pool to themselves; the engine finishes them ("length")."""
        self.in_flight: frozenset[str] = frozenset()
        """Requests of the step in flight (overlapped decode): their pages are still being written."""
        self._retiring: list[str] = []
        """Page owner keys of finished requests of the step in flight, freed once it completes."""
        self._retire_ids = itertools.count()
        self._alone: ScheduledBatch | None = None
        """The last batch of prompts alone that was scheduled (module doc, prompts first)."""
        self._alone_last = False
        """Whether the last committed step was prompts alone."""

    # --- queue management -------------------------------------------------------------------------

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str, reason: str = "abort") -> Request | None:
        """Drop a request wherever it is and free its pages; returns it, or None if unknown."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.finish(req, reason)
        return req

    def finish(self, req: Request, reason: str) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.requests.pop(req.request_id, None)
        if self.kv.has(req.request_id):
            self.keep_session(req, reason)
            self._release_pages(req.request_id)

    def keep_session(self, req: Request, reason: str) -> None:
        """An agent session's turn that ended normally keeps its pages pinned: the next turn hits them."""
        if req.session_key is not None and reason in ("stop", "length"):
            self.kv.pin(req.request_id, req.session_key, req.all_token_ids,
                        min(req.num_computed_tokens, req.num_known_tokens))

    def _release_pages(self, request_id: str) -> None:
        """Free the request's pages, or hold them under a retiring key while the step in flight may write them."""
        if request_id in self.in_flight:
            key = f"{request_id}#retiring-{next(self._retire_ids)}"
            self.kv.rename(request_id, key)
            self._retiring.append(key)
        else:
            self.kv.free(request_id)

    def take_retiring(self) -> list[str]:
        """Owner keys of pages that wait for the step in flight; the caller frees them once it has completed."""
        keys, self._retiring = self._retiring, []
        return keys

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def decoding_only(self) -> bool:
        """Nothing waits and every running request is past its prompt (one token a step)."""
        return not self.waiting and all(r.num_tokens - r.num_computed_tokens <= 1 for r in self.running)

    def queued_tokens(self) -> int:
        return sum(r.num_tokens - r.num_computed_tokens for r in self.waiting) + sum(
            r.num_tokens - r.num_computed_tokens for r in self.running
        )

    # --- one step ---------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        alone = self._prompts_alone()
        if alone is not None:
            return alone
        budget = self.limits.max_num_batched_tokens
        work: list[SeqWork] = []
        preempted = False
        for req in list(self.running):
            if req not in self.running:  # preempted by an earlier request in this loop
                continue
            n = self._num_new_tokens(req, budget)
            if n == 0:
                continue
            if not self._allocate_or_preempt(req, n):
                preempted = True
                continue
            work.append(self._seq_work(req, n))
            budget -= n
        if not preempted:
            budget = self._admit_waiting(work, budget)
        return ScheduledBatch(seqs=tuple(work), page_size=self.kv.page_size)

    def _prompts_alone(self) -> ScheduledBatch | None:
        """A step of short prompts alone, or None to schedule as usual (module doc, prompts first)."""
        limit = min(self.limits.prefill_first_tokens, self.limits.chunk_size, self.limits.max_num_batched_tokens)
        if limit <= 0 or self._alone_last or all(self._in_prompt(r) for r in self.running):
            return None
        work: list[SeqWork] = []
        for req in [r for r in self.running if self._in_prompt(r)]:
            n = req.num_tokens - req.num_computed_tokens
            if n <= limit and req in self.running and self._allocate_or_preempt(req, n):
                work.append(self._seq_work(req, n))
                limit -= n
        if limit > 0:
            self._admit_waiting(work, limit, whole=True)
        if not work:
            return None
        self._alone = ScheduledBatch(seqs=tuple(work), page_size=self.kv.page_size)
        return self._alone

    def is_prompts_alone(self, batch: ScheduledBatch) -> bool:
        """Whether ``batch`` is the last step of prompts alone that :meth:`schedule` handed out."""
        return batch is self._alone

    @staticmethod
    def _in_prompt(req: Request) -> bool:
        return req.num_computed_tokens < req.num_prompt_tokens and not req.num_pending

    def _num_new_tokens(self, req: Request, budget: int) -> int:
        if req.num_pending and req.at_length_limit:
            return 0  # its pending token is its last
        return max(0, min(req.num_tokens - req.num_computed_tokens, self.limits.chunk_size, budget))

    def _allocate_or_preempt(self, req: Request, n: int) -> bool:
        """Pages for ``n`` more tokens of a running request, preempting newer requests; False if ``req`` does not
        run this step (preempted, waiting for pages, or given up)."""
        total = req.num_computed_tokens + n
        while self.kv.allocate_slots(req.request_id, total) is None:
            victim = self.running[-1]
            if victim is not req or len(self.running) > 1:
                self._preempt(victim)
                if victim is req:
                    return False
                continue
            room = self._room_for(req, total)  # req runs alone
            if room is None:
                self.running.remove(req)
                self.out_of_memory.append(req)
            if not room:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._drop_pages(req)
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def _drop_pages(self, req: Request) -> None:
        """Free ``req``'s pages; it will be recomputed from its prompt plus the tokens it already generated."""
        logger.info("request %s: preempted (pool full), will recompute %d tokens", req.request_id, req.num_tokens)
        self._release_pages(req.request_id)
        req.num_computed_tokens = 0
        req.num_cached_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        if not req.output_token_ids:
            req.prompt_logprobs.clear()  # recomputed from the start

    def _room_for(self, req: Request, num_tokens: int) -> bool | None:
        """Nothing else can run and ``req`` cannot get pages for ``num_tokens``.

        ``True``: the newest waiting request holding pages gave them up, try again. ``False``: wait, the pages are
        reserved for transfers in flight (their requests become waiting holders). ``None``: the whole pool is too
        small for ``req``; the caller gives it up.
        """
        holders = [r for r in self.waiting if r is not req and self.kv.has(r.request_id)]
        if holders:
            self._drop_pages(holders[-1])
            return True
        if self.kv.num_pages_for(num_tokens) <= self.kv.num_pages:
            return False
        logger.warning("request %s: does not fit in the whole KV pool; finishing it", req.request_id)
        return None

    def _admit_waiting(self, work: list[SeqWork], budget: int, whole: bool = False) -> int:
        """Move waiting requests from the head of the queue to running within ``budget`` tokens; ``whole``: only
        prompts whose rest (after prefix-cache hits) fits the budget whole."""
        while self.waiting and budget > 0 and len(self.running) < self.limits.max_num_seqs:
            req = self.waiting[0]
            if self._same_prompt_in_prefill(req) or (whole and not self._in_prompt(req)):
                break  # its copy's pages are about to be cached: first come, first served behind it
            computed = self._prefix_hit(req)
            if whole and req.num_tokens - req.num_computed_tokens > budget:
                req.num_computed_tokens = req.num_cached_tokens = 0
                break
            n = self._num_new_tokens(req, budget)
            total = req.num_computed_tokens + n
            if self.kv.allocate_slots(req.request_id, total, computed) is None:
                if computed is not None:
                    req.num_computed_tokens = req.num_cached_tokens = 0
                if self.running or work:
                    break  # running requests free pages as they finish
                room = self._room_for(req, total)
                if room is None:
                    self.out_of_memory.append(self.waiting.popleft())
                elif not room:
                    break  # pages reserved for transfers in flight come back as waiting holders
                continue
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            work.append(self._seq_work(req, n))
            budget -= n
        return budget

    def _same_prompt_in_prefill(self, req: Request) -> bool:
        """A running request has ``req``'s prompt and is still computing full pages of it that ``req`` would hit
        later (a prefix hit stops one token short of the prompt, so only its first ``(len - 1) // page_size`` pages
        count: a copy that has those waits for nothing, and all copies behind it start together)."""
        ps = self.kv.page_size
        if (not self.limits.enable_prefix_caching or req.wants_prompt_logprobs or self.kv.has(req.request_id)
                or req.num_prompt_tokens < ps):
            return False
        hit_pages = (req.num_prompt_tokens - 1) // ps
        return any(r.num_computed_tokens // ps < hit_pages and r.prompt_key == req.prompt_key for r in self.running)

    def _prefix_hit(self, req: Request) -> KVCacheBlocks | None:
        """Adopt cached full pages for a request that has no pages yet (not with prompt logprobs)."""
        if self.kv.has(req.request_id) or not self.limits.enable_prefix_caching or req.wants_prompt_logprobs:
            return None
        blocks, n_cached = self.kv.get_computed_pages(req.all_token_ids, session=req.continues)
        if req.continues is not None:  # the session's partial last page too, when the prompt continues it
            blocks, n_cached = self.kv.session_tail_hit(req.continues, req.all_token_ids, blocks, n_cached)
        req.num_computed_tokens = req.num_cached_tokens = n_cached
        return blocks if n_cached else None

    def _seq_work(self, req: Request, n: int) -> SeqWork:
        """One row of the step. The request's prompt and output ids go along only when its sampling or its prompt
        logprobs read them (copying a 3,000-token history for every greedy decode row was most of a step's
        scheduling)."""
        start = req.num_computed_tokens
        prompt_logprobs = req.wants_prompt_logprobs and start < req.num_prompt_tokens
        history = req.params.reads_history or prompt_logprobs
        return SeqWork(
            request_id=req.request_id,
            token_ids=req.token_ids(start, start + n),
            start_pos=start,
            page_table=tuple(self.kv.page_table(req.request_id)),
            sample=start + n == req.num_tokens,
            params=req.params,
            prompt_token_ids=tuple(req.prompt_token_ids) if history else (),
            output_token_ids=tuple(req.output_token_ids) if history else (),
            prompt_logprobs=prompt_logprobs,
        )

    # --- after the step -----------------------------------------------------------------------------

    def commit(self, batch: ScheduledBatch) -> None:
        """Advance computed-token counts and publish newly full pages to the prefix cache."""
        self._alone_last = batch is self._alone
        for seq in batch.seqs:
            req = self.requests.get(seq.request_id)
            if req is None:
                continue
            req.num_computed_tokens = seq.start_pos + seq.num_tokens
            self.cache_known(req)

    def cache_known(self, req: Request) -> None:
        """Publish ``req``'s full pages whose tokens are computed and known (not pending) to the prefix cache (a
        request preempted while its step was in flight has no pages: nothing to publish)."""
        if self.limits.enable_prefix_caching and self.kv.has(req.request_id):
            known = min(req.num_computed_tokens, req.num_known_tokens)
            # Most steps fill no page: then skip copying the request's whole history for nothing.
            if known // self.kv.page_size > self.kv.num_hashed_pages(req.request_id):
                self.kv.cache_pages(req.request_id, req.all_token_ids, known)

    def start_in_flight(self, batch: ScheduledBatch) -> dict[str, int]:
        """Commit a launched step whose tokens are not read yet: each request advances past its row's tokens, and a
        row that samples gets a :data:`PENDING_TOKEN`; returns request id -> index of that placeholder in its
        ``output_token_ids`` (rows that sample only). Every request of the step is in flight until it completes."""
        where = {}
        for seq in batch.seqs:
            if not seq.sample:  # a prompt chunk before the last: nothing to read back
                continue
            req = self.requests[seq.request_id]
            req.output_token_ids.append(PENDING_TOKEN)
            req.num_pending += 1
            where[req.request_id] = len(req.output_token_ids) - 1
        self.commit(batch)  # publishes only pages whose tokens are known
        self.in_flight = frozenset(seq.request_id for seq in batch.seqs)
        return where

    def finish_many(self, reqs: Iterable[tuple[Request, str]]) -> None:
        """Finish each request wherever it is: running, or waiting (preempted while its last step was in flight)."""
        for req, reason in reqs:
            if req in self.running:
                self.running.remove(req)
            elif req in self.waiting:
                self.waiting.remove(req)
            self.finish(req, reason)
