"""Admin API (bearer token) and the status page.

Admin endpoints need ``Authorization: Bearer <RouterConfig.admin_token>``; without a configured token
they are disabled (403); a missing or wrong token gets 401.

* ``GET /admin/workers``: every worker with role, health, load and KV usage.
* ``POST /admin/workers``: register an external worker (a :class:`Register` body as JSON).
* ``POST /admin/workers/{id}/drain``: the worker finishes in-flight work and gets no new requests; it drops the
  agent sessions it holds, and the reply lists the ones routed to it (``sessions_dropped``: their next turns are
  prefilled in full elsewhere).
* ``POST /admin/workers/{id}/role`` ``{"role": "prefill" | "decode" | "both"}``: switch its role (to ``prefill``: its
  sessions are dropped and listed as on a drain).
* ``DELETE /admin/workers/{id}``: deregister (its in-flight requests fail with a clear error).
* ``GET /admin/sessions``: agent sessions with the worker holding each, its KV tokens, tier and idle seconds (from
  the workers' heartbeats, at most 256 per worker, plus sessions the router routes whose KV no worker reports).
* ``DELETE /admin/sessions/{id}``: end a session: the workers holding it drop it from every tier.

Read-only and public: ``GET /`` and ``GET /status`` (the status page, ``static/``), ``GET /status.json``.
"""

from __future__ import annotations

import hmac
import logging
import time
from pathlib import Path
from typing import Any, get_args

import msgspec
from aiohttp import web

from splitserve.core.messages import Drain, EndSession, Register, Role
from splitserve.router.control import switch_role
from splitserve.router.openai_api import APIError, bad_request, parse_json_body
from splitserve.router.service import SERVICE, RouterService

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
_ROLES = get_args(Role)


def _check_token(request: web.Request) -> RouterService:
    svc = request.app[SERVICE]
    token = svc.config.admin_token
    if token is None:
        raise APIError(403, "the admin API is disabled (no admin token configured)", type="permission_denied")
    given = request.headers.get("Authorization", "")
    if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), token.encode()):
        raise APIError(401, "missing or invalid admin token", type="authentication_error")
    return svc


def _worker(svc: RouterService, request: web.Request) -> Any:
    wid = request.match_info["worker_id"]
    w = svc.registry.get(wid)
    if w is None:
        raise APIError(404, f"no worker with id '{wid}'", type="not_found", param="worker_id")
    return w


def status_json(svc: RouterService) -> dict[str, Any]:
    """What the status page shows: workers, queue depths, recent TTFT/TPOT."""
    now = svc.registry.now()
    return {
        "model": svc.model_name,
        "time": time.time(),
        "healthy": svc.healthy(),
        "inflight": svc.inflight,
        "max_queued_requests": svc.config.max_queued_requests,
        "policies": {"prefill": svc.config.prefill_policy, "decode": svc.config.decode_policy},
        "workers": [w.to_json(now, addresses=False) for w in svc.registry.all()],  # public: no internal endpoints
        "history": list(svc.metrics.history),
    }


async def list_workers(request: web.Request) -> web.Response:
    svc = _check_token(request)
    now = svc.registry.now()
    return web.json_response({"workers": [w.to_json(now) for w in svc.registry.all()]})


async def register(request: web.Request) -> web.Response:
    svc = _check_token(request)
    body = parse_json_body(await request.read())
    try:
        msg = msgspec.convert({**body, "type": "Register"}, Register)
    except msgspec.ValidationError as exc:
        raise bad_request(f"invalid worker registration: {exc}") from exc
    old = svc.registry.register(msg.worker_id.encode(), msg, external=True)
    if old is not None:
        svc.control.fail_worker_streams(msg.worker_id, f"worker {msg.worker_id} re-registered by an admin")
    return web.json_response(svc.registry.get(msg.worker_id).to_json(svc.registry.now()), status=201)


async def drain(request: web.Request) -> web.Response:
    svc = _check_token(request)
    w = _worker(svc, request)
    w.draining = True
    sent = await svc.control.send(w, Drain())
    dropped = svc.forget_sessions_of(w.worker_id)
    logger.info("admin: worker %s draining (drain message %s; %d sessions dropped)", w.worker_id,
                "sent" if sent else "not delivered", len(dropped))
    return web.json_response({"worker_id": w.worker_id, "draining": True, "delivered": sent,
                              "sessions_dropped": dropped})


