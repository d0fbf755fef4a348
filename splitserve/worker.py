"""``splitserve prefill|decode|worker``: one worker process.

Every worker carries both services (prefill and decode), so the router can switch its role at run time;
``--role`` only says which work it accepts. ``both`` is a colocated worker: it prefills and decodes its
own requests and is the non-disaggregated baseline.
"""

from __future__ import annotations

import argparse
import logging
import socket
from types import MappingProxyType
from typing import Mapping

from splitserve.core.config import (
    BUILTIN_MODEL, EngineConfig, TransferConfig, WorkerConfig, env_overrides, help_with_default,
)
from splitserve.transfer.registry import BACKENDS as TRANSFER_BACKENDS

logger = logging.getLogger(__name__)

def _env_bool(text: str) -> bool:
    """``SPLITSERVE_*`` booleans: 1/true/yes/on or 0/false/no/off (anything else is an error naming the value)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


_ENGINE_FLAGS = MappingProxyType({
    "model": str, "load_format": str, "dtype": str, "device": str, "device_index": int, "seed": int,
    "page_size": int, "num_pages": int, "max_num_seqs": int, "max_num_batched_tokens": int,
    "chunk_size": int, "prefill_token_budget": int, "max_model_len": int, "attention_backend": str, "cpu_kv_cache_mb": int,
    "kv_cache_memory_fraction": float, "async_scheduling": _env_bool, "overlap_prefill": str,
    "step_window": _env_bool, "prefill_first_tokens": int, "prompt_lane": _env_bool,
    "capture_mixed_graphs": _env_bool,
})
_TRANSFER_FLAGS = MappingProxyType(
    {"transfer": str, "transfer_host": str, "transfer_port": int, "lease_s": float, "failure_policy": str,
     "ucx_progress": str}
)
_WORKER_FLAGS = MappingProxyType({
    "role": str, "worker_id": str, "router_addr": str, "host": str, "port": int, "heartbeat_s": float,
    "local_prefill_threshold": int, "session_suffix_threshold": int, "session_kv_fraction": float, "session_host_gib": float,
    "session_disk_dir": str, "session_disk_gib": float, "session_ttl_s": float, "session_policy": str, "drain_timeout_s": float, "router_queue_limit": int, "keys_dir": str,
})


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Worker, engine and KV transfer flags; each unset one falls back to ``SPLITSERVE_*`` and then the config."""
    _add_worker_flags(p)
    _add_engine_flags(p)
    _add_transfer_flags(p)


