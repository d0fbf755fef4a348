"""User configuration: frozen, validated, unknown keys rejected, no I/O.

Every role reads one of these models. Values come from CLI flags and ``SPLITSERVE_*``
environment variables (see :func:`from_env_and_args`). Facts derived at run time (the model's
shape, the number of KV pages that fit in memory, bound addresses) live elsewhere:
:class:`splitserve.core.model.config.ModelConfig` and the engine's ``RuntimeInfo``.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

BUILTIN_MODEL = "builtin:tiny-random-llama"
"""Name of the built-in random-weight model (needs no download; its id says it is random)."""

ENV_PREFIX = "SPLITSERVE_"

_T = TypeVar("_T", bound="FrozenConfig")


class FrozenConfig(BaseModel):
    """Base for every user config: immutable, strict about unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    @classmethod
    def from_mapping(cls: type[_T], values: Mapping[str, Any]) -> _T:
        """Build from a plain mapping; unknown keys raise ``pydantic.ValidationError``."""
        return cls.model_validate(dict(values))


class EngineConfig(FrozenConfig):
    """What the engine (scheduler + model runner) is asked to do."""

    model: str = BUILTIN_MODEL
    """A local Hugging Face directory, or ``builtin:...`` for the built-in random model."""
    load_format: Literal["auto", "safetensors", "dummy"] = "auto"
    """``dummy``: deterministic random weights of the config's shape (benchmarks without downloads)."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """``auto``: float32 on CPU, bfloat16 on GPU."""
    device: Literal["cpu", "cuda"] = "cpu"
    device_index: int = Field(default=0, ge=0)
    seed: int = 0
    page_size: int = Field(default=16, ge=1, le=1024)
    num_pages: int | None = Field(default=None, ge=2)
    """Pages in the KV pool; ``None`` sizes it from ``kv_cache_memory_fraction`` (GPU) or ``cpu_kv_cache_mb``."""
    kv_cache_memory_fraction: float = Field(default=0.85, gt=0.0, le=0.98)
    cpu_kv_cache_mb: int = Field(default=256, ge=1)
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=2048, ge=1)
    """Token budget of one step (prefill chunks + decode tokens)."""
    chunk_size: int = Field(default=512, ge=1)
    """Longest piece of one prompt computed in one step (chunked prefill)."""
    prefill_token_budget: int = Field(default=8192, ge=1)
    """Prefill role: token budget of one step, filled with whole prompts first come first served (a prompt is cut
    only where it exceeds the budget): no decode steps to keep short there, so no small chunks."""
    max_model_len: int | None = Field(default=None, ge=1)
    enable_prefix_caching: bool = True
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    """``auto``: triton on CUDA, torch reference on CPU."""
    cuda_graphs: bool = True
    capture_mixed_graphs: bool | None = None
    """Warm-up captures every mixed graph (decode rows with up to four short prefill rows: each batch, context and
    prefill bucket, core/engine/cuda_graphs.py) instead of one, so no step of a session turn or short prompt joining
    decode rows waits for a capture while serving (about 0.1 s each on an H200), at the cost of a longer warm-up
    (17-20 s and 0.7 GiB for an 8B model on an H200). ``None`` (auto): a worker started in the decode role does
    (:meth:`WorkerConfig.captures_mixed_graphs`), prefill and colocated workers and a bare engine do not."""
    async_scheduling: bool = True
    """Overlap host work with the device: launch a greedy decode step (plain or grammar-masked) before reading the previous step's
    tokens (core/engine/engine.py). Off: every step waits for its tokens before the next is scheduled."""
    overlap_prefill: Literal["auto", "on", "off"] = "auto"
    """With ``async_scheduling``: greedy prompt chunks overlap too (a decode worker's session turns and short prompts
    are queued right behind the step in flight instead of waiting for it on the host). ``auto``: on CUDA devices only
    (on the CPU a step completes at launch, so a prompt queued behind it gains nothing and its first token would wait
    for the next step). ``off``: a step with a prompt chunk of more than one token runs synchronously."""
    step_window: bool = True
    """With ``async_scheduling``, a worker waits on its sockets while the decode step in flight should run on, before
    it launches the next: a prompt that arrives then runs in the very next step, not the one after
    (core/engine/pacing.py). Off: the next step is launched at once."""
    prefill_first_tokens: int = Field(default=0, ge=0)
    """A decode or colocated worker runs prompts with at most this many tokens left to compute (after prefix-cache
    hits: an agent session's next turn on the worker that holds its KV) in a step of their own, ahead of the decode
    rows, which skip that step (never two in a row): the prompt's first token waits for a prompt-only step instead
    of a step that also carries every running row (core/engine/scheduler.py, prompts first). Capped by
    ``chunk_size``. 0: prompts join the decode rows' step."""
    prompt_lane: bool = False
    """With ``prefill_first_tokens``: such a step of prompts alone runs on a high-priority CUDA stream with CUDA
    graphs of its own while the decode step in flight runs on, instead of queued behind it (core/engine/lane.py);
    the decode step then ends after it. Steps that share a page with the step in flight are queued as before."""
    extra_stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation besides the tokenizer's EOS (stories260K ends with id 1)."""

    @model_validator(mode="after")
    def _lane_needs_prompts_first(self) -> "EngineConfig":
        if self.prompt_lane and not self.prefill_first_tokens:
            raise ValueError("prompt_lane runs steps of prompts alone: set prefill_first_tokens > 0 too")
        return self


class TransferConfig(FrozenConfig):
    """KV data plane between prefill and decode workers."""

    backend: Literal["auto", "zmq", "ucx", "cuda_ipc", "shm", "nixl"] = "auto"
    """``auto``: one-sided writes into the decode worker's pool where both share a host (``cuda_ipc`` between GPUs,
    ``shm`` between CPU processes), inline ZeroMQ frames otherwise (transfer/registry.py). ``nixl``: one-sided
    writes over NIXL/UCX, also across hosts (``pip install -e '.[nixl]'``)."""
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    """0: pick a free port."""
    use_ipc: bool = False
    """ZeroMQ over ``ipc://`` instead of ``tcp://`` when both ends share a host."""
    lease_s: float = Field(default=30.0, gt=0)
    """How long reserved destination pages wait for a sender before they are reclaimed."""
    failure_policy: Literal["fail", "recompute"] = "recompute"
    ucx_progress: Literal["auto", "polling", "blocking"] = "auto"
    """UCX progress thread: ``auto`` busy-polls for GPU memory (cuda_ipc completions raise no wakeup event, so
    blocking progress can stall) and blocks on wakeups for host memory."""
    curve_public_key: str | None = None
    curve_secret_key: str | None = None
    curve_server_key: str | None = None
    curve_allowed_dir: str | None = None
    """With the keys above: the receiver accepts only senders whose public key is in this folder (ZAP)."""


class WorkerConfig(FrozenConfig):
    """A prefill, decode or colocated worker process."""

    role: Literal["prefill", "decode", "both"]
    worker_id: str | None = None
    router_addr: str = "tcp://127.0.0.1:8100"
    """The router's control socket (workers connect, register, heartbeat)."""
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    """Peer socket (decode -> prefill requests). 0 picks a free port."""
    heartbeat_s: float = Field(default=1.0, gt=0)
    local_prefill_threshold: int = Field(default=0, ge=0)
    """A decode worker prefills prompts shorter than this itself (0: never)."""
    session_suffix_threshold: int = Field(default=512, ge=1)
    """A session turn held here whose new suffix has at least this many tokens is prefilled by a prefill worker
    given the held prefix (only the suffix is computed there and sent back); shorter suffixes are prefilled here."""
    session_kv_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    """At most this share of the KV pool stays pinned for agent sessions between turns (decode/sessions.py)."""
    session_host_gib: float = Field(default=0.0, ge=0.0)
    """Host-memory tier for sessions let go from the KV pool (pinned buffers on CUDA); 0: off (decode/tiers.py)."""
    session_disk_dir: str | None = None
    """Disk tier directory for sessions the host tier lets go (with ``session_disk_gib``)."""
    session_disk_gib: float = Field(default=0.0, ge=0.0)
    session_ttl_s: float = Field(default=3600.0, gt=0)
    """A session idle this long (since its last turn) is dropped from every tier."""
    session_policy: Literal["expected_return", "lru"] = "expected_return"
    """Which session to let go first under memory pressure: expected back last (then larger), or least recently used."""
    drain_timeout_s: float = Field(default=30.0, gt=0)
    keys_dir: str | None = None
    """CurveZMQ keys (``splitserve keys DIR``): the router, peer and KV sockets accept only allow-listed peers."""
    router_queue_limit: int = Field(default=100_000, ge=1)
    """Messages queued for an unreachable router before the worker takes it as gone and aborts the requests
    whose output it cannot deliver (tens of seconds of token outputs at full load; a few MB)."""
    engine: EngineConfig = EngineConfig()
    transfer: TransferConfig = TransferConfig()

    @property
    def captures_mixed_graphs(self) -> bool:
        """Whether warm-up captures every mixed graph: ``engine.capture_mixed_graphs``, or where that is ``None``
        (auto), whether this worker starts in the decode role (its session turns and short prompts join decode rows;
        a prefill worker switched to decode later captures each such graph on first use)."""
        chosen = self.engine.capture_mixed_graphs
        return self.role == "decode" if chosen is None else chosen


class RouterConfig(FrozenConfig):
    """The HTTP front end and worker registry."""

    model: str = BUILTIN_MODEL
    served_model_name: tuple[str, ...] = ()
    """Names clients may use for the model (the first is the one responses carry); empty: ``model``. Entries are
    split at commas (``SPLITSERVE_SERVED_MODEL_NAME=a,b``), so a name cannot contain one."""
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    control_host: str = "127.0.0.1"
    control_port: int = Field(default=8100, ge=0, le=65535)
    prefill_policy: Literal["round_robin", "least_loaded", "prefix_aware", "power_of_two"] = "least_loaded"
    decode_policy: Literal["round_robin", "least_loaded", "kv_aware", "power_of_two"] = "least_loaded"
    max_queued_requests: int = Field(default=1024, ge=1)
    """Above this many requests in flight the router answers 429."""
    request_timeout_s: float = Field(default=600.0, gt=0)
    heartbeat_timeout_s: float = Field(default=5.0, gt=0)
    max_workers: int = Field(default=1024, ge=1)
    """Worker ids registered at once; registrations beyond are refused."""
    forget_worker_after_s: float = Field(default=300.0, gt=0)
    """A worker silent this long leaves the registry, /metrics and /status (it registers again if it comes back)."""
    admin_token: str | None = None
    admin_token_file: str | None = None
    """A file holding the admin token (keeps it out of argv and of the environment)."""
    chat_template: str | None = None
    """A jinja chat template file that replaces (or supplies) the model's own."""
    tool_call_parser: Literal["llama3_json", "hermes"] | None = None
    """How ``tool_choice="auto"`` finds tool calls in chat output: Llama 3.1+ JSON or Hermes/Qwen ``<tool_call>``
    tags (router/tools.py); unset: ``auto`` is refused (forced calls need no parser)."""
    keys_dir: str | None = None
    """CurveZMQ keys (``splitserve keys DIR``): the control socket accepts only allow-listed workers."""
    extra_stop_token_ids: tuple[int, ...] = ()
    auto_ratio: bool = False
    """Switch worker roles automatically when measured TTFT/TPOT drift from the SLO (router/autoscale.py)."""
    slo_ttft_ms: float = Field(default=1000.0, gt=0)
    slo_tpot_ms: float = Field(default=50.0, gt=0)
    auto_ratio_interval_s: float = Field(default=5.0, gt=0)
    auto_ratio_cooldown_s: float = Field(default=30.0, ge=0)
    api_key: tuple[str, ...] = Field(default=(), repr=False)
    """Keys accepted as ``Authorization: Bearer`` on ``/v1/*``, ``/tokenize`` and ``/detokenize`` (empty, with no
    ``api_key_file``: no key needed). Split at commas like ``served_model_name``; empty entries are dropped."""
    api_key_file: str | None = None
    """A file with more keys, one a line (``#`` comments and blank lines ignored); read by the router at start."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins (``https://app.example``; ``*``: any) answered with CORS headers and preflights; empty: no
    cross-origin browser access."""
    max_body_mb: float = Field(default=8.0, gt=0)
    """Request bodies above this many MB (of 1024 * 1024 bytes) get 413 (refused from ``Content-Length`` before any
    byte is read)."""
    max_prompt_chars: int | None = Field(default=None, ge=1)
    """Text prompts / chat messages above this many characters get 400 before tokenizing; ``None``: 8 characters
    per token of the workers' maximum context length."""
    idle_timeout_s: float = Field(default=30.0, gt=0)
    """A connection that has not sent a whole request head this long after connecting or after its last response
    is closed (aiohttp's ``keepalive_timeout``: idle keep-alive and slow headers alike)."""
    body_timeout_s: float = Field(default=30.0, gt=0)
    """A request body not received whole within this many seconds gets 408 and the connection is closed."""

    @field_validator("served_model_name", mode="before")
    @classmethod
    def _names(cls, v: object) -> object:
        names = cls._comma_list(v)
        if isinstance(names, tuple) and any(not n for n in names):
            raise ValueError("served_model_name must not contain an empty name")
        return names

    @field_validator("api_key", mode="before")
    @classmethod
    def _keys(cls, v: object) -> object:
        items = cls._comma_list(v)
        return tuple(x for x in items if x) if isinstance(items, tuple) else items

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _origins(cls, v: object) -> object:
        """``https://a.example/`` and ``https://a.example`` are one origin (browsers send the latter)."""
        items = cls._comma_list(v)
        return tuple(dict.fromkeys(x.rstrip("/") for x in items if x)) if isinstance(items, tuple) else items

    @staticmethod
    def _comma_list(v: object) -> object:
        """A string or a list of strings, each entry split at commas and stripped, duplicates dropped (order kept)."""
        if isinstance(v, str):
            v = [v]
        if isinstance(v, (list, tuple)):
            return tuple(dict.fromkeys(part.strip() for n in v for part in str(n).split(",")))
        return v


def help_with_default(help_text: str, config: type[BaseModel], field: str) -> str:
    """``help_text`` ending with the default of ``config``'s ``field``: what ``--help`` shows for a flag whose unset
    value falls back to ``SPLITSERVE_*`` and then the config (read from the model, so it stays true)."""
    value = config.model_fields[field].default
    return f"{help_text} (default: {'none' if value is None else value})"


def env_overrides(prefix: str = ENV_PREFIX, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``SPLITSERVE_PAGE_SIZE=32`` -> ``{"page_size": "32"}`` (values are validated by the model)."""
    env = os.environ if environ is None else environ
    return {k[len(prefix):].lower(): v for k, v in env.items() if k.startswith(prefix)}
