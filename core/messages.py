"""Every message that crosses a socket, in one registry.

Encoding is msgpack through msgspec: typed, schema-checked on decode, never pickle. Each message is
a frozen ``msgspec.Struct`` tagged with its class name, so one decoder reads any of them and a
frame that does not match a schema raises :class:`MessageError` instead of producing garbage.

Who sends what (see docs/architecture.md):

* worker -> router: :class:`Register`, :class:`Heartbeat`, :class:`TokenOut`
* router -> worker: :class:`GenerateReq`, :class:`AbortReq`, :class:`SetRole`, :class:`Drain`, :class:`Reregister`
* decode -> prefill: :class:`PrefillReq`, :class:`AbortReq`
* prefill -> decode (transfer control channel): :class:`PrefillDone`, :class:`PrefillFailed`
"""

from __future__ import annotations

from typing import Literal, Union

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

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """Logprob of one chosen token plus the top-N alternatives as (token_id, logprob) pairs."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


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
    cache_events: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """Prefix-cache events since the last heartbeat: ("stored" | "removed", page hashes)."""
    role_epoch: int = 0
    """``SetRole.epoch`` of the last role switch applied; the router ignores ``role`` from older epochs."""


class GenerateReq(_Msg, frozen=True):
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    prefill_worker: str | None = None
    """Worker id of the prefill worker; ``None``: the receiving worker prefills itself."""
    prefill_addr: str | None = None


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


# --- decode <-> prefill --------------------------------------------------------------------------


class PrefillReq(_Msg, frozen=True):
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    dst: KVDescriptor
    reply_to: str
    """Worker id of the decode worker."""


class PrefillDone(_Msg, frozen=True):
    """Sent after the last layer's KV: the first generated token and prompt logprobs."""

    request_id: str
    transfer_id: str
    first_token: int
    first_logprob: TokenLogprob | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    num_cached_tokens: int = 0


class PrefillFailed(_Msg, frozen=True):
    request_id: str
    transfer_id: str
    error: str


Message = Union[
    Register, Heartbeat, GenerateReq, AbortReq, SetRole, Drain, Reregister, TokenOut, PrefillReq, PrefillDone,
    PrefillFailed,
]

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    """Serialize one message (msgpack)."""
    return _ENCODER.encode(msg)


def decode(data: bytes | memoryview) -> Message:
    """Parse one frame; raises :class:`MessageError` for anything that is not a valid message."""
    try:
        return _DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MessageError(f"bad message frame: {exc}") from exc
