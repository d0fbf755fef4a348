"""``splitserve router``: the HTTP front end (OpenAI-compatible API, admin, status page).

Configuration: flags, else ``SPLITSERVE_*`` environment variables (``SPLITSERVE_PORT=8000``,
``SPLITSERVE_ADMIN_TOKEN=...``), else :class:`~splitserve.core.config.RouterConfig` defaults.
SIGTERM / SIGINT: stop accepting new requests (503), let in-flight streams finish for up to
``--grace-period`` seconds, then exit.

API keys: ``--api-key`` (repeatable, or comma-separated), ``SPLITSERVE_API_KEY`` (comma-separated) or
``--api-key-file`` (one a line); the file or the variable keep them out of ``ps``. They are checked at start (an
unreadable or empty key file exits with status 2) and never logged.

HTTPS: ``--tls-certfile`` and ``--tls-keyfile`` (aliases ``--ssl-certfile`` / ``--ssl-keyfile``; variables
``SPLITSERVE_TLS_CERTFILE`` / ``SPLITSERVE_TLS_KEYFILE``) serve the API over TLS 1.2+; ``--tls-ca-certs`` also
requires every client to present a certificate signed by those CAs. :func:`tls_context` builds the context before
anything starts: a missing, unreadable or invalid file exits with status 2 and one line naming the flag.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
from typing import Any

import zmq
from aiohttp import web

from splitserve.core.config import RouterConfig, env_overrides, help_with_default

logger = logging.getLogger(__name__)

_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("model", str, "model directory or builtin:... (tokenizer and served name)"),
    ("host", str, "HTTP bind host"),
    ("port", int, "HTTP port (0: any free port)"),
    ("control_host", str, "control socket bind host (workers connect here)"),
    ("control_port", int, "control socket port (0: any free port)"),
    ("prefill_policy", str, "round_robin | least_loaded | prefix_aware | power_of_two"),
    ("decode_policy", str, "round_robin | least_loaded | kv_aware | power_of_two"),
    ("max_queued_requests", int, "answer 429 above this many requests in flight"),
    ("request_timeout_s", float, "fail a request (and abort it on the workers) after this many seconds"),
    ("heartbeat_timeout_s", float, "take a worker out of routing after this long without a heartbeat"),
    ("max_workers", int, "worker ids registered at once; more registrations are refused (default 1024)"),
    ("forget_worker_after_s", float, "forget a worker (registry, /metrics, /status) silent this long (default 300)"),
    ("admin_token", str, "bearer token of the admin API (unset: admin API disabled; prefer --admin-token-file)"),
    ("admin_token_file", str, "file holding the admin token (keeps it out of argv and the environment)"),
    ("chat_template", str, "jinja chat template file for /v1/chat/completions (replaces the model's own)"),
    ("tool_call_parser", str, "llama3_json | hermes: how tool_choice=auto finds tool calls in chat output "
                              "(default: none, auto refused)"),
    ("keys_dir", str, "CurveZMQ keys (splitserve keys DIR): only workers holding an allow-listed key reach the "
                      "control socket"),
    ("slo_ttft_ms", float, "TTFT p90 target of the automatic ratio controller"),
    ("slo_tpot_ms", float, "TPOT p90 target of the automatic ratio controller"),
    ("auto_ratio_interval_s", float, "seconds between automatic ratio decisions"),
    ("auto_ratio_cooldown_s", float, "seconds after a role switch before the next one"),
    ("api_key_file", str, "file of API keys, one a line (# comments allowed)"),
    ("max_body_mb", float, "request bodies above this many MB get 413 (default 8)"),
    ("max_prompt_chars", int, "text prompts above this many characters get 400 before tokenizing "
                              "(default: 8 per token of the workers' context length)"),
    ("idle_timeout_s", float, "close connections idle, or without a whole request head, this long (default 30)"),
    ("body_timeout_s", float, "408 and close when a request body takes longer than this to arrive (default 30)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, typ, help_text in _FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                            help=help_text if "default" in help_text else help_with_default(help_text, RouterConfig,
                                                                                            name))
    parser.add_argument("--served-model-name", dest="served_model_name", nargs="+", default=None, metavar="NAME",
                        help="names clients may use in 'model', the first one in responses (several: aliases; "
                             "default: --model)")
    parser.add_argument("--extra-stop-token-ids", dest="extra_stop_token_ids", default=None,
                        help="comma-separated token ids that end generation besides EOS (default: none)")
    parser.add_argument("--auto-ratio", dest="auto_ratio", action="store_const", const=True, default=None,
                        help="switch worker roles automatically to keep TTFT/TPOT within the SLO")
    parser.add_argument("--api-key", dest="api_key", action="append", default=None, metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on /v1, /tokenize and /detokenize (repeat or "
                             "comma-separate for several keys; argv shows in ps: prefer SPLITSERVE_API_KEY or "
                             "--api-key-file; default: none, no key needed)")
    parser.add_argument("--allowed-origins", dest="allowed_origins", nargs="+", default=None, metavar="ORIGIN",
                        help="browser origins allowed cross-origin (CORS; '*': any); default: none")
    parser.add_argument("--grace-period", type=float, default=30.0,
                        help="seconds in-flight requests may take to finish on SIGTERM (default 30)")
    add_tls_arguments(parser)


TLS_FLAGS = (("tls_certfile", "--ssl-certfile", "PEM certificate (chain) of the HTTPS API; with --tls-keyfile"),
             ("tls_keyfile", "--ssl-keyfile", "PEM private key of --tls-certfile"),
             ("tls_ca_certs", "--ssl-ca-certs", "PEM CA bundle: clients must present a certificate it signed "
                                                "(mutual TLS; optional)"))
"""(dest, vLLM-style alias, help); each also read from ``SPLITSERVE_<DEST>`` when the flag is not given."""


def add_tls_arguments(parser: argparse.ArgumentParser, client_certs: bool = True) -> None:
    """``--tls-certfile``, ``--tls-keyfile`` and (``client_certs``) ``--tls-ca-certs``; ``splitserve up`` shares
    the first two."""
    for dest, alias, help_text in TLS_FLAGS[:None if client_certs else 2]:
        parser.add_argument("--" + dest.replace("_", "-"), alias, dest=dest, default=None, metavar="FILE",
                            help=f"{help_text} (default: ${'SPLITSERVE_' + dest.upper()}, else none: plain HTTP)")


def tls_files(args: argparse.Namespace, environ: dict[str, str] | None = None) -> dict[str, str | None]:
    """The TLS file flags, each from its flag, else its ``SPLITSERVE_*`` variable."""
    env = os.environ if environ is None else environ
    return {dest: getattr(args, dest, None) or env.get("SPLITSERVE_" + dest.upper()) or None
            for dest, _alias, _help in TLS_FLAGS}


def tls_context(tls_certfile: str | None = None, tls_keyfile: str | None = None,
                tls_ca_certs: str | None = None) -> ssl.SSLContext | None:
    """The server's TLS context, or ``None`` without a certificate; ``ValueError`` naming the flag when a file is
    missing, unreadable or not a PEM certificate / key, or when only one of certificate and key is given."""
    if not tls_certfile and not tls_keyfile:
        if tls_ca_certs:
            raise ValueError("--tls-ca-certs needs --tls-certfile and --tls-keyfile")
        return None
    if not (tls_certfile and tls_keyfile):
        raise ValueError("--tls-certfile and --tls-keyfile must be given together")
    for flag, path in (("--tls-certfile", tls_certfile), ("--tls-keyfile", tls_keyfile),
                       ("--tls-ca-certs", tls_ca_certs)):
        if path:
            _check_readable(flag, path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls_certfile, tls_keyfile)
    except ssl.SSLError as exc:
        raise ValueError(f"--tls-certfile {tls_certfile} / --tls-keyfile {tls_keyfile}: not a PEM certificate and "
                         f"its private key ({exc.reason or exc})") from None
    if tls_ca_certs:
        try:
            ctx.load_verify_locations(cafile=tls_ca_certs)
        except ssl.SSLError as exc:
            raise ValueError(f"--tls-ca-certs {tls_ca_certs}: not a PEM CA bundle ({exc.reason or exc})") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _check_readable(flag: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ValueError(f"{flag} {path}: {exc.strerror or exc}") from None


def config_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> RouterConfig:
    """Flags override ``SPLITSERVE_*`` variables, which override defaults (unknown variables ignored)."""
    fields = set(RouterConfig.model_fields)
    values: dict[str, Any] = {k: v for k, v in env_overrides(environ=environ).items() if k in fields}
    if isinstance(values.get("extra_stop_token_ids"), str):
        values["extra_stop_token_ids"] = _ids(values["extra_stop_token_ids"])
    for name in fields:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = _ids(v) if name == "extra_stop_token_ids" else v
    return with_model_resolved(RouterConfig.from_mapping(values))


def with_model_resolved(config: RouterConfig) -> RouterConfig:
    """``config`` whose ``model`` is a directory (a Hugging Face repo id resolved through the local cache, see
    core/hub.py); the repo id stays the served name unless ``served_model_name`` is set. Raises ``ValueError``."""
    from splitserve.core.hub import is_repo_id, resolve_model

    if not is_repo_id(config.model):
        return config
    names = config.served_model_name or (config.model,)
    return config.model_copy(update={"model": resolve_model(config.model), "served_model_name": names})


def _ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise ValueError(f"extra_stop_token_ids must be comma-separated ints, got {text!r}") from exc


async def serve(config: RouterConfig, grace_period_s: float, stop: asyncio.Event | None = None,
                ssl_context: ssl.SSLContext | None = None) -> None:
    """Run the router until ``stop`` is set or SIGTERM/SIGINT arrives, then shut down gracefully; HTTPS with
    ``ssl_context``."""
    from splitserve.router.app import SERVICE, create_app, runner_options

    app = create_app(config)
    runner = web.AppRunner(app, **runner_options(config))
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, ssl_context=ssl_context)
    await site.start()
    svc = app[SERVICE]
    port = runner.addresses[0][1]
    scheme = "https" if ssl_context is not None else "http"
    logger.info("router serving %s at %s://%s:%d (control %s); API keys: %d", svc.model_name, scheme, config.host,
                port, svc.control.address, len(svc.api_keys))
    print(f"SplitServe router listening on {scheme}://{config.host}:{port} (workers: {svc.control.address})",
          flush=True)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("shutting down: no new requests; %d in flight get up to %.0f s", svc.inflight, grace_period_s)
    svc.accepting = False
    deadline = loop.time() + grace_period_s
    while svc.inflight > 0 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if svc.inflight:
        logger.warning("grace period over: %d requests still in flight are cut off", svc.inflight)
    await runner.cleanup()


def admin_token_from_file(config: RouterConfig) -> RouterConfig:
    """``config`` with the admin token read from ``admin_token_file`` (``ValueError`` if empty, ``OSError`` if
    unreadable)."""
    if not config.admin_token_file:
        return config
    with open(config.admin_token_file, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"--admin-token-file {config.admin_token_file} is empty")
    return config.model_copy(update={"admin_token": token})


def main(args: argparse.Namespace) -> int:
    from splitserve.router.service import load_api_keys

    try:
        config = admin_token_from_file(config_from_args(args))
        load_api_keys(config)
        ssl_context = tls_context(**tls_files(args))
    except (ValueError, OSError) as exc:  # pydantic.ValidationError is a ValueError; an unreadable key file
        logger.error("invalid router configuration: %s", exc)
        return 2
    try:
        import uvloop
    except ImportError:
        logger.warning("uvloop is not installed; using the default asyncio loop")
        run = asyncio.run
    else:
        run = uvloop.run
    try:
        run(serve(config, args.grace_period, ssl_context=ssl_context))
    except (OSError, zmq.ZMQError) as exc:  # a port in use, an address this host does not have: one line, no traceback
        logger.error("router cannot listen (HTTP %s:%d, control %s:%d): %s", config.host, config.port,
                     config.control_host, config.control_port, str(exc).lower())
        return 2
    return 0
