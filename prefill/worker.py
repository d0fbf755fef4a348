"""Prefill service: computes prompts' KV and streams each layer to the decode worker that asked.

Flow for one request (see docs/architecture.md):
1. A decode worker sends ``PrefillReq`` with a ``KVDescriptor`` of pages it reserved.
2. The request joins this worker's engine as ``prefill_only`` (batched with other prompts up to the token
   budget, chunked, reusing this worker's prefix cache).
3. After every layer of every step, the layer hook hands the sender one list of what this step computed
   for every outgoing request (on the first chunk, the prefix-cache hit too), built once per step: the
   sender writes it into the decode workers' pages (one-sided, on the same host) or streams it, while later
   layers compute here. Nothing in the hook waits for the device.
4. When the first token is sampled, ``PrefillDone`` follows the data (on the one-sided path, once the writes
   completed); the engine then frees (or prefix-caches) this worker's pages -- the sender has copied them out,
   or ordered their reuse after its writes.

An agent session's turn whose decode worker holds the conversation (``KVDescriptor.held_tokens``): before step 2
the held pages this worker's prefix cache lacks are copied from the decode worker's pool into fresh pages here
(``KVSender.read_held``, one-sided path), registered in the prefix cache and held under ``<id>#held`` until the
request ends, so the step computes only the new suffix; step 3 sends only tokens past the held prefix. Where the
pool cannot be read, this worker computes what its prefix cache lacks and still sends only the suffix.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from splitserve.core.cache.prefix import page_hashes
from splitserve.core.engine.batch import ScheduledBatch
from splitserve.core.engine.engine import StepOutput
from splitserve.core.engine.service import WorkerCore
from splitserve.core.messages import AbortReq, PrefillDone, PrefillReq
from splitserve.transfer.base import KVSender, LayerSend, TransferError, TransferFailed

logger = logging.getLogger(__name__)


@dataclass
class _Outgoing:
    transfer_id: str
    request_id: str
    sent_upto: int = 0
    started: float = 0.0
    """When the ``PrefillReq`` arrived (monotonic)."""
    peer: bytes | None = None
    """The peer connection the ``PrefillReq`` came on: only it (or the router) may abort the request."""
    first_step: float | None = None
    """When its first step computed (monotonic)."""
    queue_s: float = 0.0
    """From the decode worker sending ``PrefillReq`` (wall clock; else from its arrival) to the first step."""
    sent_at: float = 0.0
    held_key: str | None = None
    """The holder id of the held prefix pages copied in for it (freed when it ends)."""


class _CannotRead(Exception):
    """The transfer cannot read the decode worker's pool (inline path): the prefix is computed here."""


