"""The router's OpenAPI 3.1 document (``GET /openapi.json``), built from the request models at run time.

1. :func:`request_schemas`: the JSON Schema of each request model of router/openai_api.py
   (``model_json_schema``, so a field added there is in the document without an edit here), with their shared
   ``$defs`` moved to ``components.schemas``; where a model's own schema cannot say what it checks (``prompt``
   is ``Any``, checked by a validator), :data:`_FIELD_OVERRIDES` says it.
2. :data:`_RESPONSES`: the response bodies (completion, chat completion, models, tokenize, detokenize, version,
   health) and the one error shape of every 4xx and 5xx, ``{"error": {"message", "type", "param", "code"}}``.
3. :func:`build_document`: one operation per public route (the OpenAI API, ``/tokenize``, ``/detokenize``,
   ``/version``, ``/health``, ``/metrics`` and this document), with its request body, its answers (JSON, or
   Server-Sent Events for a stream) and every error status the route can give; with API keys configured, the
   bearer scheme on the routes that need it (``/v1/*``, ``/tokenize``, ``/detokenize``).
4. :func:`add_route`: ``GET /openapi.json`` on the app, the document built once when the app is made.

tests/test_openapi_fuzz.py fuzzes a live router from this document (schemathesis).
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from splitserve.router.openai_api import (
    MAX_TOKEN_ID, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
)
from splitserve.router.version import package_version

logger = logging.getLogger(__name__)

_REF = "#/components/schemas/{model}"
REQUEST_MODELS: tuple[type[BaseModel], ...] = (CompletionRequest, ChatCompletionRequest, TokenizeRequest,
                                               DetokenizeRequest)

_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID}}
_STRINGS = {"type": "array", "minItems": 1, "items": {"type": "string"}}
_PROMPT = {"title": "Prompt", "description": "a string, a list of strings, a list of token ids or a list of "
           "token-id lists", "anyOf": [{"type": "string"}, _STRINGS, _TOKEN_IDS,
                                       {"type": "array", "minItems": 1, "items": _TOKEN_IDS}]}
_LOGIT_BIAS = {"title": "Logit Bias", "anyOf": [
    {"type": "object", "propertyNames": {"pattern": "^[0-9]{1,10}$"},
     "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}, {"type": "null"}]}
_FIELD_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "CompletionRequest": {"prompt": _PROMPT, "logit_bias": _LOGIT_BIAS},
    "ChatCompletionRequest": {"logit_bias": _LOGIT_BIAS},
}
"""What a model's validators check that its generated schema cannot show (copied into each document)."""


def request_schemas() -> dict[str, dict[str, Any]]:
    """Step 1: ``components.schemas`` for the request models (name -> schema), their ``$defs`` included."""
    out: dict[str, dict[str, Any]] = {}
    for model in REQUEST_MODELS:
        schema = model.model_json_schema(ref_template=_REF)
        out.update(schema.pop("$defs", {}))
        for name, override in _FIELD_OVERRIDES.get(model.__name__, {}).items():
            if name in schema.get("properties", {}):
                schema["properties"][name] = copy.deepcopy(override)
        out[model.__name__] = schema
    return out


_NULLABLE_STR = {"type": ["string", "null"]}
_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"], "properties": {
    "prompt_tokens": {"type": "integer", "minimum": 0}, "completion_tokens": {"type": "integer", "minimum": 0},
    "total_tokens": {"type": "integer", "minimum": 0}}}


def _response_body(object_name: str, choice: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
        "id": {"type": "string"}, "object": {"const": object_name}, "created": {"type": "integer"},
        "model": {"type": "string"}, "choices": {"type": "array", "items": choice}, "usage": _USAGE}}


def _choice(extra: dict[str, Any]) -> dict[str, Any]:
    props = {"index": {"type": "integer", "minimum": 0}, "finish_reason": _NULLABLE_STR, **extra}
    return {"type": "object", "required": ["index", "finish_reason", *extra], "properties": props}


def _chunk(object_name: str, choice: dict[str, Any]) -> dict[str, Any]:
    """A streamed chunk: no choice in the last (usage) chunk, ``usage`` null in the others."""
    body = _response_body(object_name, choice)
    body["properties"]["usage"] = {"anyOf": [_USAGE, {"type": "null"}]}
    body["required"] = ["id", "object", "created", "model", "choices"]
    return body


