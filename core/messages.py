"""Every message that crosses a socket, in one registry.

Encoding is msgpack through msgspec: typed, schema-checked on decode, never pickle. Each message is
a frozen ``msgspec.Struct`` tagged with its class name, so one decoder reads any of them and a
frame that does not match a schema raises :class:`MessageError` instead of producing garbage.

Who sends what (see docs/architecture.md):

* worker -> router: :class:`Register`, :class:`Heartbeat`, :class:`TokenOut`, :class:`TokenOuts`
* router -> worker: :class:`GenerateReq`, :class:`AbortReq`, :class:`SetRole`, :class:`Drain`, :class:`Reregister`,
  :class:`EndSession`
* decode -> prefill: :class:`PrefillReq`, :class:`AbortReq`
* prefill -> decode (transfer control channel): :class:`PrefillDone`, :class:`PrefillFailed`
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec

Role = Literal["prefill", "decode", "both"]
FinishReason = Literal["stop", "length", "abort", "error"]


class MessageError(ValueError):
    """A frame could not be decoded into a known message."""


class _Msg(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """Base of wire messages: tag = class name."""


class SamplingParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-request sampling settings (validated by the router before they reach a worker)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1: disabled."""
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    """Top-N logprobs for every generated token (0: only the sampled token's)."""
    prompt_logprobs: int | None = None
    """Top-N logprobs for every prompt token (the first has none)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before penalties; -100 bans a token, +100 forces it."""
    grammar: tuple[str, str] | None = None
    """Structured output: ``(kind, spec)``, the output must match it (kinds and specs: core/engine/grammar.py).
    The worker applies its token mask at every sampled token and finishes the request when it terminates."""

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

    @property
    def history_shapes_logits(self) -> bool:
        """Penalties or ``min_tokens``: the request's own prompt and output ids change its logits."""
        return (self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)
                or self.min_tokens > 0)

    @property
    def reads_history(self) -> bool:
        """Sampling reads the request's prompt and output ids: :attr:`history_shapes_logits`, or a random draw
        (seeded by its position); a greedy row with neither needs none (the scheduler then hands the runner none)."""
        return not self.greedy or self.history_shapes_logits


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """Logprob of one chosen token plus the top-N alternatives as (token_id, logprob) pairs."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class KVPoolExport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How a sender on the same host opens a decode worker's whole KV pool to write into it (one-sided path).

    Made once per pool by the receiver's copy engine (transfer/cuda_ipc.py, transfer/shm.py). It grants write access
    to every page of the pool, so it only travels to authenticated peers, inside :class:`KVDescriptor`.
    """

    kind: Literal["cuda_ipc", "shm", "nixl"]
    pool_id: str
    """Unique per pool allocation: senders open a pool once and cache it under this id."""
    host_id: str
    """Hostname and kernel boot id: both paths work only between processes of one host."""
    pid: int
    shape: tuple[int, ...]
    """``[num_layers, 2, num_pages, page_size, num_kv_heads, head_dim]``."""
    dtype: str
    fd: int = -1
    """shm: the pool's memfd in process ``pid``."""
    handle: bytes = b""
    """cuda_ipc: the CUDA IPC handle of the allocation that holds the pool."""
    storage_size: int = 0
    storage_offset: int = 0
    """cuda_ipc: bytes from the allocation's start to the storage."""
    tensor_offset: int = 0
    """cuda_ipc: elements from the storage's start to the pool."""
    ref_counter_handle: bytes = b""
    ref_counter_offset: int = 0
    event_handle: bytes = b""
    event_sync_required: bool = False
    addr: int = 0
    """nixl: address of the pool's first byte in process ``pid`` (``handle`` holds the agent metadata that grants it)."""
    device_id: int = 0
    """nixl: the pool's CUDA device index (0 for host memory)."""
    mem_type: str = ""
    """nixl: ``"DRAM"`` (host memory) or ``"VRAM"`` (GPU memory)."""


