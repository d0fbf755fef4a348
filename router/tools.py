"""Tool calls in chat: the model's tool-call formats parsed into OpenAI ``tool_calls``, streamed or whole.

Flow for one choice of a chat request with ``tools`` (``tool_choice`` other than ``"none"``):

1. :func:`check_tool_parser` (while the request is parsed): ``tool_choice="auto"`` needs the router started with
   ``--tool-call-parser`` (``llama3_json`` or ``hermes``), else a 400 naming ``tool_choice``. The chat template
   renders the tools, earlier assistant calls and ``tool`` results (router/openai_api.py's ``template_*``); a
   forced choice runs through a grammar (router/structured.py), so even a random model produces a valid call.
2. :class:`ToolCallStream` (one per choice, owned by the chat formatter) turns the generated text into content and
   call deltas as it arrives:

   - named function: the whole output is the call's arguments (JSON), streamed as argument deltas after a first
     delta carrying the call's id and name;
   - ``"required"``: the output is a JSON array of ``{"name", "parameters"}`` (vLLM's format), parsed at the end;
   - ``"auto"``, ``hermes``: text before ``<tool_call>`` streams as content (a possible start of the tag is held
     back); each ``<tool_call>{"name", "arguments"}</tool_call>`` is one call, sent once its closing tag (or the
     end of the output) arrives;
   - ``"auto"``, ``llama3_json`` (Llama 3.1+): an output whose first non-space text is ``{`` (or
     ``<|python_tag|>``) is held and parsed at the end as ``{"name", "parameters"}`` objects separated by ``;``;
     other outputs stream as content. Text that does not parse as calls is returned as content.
3. :meth:`ToolCallStream.finish_reason`: ``"tool_calls"`` when calls were made (auto, required) and the model
   stopped by itself; a named call keeps ``"stop"``, as OpenAI's API does.

The non-streamed message is built by the same machinery (:func:`whole_message`), so streamed deltas always add up to
it.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Sequence

from splitserve.router.openai_api import ChatCompletionRequest, NamedToolChoice, bad_request

PARSERS = ("llama3_json", "hermes")
HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"

ParsedCall = tuple[str, str]
"""(function name, arguments as JSON text)."""


def check_tool_parser(req: ChatCompletionRequest, parser: str | None) -> None:
    """400 naming ``tool_choice`` when it is ``"auto"`` and the router has no tool-call parser."""
    if req.tool_mode == "auto" and parser is None:
        raise bad_request("invalid field 'tool_choice': \"auto\" (the default with tools) needs the router started "
                          "with --tool-call-parser llama3_json|hermes; use \"required\", a named function or "
                          "\"none\"", param="tool_choice")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call_of(obj: Any, args_keys: Sequence[str]) -> ParsedCall | None:
    """``{"name": str, <args key>: object}`` -> (name, arguments JSON); None if it is not a call."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models send the arguments as JSON text
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def parse_llama3_json(text: str) -> list[ParsedCall] | None:
    """Llama 3.1+ JSON tool calls: ``[<|python_tag|>]{"name", "parameters"}[; {...}]*``; None if ``text`` is not
    only that."""
    body = text.strip()
    body = body[len(PYTHON_TAG):].lstrip() if body.startswith(PYTHON_TAG) else body
    if not body.startswith("{"):
        return None
    decoder, calls, i = json.JSONDecoder(), [], 0
    while i < len(body):
        try:
            obj, i = decoder.raw_decode(body, i)
        except ValueError:
            return None
        call = _call_of(obj, ("parameters", "arguments"))
        if call is None:
            return None
        calls.append(call)
        rest = body[i:].lstrip()
        if rest.startswith(";"):
            rest = rest[1:].lstrip()
        elif rest:
            return None
        i = len(body) - len(rest)
    return calls


def parse_hermes_body(body: str) -> ParsedCall | None:
    """The JSON inside one ``<tool_call>...</tool_call>``: ``{"name", "arguments"}``."""
    try:
        obj = json.loads(body.strip())
    except ValueError:
        return None
    return _call_of(obj, ("arguments", "parameters"))