def _event(chunk_schema: str) -> dict[str, Any]:
    """One Server-Sent Event of a stream (in OpenAPI 3.1 a ``text/event-stream`` schema describes each event): its
    data is a JSON chunk, an error in the error shape (after the 200 went out), or the final ``[DONE]``."""
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {
        "anyOf": [{"$ref": _REF.format(model=chunk_schema)}, {"$ref": _REF.format(model="ErrorResponse")}]}}
    return {"type": "object", "required": ["data"],
            "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}}}


_RESPONSES: dict[str, dict[str, Any]] = {
    "ErrorResponse": {"type": "object", "required": ["error"], "additionalProperties": False, "properties": {
        "error": {"type": "object", "required": ["message", "type", "param", "code"], "additionalProperties": False,
                  "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                 "param": _NULLABLE_STR, "code": _NULLABLE_STR}}}},
    "Completion": _response_body("text_completion", _choice({"text": {"type": "string"}})),
    "CompletionChunk": _chunk("text_completion", _choice({"text": {"type": "string"}})),
    "ChatCompletionChunk": _chunk("chat.completion.chunk", _choice({"delta": {"type": "object", "properties": {
        "role": {"const": "assistant"}, "content": _NULLABLE_STR}}})),
    "ChatCompletion": _response_body("chat.completion", _choice({"message": {
        "type": "object", "required": ["role"], "properties": {"role": {"const": "assistant"},
                                                               "content": _NULLABLE_STR}}})),
    "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
        "object": {"const": "list"}, "data": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
                "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                "owned_by": {"type": "string"}, "max_model_len": {"type": "integer"}}}}}},
    "TokenizeResponse": {"type": "object", "required": ["tokens", "count", "max_model_len"], "properties": {
        "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "count": {"type": "integer", "minimum": 0}, "max_model_len": {"type": ["integer", "null"]}}},
    "DetokenizeResponse": {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
    "Version": {"type": "object", "required": ["version"], "properties": {"version": {"type": "string"}}},
    "Health": {"type": "object", "required": ["status"],
               "properties": {"status": {"enum": ["ok", "unavailable"]}}},
}
"""Step 2: response bodies (the fields clients read; more may be present)."""

_ERRORS = {
    "400": "invalid request (the message and ``param`` name the field)", "401": "missing or invalid API key",
    "404": "unknown model", "408": "the body did not arrive in time", "413": "body too large",
    "415": "the body is not application/json", "429": "too many requests in flight",
    "500": "internal error (the router log names the request)", "503": "no workers, or shutting down",
    "504": "the request timed out",
}
_API_ERRORS = ("400", "401", "404", "408", "413", "415", "429", "500", "503", "504")
_TOKENIZER_ERRORS = ("400", "401", "404", "408", "413", "415", "500")
_GET_ERRORS = ("500",)


def _json(schema_name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(model=schema_name)}}}


def _operation(summary: str, ok: dict[str, Any], errors: tuple[str, ...], body: str | None = None,
               secured: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": {"description": "OK", "content": ok}}}
    op["responses"].update({code: {"description": _ERRORS[code], "content": _json("ErrorResponse")}
                            for code in errors})
    if body is not None:
        op["requestBody"] = {"required": True, "content": _json(body)}
    if secured:
        op["security"] = [{"bearer": []}]
    return op


def _paths(secured: bool) -> dict[str, Any]:
    def sse(chunk: str) -> dict[str, Any]:
        return {"text/event-stream": {"schema": _event(chunk)}}

    text = {"text/plain": {"schema": {"type": "string"}}}
    health = _operation("ready to serve: a prefill-capable and a decode-capable worker", _json("Health"), ())
    health["responses"]["503"] = {"description": "not ready", "content": _json("Health")}
    completion = {**_json("Completion"), **sse("CompletionChunk")}
    chat = {**_json("ChatCompletion"), **sse("ChatCompletionChunk")}
    return {
        "/v1/completions": {"post": _operation("text completion (stream: Server-Sent Events)", completion,
                                               _API_ERRORS, "CompletionRequest", secured)},
        "/v1/chat/completions": {"post": _operation("chat completion (stream: Server-Sent Events)", chat,
                                                    _API_ERRORS, "ChatCompletionRequest", secured)},
        "/v1/models": {"get": _operation("served model names", _json("ModelList"), ("401", "500"), None, secured)},
        "/tokenize": {"post": _operation("prompt -> token ids", _json("TokenizeResponse"), _TOKENIZER_ERRORS,
                                         "TokenizeRequest", secured)},
        "/detokenize": {"post": _operation("token ids -> text", _json("DetokenizeResponse"), _TOKENIZER_ERRORS,
                                           "DetokenizeRequest", secured)},
        "/version": {"get": _operation("package version", _json("Version"), _GET_ERRORS)},
        "/health": {"get": health},
        "/metrics": {"get": _operation("Prometheus metrics", text, _GET_ERRORS)},
        "/openapi.json": {"get": _operation("this document", {"application/json": {"schema": {"type": "object"}}},
                                            _GET_ERRORS)},
    }


def build_document(api_keys: bool = False) -> dict[str, Any]:
    """Step 3: the whole document; ``api_keys``: the bearer scheme on ``/v1/*``, ``/tokenize``, ``/detokenize``."""
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "SplitServe router", "version": package_version(),
                 "description": "OpenAI-compatible API of a disaggregated prefill/decode LLM server"},
        "paths": _paths(api_keys),
        "components": {"schemas": {**request_schemas(), **copy.deepcopy(_RESPONSES)}},
    }
    if api_keys:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


def add_route(app: web.Application, api_keys: bool) -> None:
    """Step 4: ``GET /openapi.json``, the document built once here (when the app is made)."""
    body = json.dumps(build_document(api_keys), separators=(",", ":")).encode()

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app.router.add_get("/openapi.json", openapi_json)