def _add_worker_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--role", choices=["prefill", "decode", "both"], default=None, help="default: the command name")
    p.add_argument("--worker-id", default=None, help="this worker's name on the router (default: ROLE-PID)")
    p.add_argument("--router-addr", default=None,
                   help=help_with_default("router control socket", WorkerConfig, "router_addr"))
    p.add_argument("--host", default=None,
                   help=help_with_default("bind host for the peer socket", WorkerConfig, "host"))
    p.add_argument("--port", type=int, default=None, help="peer socket port (default 0: any free port)")
    p.add_argument("--heartbeat-s", type=float, default=None,
                   help=help_with_default("seconds between heartbeats to the router", WorkerConfig, "heartbeat_s"))
    p.add_argument("--local-prefill-threshold", type=int, default=None,
                   help="decode role: prefill prompts shorter than this itself (default 0: never)")
    p.add_argument("--session-suffix-threshold", type=int, default=None,
                   help=help_with_default("decode role: a held session's turn whose new suffix has at least this many "
                                          "tokens is prefilled by a prefill worker given the held prefix",
                                          WorkerConfig, "session_suffix_threshold"))
    p.add_argument("--session-kv-fraction", type=float, default=None,
                   help=help_with_default("share of the KV pool agent sessions may keep pinned between turns",
                                          WorkerConfig, "session_kv_fraction"))
    p.add_argument("--session-host-gib", type=float, default=None,
                   help="host-memory tier (GiB) for sessions let go from the KV pool (default 0: off)")
    p.add_argument("--session-disk-dir", default=None,
                   help="disk tier directory for sessions (with --session-disk-gib; default: none)")
    p.add_argument("--session-disk-gib", type=float, default=None, help="disk tier budget in GiB (default 0: off)")
    p.add_argument("--session-ttl-s", type=float, default=None,
                   help=help_with_default("drop a session idle this long from every tier", WorkerConfig, "session_ttl_s"))
    p.add_argument("--session-policy", choices=["expected_return", "lru"], default=None,
                   help=help_with_default("session to let go first under KV pressure", WorkerConfig, "session_policy"))
    p.add_argument("--drain-timeout-s", type=float, default=None,
                   help=help_with_default("on SIGTERM, seconds to finish running requests",
                                          WorkerConfig, "drain_timeout_s"))
    p.add_argument("--keys-dir", default=None,
                   help="CurveZMQ keys (splitserve keys DIR): only allow-listed peers reach this worker's sockets "
                        "(default: none; `splitserve up` makes its own)")
    p.add_argument("--router-queue-limit", type=int, default=None,
                   help=help_with_default("messages queued for an unreachable router before its requests are "
                                          "aborted here", WorkerConfig, "router_queue_limit"))


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"HF model dir, dummy:<shape> or {BUILTIN_MODEL} (default)")
    p.add_argument("--load-format", choices=["auto", "safetensors", "dummy"], default=None,
                   help=help_with_default("how weights load; dummy: random weights of the model's shape",
                                          EngineConfig, "load_format"))
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default=None,
                   help="weights and KV dtype (default auto: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help=help_with_default("device to run on", EngineConfig, "device"))
    p.add_argument("--device-index", type=int, default=None,
                   help=help_with_default("GPU index with --device cuda", EngineConfig, "device_index"))
    p.add_argument("--seed", type=int, default=None,
                   help=help_with_default("seed of dummy weights and of sampling without a request seed",
                                          EngineConfig, "seed"))
    p.add_argument("--page-size", type=int, default=None,
                   help=help_with_default("tokens per KV page", EngineConfig, "page_size"))
    p.add_argument("--num-pages", type=int, default=None,
                   help="KV pages (default: from --kv-cache-memory-fraction on cuda, --cpu-kv-cache-mb on cpu)")
    p.add_argument("--cpu-kv-cache-mb", type=int, default=None,
                   help=help_with_default("KV pool size on cpu in MB", EngineConfig, "cpu_kv_cache_mb"))
    p.add_argument("--kv-cache-memory-fraction", type=float, default=None,
                   help=help_with_default("share of free GPU memory for the KV pool",
                                          EngineConfig, "kv_cache_memory_fraction"))
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help=help_with_default("requests running at once", EngineConfig, "max_num_seqs"))
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help=help_with_default("tokens per step, decode/colocated role",
                                          EngineConfig, "max_num_batched_tokens"))
    p.add_argument("--chunk-size", type=int, default=None,
                   help=help_with_default("decode/colocated role: longest prompt piece per step",
                                          EngineConfig, "chunk_size"))
    p.add_argument("--prefill-token-budget", type=int, default=None,
                   help="prefill role: tokens per step, whole prompts first come first served (default 8192)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt plus output in tokens (default: the model's context length)")
    p.add_argument("--attention-backend", choices=["auto", "torch", "triton"], default=None,
                   help="attention kernels (default auto: triton on cuda, torch on cpu)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each greedy decode step (plain or grammar-masked) before reading the previous step's tokens, so host work "
                        "overlaps the device (default on)")
    p.add_argument("--overlap-prefill", choices=["auto", "on", "off"], default=None,
                   help="with --async-scheduling: greedy prompt chunks (a decode worker's session turns and short "
                        "prompts) are queued behind the step in flight too (default auto: on CUDA devices)")
    p.add_argument("--step-window", action=argparse.BooleanOptionalAction, default=None,
                   help="while an overlapped decode step runs, wait for new requests before launching the next, so a "
                        "new prompt runs in the very next step (default on)")
    p.add_argument("--prefill-first-tokens", type=int, default=None,
                   help=help_with_default("decode/colocated role: prompts with at most this many tokens left to "
                                          "compute (a held session's next turn) run in a step of their own, ahead of "
                                          "the decode rows; 0: they join the decode step", EngineConfig,
                                          "prefill_first_tokens"))
    p.add_argument("--prompt-lane", action=argparse.BooleanOptionalAction, default=None,
                   help="with --prefill-first-tokens: those steps run on a high-priority CUDA stream while the decode "
                        "step in flight runs on, instead of queued behind it (default off)")
    p.add_argument("--capture-mixed-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="warm-up captures every CUDA graph of decode rows with short prompt rows (session turns), "
                        "not just one, so none is captured while serving (about 0.1 s each; default: a worker "
                        "started in the decode role does, others do not)")
    p.add_argument("--extra-stop-token-id", type=int, action="append", default=None,
                   help="a token id that ends generation besides EOS; repeat for several (default: none)")


def _add_transfer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transfer", choices=list(TRANSFER_BACKENDS), default=None,
                   help="KV transfer backend (default auto: one-sided cuda_ipc/shm writes on one host, zmq otherwise)")
    p.add_argument("--transfer-host", default=None,
                   help=help_with_default("bind host of the KV transfer listener", TransferConfig, "host"))
    p.add_argument("--transfer-port", type=int, default=None, help="KV transfer port (default 0: any free port)")
    p.add_argument("--lease-s", type=float, default=None,
                   help=help_with_default("a KV transfer with no frame for this long fails", TransferConfig, "lease_s"))
    p.add_argument("--failure-policy", choices=["fail", "recompute"], default=None,
                   help=help_with_default("decode role, after a lost KV transfer", TransferConfig, "failure_policy"))
    p.add_argument("--ucx-progress", choices=["auto", "polling", "blocking"], default=None,
                   help=help_with_default("UCX progress thread: auto = polling on CUDA (cuda_ipc raises no wakeup), "
                                          "blocking on CPU", TransferConfig, "ucx_progress"))