class KVDescriptor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where a prefill worker must write one request's KV (reserved by the decode worker).

    ``page_ids[i]`` holds tokens ``[i * page_size, (i + 1) * page_size)`` of the request. The layout
    fields must equal the sender's, or the transfer is refused with a clear error.
    """

    transfer_id: str
    receiver_addr: str
    model_id: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    page_ids: tuple[int, ...]
    num_tokens: int
    lease_s: float
    pool: KVPoolExport | None = None
    """Set when the receiver accepts one-sided writes into its pool (same host); the sender may still send inline."""
    receiver_key: str | None = None
    """The receiver's CurveZMQ public key (z85; its KV socket is a CURVE server with it); ``None`` without keys."""
    held_tokens: int = 0
    """The receiver already holds the KV of tokens ``[0, held_tokens)`` in the first pages (an agent session's
    prefix; a multiple of ``page_size``): the sender sends only ``[held_tokens, num_tokens)``, and on the one-sided
    path may read the held pages instead of computing them (transfer/base.py, "Held prefix")."""


# --- worker <-> router ---------------------------------------------------------------------------


class Register(_Msg, frozen=True):
    worker_id: str
    role: Role
    model_id: str
    peer_addr: str
    """Where decode workers send :class:`PrefillReq` (prefill-capable workers)."""
    transfer_addr: str
    """Where prefill workers push KV (decode-capable workers)."""
    num_pages: int
    page_size: int
    max_model_len: int
    vocab_size: int = 0
    """The model's vocabulary size (token-id prompts must stay below it); 0: unknown."""


class SessionReport(msgspec.Struct, frozen=True, array_like=True):
    """One session a worker holds (``GET /admin/sessions``)."""

    session_id: Annotated[str, msgspec.Meta(max_length=256)]
    tokens: int
    """KV tokens held, in whole pages."""
    tier: Literal["gpu", "host", "disk"]
    idle_s: float
    """Seconds since its last turn started."""