def parse_required(text: str) -> list[ParsedCall] | None:
    """vLLM's forced format: a JSON array of ``{"name", "parameters"}``."""
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list) or not items:
        return None
    calls = [_call_of(item, ("parameters", "arguments")) for item in items]
    return None if any(c is None for c in calls) else calls  # type: ignore[return-value]


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ToolCallStream:
    """Per choice: generated text in, (content, OpenAI tool-call deltas) out (module flow, step 2)."""

    def __init__(self, mode: str, parser: str | None = None, function: str | None = None) -> None:
        self.mode, self.parser, self.function = mode, parser, function
        self.num_calls = 0
        self._buf = ""
        self._in_calls = False
        """auto: a call started (hermes: inside the calls region; llama3_json: the output is held as a call)."""
        self._decided = False
        """auto, llama3_json: the first non-space text was seen."""

    @classmethod
    def for_request(cls, req: ChatCompletionRequest, parser: str | None) -> ToolCallStream | None:
        mode = req.tool_mode
        if mode == "none" or (mode == "auto" and parser is None):
            return None
        name = req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else None
        return cls(mode, parser, name)

    def _delta(self, call: ParsedCall) -> dict[str, Any]:
        delta = {"index": self.num_calls, "id": new_call_id(), "type": "function",
                 "function": {"name": call[0], "arguments": call[1]}}
        self.num_calls += 1
        return delta

    def push(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """Content to send now, and call deltas."""
        if self.mode == "named":
            return "", self._named(text)
        self._buf += text
        if self.mode == "required":
            return "", []
        if self.parser == "hermes":
            return self._hermes(final=False)
        return self._llama3(final=False)

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """What is still held once the output ended."""
        if self.mode == "named":
            return "", self._named("") if self.num_calls == 0 else []
        if self.mode == "required":
            calls = parse_required(self._buf)
            text, self._buf = self._buf, ""
            return ("", [self._delta(c) for c in calls]) if calls else (text, [])
        if self.parser == "hermes":
            return self._hermes(final=True)
        return self._llama3(final=True)

    def finish_reason(self, reason: str | None) -> str | None:
        if reason == "stop" and self.num_calls and self.mode in ("auto", "required"):
            return "tool_calls"
        return reason

    def _named(self, text: str) -> list[dict[str, Any]]:
        if self.num_calls == 0:
            self.num_calls = 1
            return [{"index": 0, "id": new_call_id(), "type": "function",
                     "function": {"name": self.function, "arguments": text}}]
        return [{"index": 0, "function": {"arguments": text}}] if text else []

    def _hermes(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        content, calls = "", []
        if not self._in_calls:
            start = self._buf.find(HERMES_START)
            if start < 0:
                cut = len(self._buf) - (0 if final else _held_prefix(self._buf, HERMES_START))
                content, self._buf = self._buf[:cut], self._buf[cut:]
                return content, []
            content, self._buf, self._in_calls = self._buf[:start], self._buf[start:], True
        while self._buf:
            start = self._buf.find(HERMES_START)
            if start < 0:  # text between or after calls is dropped (as vLLM's parser does)
                self._buf = "" if final else self._buf[len(self._buf) - _held_prefix(self._buf, HERMES_START):]
                break
            body = self._buf[start + len(HERMES_START):]
            end = body.find(HERMES_END)
            if end < 0 and not final:
                self._buf = self._buf[start:]
                break
            raw = body if end < 0 else body[:end]
            call = parse_hermes_body(raw)
            if call is None:  # not a call after all: its text is content
                content += HERMES_START + raw + ("" if end < 0 else HERMES_END)
            else:
                calls.append(self._delta(call))
            self._buf = "" if end < 0 else body[end + len(HERMES_END):]
        return content, calls

    def _llama3(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        if not self._decided:
            head = self._buf.lstrip()
            if not head and not final:
                return "", []
            self._decided = True
            self._in_calls = head.startswith("{") or head.startswith(PYTHON_TAG)
        if not self._in_calls:
            text, self._buf = self._buf, ""
            return text, []
        if not final:
            return "", []
        text, self._buf = self._buf, ""
        calls = parse_llama3_json(text)
        return ("", [self._delta(c) for c in calls]) if calls else (text, [])


def whole_message(stream: ToolCallStream, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The non-streamed (content, tool_calls) of ``text``: the same deltas as a stream, merged."""
    content, deltas = stream.push(text)
    more_content, more = stream.finish()
    content += more_content
    calls: list[dict[str, Any]] = []
    for d in deltas + more:
        if d["index"] == len(calls):
            calls.append({"id": d["id"], "type": "function", "function": dict(d["function"])})
        else:
            calls[d["index"]]["function"]["arguments"] += d["function"]["arguments"]
    return (content or None) if calls else content, calls