def _pick(args: argparse.Namespace, env: dict[str, str], names: Mapping[str, type]) -> dict[str, object]:
    """Flags win over SPLITSERVE_* environment variables; unset ones keep the config default."""
    out: dict[str, object] = {}
    for name, typ in names.items():
        val = getattr(args, name, None)
        if val is None and name in env:
            val = typ(env[name])
        if val is not None:
            out[name] = val
    return out


def build_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> WorkerConfig:
    env = env_overrides(environ=environ)
    eng = _pick(args, env, _ENGINE_FLAGS)
    if args.extra_stop_token_id:
        eng["extra_stop_token_ids"] = tuple(args.extra_stop_token_id)
    tr = _pick(args, env, _TRANSFER_FLAGS)
    tr_cfg = {"backend": tr.pop("transfer", "auto"), **{k.replace("transfer_", ""): v for k, v in tr.items()}}
    wk = _pick(args, env, _WORKER_FLAGS)
    if "host" in wk:
        tr_cfg.setdefault("host", wk["host"])  # peers reach the KV receiver where they reach the worker
    wk.setdefault("role", "both" if args._command == "worker" else args._command)
    from splitserve.core.hub import is_repo_id, resolve_model

    if "model" in eng and is_repo_id(eng["model"]):
        eng["model"] = resolve_model(eng["model"])  # a Hugging Face repo id -> its cached snapshot
    return WorkerConfig(engine=EngineConfig(**eng), transfer=TransferConfig(**tr_cfg), **wk)


def main(args: argparse.Namespace) -> int:
    from splitserve.core.hub import ModelNotFound

    try:
        cfg = build_config(args)
    except ModelNotFound as exc:
        logger.error("%s", exc)
        return 2
    return run_worker(cfg)


def _curve(cfg: WorkerConfig) -> dict[str, str]:
    """The KV sockets' CurveZMQ settings from ``--keys-dir``: this worker's own named key pair when the folder has one
    for ``--worker-id``, else the shared worker key pair. A sender takes each receiver's public key from the
    descriptor (``KVDescriptor.receiver_key``), the shared worker public key when the descriptor has none."""
    if not cfg.keys_dir:
        return {}
    from splitserve.core import keys

    k = keys.load(cfg.keys_dir, "worker", name=cfg.worker_id)
    return {"curve_public_key": k.public.decode(), "curve_secret_key": k.secret.decode(),
            "curve_server_key": k.worker_public.decode() if k.worker_public else None,
            "curve_allowed_dir": k.allowed_dir}


def run_worker(cfg: WorkerConfig) -> int:
    """Build the engine, both services and the transfer endpoints; run until SIGTERM (then drain)."""
    from splitserve.core.engine.engine import LLMEngine
    from splitserve.core.engine.service import WorkerCore
    from splitserve.decode.worker import DecodeService
    from splitserve.prefill.worker import PrefillService
    import torch

    from splitserve.transfer.base import KVLayout
    from splitserve.transfer.registry import make_copy_engine, make_receiver, make_sender, resolve

    # ZeroMQ and UCX bind and advertise addresses, not names (compose service names, pod hostnames): resolve here.
    transfer = cfg.transfer.model_copy(update={"host": socket.gethostbyname(cfg.transfer.host), **_curve(cfg)})
    cfg = cfg.model_copy(update={"transfer": transfer})
    device = torch.device(cfg.engine.device, cfg.engine.device_index if cfg.engine.device == "cuda" else None)
    backend = resolve(cfg.transfer.backend, device.type)
    copy_engine = make_copy_engine(backend, device, host=cfg.transfer.host)
    engine = LLMEngine(cfg.engine, allocate=copy_engine.allocate if copy_engine is not None else None)
    if cfg.engine.device == "cuda":  # before registering: no compile or graph capture inside a request
        logger.info("worker warm-up: %s", engine.warmup(mixed_graphs=cfg.captures_mixed_graphs))
    info = engine.info
    mc = engine.model_config
    layout = KVLayout(
        model_id=info.model_id,
        dtype=str(info.dtype).removeprefix("torch."),
        num_layers=mc.num_layers,
        num_kv_heads=mc.num_kv_heads,
        head_dim=mc.head_dim,
        page_size=info.page_size,
    )
    sender = make_sender(cfg.transfer, engine.kv_cache, layout, copy_engine)
    receiver = make_receiver(cfg.transfer, engine.kv_cache, layout, copy_engine)
    core = WorkerCore(cfg, engine)
    how = backend + (" (auto)" if cfg.transfer.backend == "auto" else "")
    if receiver.pool_export is not None:
        how += ", same-host peers write into this pool directly"
    logger.info("worker %s: KV transfer over %s, receiving at %s", core.worker_id, how, receiver.address)
    prefill = PrefillService(core, sender, layout.token_bytes())
    decode = DecodeService(core, receiver, layout, cfg.transfer)
    engine.runner.layer_hook = prefill.layer_hook
    core.install_signal_handlers()
    try:
        core.run()
    finally:
        decode.close()
        sender.close()
        core.close()
    return 0
