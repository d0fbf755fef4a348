"""The worker process skeleton shared by every role: router connection, main loop, heartbeats.

One thread does everything, in this order, forever: read control messages (router and peers), poll the registered
pollers (KV transfer endpoints), run one engine step, hand each output to the service that owns the request (the
tokens of one step leave as one frame, :class:`TokenOuts`), send a heartbeat when due. While an overlapped decode
step runs, the engine may first wait on the sockets (:meth:`WorkerCore.wait_for_work`): a message that comes then is
read before the next step is scheduled. A side thread only keeps the worker visibly alive while that loop is inside a
long step (a compile, a huge prefill): when no heartbeat left for ``1.5 * heartbeat_s`` it resends the last one
without its prefix-cache events, under the lock that serialises every use of the router socket. Role services
(prefill/, decode/) plug in by registering message handlers, pollers and output owners; they never share a request.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import msgspec
import zmq

from splitserve.core import keys
from splitserve.core.config import WorkerConfig
from splitserve.core.engine.engine import LLMEngine, StepOutput, limits_for_role
from splitserve.core.messages import (
    AbortReq,
    Drain,
    EndSession,
    GenerateReq,
    Heartbeat,
    Message,
    MessageError,
    PrefillReq,
    Register,
    Reregister,
    SetRole,
    TokenOut,
    TokenOuts,
    decode,
    encode,
)

logger = logging.getLogger(__name__)

Handler = Callable[[bytes | None, Message], None]
"""``handler(peer_identity_or_None_for_router, message)``."""

FROM_ROUTER = frozenset({GenerateReq, AbortReq, SetRole, Drain, Reregister, EndSession})
"""What the router socket accepts (the router owns requests, roles and drains)."""
FROM_PEERS = frozenset({PrefillReq, AbortReq})
"""What the peer socket accepts: a decode worker asking this worker to prefill, or taking that back."""
OutputOwner = Callable[[StepOutput], None]


@dataclass
class Counters:
    prefill_tokens: int = 0
    decode_tokens: int = 0
    transfer_bytes: int = 0
    transfer_seconds: float = 0.0
    transfers_failed: int = 0
    session_hits: int = 0
    session_tokens_reused: int = 0


def bind_random(sock: zmq.Socket, host: str, port: int) -> str:
    """Bind ``tcp://host:port`` (port 0: any free port) and return the bound endpoint.

    ``host`` may be a DNS name (a compose service name, a pod IP): ZeroMQ binds only to addresses and
    interfaces, so names are resolved first.
    """
    host = socket.gethostbyname(host)
    if port:
        sock.bind(f"tcp://{host}:{port}")
        return f"tcp://{host}:{port}"
    bound = sock.bind_to_random_port(f"tcp://{host}")
    return f"tcp://{host}:{bound}"


class WorkerCore:
    """Owns the engine, the sockets and the loop; services attach to it."""

    def __init__(self, cfg: WorkerConfig, engine: LLMEngine) -> None:
        self.cfg = cfg
        self.role = cfg.role
        self.role_epoch = 0
        self.worker_id = cfg.worker_id or f"{cfg.role}-{uuid.uuid4().hex[:8]}"
        self.engine = engine
        self.ctx = zmq.Context.instance()
        # its own named key when the folder has one for this id, else the shared worker key (core/keys.py)
        self.keys = keys.load(cfg.keys_dir, "worker", name=self.worker_id) if cfg.keys_dir else None
        self._auth = keys.start_authenticator(self.ctx, self.keys) if self.keys else None
        self.router = self.ctx.socket(zmq.DEALER)
        if self.keys:
            keys.connect_to(self.router, self.keys, self.keys.router_public)
        # unguessable per process start: no other client can take this connection over (router/control.py step 3)
        self.router.setsockopt(zmq.IDENTITY, self.worker_id.encode()[:200] + b"/" + uuid.uuid4().hex.encode())
        self.router.setsockopt(zmq.LINGER, 1000)
        self.router.setsockopt(zmq.SNDHWM, cfg.router_queue_limit)
        self.router.connect(cfg.router_addr)
        self.peer = self.ctx.socket(zmq.ROUTER)
        self.peer.setsockopt(zmq.LINGER, 0)
        if self.keys:
            keys.serve(self.peer, self.keys)
        self.peer_addr = bind_random(self.peer, cfg.host, cfg.port)
        self.transfer_addr = ""
        self.handlers: dict[type, Handler] = {}
        self.pollers: list[Callable[[], None]] = []
        self.wake_sockets: list[object] = []
        """Sockets of the roles' own endpoints (a KV receiver's) that wake the idle wait when readable."""
        self.busy_hints: list[Callable[[], bool]] = []
        """Work that completes without a message (a KV sender's device writes): while one says True the loop polls
        without blocking, so what completes leaves at once rather than after the idle wait."""
        self.owners: dict[str, OutputOwner] = {}
        self.abort_handlers: list[Callable[[AbortReq, bytes | None], None]] = []
        self.waiting_sources: list[Callable[[], int]] = []
        """Requests a role holds outside the engine's queue (the decode worker's page wait), for heartbeats."""
        self.heartbeat_fields: list[Callable[[], dict]] = []
        """Extra ``Heartbeat`` fields a role service reports (the decode worker's agent sessions)."""
        self.counters = Counters()
        self.draining = False
        self.stopping = False
        self._last_hb = 0.0
        self._orphaned: set[str] = set()
        """Requests whose output could not be queued for the router: aborted here on the next loop."""
        self._router_backlogged = False
        self._token_batch: list[TokenOut] | None = None
        """While a step's outputs are handed out (:meth:`hand_out`): the tokens they send, which leave together."""
        self._router_lock = threading.Lock()
        """Serialises the router socket between the loop and the heartbeat thread (ZeroMQ sockets are not
        thread-safe; a lock gives the exclusive use and memory barrier they need)."""
        self._last_heartbeat: Heartbeat | None = None
        self._hb_stop = threading.Event()
        engine.kv.record_cache_events()
        engine.scheduler.limits = limits_for_role(cfg.engine, self.role)
        self.on(AbortReq, self._on_abort)
        self.on(Drain, lambda _p, _m: self.start_drain())
        self.on(SetRole, self._on_set_role)
        self.on(Reregister, lambda _p, _m: self.register())

    # --- wiring ----------------------------------------------------------------------------------------

    def on(self, kind: type, handler: Handler) -> None:
        self.handlers[kind] = handler

    def own(self, request_id: str, owner: OutputOwner) -> None:
        self.owners[request_id] = owner

    def send_router(self, msg: Message) -> bool:
        """Queue ``msg`` for the router without ever blocking the loop; ``False`` when it was dropped.

        The queue holds ``cfg.router_queue_limit`` messages while the router is slow or away (a restarted router gets
        them). Once it is full the router is taken as gone: a request whose output is dropped can no longer be
        streamed to anyone, so it is aborted here (next loop turn), which frees its pages.
        """
        try:
            with self._router_lock:
                self.router.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            self._on_router_backlog(msg)
            return False
        if self._router_backlogged:
            logger.info("worker %s: router reachable again", self.worker_id)
            self._router_backlogged = False
        return True

    def _on_router_backlog(self, msg: Message) -> None:
        if not self._router_backlogged:
            logger.warning("worker %s: router unreachable (%d messages queued): dropping output, aborting the "
                           "affected requests here", self.worker_id, self.cfg.router_queue_limit)
            self._router_backlogged = True
        outs = msg.outs if isinstance(msg, TokenOuts) else (msg,)
        for rid in (getattr(out, "request_id", None) for out in outs):
            if rid is not None and rid not in self._orphaned and rid in self.owners:
                logger.warning("request %s: output could not reach the router; aborting", rid)
                self._orphaned.add(rid)

    def _abort_orphans(self) -> None:
        for rid in sorted(self._orphaned):
            self._on_abort(None, AbortReq(request_id=rid, reason="the router is unreachable"))  # as if the router said so
        self._orphaned.clear()

    def send_token_out(self, out: TokenOut) -> None:
        """Send ``out`` to the router; during :meth:`hand_out`, after the step's other outputs unless it carries
        ``timing`` (a request's first output from here: its time to first token is waiting on it)."""
        if self._token_batch is not None and out.timing is None:
            self._token_batch.append(out)
        else:
            self.send_router(out)

    def hand_out(self, outputs: list[StepOutput]) -> None:
        """Give each output of a step to the service that owns its request; the tokens they send leave as one frame
        (one :class:`TokenOut` alone as itself), so the router reads a step's tokens at once. First outputs go
        ahead alone (:meth:`send_token_out`)."""
        self._token_batch = []
        try:
            for out in outputs:
                owner = self.owners.get(out.request_id)
                if owner is not None:
                    owner(out)
        finally:
            batch, self._token_batch = self._token_batch, None
            if len(batch) == 1:
                self.send_router(batch[0])
            elif batch:
                self.send_router(TokenOuts(outs=tuple(batch)))

    def fail_request(self, request_id: str, error: str) -> None:
        logger.warning("request %s: failed: %s", request_id, error)
        self.owners.pop(request_id, None)
        self.send_token_out(TokenOut(request_id=request_id, token_ids=(), finish_reason="error", error=error))

    # --- lifecycle ---------------------------------------------------------------------------------------

    def register(self) -> None:
        info = self.engine.info
        self.send_router(
            Register(
                worker_id=self.worker_id,
                role=self.role,
                model_id=info.model_id,
                peer_addr=self.peer_addr,
                transfer_addr=self.transfer_addr,
                num_pages=info.num_pages,
                page_size=info.page_size,
                max_model_len=info.max_model_len,
                vocab_size=self.engine.model_config.vocab_size,
            )
        )
        logger.info("worker %s registered with %s as %s", self.worker_id, self.cfg.router_addr, self.role)

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())

    def request_stop(self) -> None:
        """SIGTERM: drain (finish in-flight work, accept none), then exit the loop."""
        self.start_drain()
        self.stopping = True

    def start_drain(self) -> None:
        if not self.draining:
            logger.info("worker %s draining", self.worker_id)
        self.draining = True
        self._last_hb = 0.0  # tell the router now

    def busy(self) -> bool:
        return self.engine.has_unfinished() or bool(self.owners)

    def run(self) -> None:
        self.register()
        self.heartbeat(force=True)  # also what the side thread resends if the first step is long
        beat = threading.Thread(target=self._heartbeat_while_busy, name=f"{self.worker_id}-heartbeat", daemon=True)
        beat.start()
        try:
            self._run_loop()
        finally:
            self._hb_stop.set()
            beat.join(timeout=5)

    def _heartbeat_while_busy(self) -> None:
        """Side thread: resend the last heartbeat (without cache events) while the loop has sent none for a while."""
        period = self.cfg.heartbeat_s
        while not self._hb_stop.wait(period / 2):
            last = self._last_heartbeat
            if last is None or time.monotonic() - self._last_hb < 1.5 * period:
                continue
            payload = encode(msgspec.structs.replace(last, cache_events=()))
            with self._router_lock:
                try:
                    self.router.send(payload, zmq.NOBLOCK)
                except zmq.Again:  # the router is unreachable: the loop handles that once the step ends
                    continue
            self._last_hb = time.monotonic()
            logger.debug("worker %s: heartbeat from the side thread (the loop is in a long step)", self.worker_id)

    def _run_loop(self) -> None:
        deadline = None
        while True:
            if self.stopping and deadline is None:
                deadline = time.monotonic() + self.cfg.drain_timeout_s
            if deadline is not None and (not self.busy() or time.monotonic() > deadline):
                break
            try:
                self.loop_once()
            except Exception as exc:
                # Tell every client now instead of leaving them to the router's heartbeat timeout, then die
                # (a supervisor restarts the process; its KV pool goes with it).
                logger.exception("worker %s: main loop failed", self.worker_id)
                for rid in list(self.owners):
                    self.fail_request(rid, f"worker {self.worker_id} failed: {type(exc).__name__}: {exc}")
                raise
        if self.busy():
            for rid in list(self.owners):
                self.fail_request(rid, f"worker {self.worker_id} shut down before the request finished")
        self.heartbeat(force=True)
        logger.info("worker %s stopped", self.worker_id)

    def loop_once(self) -> None:
        if self._orphaned:
            self._abort_orphans()
        idle = not self.engine.has_unfinished() and not any(hint() for hint in self.busy_hints)
        self.read_messages(timeout_ms=5 if idle else 0)
        for poll in self.pollers:
            poll()
        if self.engine.has_unfinished():
            self.hand_out(self.engine.step(arrivals=self.wait_for_work))
            for poll in self.pollers:  # what the step finished (KV written, first tokens) leaves now, not after a wait
                poll()
        self.heartbeat()

    def close(self) -> None:
        self.router.close(linger=1000)
        self.peer.close(linger=0)
        if self._auth is not None:
            self._auth.stop()

    # --- messages --------------------------------------------------------------------------------------

    def _poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.peer, zmq.POLLIN)
        for sock in self.wake_sockets:  # read by the pollers; here they only end the wait
            poller.register(sock, zmq.POLLIN)
        return poller

    def wait_for_work(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a message or a KV frame, reading nothing; True when one came (the engine's
        step 0': work that arrives while a decode step runs joins the next step, core/engine/pacing.py).

        ZeroMQ polls in whole milliseconds (pyzmq truncates 2.7 to 2, and 0.9 to no wait at all), so the whole
        milliseconds are one poll and the rest is polled without a timeout until the deadline: the window ends when
        the engine asked, not up to a millisecond early (a turn that comes in that millisecond waits a whole extra
        decode step)."""
        deadline = time.monotonic() + timeout_s
        poller = self._poller()
        with self._router_lock:
            whole_ms = int(timeout_s * 1e3)
            if whole_ms > 0 and poller.poll(whole_ms):
                return True
            while time.monotonic() < deadline:
                if poller.poll(0):
                    return True
            return False

    def read_messages(self, timeout_ms: int) -> None:
        poller = self._poller()
        with self._router_lock:
            ready = dict(poller.poll(timeout_ms))
        for _ in range(256):  # bounded per loop so engine steps keep flowing
            got = False
            if ready.get(self.router):
                with self._router_lock:
                    payload = self.router.recv() if self.router.poll(0) else None
                if payload is not None:
                    self._dispatch(None, payload)
                    got = True
            if ready.get(self.peer) and self.peer.poll(0):
                frames = self.peer.recv_multipart()
                if len(frames) == 2:
                    self._dispatch(frames[0], frames[1])
                else:
                    logger.warning("dropping peer message with %d frames", len(frames))
                got = True
            if not got:
                break

    def _dispatch(self, peer: bytes | None, payload: bytes) -> None:
        try:
            msg = decode(payload)
        except MessageError as exc:
            logger.warning("dropping undecodable message: %s", exc)
            return
        if type(msg) not in (FROM_ROUTER if peer is None else FROM_PEERS):
            where = "router" if peer is None else "peer"
            logger.warning("worker %s: %s is not accepted on the %s socket; dropped", self.worker_id,
                           type(msg).__name__, where)
            return
        handler = self.handlers.get(type(msg))
        if handler is None:
            logger.warning("worker %s (%s): no handler for %s", self.worker_id, self.role, type(msg).__name__)
            return
        handler(peer, msg)

    def _on_abort(self, peer: bytes | None, msg: AbortReq) -> None:
        """``peer``: ``None`` from the router, else the peer connection it came on (services check ownership)."""
        for handler in self.abort_handlers:
            handler(msg, peer)

    def _on_set_role(self, _peer: bytes | None, msg: SetRole) -> None:
        logger.info("worker %s: role %s -> %s", self.worker_id, self.role, msg.role)
        self.role, self.role_epoch = msg.role, msg.epoch
        self.engine.scheduler.limits = limits_for_role(self.cfg.engine, msg.role)
        self._last_hb = 0.0  # the next heartbeat carries the new role

    # --- heartbeats ----------------------------------------------------------------------------------------

    def heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_hb < self.cfg.heartbeat_s:
            return
        self._last_hb = now
        usage = self.engine.kv.usage()
        sched = self.engine.scheduler
        c = self.counters
        hb = Heartbeat(
            worker_id=self.worker_id,
            role=self.role,
            role_epoch=self.role_epoch,
            running=len(sched.running),
            waiting=len(sched.waiting) + sum(source() for source in self.waiting_sources),
            queued_tokens=sched.queued_tokens(),
            kv_pages_used=usage.used,
            kv_pages_free=usage.free,
            kv_pages_cached=usage.cached,
            draining=self.draining,
            prefill_tokens_total=c.prefill_tokens,
            decode_tokens_total=c.decode_tokens,
            transfer_bytes_total=c.transfer_bytes,
            transfer_seconds_total=c.transfer_seconds,
            transfers_failed_total=c.transfers_failed,
            preemptions_total=sched.num_preemptions,
            session_hits_total=c.session_hits,
            session_tokens_reused_total=c.session_tokens_reused,
            cache_events=tuple(self.engine.kv.take_cache_events()),
            **{k: v for fields in self.heartbeat_fields for k, v in fields().items()},
        )
        self._last_heartbeat = hb
        self.send_router(hb)