class SessionStats(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A decode worker's agent sessions, for the router's metrics and admin API (decode/sessions.py)."""

    live: int = 0
    turns_total: int = 0
    """Turns that came with a session id (the hit rate is ``Heartbeat.session_hits_total`` over this)."""
    pages_gpu: int = 0
    pages_host: int = 0
    pages_disk: int = 0
    restores_total: int = 0
    """Sessions brought back from host memory or disk into the KV pool."""
    restore_bytes_total: int = 0
    restore_seconds_total: float = 0.0
    evictions: Annotated[tuple[tuple[str, int], ...], msgspec.Meta(max_length=16)] = ()
    """Cumulative (reason, count): ``to_host``, ``to_disk``, ``dropped``, ``ttl``, ``restore_failed``, ``drained``,
    ``role_change``."""
    sessions: Annotated[tuple[SessionReport, ...], msgspec.Meta(max_length=256)] = ()
    """The most recently used sessions (at most 256; ``live`` counts all)."""


class Heartbeat(_Msg, frozen=True):
    worker_id: str
    role: Role
    running: int
    waiting: int
    queued_tokens: int
    kv_pages_used: int
    kv_pages_free: int
    kv_pages_cached: int
    draining: bool = False
    prefill_tokens_total: int = 0
    decode_tokens_total: int = 0
    transfer_bytes_total: int = 0
    transfer_seconds_total: float = 0.0
    transfers_failed_total: int = 0
    """KV transfers into this worker that failed (then recomputed or failed per ``failure_policy``)."""
    preemptions_total: int = 0
    """Times a request here lost its KV pages to make room and was recomputed."""
    session_hits_total: int = 0
    """Session turns that found their conversation's KV held here (only the new suffix was computed)."""
    session_tokens_reused_total: int = 0
    """Prompt tokens those turns did not recompute."""
    cache_events: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """Prefix-cache events since the last heartbeat: ("stored" | "removed", page hashes)."""
    role_epoch: int = 0
    """``SetRole.epoch`` of the last role switch applied; the router ignores ``role`` from older epochs."""
    sessions: SessionStats | None = None
    """Agent sessions this (decode-capable) worker holds: per tier, cumulative counters, a bounded list."""


class SessionHint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An agent session's turn: the decode worker keeps the conversation's KV after the turn for the next one."""

    session_id: str
    end: bool = False
    """The last turn: release what the session holds once it finishes."""
    expected_return_s: float | None = None
    """When the agent expects to send the next turn (a hint for what to release first under memory pressure)."""


class GenerateReq(_Msg, frozen=True):
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    prefill_worker: str | None = None
    """Worker id of the prefill worker; ``None``: the receiving worker prefills itself."""
    prefill_addr: str | None = None
    session: SessionHint | None = None
    prefill_key: str | None = None
    """The prefill worker's CurveZMQ public key (z85) as the router authenticated it; its peer socket serves with it."""


class EndSession(_Msg, frozen=True):
    """Router -> decode worker: drop everything an agent session holds (``DELETE /admin/sessions/{id}``)."""

    session_id: str


class AbortReq(_Msg, frozen=True):
    request_id: str
    reason: str = "aborted"


class SetRole(_Msg, frozen=True):
    role: Role
    epoch: int = 0
    """Router's count of role switches for this worker; the worker echoes it as ``Heartbeat.role_epoch``."""


class Drain(_Msg, frozen=True):
    """Finish in-flight work, accept nothing new."""


class Reregister(_Msg, frozen=True):
    """The router does not know the sender of a heartbeat (it restarted): send ``Register`` again."""


class RequestTiming(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where one disaggregated request's time went (seconds; ``None``: not measured on this message).

    The first ``TokenOut`` carries the prefill side (``prefill_queue_s``, ``prefill_compute_s``) and the transfer
    (``transfer_s``: from the end of the prefill compute until the decode worker had the KV, i.e. the part of the
    transfer that was not hidden behind compute; ``transfer_bytes``); the second carries ``join_s``, from the KV
    landing to the request's first decode step. A request prefilled on the decode worker itself (a short prompt,
    an agent session's next turn) has ``local_prefill_s`` instead: from its ``GenerateReq`` reaching the decode
    worker to its first token.
    """

    prefill_queue_s: float | None = None
    prefill_compute_s: float | None = None
    transfer_s: float | None = None
    transfer_bytes: int | None = None
    join_s: float | None = None
    local_prefill_s: float | None = None


class TokenOut(_Msg, frozen=True):
    """New tokens of one request (decode worker -> router); the last one has ``finish_reason``."""

    request_id: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    timing: RequestTiming | None = None


class TokenOuts(_Msg, frozen=True):
    """The outputs of one engine step, several requests' :class:`TokenOut` in one frame (decode worker -> router).

    One frame instead of one per request: the router reads, decrypts and decodes a step's tokens once, and can hand
    out first tokens before the rest (a session turn's first token waited behind up to a whole batch of others)."""

    outs: tuple[TokenOut, ...]


# --- decode <-> prefill --------------------------------------------------------------------------


class PrefillReq(_Msg, frozen=True):
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    dst: KVDescriptor
    reply_to: str
    """Worker id of the decode worker."""
    sent_at: float = 0.0
    """Wall-clock time (``time.time()``) the decode worker sent this: the prefill worker's queue time then counts
    the time it sat unread while a step ran (exact on one host; across hosts as good as their clock sync)."""


class PrefillDone(_Msg, frozen=True):
    """Sent after the last layer's KV: the first generated token and prompt logprobs."""

    request_id: str
    transfer_id: str
    first_token: int
    first_logprob: TokenLogprob | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    num_cached_tokens: int = 0
    queue_s: float = 0.0
    """From ``PrefillReq`` being sent (``sent_at``; else from its arrival) to the request's first prefill step."""
    compute_s: float = 0.0
    """From its first step to the first token (the writes of the last step may still be in flight)."""


class PrefillFailed(_Msg, frozen=True):
    request_id: str
    transfer_id: str
    error: str
    retryable: bool = True
    """False when the request itself is at fault (its step raised): the decode worker fails it instead of recomputing."""


Message = Union[
    Register, Heartbeat, GenerateReq, AbortReq, SetRole, Drain, Reregister, TokenOut, TokenOuts, PrefillReq,
    PrefillDone, PrefillFailed, EndSession,
]

DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError)
"""What msgspec raises for hostile input: deep nesting surfaces as RecursionError, invalid UTF-8 as UnicodeDecodeError."""
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    """Serialize one message (msgpack)."""
    return _ENCODER.encode(msg)


def decode(data: bytes | memoryview) -> Message:
    """Parse one frame; raises :class:`MessageError` for anything that is not a valid message."""
    try:
        return _DECODER.decode(data)
    except DECODE_ERRORS as exc:
        raise MessageError(f"bad message frame: {exc}") from exc
