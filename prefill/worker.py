"""Prefill service: computes prompts' KV and streams each layer to the decode worker that asked.

Flow for one request (see docs/architecture.md):
1. A decode worker sends ``PrefillReq`` with a ``KVDescriptor`` of pages it reserved.
2. The request joins this worker's engine as ``prefill_only`` (batched with other prompts up to the token
   budget, chunked, reusing this worker's prefix cache).
3. After every layer of every step, the layer hook sends the tokens computed so far (on the first chunk,
   the prefix-cache hit too) to the decode worker: pages fill there while later layers compute here.
4. When the first token is sampled, ``PrefillDone`` follows the data; the engine then frees (or
   prefix-caches) this worker's pages -- all data was copied out by then.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from splitserve.core.engine.batch import ScheduledBatch
from splitserve.core.engine.engine import StepOutput
from splitserve.core.engine.service import WorkerCore
from splitserve.core.messages import AbortReq, PrefillDone, PrefillReq
from splitserve.transfer.base import KVSender, TransferError, TransferFailed

logger = logging.getLogger(__name__)


@dataclass
class _Outgoing:
    transfer_id: str
    request_id: str
    sent_upto: int = 0
    started: float = 0.0
    bytes_per_token: int = 0


class PrefillService:
    def __init__(self, core: WorkerCore, sender: KVSender, bytes_per_token_layer: int) -> None:
        self.core = core
        self.sender = sender
        self.bytes_per_token_layer = bytes_per_token_layer
        self.num_layers = core.engine.model_config.num_layers
        self.outgoing: dict[str, _Outgoing] = {}
        core.on(PrefillReq, self._on_prefill_req)
        core.abort_handlers.append(self._on_abort)
        core.pollers.append(self._poll_sender)
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
        try:
            self.core.engine.add_request(rid, msg.prompt_token_ids, msg.params, prefill_only=True)
        except ValueError as exc:
            return self._refuse(tid, rid, str(exc))
        self.outgoing[rid] = _Outgoing(tid, rid, started=time.monotonic())
        self.core.own(rid, self._on_output)
        logger.info("request %s: prefill of %d tokens for transfer %s", rid, len(msg.prompt_token_ids), tid)

    def _refuse(self, tid: str, rid: str, error: str) -> None:
        try:
            self.sender.fail(tid, rid, error)
        except TransferError as exc:
            logger.warning("request %s: could not report failure to the decode worker: %s", rid, exc)

    def _on_abort(self, msg: AbortReq) -> None:
        out = self.outgoing.pop(msg.request_id, None)
        if out is None:
            return
        self.core.engine.abort(msg.request_id)
        self.core.owners.pop(msg.request_id, None)
        self._refuse(out.transfer_id, out.request_id, f"aborted: {msg.reason}")
        logger.info("request %s: prefill aborted", msg.request_id)

    # --- streaming ----------------------------------------------------------------------------------------

    def layer_hook(self, layer: int, batch: ScheduledBatch) -> None:
        """Runner hook: send what this step computed of ``layer`` for every outgoing request in the batch."""
        for seq in batch.seqs:
            out = self.outgoing.get(seq.request_id)
            if out is None:
                continue
            end = seq.start_pos + seq.num_tokens
            self.sender.send_layer(out.transfer_id, layer, seq.page_table, out.sent_upto, end)
            if layer == self.num_layers - 1:
                self.core.counters.transfer_bytes += (end - out.sent_upto) * self.bytes_per_token_layer * self.num_layers
                self.core.counters.prefill_tokens += seq.num_tokens
                out.sent_upto = end

    def _on_output(self, so: StepOutput) -> None:
        out = self.outgoing.pop(so.request_id, None)
        self.core.owners.pop(so.request_id, None)
        if out is None:
            return
        if not so.new_token_ids:
            return self._refuse(out.transfer_id, out.request_id, f"prefill ended without a token ({so.finish_reason})")
        done = PrefillDone(
            request_id=so.request_id,
            transfer_id=out.transfer_id,
            first_token=so.new_token_ids[0],
            first_logprob=so.logprobs[0] if so.logprobs else None,
            prompt_logprobs=tuple(so.prompt_logprobs) if so.prompt_logprobs is not None else None,
            num_cached_tokens=so.num_cached_tokens,
        )
        self.sender.finish(out.transfer_id, done)
        self.core.counters.transfer_seconds += time.monotonic() - out.started
        logger.info("request %s: prefill done, first token sent with transfer %s", so.request_id, out.transfer_id)

    def _poll_sender(self) -> None:
        for ev in self.sender.poll():
            if isinstance(ev, TransferFailed):
                out = self.outgoing.pop(ev.request_id, None)
                if out is not None:
                    self.core.engine.abort(ev.request_id)
                    self.core.owners.pop(ev.request_id, None)
                logger.warning("request %s: transfer %s failed: %s", ev.request_id, ev.transfer_id, ev.reason)
