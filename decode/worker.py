"""Decode service: reserves pages, asks a prefill worker to fill them, then generates and streams tokens.

Flow for one request (see docs/architecture.md):
1. ``GenerateReq`` from the router. Short prompts (``local_prefill_threshold``), requests without a prefill
   worker, and colocated workers prefill here: the request joins the engine directly.
   An agent session's turn whose KV is held here (decode/sessions.py) prefills its new suffix here when it is
   short (``session_suffix_threshold``); a longer suffix goes to step 2 with the session's pages reserved first
   (``KVDescriptor.held_tokens``): the prefill worker is given the held prefix and sends back only the suffix.
   A turn whose KV waits in host memory behind copies still in flight waits for them (``restoring``, at most
   ``RESTORE_WAIT_S``) rather than recomputing.
2. Otherwise reserve pages for the prompt (the request owns them from now on; if the pool is full the
   request waits in ``pending`` until pages free up), register them with the KV receiver under a lease, and
   send ``PrefillReq`` (with the page descriptor) to the chosen prefill worker.
3. K/V land in the reserved pages inside ``receiver.poll()`` on this thread. ``TransferComplete`` brings the
   first token: the request joins the continuous batch, and its tokens stream to the router.
4. Finish, abort, or failure frees the pages. A failed transfer (lease expired, prefill worker gone or
   refusing) either fails the request with a clear error or recomputes the prompt here (``failure_policy``).
   An aborted request whose prefill worker may still be writing into its pages (one-sided path) keeps them,
   under ``<id>#settling``, until the receiver reports that the writes stopped.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import msgspec
import zmq

from splitserve.core import keys
from splitserve.core.config import TransferConfig
from splitserve.core.engine.engine import StepOutput
from splitserve.core.engine.service import WorkerCore
from splitserve.core.messages import (
    AbortReq, EndSession, GenerateReq, KVDescriptor, PrefillDone, PrefillReq, RequestTiming, TokenOut, encode,
)
from splitserve.decode.sessions import Claim, build_keeper
from splitserve.transfer.base import KVLayout, KVReceiver, LayerArrived, TransferComplete, TransferError, TransferFailed

logger = logging.getLogger(__name__)

RESTORE_WAIT_S = 1.0
"""Longest a session turn waits for copies to host memory to finish so that its own copy can come back; past it the
turn is prefilled in full."""


@dataclass
class _Incoming:
    req: GenerateReq
    transfer_id: str
    prefill_addr: str
    started: float
    held_tokens: int = 0
    """Tokens of a session's prefix held here already (not transferred)."""