class PrefillService:
    def __init__(self, core: WorkerCore, sender: KVSender, bytes_per_token_layer: int) -> None:
        self.core = core
        self.sender = sender
        self.bytes_per_token_layer = bytes_per_token_layer
        self.num_layers = core.engine.model_config.num_layers
        self.outgoing: dict[str, _Outgoing] = {}
        self._step: tuple[ScheduledBatch, list[LayerSend]] | None = None
        """The step being computed and what it sends (built at its first layer)."""
        core.on(PrefillReq, self._on_prefill_req)
        core.abort_handlers.append(self._on_abort)
        core.pollers.append(self._poll_sender)
        core.busy_hints.append(sender.writes_in_flight)
        core.engine.runner.hook_filter = lambda batch: any(s.request_id in self.outgoing for s in batch.seqs)

    def accepts_prefill(self) -> bool:
        return self.core.role in ("prefill", "both") and not self.core.draining

    # --- requests from decode workers -------------------------------------------------------------------

    def _on_prefill_req(self, _peer: bytes | None, msg: PrefillReq) -> None:
        rid, tid = msg.request_id, msg.dst.transfer_id
        try:
            self.sender.begin(msg.dst, request_id=rid)
        except TransferError as exc:
            logger.warning("request %s: refusing transfer %s: %s", rid, tid, exc)
            return self._refuse(tid, rid, str(exc))
        if not self.accepts_prefill():
            return self._refuse(tid, rid, f"worker {self.core.worker_id} is not accepting prefill work")
        started, held_key = time.monotonic(), self._take_held(msg)
        try:
            self.core.engine.add_request(rid, msg.prompt_token_ids, msg.params, prefill_only=True)
        except ValueError as exc:  # a request this engine can never serve: recomputing it would fail too
            self._release_held(held_key)
            return self._refuse(tid, rid, str(exc), retryable=False)
        self.outgoing[rid] = _Outgoing(tid, rid, sent_upto=msg.dst.held_tokens, started=started,
                                       sent_at=msg.sent_at, peer=_peer, held_key=held_key)
        self.core.own(rid, self._on_output)
        logger.info("request %s: prefill of %d tokens (%d held by the decode worker) for transfer %s", rid,
                    len(msg.prompt_token_ids), msg.dst.held_tokens, tid)

    def _take_held(self, msg: PrefillReq) -> str | None:
        """Copy the held pages this prefix cache lacks from the decode worker, held under ``<id>#held`` (returned);
        ``None`` when nothing was taken (no held prefix, page sizes differ, inline path, pool short)."""
        kv, dst = self.core.engine.kv, msg.dst
        num_pages = dst.held_tokens // kv.page_size
        if (not num_pages or dst.page_size != kv.page_size or not kv.enable_prefix_caching
                or msg.params.prompt_logprobs is not None):
            return None
        key = f"{msg.request_id}#held"

        def fill(pages: list[int], indices: list[int]) -> None:
            if indices and not self.sender.read_held(dst.transfer_id, [dst.page_ids[i] for i in indices], pages):
                raise _CannotRead

        try:
            held = kv.hold_hashed(key, page_hashes(msg.prompt_token_ids[:num_pages * kv.page_size], kv.page_size),
                                   fill)
        except _CannotRead:
            return None
        except TransferError as exc:
            logger.warning("request %s: cannot read the held prefix (%s); computing it here", msg.request_id, exc)
            return None
        return key if held is not None else None

    def _release_held(self, key: str | None) -> None:
        if key is not None:
            self.core.engine.release(key)

    def _refuse(self, tid: str, rid: str, error: str, retryable: bool = True) -> None:
        try:
            self.sender.fail(tid, rid, error, retryable)
        except TransferError as exc:
            logger.warning("request %s: could not report failure to the decode worker: %s", rid, exc)

    def _on_abort(self, msg: AbortReq, peer: bytes | None = None) -> None:
        out = self.outgoing.get(msg.request_id)
        if out is None:
            return
        if peer is not None and peer != out.peer:  # only the decode worker that asked may take it back
            logger.warning("request %s: abort from a peer that did not ask for this prefill; ignored", msg.request_id)
            return
        del self.outgoing[msg.request_id]
        self.core.engine.abort(msg.request_id)
        self._release_held(out.held_key)
        self.core.owners.pop(msg.request_id, None)
        self._refuse(out.transfer_id, out.request_id, f"aborted: {msg.reason}")
        logger.info("request %s: prefill aborted", msg.request_id)

    # --- streaming ----------------------------------------------------------------------------------------

    def layer_hook(self, layer: int, batch: ScheduledBatch) -> None:
        """Runner hook: send what this step computed of ``layer`` for every outgoing request in the batch."""
        if self._step is None or self._step[0] is not batch:
            self._step = (batch, self._step_sends(batch))
        items = self._step[1]
        self.sender.send_step_layer(layer, items)
        if layer < self.num_layers - 1:
            return
        for seq in batch.seqs:
            out = self.outgoing.get(seq.request_id)
            if out is not None:
                end = seq.start_pos + seq.num_tokens
                self.core.counters.prefill_tokens += seq.num_tokens
                if end > out.sent_upto:  # a chunk inside the held prefix sends nothing
                    sent = end - out.sent_upto
                    self.core.counters.transfer_bytes += sent * self.bytes_per_token_layer * self.num_layers
                    out.sent_upto = end
        self._step = None

    def _step_sends(self, batch: ScheduledBatch) -> list[LayerSend]:
        now, sends = time.monotonic(), []
        for s in batch.seqs:
            out = self.outgoing.get(s.request_id)
            if out is not None:
                if out.first_step is None:
                    out.first_step = now
                    out.queue_s = max(0.0, time.time() - out.sent_at) if out.sent_at else now - out.started
                if s.start_pos + s.num_tokens > out.sent_upto:
                    sends.append(LayerSend(out.transfer_id, s.page_table, out.sent_upto, s.start_pos + s.num_tokens))
        return sends

    def _on_output(self, so: StepOutput) -> None:
        out = self.outgoing.pop(so.request_id, None)
        self.core.owners.pop(so.request_id, None)
        if out is None:
            return
        self._release_held(out.held_key)
        if so.finish_reason == "error":  # the request's own fault: the decode worker must not recompute it
            return self._refuse(out.transfer_id, out.request_id, so.error or "the request failed", retryable=False)
        if not so.new_token_ids:
            return self._refuse(out.transfer_id, out.request_id, f"prefill ended without a token ({so.finish_reason})")
        done = PrefillDone(
            request_id=so.request_id,
            transfer_id=out.transfer_id,
            first_token=so.new_token_ids[0],
            first_logprob=so.logprobs[0] if so.logprobs else None,
            prompt_logprobs=tuple(so.prompt_logprobs) if so.prompt_logprobs is not None else None,
            num_cached_tokens=so.num_cached_tokens,
            queue_s=out.queue_s,
            compute_s=time.monotonic() - (out.first_step or out.started),
        )
        self.sender.finish(out.transfer_id, done)
        logger.info("request %s: prefill done, first token sent with transfer %s", so.request_id, out.transfer_id)

    def _poll_sender(self) -> None:
        for ev in self.sender.poll():
            if isinstance(ev, TransferFailed):
                out = self.outgoing.pop(ev.request_id, None)
                if out is not None:
                    self.core.engine.abort(ev.request_id)
                    self.core.owners.pop(ev.request_id, None)
                    self._release_held(out.held_key)
                logger.warning("request %s: transfer %s failed: %s", ev.request_id, ev.transfer_id, ev.reason)