async def set_role(request: web.Request) -> web.Response:
    svc = _check_token(request)
    w = _worker(svc, request)
    role = parse_json_body(await request.read()).get("role")
    if role not in _ROLES:
        raise bad_request(f"invalid field 'role': must be one of {', '.join(_ROLES)}", param="role")
    sent = await switch_role(svc.control, w, role)
    dropped = svc.forget_sessions_of(w.worker_id) if sent and role == "prefill" else []
    logger.info("admin: worker %s role -> %s (%s; %d sessions dropped)", w.worker_id, role,
                "sent" if sent else "not delivered", len(dropped))
    return web.json_response({"worker_id": w.worker_id, "role": w.role, "delivered": sent,
                              "sessions_dropped": dropped}, status=200 if sent else 502)


async def deregister(request: web.Request) -> web.Response:
    svc = _check_token(request)
    w = _worker(svc, request)
    svc.registry.remove(w.worker_id)
    svc.control.fail_worker_streams(w.worker_id, f"worker {w.worker_id} was deregistered by an admin")
    return web.json_response({"worker_id": w.worker_id, "removed": True})


MAX_LISTED_SESSIONS = 10_000
"""Sessions ``GET /admin/sessions`` lists at most."""


def _reported_sessions(svc: RouterService) -> list[dict[str, Any]]:
    """What the workers' last heartbeats say they hold, one entry per (session, worker)."""
    out = []
    for w in svc.registry.all():
        stats = w.heartbeat.sessions if w.heartbeat is not None else None
        for r in stats.sessions if stats is not None else ():
            out.append({"session_id": r.session_id, "worker": w.worker_id, "tokens": r.tokens, "tier": r.tier,
                        "idle_s": r.idle_s, "routed_here": svc.sessions.get(r.session_id) == w.worker_id})
    return out


async def list_sessions(request: web.Request) -> web.Response:
    svc = _check_token(request)
    listed = _reported_sessions(svc)
    seen = {e["session_id"] for e in listed}
    for sid, wid in svc.sessions.items():  # routed to a worker that reports no KV for it (dropped, or not yet told)
        if len(listed) >= MAX_LISTED_SESSIONS:
            break
        if sid not in seen:
            listed.append({"session_id": sid, "worker": wid, "tokens": 0, "tier": None, "idle_s": None,
                           "routed_here": True})
    return web.json_response({"sessions": listed[:MAX_LISTED_SESSIONS], "routed": len(svc.sessions)})


async def end_session(request: web.Request) -> web.Response:
    """End a session everywhere: the router forgets its holder and every worker reporting it drops it."""
    svc = _check_token(request)
    sid = request.match_info["session_id"]
    holders = {e["worker"] for e in _reported_sessions(svc) if e["session_id"] == sid}
    routed = svc.sessions.pop(sid, None)
    svc.metrics.sessions.set(len(svc.sessions))
    if routed is not None:
        holders.add(routed)
    if not holders:
        raise APIError(404, f"no session with id '{sid}'", type="not_found", param="session_id")
    delivered = {}
    for wid in sorted(holders):
        w = svc.registry.get(wid)
        delivered[wid] = w is not None and await svc.control.send(w, EndSession(session_id=sid))
    logger.info("admin: session %s ended (workers %s)", sid, delivered)
    return web.json_response({"session_id": sid, "ended": True, "workers": delivered})


async def status_data(request: web.Request) -> web.Response:
    return web.json_response(status_json(request.app[SERVICE]))


async def status_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


def add_routes(app: web.Application) -> None:
    """Admin, status page and static routes on ``app`` (the service is ``app[SERVICE]``)."""
    app.router.add_get("/admin/workers", list_workers)
    app.router.add_post("/admin/workers", register)
    app.router.add_post("/admin/workers/{worker_id}/drain", drain)
    app.router.add_post("/admin/workers/{worker_id}/role", set_role)
    app.router.add_delete("/admin/workers/{worker_id}", deregister)
    app.router.add_get("/admin/sessions", list_sessions)
    app.router.add_delete("/admin/sessions/{session_id}", end_session)
    app.router.add_get("/status.json", status_data)
    app.router.add_get("/", status_page)
    app.router.add_get("/status", status_page)
    app.router.add_static("/static/", STATIC_DIR)