class DecodeService:
    def __init__(self, core: WorkerCore, receiver: KVReceiver, layout: KVLayout, tcfg: TransferConfig) -> None:
        self.core = core
        self.receiver = receiver
        self.layout = layout
        self.tcfg = tcfg
        self.incoming: dict[str, _Incoming] = {}
        self.by_transfer: dict[str, str] = {}
        self.pending: OrderedDict[str, GenerateReq] = OrderedDict()
        self.landed: dict[str, float] = {}
        """request id -> when its KV landed, until its first decode step (the ``join_s`` of its timing)."""
        self.sessions = build_keeper(core.engine.kv, core.engine.kv_cache, core.engine.release_session, core.cfg,
                                     core.engine.order_pool_write)
        self.local: dict[str, tuple[float, float]] = {}
        """Requests prefilled here, until their first output (counts the prompt tokens computed, times
        ``local_prefill_s``): when their ``GenerateReq`` arrived (monotonic; a recompute: when it started), and when
        the engine took it in."""
        self.ending: dict[str, str] = {}
        """A session's last turn -> the session, ended once the turn has taken its pages (its first output)."""
        self.session_hits: set[str] = set()
        """Requests that found their session's KV here, until their first output (counts the tokens reused)."""
        self.held_turns: set[str] = set()
        """Session turns waiting in ``pending`` whose pages are reserved behind the session's held prefix."""
        self.restoring: OrderedDict[str, tuple[GenerateReq, float]] = OrderedDict()
        """Session turns whose KV can come back from host memory once copies in flight finish: (message, arrival)."""
        self.settling: dict[str, str] = {}
        """transfer id -> page owner key of an aborted request whose pages may still be written (one-sided path)."""
        self.peers: dict[tuple[str, str | None], zmq.Socket] = {}
        """Peer sockets by (prefill address, its public key)."""
        self._seq = itertools.count()
        core.transfer_addr = receiver.address
        if receiver.wake_socket is not None:
            core.wake_sockets.append(receiver.wake_socket)
        core.on(GenerateReq, self._on_generate)
        core.abort_handlers.append(self._on_abort)
        core.waiting_sources.append(lambda: len(self.pending))
        core.pollers.append(self._poll)
        core.pollers.append(self.sessions.poll)
        core.pollers.append(self._retry_restores)
        core.waiting_sources.append(lambda: len(self.restoring))
        core.pollers.append(self._drop_sessions_when_leaving)
        core.on(EndSession, lambda _p, m: self.sessions.end(m.session_id))
        core.heartbeat_fields.append(lambda: {"sessions": self.sessions.stats()})

    def _drop_sessions_when_leaving(self) -> None:
        """A draining worker, or one switched to prefill, gets no more session turns: let their KV go now."""
        if self.core.draining or self.core.role == "prefill":
            self.sessions.drop_all("drained" if self.core.draining else "role_change")

    # --- admission ------------------------------------------------------------------------------------------

    def _on_generate(self, _peer: bytes | None, msg: GenerateReq) -> None:
        arrived = time.monotonic()
        rid = msg.request_id
        if self.core.draining or self.core.role == "prefill":
            return self.core.fail_request(rid, f"worker {self.core.worker_id} is not accepting decode work")
        self.core.own(rid, self._on_output)
        if msg.session is not None:
            self.sessions.touch(msg.session)
        self._admit(msg, arrived)

    def _admit(self, msg: GenerateReq, arrived: float, claim: Claim | None = None) -> None:
        """Start a request: a session turn as its session's ``claim`` says (made now unless given), else a prompt
        prefilled here or by the prefill worker."""
        rid = msg.request_id
        if msg.session is not None:
            claim = claim or self.sessions.claim(msg.session.session_id)
            if claim == "wait":
                self.restoring[rid] = (msg, arrived)
                logger.info("request %s: waiting for copies to host memory before its session's restore", rid)
                return
            if claim == "hit":  # its KV is here (or restored from a tier): only the suffix is computed
                self.core.counters.session_hits += 1
                self.session_hits.add(rid)
                if not self._suffix_elsewhere(msg):
                    return self._prefill_locally(msg, arrived)
                self.held_turns.add(rid)
                return self._queue_prefill(msg)
        local = (
            msg.prefill_addr is None
            or len(msg.prompt_token_ids) < self.core.cfg.local_prefill_threshold
        )
        if local:
            return self._prefill_locally(msg, arrived)
        self._queue_prefill(msg)

    def _retry_restores(self) -> None:
        """Admit the session turns that waited for copies to host memory once their session can come back; one that
        waited ``RESTORE_WAIT_S`` is restored now if it fits, else its copy is dropped and it is prefilled in full."""
        now = time.monotonic()
        for rid, (msg, arrived) in list(self.restoring.items()):
            sid = msg.session.session_id
            claim = self.sessions.claim(sid)
            if claim == "wait" and now - arrived > RESTORE_WAIT_S:
                claim = "hit" if self.sessions.restore(sid) else "miss"
            if claim != "wait":
                del self.restoring[rid]
                self._admit(msg, arrived, claim)

    def _suffix_elsewhere(self, msg: GenerateReq) -> bool:
        """A held session's turn whose new suffix is long enough for a prefill worker (given the held prefix)."""
        if msg.prefill_addr is None or msg.params.prompt_logprobs is not None:
            return False
        _, held = self.core.engine.kv.get_computed_pages(msg.prompt_token_ids, session=msg.session.session_id)
        return len(msg.prompt_token_ids) - held >= self.core.cfg.session_suffix_threshold

    def _queue_prefill(self, msg: GenerateReq) -> None:
        rid = msg.request_id
        try:  # before pages are reserved and a prefill worker is asked: a prompt that can never run fails now
            self.core.engine.check_prompt(rid, msg.prompt_token_ids)
        except ValueError as exc:
            self.held_turns.discard(rid)
            return self.core.fail_request(rid, str(exc))
        self.pending[rid] = msg
        self._start_pending()

    def _prefill_locally(self, msg: GenerateReq, arrived: float | None = None) -> None:
        arrived = time.monotonic() if arrived is None else arrived
        try:
            self.core.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params,
                                         session_key=_session_key(msg),
                                         continues=None if msg.session is None else msg.session.session_id)
            self.local[msg.request_id] = (arrived, time.monotonic())
        except ValueError as exc:
            self.local.pop(msg.request_id, None)
            self.core.fail_request(msg.request_id, str(exc))
            if msg.session is not None and msg.session.end:
                self.sessions.end(msg.session.session_id)
            return
        if msg.session is not None and msg.session.end:  # ended once the turn took its pages (its partial one too)
            self.ending[msg.request_id] = msg.session.session_id

    def _log_local(self, so: StepOutput, arrived: float, admitted: float, now: float) -> None:
        """One line per prompt prefilled here: its wait (taking it in, waiting for the loop to schedule its step,
        scheduling and launching it), and the step that computed it."""
        step = self.core.engine.last_step
        if step is None:
            return
        logger.info("request %s: prefilled %d new tokens here, first token %.1f ms after it arrived: %.1f ms before its "
                    "step (%.2f ms taking it in, %.2f ms to its scheduling, %.2f ms scheduling and launching), a step "
                    "of %d rows %.1f ms (%s, %s)", so.request_id, so.num_prompt_tokens - so.num_cached_tokens,
                    1e3 * (now - arrived), 1e3 * (step.started - arrived), 1e3 * (admitted - arrived),
                    1e3 * (step.scheduled - admitted), 1e3 * (step.started - step.scheduled), step.rows,
                    1e3 * (step.ended - step.started), "CUDA graph" if step.graphed else "eager",
                    "overlapped" if step.overlapped else "synchronous")

    def _start_pending(self) -> None:
        """Reserve pages for waiting requests in arrival order; stop at the first that does not fit."""
        while self.pending:
            rid, msg = next(iter(self.pending.items()))
            held, held_tokens = None, 0
            if rid in self.held_turns:  # the session's pages first (looked up now: a victim may have left since)
                held, held_tokens = self.core.engine.kv.get_computed_pages(msg.prompt_token_ids,
                                                                           session=msg.session.session_id)
            pages = self.core.engine.reserve(rid, len(msg.prompt_token_ids), held)
            if pages is None and self.sessions.make_room("a transfer needs the pages"):
                continue
            if pages is None:
                return
            del self.pending[rid]
            if rid in self.held_turns and msg.session.end:  # its last turn holds its pages now: the session ends
                self.sessions.end(msg.session.session_id)
            self.held_turns.discard(rid)
            self._ask_prefill(msg, pages, held_tokens)

    def _ask_prefill(self, msg: GenerateReq, pages: list[int], held_tokens: int = 0) -> None:
        rid = msg.request_id
        if self.core.keys and not (msg.prefill_key or self.core.keys.worker_public):
            self.core.engine.release(rid)
            return self.core.fail_request(rid, f"no CurveZMQ public key known for prefill worker {msg.prefill_worker} "
                                               "(the router sent none and this key set has no shared worker key)")
        tid = f"{rid}/{self.core.worker_id}/{next(self._seq)}"
        desc = KVDescriptor(
            transfer_id=tid,
            receiver_addr=self.receiver.address,
            model_id=self.layout.model_id,
            dtype=self.layout.dtype,
            num_layers=self.layout.num_layers,
            num_kv_heads=self.layout.num_kv_heads,
            head_dim=self.layout.head_dim,
            page_size=self.layout.page_size,
            page_ids=tuple(pages),
            num_tokens=len(msg.prompt_token_ids),
            lease_s=self.tcfg.lease_s,
            pool=self.receiver.pool_export,
            receiver_key=self.core.keys.public.decode("ascii") if self.core.keys else None,
            held_tokens=held_tokens,
        )
        try:
            self.receiver.expect(desc, request_id=rid)
        except TransferError as exc:
            self.core.engine.release(rid)
            return self.core.fail_request(rid, str(exc))
        if held_tokens:  # the prefill worker reads the held pages: none may still be written by the step in flight
            self.core.engine.wait_in_flight()
        self.incoming[rid] = _Incoming(msg, tid, msg.prefill_addr or "", time.monotonic(), held_tokens)
        self.by_transfer[tid] = rid
        req = PrefillReq(
            request_id=rid, prompt_token_ids=msg.prompt_token_ids, params=msg.params, dst=desc, reply_to=self.core.worker_id,
            sent_at=time.time(),
        )
        self._peer(msg.prefill_addr or "", msg.prefill_key).send(encode(req))
        logger.info("request %s: %d pages reserved (%d tokens held), prefill asked of %s", rid, len(pages),
                    held_tokens, msg.prefill_worker)

    def _peer(self, addr: str, server_key: str | None) -> zmq.Socket:
        """The socket to the prefill worker at ``addr``: a CURVE client of its own public key as the router sent it
        (``GenerateReq.prefill_key``), else of the shared worker key."""
        sock = self.peers.get((addr, server_key))
        if sock is None:
            sock = self.core.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self.core.keys:
                keys.connect_to(sock, self.core.keys, server_key or self.core.keys.worker_public)
            sock.setsockopt(zmq.SNDHWM, 10000)
            sock.connect(addr)
            self.peers[(addr, server_key)] = sock
        return sock

    # --- transfers ------------------------------------------------------------------------------------------

    def _poll(self) -> None:
        for ev in self.receiver.poll(0):
            if isinstance(ev, LayerArrived):
                continue
            key = self.settling.pop(ev.transfer_id, None)
            if key is not None:  # the sender stopped writing: the aborted request's pages are free to reuse
                self.core.engine.release(key)
                continue
            rid = self.by_transfer.pop(ev.transfer_id, None)
            if rid is None:
                continue
            inc = self.incoming.pop(rid)
            if isinstance(ev, TransferComplete):
                self._on_complete(inc, ev)
            elif isinstance(ev, TransferFailed):
                self._on_failed(inc, ev.reason, ev.retryable)
        self._start_pending()

    def _on_complete(self, inc: _Incoming, ev: TransferComplete) -> None:
        rid, done = inc.req.request_id, ev.done
        timing = self._timing(inc, done)
        self.core.counters.transfer_seconds += timing.transfer_s or 0.0
        self.core.counters.transfer_bytes += timing.transfer_bytes or 0
        self.landed[rid] = time.monotonic()
        first = TokenOut(
            request_id=rid,
            token_ids=(done.first_token,),
            logprobs=(done.first_logprob,) if done.first_logprob is not None else None,
            prompt_logprobs=done.prompt_logprobs,
            num_prompt_tokens=len(inc.req.prompt_token_ids),
            num_cached_tokens=done.num_cached_tokens,
            timing=timing,
        )
        try:
            finished = self.core.engine.add_prefilled(
                rid, inc.req.prompt_token_ids, inc.req.params, done.first_token, done.first_logprob,
                session_key=_session_key(inc.req),
            )
        except ValueError as exc:
            self.core.engine.release(rid)
            return self.core.fail_request(rid, str(exc))
        if rid in self.session_hits:  # a held turn: the held prefix the prefill worker did not compute
            self.session_hits.discard(rid)
            self.core.counters.session_tokens_reused += min(inc.held_tokens, done.num_cached_tokens)
        if finished is not None:
            self.core.owners.pop(rid, None)
            first = msgspec.structs.replace(first, finish_reason=finished.finish_reason)
        self.core.send_token_out(first)
        logger.info("request %s: KV arrived, first token in", rid)

    def _timing(self, inc: _Incoming, done: PrefillDone) -> RequestTiming:
        """The prefill worker's queue and compute time, and what is left of the wait: the transfer not hidden."""
        waited = time.monotonic() - inc.started
        nbytes = (len(inc.req.prompt_token_ids) - inc.held_tokens) * self.layout.token_bytes() * self.layout.num_layers
        timing = RequestTiming(prefill_queue_s=done.queue_s, prefill_compute_s=done.compute_s,
                               transfer_s=max(0.0, waited - done.queue_s - done.compute_s), transfer_bytes=nbytes)
        logger.debug("request %s: prefill queue %.1f ms, compute %.1f ms, transfer %.1f ms after compute, %.1f MB "
                     "(%.1f GB/s over compute + transfer)", inc.req.request_id, 1e3 * done.queue_s, 1e3 * done.compute_s,
                     1e3 * timing.transfer_s, nbytes / 1e6, nbytes / 1e9 / max(done.compute_s + timing.transfer_s, 1e-9))
        return timing

    def _on_failed(self, inc: _Incoming, reason: str, retryable: bool = True) -> None:
        rid = inc.req.request_id
        self.core.engine.release(rid)
        if not retryable:  # the request's own fault, not the transfer's: fail it alone, never recompute
            return self.core.fail_request(rid, reason)
        self.core.counters.transfers_failed += 1
        if self.tcfg.failure_policy == "recompute":
            logger.warning("request %s: transfer failed (%s); recomputing the prompt here", rid, reason)
            return self._prefill_locally(inc.req)
        self.core.fail_request(rid, f"KV transfer from the prefill worker failed: {reason}")

    # --- outputs and aborts ---------------------------------------------------------------------------------

    def _on_output(self, so: StepOutput) -> None:
        self.core.counters.decode_tokens += len(so.new_token_ids)
        landed, timing = self.landed.pop(so.request_id, None), None
        if landed is not None:
            timing = RequestTiming(join_s=time.monotonic() - landed)
        if so.request_id in self.local and (so.new_token_ids or so.finished):
            (arrived, admitted), now = self.local.pop(so.request_id), time.monotonic()
            timing = RequestTiming(local_prefill_s=now - arrived)
            self._log_local(so, arrived, admitted, now)
            self.core.counters.prefill_tokens += max(0, so.num_prompt_tokens - so.num_cached_tokens)
        if so.request_id in self.ending:
            self.sessions.end(self.ending.pop(so.request_id))
        if so.request_id in self.session_hits:
            self.session_hits.discard(so.request_id)
            self.core.counters.session_tokens_reused += so.num_cached_tokens
        if so.finished:
            self.core.owners.pop(so.request_id, None)
            self.sessions.enforce_cap()
        self.core.send_token_out(
            TokenOut(
                request_id=so.request_id,
                token_ids=tuple(so.new_token_ids),
                logprobs=tuple(so.logprobs) if so.logprobs else None,
                prompt_logprobs=tuple(so.prompt_logprobs) if so.prompt_logprobs is not None else None,
                finish_reason=so.finish_reason,  # type: ignore[arg-type]
                error=so.error,
                num_prompt_tokens=so.num_prompt_tokens,
                num_cached_tokens=so.num_cached_tokens,
                timing=timing,
            )
        )

    def _on_abort(self, msg: AbortReq, peer: bytes | None = None) -> None:
        rid = msg.request_id
        if peer is not None:  # decode requests belong to the router: a peer cannot abort them
            return
        self.pending.pop(rid, None)
        self.restoring.pop(rid, None)
        self.held_turns.discard(rid)
        self.landed.pop(rid, None)
        self.session_hits.discard(rid)
        self.local.pop(rid, None)
        if rid in self.ending:
            self.sessions.end(self.ending.pop(rid))
        inc = self.incoming.pop(rid, None)
        if inc is not None:
            self.by_transfer.pop(inc.transfer_id, None)
            if self.receiver.cancel(inc.transfer_id):
                self.core.engine.release(rid)
            elif self.core.engine.kv.has(rid):
                key = f"{rid}#settling"
                self.core.engine.kv.rename(rid, key)
                self.settling[inc.transfer_id] = key
            self._peer(inc.prefill_addr, inc.req.prefill_key).send(encode(AbortReq(request_id=rid, reason=msg.reason)))
        self.core.engine.abort(rid)
        if self.core.owners.pop(rid, None) is not None:
            logger.info("request %s: aborted (%s)", rid, msg.reason)

    def close(self) -> None:
        for sock in self.peers.values():
            sock.close(linger=0)
        self.receiver.close()
        self.sessions.close()


def _session_key(msg: GenerateReq) -> str | None:
    """The key a turn's pages are pinned under when it finishes (none for a session's last turn)."""
    return None if msg.session is None or msg.session.end else msg.session.session_id
