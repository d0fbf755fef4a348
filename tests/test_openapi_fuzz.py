"""Fuzz the router's HTTP API from its own OpenAPI document (issues 10 and 12), with schemathesis.

1. A real router and one prefill and one decode worker (processes, built-in model, a 64-token context so every
   generated request is short; at most 16 requests on the workers at once, so a fuzzed list of prompts times
   ``n`` gets its 429 instead of running a thousand choices), as tests/cluster.py starts them.
2. ``GET /openapi.json`` is the document (router/openapi.py, built from the request models): it must be OpenAPI
   3.1 and list every public route.
3. schemathesis generates requests for every operation from it, valid and invalid (derandomized: the same cases
   every run; a bounded number per operation), and checks each answer: never a 5xx, only documented status codes
   and content types, bodies that match the document, and every 4xx in OpenAI's error shape
   ``{"error": {"message", "type", "param", "code"}}`` (negative cases must be refused with a 4xx).
4. Afterwards the workers are alive, serve a normal request, and hold zero KV pages; no process logged a traceback.
"""

from __future__ import annotations

import json
import socket
import sys
import urllib.request
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import checks  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from cluster import Cluster  # noqa: E402

MODEL = "builtin:tiny-random-llama"
PUBLIC_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/version",
                 "/health", "/metrics", "/openapi.json"}
ERROR_FIELDS = {"message", "type", "param", "code"}
MAX_EXAMPLES = 25
"""Per operation (and generation mode): about 30 s for the whole run on 2 CPU cores."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(MODEL, log_dir=tmp_path_factory.mktemp("fuzz-logs"),
                worker_args=["--max-model-len", "64", "--page-size", "8", "--num-pages", "64"],
                router_args=["--max-queued-requests", "16"])  # a list of prompts times n is one request each
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def api_schema(cluster):
    return schemathesis.openapi.from_url(f"{cluster.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_openapi_document_lists_every_public_route(cluster):
    doc = _get_json(f"{cluster.url}/openapi.json")
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == PUBLIC_ROUTES
    schemas = doc["components"]["schemas"]
    assert {"CompletionRequest", "ChatCompletionRequest", "TokenizeRequest", "DetokenizeRequest",
            "ErrorResponse"} <= set(schemas)
    assert {"prompt", "max_tokens", "temperature", "n"} <= set(schemas["CompletionRequest"]["properties"])


NOT_PUBLIC = ("/admin", "/status", "/static")
"""Operator routes (admin API, status page): not in the public document."""


def test_the_document_describes_every_public_route_of_the_app():
    """Kept true: a route added to the app without its operation in router/openapi.py fails here."""
    import zmq.asyncio

    from splitserve.core.config import RouterConfig
    from splitserve.core.tokenizer import load_tokenizer
    from splitserve.router.app import create_app
    from splitserve.router.openapi import build_document
    from splitserve.router.service import SERVICE

    ctx = zmq.asyncio.Context()
    try:
        app = create_app(RouterConfig(model=MODEL, control_port=0), load_tokenizer(MODEL), ctx=ctx)
        app[SERVICE].pool.shutdown()
        routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    finally:
        ctx.term()
    public = {(m, p) for m, p in routes if p != "/" and not p.startswith(NOT_PUBLIC)}
    doc = build_document()
    assert public == {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    keyed = build_document(api_keys=True)["paths"]
    assert {p for p, ops in keyed.items() if any("security" in op for op in ops.values())} == {
        "/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize"}


def openai_error_shape(ctx, response, case):
    """Every 4xx and 5xx body is ``{"error": {"message", "type", "param", "code"}}`` (message and type strings)."""
    if response.status_code < 400:
        return None
    body = json.loads(response.content)
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or set(error) != ERROR_FIELDS:
        raise AssertionError(f"{response.status_code} without an OpenAI-shaped error body: {response.content[:300]!r}")
    if not isinstance(error["message"], str) or not isinstance(error["type"], str):
        raise AssertionError(f"error message and type must be strings: {error}")
    return None


CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, checks.response_headers_conformance, checks.negative_data_rejection,
          checks.unsupported_method, checks.allow_header_conformance, checks.missing_required_header]


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_every_route_answers_fuzzed_requests_within_its_document(case):
    case.call_and_validate(checks=CHECKS, additional_checks=[openai_error_shape], timeout=60)


def _raw(cluster, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", cluster.port), timeout=30) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("request_line, allow", [
    (b"TRACE /v1/completions", b"POST"),
    (b"POST /v1/models", b"GET"),  # was a 415 (the content-type check ran before routing)
])
def test_an_undeclared_method_gets_405_with_allow_and_the_error_shape(cluster, request_line, allow):
    """Found by schemathesis (ST204): the error middleware dropped aiohttp's ``Allow`` header, and a POST without a
    JSON body to a GET route got 415."""
    answer = _raw(cluster, request_line + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    allowed = [line.split(b":", 1)[1] for line in lines[1:] if line.lower().startswith(b"allow:")]
    assert lines[0].split()[1] == b"405" and allowed and allow in allowed[0], head
    assert set(json.loads(body)["error"]) == ERROR_FIELDS


def test_a_malformed_request_head_is_a_400_and_one_log_line_without_traceback(cluster):
    """Found by schemathesis (a NUL byte in a header): aiohttp logged an ERROR with a traceback for any such
    client; the last test checks that no process log holds one."""
    answer = _raw(cluster, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Probe: \x00\r\n\r\n")
    assert answer.split(b"\r\n")[0].split()[1] == b"400", answer[:200]


def test_after_the_fuzz_the_workers_serve_and_hold_no_pages(cluster):
    assert all(p.poll() is None for p in cluster.procs.values()), {k: p.poll() for k, p in cluster.procs.items()}
    req = urllib.request.Request(f"{cluster.url}/v1/completions", method="POST",
                                 headers={"Content-Type": "application/json"},
                                 data=json.dumps({"prompt": "Once upon a time", "max_tokens": 8,
                                                  "temperature": 0}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        body = json.loads(r.read())
    assert body["choices"][0]["finish_reason"] in ("length", "stop") and body["usage"]["completion_tokens"] >= 1
    used = cluster.wait_pages_free(timeout_s=30)
    assert used and not any(used.values()), used
    assert cluster.tracebacks() == []
