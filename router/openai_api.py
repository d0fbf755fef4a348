"""OpenAI-compatible request models, validation, error bodies and response shapes.

Flow for one request body:
1. :func:`parse_json_body`: JSON object or 400 (invalid JSON or UTF-8, nesting deeper than the parser allows,
   integers of more than 4,300 digits, a lone UTF-16 surrogate in any string: each named in the message). JSON's
   ``NaN`` / ``Infinity`` literals parse, and are refused by the numeric fields below (naming the field).
2. :func:`parse_request`: parameters this server does not implement (``suffix``, ``functions``, ``structured_outputs``...,
   see :data:`REFUSED`; ``tools`` and ``tool_choice`` outside chat) are refused by name; then the pydantic model (other
   unknown fields ignored, like OpenAI's own server does for fields it does not use). Every sampling and scheduling number is strict (a JSON string such
   as ``"0.5"`` is refused), finite (``NaN`` and ``Infinity`` are refused) and inside the ranges below; then the
   rules between fields (``stream_options`` needs ``stream``, ``best_of`` equals ``n``, ``max_tokens=0`` needs
   ``echo``; tools: ``tool_choice`` needs ``tools`` and names one of them, tool names are distinct, each
   ``parameters`` is a JSON schema). Structured output (``response_format`` ``json_object`` / ``json_schema``,
   ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``, or a forced tool call:
   ``tool_choice`` ``"required"`` or a named function) becomes the request's grammar (router/structured.py; one
   kind per request). The first failure becomes :class:`APIError` (HTTP 400) whose message and ``param`` name the
   field.
3. :func:`check_prompt_chars` (before tokenizing): a text prompt, the chat messages or a ``/tokenize`` prompt longer
   than the character limit is a 400 naming ``prompt`` / ``messages``;
   :func:`check_token_ids`: prompt, stop and ``logit_bias`` token ids inside the workers' vocabulary, once known.
4. :func:`to_sampling_params`: the context-length and ``min_tokens <= max_tokens`` checks, then the worker's
   :class:`SamplingParams`, with the grammar (``max_tokens=0`` with ``echo`` asks the worker for one token, which the router drops,
   as vLLM does: the prompt and its logprobs come back, nothing generated). :func:`copy_params` gives copy ``j`` of
   ``n`` its seed: ``seed + j`` (vLLM's rule), so seeded copies differ and each is reproducible.

Responses are plain dicts in OpenAI's shapes (``text_completion``, ``chat.completion`` and their streaming chunks);
``return_token_ids`` adds vLLM's ``token_ids`` / ``prompt_token_ids`` (router/formatting.py).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any, Literal, Optional, Sequence, TypeVar, Union

import msgspec
from pydantic import (
    AllowInfNan, BaseModel, ConfigDict, Field, PrivateAttr, Strict, StrictBool, StrictInt, StrictStr,
    ValidationError, field_validator,
)

from splitserve.core.messages import SamplingParams
from splitserve.router.structured import SpecError, forced_tool_schema, request_grammar, schema_spec

MAX_TOP_LOGPROBS = 20
MAX_TEMPERATURE = 1e4
"""OpenAI allows [0, 2] and vLLM any value >= 0. Logits span tens of units, so far below 1e4 sampling is already
uniform over the kept tokens; a finite bound keeps every value representable in float32 (1e39 is not)."""
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-4, 1e4
"""vLLM allows any value > 0. The penalty divides positive logits and multiplies negative ones, so x and 1/x are
equally strong; beyond 1e4 (or below 1e-4) every seen token is already forced out (or in) for real logits, and
values like 1e-300 only overflow."""
MAX_TOKEN_ID = 2**31 - 1
"""Token ids and top_k fit in 32 bits (ids are also checked against the workers' vocabulary once it is known)."""
SEED_RANGE = (-(2**63), 2**64 - 1)
"""A 64-bit seed, signed or unsigned (what the wire format carries)."""
MAX_N = 128
"""Copies of one prompt per request (``n``); each copy is a request on the workers."""
MAX_LOGIT_BIAS = 100.0
"""OpenAI's range: -100 bans a token, +100 forces it (several +100 tokens: one of them)."""

FiniteFloat = Annotated[float, Strict(), AllowInfNan(False)]
"""A JSON number (an int is accepted), never a string, NaN or infinity."""
TokenId = Annotated[StrictInt, Field(ge=0, le=MAX_TOKEN_ID)]


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def server_error(request_id: str) -> APIError:
    """The catch-all 500: names the request id (the router log has one line for it), never the cause."""
    return APIError(500, f"internal server error (request {request_id}); the router log names the cause",
                    type="server_error")


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
"""A ``\\uD800``-``\\uDFFF`` escape: only then can a decoded string hold a lone surrogate."""


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Decode a request body (module flow, step 1); anything but a JSON object of valid Unicode gives a 400."""
    try:
        body = json.loads(raw)
    except RecursionError as exc:
        raise bad_request("request body is not valid JSON: nested too deeply", code="invalid_json") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, integers past Python's digit limit
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    if _SURROGATE_ESCAPE.search(raw):
        _reject_lone_surrogates(body)
    return body


def _reject_lone_surrogates(body: dict[str, Any]) -> None:
    """400 naming the first string (value or key) holding an unpaired UTF-16 surrogate, which no tokenizer, log
    or UTF-8 encoder takes. Iterative: the parser already bounds the depth."""
    todo: list[tuple[str, Any]] = [("", body)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, dict):
            items = list(value.items())
        elif isinstance(value, list):
            items = [(str(i), v) for i, v in enumerate(value)]
        else:
            items = []
        for key, item in items:
            where = f"{path}.{key}" if path else key
            if not _is_unicode(key) or (isinstance(item, str) and not _is_unicode(item)):
                raise bad_request(f"invalid field '{where}': contains a lone UTF-16 surrogate (not valid Unicode)",
                                  param=where, code="invalid_unicode")
            if isinstance(item, (dict, list)):
                todo.append((where, item))


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- requests ------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False
    """Send a last chunk with the usage of the whole request (its ``choices`` empty)."""
    continuous_usage_stats: StrictBool = False
    """vLLM extra, refused when true (usage on every chunk is not implemented)."""


NAME_PATTERN = r"^[a-zA-Z0-9_.-]{1,64}$"
"""Names of response formats and tools (OpenAI's rule, dots allowed)."""


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: StrictStr = Field(pattern=NAME_PATTERN)
    description: Optional[StrictStr] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    """The JSON schema the output must match (absent: any JSON value)."""
    strict: Optional[StrictBool] = None
    """Accepted either way: the schema is always enforced strictly (by the grammar)."""


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @field_validator("json_schema")
    @classmethod
    def _schema_given(cls, v: JsonSchemaFormat | None, info: Any) -> JsonSchemaFormat | None:
        if v is not None and info.data.get("type") != "json_schema":
            raise ValueError("json_schema is only allowed with type 'json_schema'")
        return v

    def spec(self) -> dict[str, Any]:
        """Plain form for router/structured.py."""
        if self.type == "json_schema" and self.json_schema is None:
            raise bad_request("invalid field 'response_format.json_schema': required with type 'json_schema'",
                              param="response_format.json_schema")
        return self.model_dump(by_alias=True)


class _CommonRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")
    _grammar: Optional[tuple[str, str]] = PrivateAttr(default=None)
    """Structured output: set by :func:`parse_request` (router/structured.py)."""

    model: Optional[StrictStr] = None
    """Optional: this server serves one model (under one or more names)."""
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[StrictInt] = Field(default=None, ge=0)
    temperature: FiniteFloat = Field(default=1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: FiniteFloat = Field(default=1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(default=0, ge=-1, le=MAX_TOKEN_ID)
    """-1 or 0: disabled; any value above the vocabulary size keeps every token."""
    min_p: FiniteFloat = Field(default=0.0, ge=0.0, le=1.0)
    seed: Optional[StrictInt] = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    stop_token_ids: Optional[list[TokenId]] = None
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(default=0, ge=0)
    """At most the request's max_tokens (checked in :func:`to_sampling_params`)."""
    presence_penalty: FiniteFloat = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: FiniteFloat = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: FiniteFloat = Field(default=1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    n: StrictInt = Field(default=1, ge=1, le=MAX_N)
    user: Optional[StrictStr] = None
    """Accepted (OpenAI's end-user id); neither used nor logged."""
    logit_bias: Optional[dict[str, FiniteFloat]] = None
    """Token id (a JSON key, so a string) -> bias in [-100, 100], added to the logits before penalties."""
    include_stop_str_in_output: StrictBool = False
    """vLLM extra: keep the stop string that ended the output at its end."""
    session_id: Optional[StrictStr] = Field(default=None, min_length=1, max_length=256)
    """Agent session (also the ``X-Session-Id`` header): the next turn goes where this turn's KV is kept."""
    session_end: StrictBool = False
    """This is the session's last turn: release what it holds once it finishes."""
    expected_return_s: Optional[FiniteFloat] = Field(default=None, ge=0.0, le=30 * 86400.0)
    """When the agent expects to send the next turn, in seconds (what is released first under memory pressure)."""
    return_token_ids: StrictBool = False
    """vLLM extra: each choice also carries ``token_ids`` (the ids it generated) and the response its prompt's ids
    (``prompt_token_ids``: on each choice for completions, at the top level for chat, as vLLM lays them out).
    Streamed: each chunk's choice has the ids of that chunk, the first chunk the prompt's ids."""
    response_format: Optional[ResponseFormat] = None
    guided_json: Optional[Union[dict[str, Any], StrictStr]] = None
    """vLLM extra: a JSON schema (object or JSON text) the output must match."""
    guided_regex: Optional[StrictStr] = None
    guided_choice: Optional[list[StrictStr]] = None
    guided_grammar: Optional[StrictStr] = None
    """vLLM extra: an EBNF grammar in xgrammar's dialect (GBNF-like: ``root ::= ...``)."""

    @property
    def grammar(self) -> tuple[str, str] | None:
        """The structured-output grammar ``(kind, spec)`` for ``SamplingParams.grammar`` (None: free text)."""
        return self._grammar

    @field_validator("logit_bias")
    @classmethod
    def _bias_ok(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isdigit() or int(key) > MAX_TOKEN_ID:
                raise ValueError(f"keys must be token ids in [0, {MAX_TOKEN_ID}], got {key!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"biases must be in [-100, 100], got {bias} for token {key}")
        return v

    @property
    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple(sorted((int(k), float(b)) for k, b in (self.logit_bias or {}).items()))

    @field_validator("stop")
    @classmethod
    def _stop_non_empty(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in items):
            raise ValueError("stop strings must not be empty")
        return v

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


CommonRequest = _CommonRequest
"""Either request kind (completions or chat)."""
_R = TypeVar("_R", bound=_CommonRequest)

PROMPT_FORMS = "a string, a list of strings, a list of token ids or a list of token-id lists"


class CompletionRequest(_CommonRequest):
    prompt: Any
    """One of :data:`PROMPT_FORMS` (checked by ``_prompt_ok``; :meth:`prompts` gives one entry per prompt)."""
    logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: StrictBool = False
    best_of: Optional[StrictInt] = Field(default=None, ge=1)
    """Only equal to ``n`` (each copy is returned; none is picked as best)."""

    @field_validator("prompt")
    @classmethod
    def _prompt_ok(cls, v: Any) -> Any:
        if isinstance(v, list) and v and _all_token_ids(v):  # one prompt of token ids: checked in one pass
            return v
        items = v if isinstance(v, list) and v else [v]
        if not (all(isinstance(p, str) for p in items) or all(_is_token_list(p) for p in items)):
            raise ValueError(f"must be {PROMPT_FORMS} (token ids: ints in [0, {MAX_TOKEN_ID}], lists non-empty)")
        return v

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: its text, or its token ids (a validated list is all ids or all prompts, so its first
        item says which)."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


def _all_token_ids(items: list) -> bool:
    """Every item is a token id (an ``int``, not a ``bool``, in range); the type check runs in C (``map``), so a
    2,600-id prompt costs tens of microseconds, not hundreds."""
    return not items or (set(map(type, items)) == {int} and 0 <= min(items) and max(items) <= MAX_TOKEN_ID)


def _is_token_list(p: Any) -> bool:
    return isinstance(p, list) and bool(p) and _all_token_ids(p)


class FunctionCall(BaseModel):
    """``function`` of a tool call in an assistant message: ``arguments`` is JSON text."""

    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    arguments: StrictStr


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr = Field(pattern=NAME_PATTERN)
    description: Optional[StrictStr] = None
    parameters: Optional[dict[str, Any]] = None
    """A JSON schema of the arguments object (absent: no arguments)."""
    strict: Optional[StrictBool] = None
    """Accepted either way: forced calls always follow the schema; ``auto`` calls are parsed, not constrained."""


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class _FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr


class NamedToolChoice(BaseModel):
    """``{"type": "function", "function": {"name": ...}}``: the output is a call of that function."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: _FunctionName


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: StrictStr
    content: Optional[Union[StrictStr, list[dict[str, Any]]]] = None
    name: Optional[StrictStr] = None
    tool_calls: Optional[list[ToolCall]] = None
    """Assistant messages: the calls it made (rendered by the chat template)."""
    tool_call_id: Optional[StrictStr] = None
    """``tool`` messages: the call this result answers."""

    def text(self) -> str:
        """Content as text; a list of content parts may only hold ``{"type": "text"}`` parts."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request("only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(default=None, ge=0)
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    """Default: ``"auto"`` with tools, ``"none"`` without."""
    parallel_tool_calls: StrictBool = True
    """With ``tool_choice="required"``: false allows one call only."""

    @property
    def tool_mode(self) -> str:
        """``none``, ``auto``, ``required`` or ``named``."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if self.tool_choice is None:
            return "auto"
        return self.tool_choice if isinstance(self.tool_choice, str) else "named"

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools the chat template renders (none when ``tool_choice`` is ``"none"``)."""
        if self.tool_mode == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools or ()]

    def template_messages(self) -> list[dict[str, Any]]:
        out = []
        for i, m in enumerate(self.messages):
            msg: dict[str, Any] = {"role": m.role, "content": m.text()}
            if m.name is not None:
                msg["name"] = m.name
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if m.tool_calls:
                msg["tool_calls"] = [_template_call(c, f"messages.{i}.tool_calls.{j}.function.arguments")
                                     for j, c in enumerate(m.tool_calls)]
            out.append(msg)
        return out


def _template_call(call: ToolCall, where: str) -> dict[str, Any]:
    """A tool call as chat templates expect it: ``arguments`` as an object (JSON text in the API)."""
    try:
        args = json.loads(call.function.arguments)
    except ValueError as exc:
        raise bad_request(f"invalid field '{where}': not valid JSON: {exc}", param=where) from exc
    return {"id": call.id, "type": call.type, "function": {"name": call.function.name, "arguments": args}}


REFUSED: tuple[tuple[str, Any, str], ...] = (
    ("suffix", lambda v: v is None, "suffix (fill-in-the-middle) is not supported"),
    ("functions", lambda v: v is None or v == [], "the deprecated function calling is not supported: use tools"),
    ("function_call", lambda v: v is None or v == "none",
     "the deprecated function calling is not supported: use tool_choice"),
    ("structured_outputs", lambda v: v is None,
     "not supported: use response_format or guided_json / guided_regex / guided_choice / guided_grammar"),
    ("guided_decoding_backend", lambda v: v is None or v in ("xgrammar", "auto"),
     "only the xgrammar backend is available"),
    ("guided_whitespace_pattern", lambda v: v is None,
     "not supported: JSON output is compact (', ' and ': ' separators, no other whitespace)"),
)
"""(field, accepted(value), why): parameters this server does not implement; any other value is a 400 naming them."""
CHAT_ONLY: tuple[tuple[str, Any], ...] = (
    ("tools", lambda v: v is None or v == []),
    ("tool_choice", lambda v: v is None or v == "none"),
    ("parallel_tool_calls", lambda v: v is None or isinstance(v, bool)),
)
"""(field, accepted(value)) outside /v1/chat/completions: any other value is refused by name."""


_M = TypeVar("_M", bound=BaseModel)


def parse_request(cls: type[_R], body: dict[str, Any]) -> _R:
    """Validate ``body`` as ``cls``; the first error becomes a 400 that names its field (module flow, step 2)."""
    for name, accepted, why in REFUSED:
        if name in body and not accepted(body[name]):
            raise bad_request(f"unsupported field '{name}': {why}", param=name, code="unsupported_parameter")
    if cls is CompletionRequest:
        for name, accepted in CHAT_ONLY:
            if name in body and not accepted(body[name]):
                raise bad_request(f"unsupported field '{name}': tool calling is only for /v1/chat/completions",
                                  param=name, code="unsupported_parameter")
    req = validate_body(cls, body)
    _check_rules(req)
    if isinstance(req, ChatCompletionRequest):
        _check_tools(req)
    req._grammar = _grammar_of(req)
    return req


def _check_tools(req: ChatCompletionRequest) -> None:
    """``tool_choice`` needs ``tools`` and names one of them; tool names are distinct; parameters are schemas."""
    names = [t.function.name for t in req.tools or ()]
    if req.tool_choice not in (None, "none") and not names:
        raise bad_request("invalid field 'tool_choice': needs a non-empty 'tools' list", param="tool_choice")
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise bad_request(f"invalid field 'tools': the function name '{dup}' is listed twice", param="tools")
    if isinstance(req.tool_choice, NamedToolChoice) and req.tool_choice.function.name not in names:
        raise bad_request(f"invalid field 'tool_choice': function '{req.tool_choice.function.name}' is not in "
                          f"'tools' ({', '.join(names)})", param="tool_choice")
    for i, tool in enumerate(req.tools or ()):
        if tool.function.parameters is not None:
            _spec(lambda: schema_spec(tool.function.parameters, f"tools.{i}.function.parameters"))


def _grammar_of(req: _CommonRequest) -> tuple[str, str] | None:
    """The request's structured-output grammar (router/structured.py); 400 naming the field."""
    fields: dict[str, Any] = {name: getattr(req, name) for name in ("guided_json", "guided_regex", "guided_choice",
                                                                    "guided_grammar")}
    fields["response_format"] = req.response_format.spec() if req.response_format is not None else None
    forced = None
    if isinstance(req, ChatCompletionRequest) and req.tool_mode in ("required", "named"):
        tools = [t.model_dump() for t in req.tools or ()]
        choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedToolChoice) else req.tool_choice
        forced = forced_tool_schema(tools, choice, req.parallel_tool_calls)
    return _spec(lambda: request_grammar(fields, forced))


def _spec(make: Any) -> Any:
    try:
        return make()
    except SpecError as exc:
        raise bad_request(exc.message, param=exc.field) from exc


def validate_body(cls: type[_M], body: dict[str, Any]) -> _M:
    """``cls.model_validate(body)``; the first error becomes a 400 that names its field."""
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"] if isinstance(p, int) or not _is_type_tag(str(p))]
        param = ".".join(loc) or None
        msg = err["msg"].removeprefix("Value error, ")
        raise bad_request(f"invalid field '{param}': {msg}", param=param) from exc


def _check_rules(req: _CommonRequest) -> None:
    """Rules between fields: stream_options needs stream, best_of equals n, max_tokens=0 needs echo."""
    if req.stream_options is not None and not req.stream:
        raise bad_request("invalid field 'stream_options': only allowed with stream=true", param="stream_options")
    if req.stream_options is not None and req.stream_options.continuous_usage_stats:
        raise bad_request("invalid field 'stream_options': continuous_usage_stats is not supported",
                          param="stream_options")
    if isinstance(req, CompletionRequest) and req.best_of is not None and req.best_of != req.n:
        raise bad_request(f"invalid field 'best_of': only best_of equal to n ({req.n}) is supported "
                          f"(got {req.best_of})", param="best_of")
    asked, field_name = requested_max_tokens(req)
    if asked == 0 and not (isinstance(req, CompletionRequest) and req.echo):
        raise bad_request(f"invalid field '{field_name}': must be at least 1 (0 only with echo=true, which "
                          "returns the prompt alone)", param=field_name)


def _is_type_tag(part: str) -> bool:
    """pydantic puts union member names (``str``, ``list[int]``...) into error locations."""
    return (part in {"str", "list[int]", "list[str]", "list[dict[str,any]]"}
            or part.startswith(("list[", "function-", "dict[", "literal[")) or part[:1].isupper())


# --- requests -> sampling parameters -------------------------------------------------------------


def check_token_ids(req: _CommonRequest, prompt_ids: Sequence[int], prompt_field: str,
                    vocab_size: int | None) -> None:
    """400 naming the field when a prompt, stop or logit_bias token id is outside ``[0, vocab_size)``
    (``None``: unknown)."""
    if vocab_size is None:
        return
    biased = [t for t, _ in req.logit_bias_pairs]
    for name, ids in ((prompt_field, prompt_ids), ("stop_token_ids", req.stop_token_ids or ()),
                      ("logit_bias", biased)):
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise bad_request(f"invalid field '{name}': token ids must be in [0, {vocab_size}), got {bad}", param=name)


CHARS_PER_TOKEN = 8
"""Default character limit of a text prompt per token of context: about twice what English text takes per token,
so only prompts that cannot fit are refused before the (costly) tokenization."""


def check_prompt_chars(req: BaseModel, limit: int | None) -> None:
    """400 naming ``prompt`` / ``messages`` when a text prompt (each one; for chat, all messages together) has more
    than ``limit`` characters (``None``: no limit known yet). Token-id prompts are not checked here."""
    if limit is None:
        return
    if isinstance(req, ChatCompletionRequest):
        field, lengths = "messages", [sum(len(m.text()) for m in req.messages)]
    elif isinstance(req, CompletionRequest):
        field, lengths = "prompt", [len(p) for p in req.prompts() if isinstance(p, str)]
    else:
        field, lengths = "prompt", [len(getattr(req, "prompt", ""))]
    longest = max(lengths, default=0)
    if longest > limit:
        raise bad_request(f"invalid field '{field}': {longest} characters is more than this server takes before "
                          f"tokenizing ({limit}: {CHARS_PER_TOKEN} per token of the maximum context length, or "
                          "--max-prompt-chars)", param=field, code="context_length_exceeded")


def requested_max_tokens(req: _CommonRequest) -> tuple[int | None, str]:
    """(max tokens asked for or None, the field it came from)."""
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens, "max_completion_tokens"
    return req.max_tokens, "max_tokens"


def to_sampling_params(req: _CommonRequest, num_prompt_tokens: int, max_model_len: int,
                       prompt_field: str) -> SamplingParams:
    """Build worker sampling parameters; 400 when the prompt or prompt + max_tokens exceed the context."""
    if num_prompt_tokens >= max_model_len:
        raise bad_request(
            f"the prompt has {num_prompt_tokens} tokens but this model's maximum context length is "
            f"{max_model_len} tokens (room for at least one new token is needed)",
            param=prompt_field, code="context_length_exceeded")
    room = max_model_len - num_prompt_tokens
    asked, field_name = requested_max_tokens(req)
    default = 16 if isinstance(req, CompletionRequest) else room
    max_tokens = default if asked is None else max(asked, 1)  # 0: echo only (one token, dropped by the router)
    if max_tokens > room:
        raise bad_request(
            f"this model's maximum context length is {max_model_len} tokens; the prompt has "
            f"{num_prompt_tokens} and {field_name} asks for {max_tokens}", param=field_name,
            code="context_length_exceeded")
    if req.min_tokens > max_tokens:
        default = ", the default" if asked is None else ""
        raise bad_request(f"invalid field 'min_tokens': {req.min_tokens} is more than {field_name} "
                          f"({max_tokens}{default})", param="min_tokens")
    logprobs, prompt_logprobs = _logprob_counts(req)
    return SamplingParams(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        min_p=req.min_p, seed=req.seed, repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        logit_bias=req.logit_bias_pairs, grammar=req.grammar)


def copy_params(params: SamplingParams, copy: int) -> SamplingParams:
    """Parameters of copy ``copy`` of ``n``: seed ``seed + copy`` (vLLM's rule; wrapped inside the 64-bit range)."""
    if params.seed is None or copy == 0:
        return params
    seed = params.seed + copy
    if seed > SEED_RANGE[1]:
        seed -= 2**64
    return msgspec.structs.replace(params, seed=seed)


def echo_only(req: _CommonRequest) -> bool:
    """``max_tokens=0`` with ``echo``: the prompt (and its logprobs) alone, no generated token."""
    return isinstance(req, CompletionRequest) and req.echo and req.max_tokens == 0


def _logprob_counts(req: _CommonRequest) -> tuple[int | None, int | None]:
    """(top-N per generated token, top-N per prompt token) the worker must return."""
    if isinstance(req, CompletionRequest):
        return req.logprobs, (req.logprobs if req.echo and req.logprobs is not None else None)
    if isinstance(req, ChatCompletionRequest) and req.logprobs:
        return (req.top_logprobs or 0), None
    if isinstance(req, ChatCompletionRequest) and req.top_logprobs is not None:
        raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
    return None, None


# --- responses -----------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(num_prompt: int, num_completion: int, num_cached: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_completion,
        "total_tokens": num_prompt + num_completion,
        "prompt_tokens_details": {"cached_tokens": num_cached},
    }


def models_body(names: Sequence[str], max_model_len: int | None) -> dict[str, Any]:
    """``/v1/models``: one card per served name (aliases of the one model, the first is the main name)."""
    created = int(time.time())
    cards = []
    for name in names:
        card: dict[str, Any] = {"id": name, "object": "model", "created": created, "owned_by": "splitserve",
                                "root": names[0], "parent": None}
        if max_model_len is not None:
            card["max_model_len"] = max_model_len
        cards.append(card)
    return {"object": "list", "data": cards}


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize`` body (completions form)."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[StrictStr] = None
    prompt: StrictStr
    add_special_tokens: StrictBool = True


class DetokenizeRequest(BaseModel):
    """vLLM's ``/detokenize`` body."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[StrictStr] = None
    tokens: list[TokenId]
