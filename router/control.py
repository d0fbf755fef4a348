"""The router's control plane: one ZeroMQ ROUTER socket that every worker's DEALER connects to.

1. Frames are ``[identity, payload]`` with ``payload = messages.encode(msg)``. Workers send :class:`Register`,
   :class:`Heartbeat` and :class:`TokenOut`; the router sends :class:`GenerateReq`, :class:`AbortReq`,
   :class:`SetRole` and :class:`Drain`. A frame that does not decode is logged and dropped.
2. With keys (``--keys-dir``) only allow-listed CurveZMQ clients get through, and every frame carries the public key
   its sender authenticated with (ZAP's User-Id). A worker id is bound to a key: to its named key in the allow-list
   (``<id>.key``, core/keys.py), else to the key it registered with while it stays registered. A Register,
   Heartbeat or TokenOut for worker id X from any other key is refused (counted in :attr:`ControlPlane.refused`,
   logged at most once per ``REFUSAL_LOG_INTERVAL_S`` per worker id and kind), whatever ZeroMQ identity it comes
   on; a named key speaks only for its own id. With one shared worker key every worker has the same key, and what
   is left is step 3's connection check (docs/security.md: the trust boundary of a shared key).
3. A heartbeat counts only from the connection (identity) that registered its worker id, token output only from
   the request's decode worker. Workers pick an unguessable identity per process start (core/engine/service.py),
   so another client cannot take over a registered connection through ``ROUTER_HANDOVER``.
4. Each in-flight request has a :class:`RequestStream` (an asyncio queue of ``TokenOut``); a worker that dies
   (missed heartbeats, re-registration, deregistration) fails its streams with a clear error so no client waits
   forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import zmq
import zmq.asyncio

from splitserve.core import keys
from splitserve.core import messages as m
from splitserve.router.pools import RegistryFull, WorkerRegistry, WorkerState

logger = logging.getLogger(__name__)

ABORTED_MEMORY = 4096
"""How many recently aborted request ids the control plane remembers (late outputs of those are just dropped)."""
REFUSAL_LOG_INTERVAL_S = 10.0
"""A refused message (wrong key for a worker id) is logged at most this often per worker id and message kind."""
REFUSAL_LOG_MEMORY = 1024
"""How many (kind, worker id) pairs the refusal log remembers (bounded whatever a client sends)."""


@dataclass(eq=False)
class RequestStream:
    """Outputs of one request on its way back from the decode worker."""

    request_id: str
    decode_worker: str
    prefill_worker: str | None
    prompt_tokens: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    first_token_seen: bool = False
    finished: bool = False

    def fail(self, error: str) -> None:
        """End the stream with an error (only once)."""
        if not self.finished:
            self.queue.put_nowait(m.TokenOut(request_id=self.request_id, token_ids=(), finish_reason="error",
                                             error=error))


def _describe(msg: m.Message) -> str:
    """``GenerateReq (request cmpl-...)``: the message kind, and its request id where it has one."""
    rid = getattr(msg, "request_id", None)
    return f"{type(msg).__name__} (request {rid})" if rid else type(msg).__name__


async def switch_role(control: "ControlPlane", worker: WorkerState, role: m.Role) -> bool:
    """Send ``SetRole`` and, once it is delivered, route by the new role; ``False`` when undeliverable.

    The admin API and the automatic ratio controller both switch roles through here.
    """
    epoch = worker.role_epoch + 1
    if not await control.send(worker, m.SetRole(role=role, epoch=epoch)):
        return False
    worker.role, worker.role_epoch = role, epoch
    return True


class ControlPlane:
    """Binds the control socket, keeps the registry current and routes ``TokenOut`` to streams."""

    def __init__(self, ctx: zmq.asyncio.Context, registry: WorkerRegistry, host: str, port: int,
                 on_heartbeat: Callable[[WorkerState], None] | None = None, reap_interval_s: float = 0.25,
                 control_keys: "keys.CurveKeys | None" = None) -> None:
        self._ctx = ctx
        self.registry = registry
        self._host = host
        self._port = port
        self._on_heartbeat = on_heartbeat
        self._reap_interval = reap_interval_s
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        self.streams: dict[str, RequestStream] = {}
        self._aborted: OrderedDict[str, None] = OrderedDict()
        """Recently aborted request ids (bounded): late outputs of these need no second ``AbortReq``."""
        self.address = ""
        self._keys = control_keys
        self._auth: object | None = None
        self._bound: dict[str, str] = {}
        """Worker id -> its named public key (z85) from the allow-list; those ids speak only with that key."""
        self._named: dict[str, str] = {}
        """Named public key -> the only worker id it may speak for."""
        self.refused: Counter[str] = Counter()
        """Messages refused for a worker id's key, by kind (``Register``, ``Heartbeat``, ``TokenOut``)."""
        self._refusal_logged: OrderedDict[tuple[str, str], float] = OrderedDict()

    async def start(self) -> None:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        if self._keys is not None:  # only workers holding an allow-listed key complete the handshake
            from zmq.auth.asyncio import AsyncioAuthenticator

            self._auth = AsyncioAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=self._keys.allowed_dir)
            keys.serve(sock, self._keys)
            self._bound = keys.named_workers(self._keys.allowed_dir)
            self._named = {key: wid for wid, key in self._bound.items()}
            logger.info("control socket: %d worker ids bound to named keys", len(self._bound))
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker with the same id takes over its identity
        if self._port == 0:
            port = sock.bind_to_random_port(f"tcp://{self._host}")
        else:
            sock.bind(f"tcp://{self._host}:{self._port}")
            port = self._port
        self._sock = sock
        self.address = f"tcp://{self._host}:{port}"
        self._tasks = [asyncio.create_task(self._recv_loop(), name="control-recv"),
                       asyncio.create_task(self._reap_loop(), name="control-reap")]
        logger.info("control socket bound at %s", self.address)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        self._tasks = []
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        for s in list(self.streams.values()):
            s.fail("router is shutting down")
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    # --- sending ---------------------------------------------------------------------------------

    async def send(self, worker: WorkerState, msg: m.Message) -> bool:
        """Send one message; ``False`` (logged) when the worker is unreachable."""
        if self._sock is None:
            raise RuntimeError("control plane is not started")
        try:
            await self._sock.send_multipart([worker.identity, m.encode(msg)])
            return True
        except zmq.ZMQError as exc:
            logger.warning("cannot send %s to worker %s: %s", _describe(msg), worker.worker_id, exc)
            return False

    def _send_nowait(self, identity: bytes, msg: m.Message) -> None:
        """Best-effort send from the receive loop (no await); failures are logged."""
        if self._sock is None:
            return
        def report(fut: asyncio.Future) -> None:
            if not fut.cancelled() and fut.exception() is not None:
                logger.warning("cannot send %s to %r: %s", _describe(msg), identity[:64], fut.exception())

        try:  # zmq.asyncio returns a future; a failure lands in it, not here
            self._sock.send_multipart([identity, m.encode(msg)], flags=zmq.NOBLOCK).add_done_callback(report)
        except zmq.ZMQError as exc:
            logger.warning("cannot send %s to %r: %s", _describe(msg), identity[:64], exc)

    async def abort(self, request_id: str, reason: str) -> None:
        """Tell the request's decode worker (and prefill worker, if separate) to drop it."""
        stream = self.streams.get(request_id)
        if stream is None:
            return
        self._remember_aborted(request_id)
        for wid in {stream.decode_worker, stream.prefill_worker} - {None}:
            w = self.registry.get(wid)
            if w is not None:
                logger.info("request %s: abort sent to worker %s (%s)", request_id, wid, reason)
                await self.send(w, m.AbortReq(request_id=request_id, reason=reason))

    # --- streams ---------------------------------------------------------------------------------

    def open_stream(self, request_id: str, decode: WorkerState, prefill: WorkerState | None,
                    prompt_tokens: int) -> RequestStream:
        stream = RequestStream(request_id, decode.worker_id, prefill.worker_id if prefill else None, prompt_tokens)
        self.streams[request_id] = stream
        decode.inflight += 1
        target = prefill if prefill is not None else decode
        target.pending_prefill_tokens += prompt_tokens
        if prefill is not None:
            prefill.inflight += 1
        return stream

    def close_stream(self, stream: RequestStream) -> None:
        """Forget a finished stream and undo its load accounting."""
        stream.finished = True
        if self.streams.pop(stream.request_id, None) is None:
            return
        self._release_prefill(stream)
        decode = self.registry.get(stream.decode_worker)
        if decode is not None:
            decode.inflight = max(0, decode.inflight - 1)
        if stream.prefill_worker is not None:
            prefill = self.registry.get(stream.prefill_worker)
            if prefill is not None:
                prefill.inflight = max(0, prefill.inflight - 1)

    def _release_prefill(self, stream: RequestStream) -> None:
        if stream.first_token_seen:
            return
        stream.first_token_seen = True
        w = self.registry.get(stream.prefill_worker or stream.decode_worker)
        if w is not None:
            w.pending_prefill_tokens = max(0, w.pending_prefill_tokens - stream.prompt_tokens)

    def fail_worker_streams(self, worker_id: str, error: str) -> None:
        """End with ``error`` every stream whose tokens come from ``worker_id`` (its decode worker).

        A stream whose *prefill* worker is lost is left alone: its decode worker owns the request and its
        pages, and ends the transfer's lease by recomputing the prompt or failing the request with a clear
        error (``TransferConfig.failure_policy``), so failing it here would throw away a request that survives.
        """
        for s in list(self.streams.values()):
            if s.decode_worker == worker_id:
                logger.warning("request %s failed: %s", s.request_id, error)
                s.fail(error)

    # --- receiving -------------------------------------------------------------------------------

    async def _recv_loop(self) -> None:
        if self._sock is None:
            raise RuntimeError("control plane is not started")
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            if len(frames) != 2:
                logger.warning("dropped control message with %d frames (want 2)", len(frames))
                continue
            identity = frames[0].bytes
            try:
                msg = m.decode(frames[1].bytes)
            except m.MessageError as exc:
                logger.warning("dropped undecodable control message from %r: %s", identity[:64], exc)
                continue
            key = keys.client_key(frames[1]) if self._keys is not None else None
            try:
                self._dispatch(identity, msg, key)
            except Exception:  # a bug in one message's handling must not stop the control plane
                logger.exception("error handling %s from %r", type(msg).__name__, identity[:64])

    def _dispatch(self, identity: bytes, msg: m.Message, key: str | None = None) -> None:
        """``key``: the sender's authenticated public key (z85), ``None`` on a socket without keys."""
        if isinstance(msg, m.TokenOut):
            self._on_token_out(identity, msg, key)
        elif isinstance(msg, m.TokenOuts):
            self._on_token_outs(identity, msg, key)
        elif isinstance(msg, m.Heartbeat):
            self._on_heartbeat_msg(identity, msg, key)
        elif isinstance(msg, m.Register):
            self._on_register(identity, msg, key)
        else:
            logger.warning("unexpected %s on the control socket dropped", type(msg).__name__)

    def _on_heartbeat_msg(self, identity: bytes, msg: m.Heartbeat, key: str | None) -> None:
        if self._refuse_key("Heartbeat", msg.worker_id, key):
            return
        known = self.registry.get(msg.worker_id)
        if known is not None and known.identity != identity:  # only the connection that registered the id
            logger.warning("heartbeat for worker %s from another connection: dropped", msg.worker_id)
            return
        w = self.registry.heartbeat(msg)
        if w is None:
            logger.warning("heartbeat from unregistered worker %s: asking it to register", msg.worker_id)
            self._send_nowait(identity, m.Reregister())
        elif self._on_heartbeat is not None:
            self._on_heartbeat(w)

    def _on_register(self, identity: bytes, msg: m.Register, key: str | None) -> None:
        if self._refuse_key("Register", msg.worker_id, key):
            return
        try:
            old = self.registry.register(identity, msg, curve_key=key)
        except RegistryFull as exc:
            logger.warning("registration refused: %s", exc)
            return
        if old is not None:
            self.fail_worker_streams(msg.worker_id, f"worker {msg.worker_id} restarted (re-registered)")

    def key_mismatch(self, worker_id: str, key: str | None) -> str | None:
        """Why ``key`` may not speak for ``worker_id`` (step 2 of the module's flow); ``None`` when it may."""
        if key is None:  # a socket without keys: nothing to check
            return None
        bound = self._bound.get(worker_id)
        if bound is not None:
            return None if key == bound else f"worker id {worker_id} has a named key and this is another key"
        other = self._named.get(key)
        if other is not None:
            return f"the named key of worker {other} speaks only for {other}"
        w = self.registry.get(worker_id)
        if w is not None and w.curve_key is not None and w.curve_key != key:
            return f"worker {worker_id} registered with another key"
        return None

    def _refuse_key(self, kind: str, worker_id: str, key: str | None) -> bool:
        """Count and (rate-limited) log a ``kind`` message for ``worker_id`` from a key that may not send it."""
        why = self.key_mismatch(worker_id, key)
        if why is None:
            return False
        self.refused[kind] += 1
        now, slot = time.monotonic(), (kind, worker_id)
        last = self._refusal_logged.get(slot)
        if last is None or now - last >= REFUSAL_LOG_INTERVAL_S:
            self._refusal_logged[slot] = now
            self._refusal_logged.move_to_end(slot)
            while len(self._refusal_logged) > REFUSAL_LOG_MEMORY:
                self._refusal_logged.popitem(last=False)
            logger.warning("%s for worker %s refused: %s (client key %s..., %d %s refused so far)", kind, worker_id,
                           why, key[:8] if key else "-", self.refused[kind], kind)
        return True

    def _remember_aborted(self, request_id: str) -> None:
        self._aborted[request_id] = None
        while len(self._aborted) > ABORTED_MEMORY:
            self._aborted.popitem(last=False)

    def _on_token_outs(self, identity: bytes, msg: m.TokenOuts, key: str | None = None) -> None:
        """A step's outputs, each checked as a :class:`~splitserve.core.messages.TokenOut` alone. The requests still
        waiting for their first token get theirs first: their streams wake first, ahead of the step's other tokens
        (a stable order, so one request's outputs keep theirs)."""
        def first_token_seen(out: m.TokenOut) -> bool:
            stream = self.streams.get(out.request_id)
            return stream is not None and stream.first_token_seen

        for out in sorted(msg.outs, key=first_token_seen):  # False (still waiting) sorts first
            self._on_token_out(identity, out, key)

    def _on_token_out(self, identity: bytes, msg: m.TokenOut, key: str | None = None) -> None:
        stream = self.streams.get(msg.request_id)
        if stream is None:
            if msg.finish_reason is None and msg.request_id not in self._aborted:
                # Nobody will read this request (a restarted router, a stream already failed): stop the worker
                # generating it, which frees its pages.
                logger.info("request %s: output for a request this router does not know: abort sent", msg.request_id)
                self._remember_aborted(msg.request_id)
                self._send_nowait(identity, m.AbortReq(request_id=msg.request_id, reason="unknown to the router"))
            return
        if self._refuse_key("TokenOut", stream.decode_worker, key):  # only the decode worker's key
            return
        owner = self.registry.get(stream.decode_worker)
        if owner is None or owner.identity != identity:  # only the request's decode worker streams its tokens
            logger.warning("request %s: output from a worker that is not its decode worker: dropped", msg.request_id)
            return
        if msg.token_ids or msg.finish_reason is not None:
            self._release_prefill(stream)
        stream.queue.put_nowait(msg)

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self._reap_interval)
            for w in self.registry.expire():
                self.fail_worker_streams(
                    w.worker_id, f"worker {w.worker_id} stopped responding (no heartbeat); request failed")
            self.registry.forget_stale()
