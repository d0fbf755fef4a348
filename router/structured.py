"""Structured-output requests -> the grammar a worker enforces (router side; torch-free, so no xgrammar here).

Flow for one request (:func:`request_grammar`, called while the request is parsed):

1. Collect what asks for structured output: ``response_format`` (``json_object`` or ``json_schema``), vLLM's
   ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``, and for chat a forced tool call
   (``tool_choice`` ``"required"`` or a named function: :func:`forced_tool_schema`). More than one is a
   :class:`SpecError` naming the second.
2. Check it as far as the router can without xgrammar: a JSON schema must be an object that ``jsonschema``
   accepts as a schema (its own draft's meta-schema), a regex must compile with Python's ``re``, a choice list
   must be non-empty. A spec that passes here but that xgrammar refuses fails on the worker, whose error names the
   field.
3. Return ``(kind, spec)`` for ``SamplingParams.grammar`` (kinds as in core/engine/grammar.py), or None.

The caller turns a :class:`SpecError` into a 400 naming :attr:`SpecError.field`.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence

import jsonschema
from jsonschema.exceptions import SchemaError

Grammar = tuple[str, str]


class SpecError(ValueError):
    """A structured-output field the router refuses; ``field`` is the parameter to name in the 400."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def schema_spec(schema: Any, field: str) -> str:
    """A JSON schema (dict, or JSON text of one) checked against its meta-schema; the spec text for the worker."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise SpecError(field, f"invalid field '{field}': not valid JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise SpecError(field, f"invalid field '{field}': a JSON schema must be an object, got "
                               f"{type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        at = f" at '{where}'" if where else ""
        raise SpecError(field, f"invalid field '{field}': not a valid JSON schema{at}: {exc.message}") from exc
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


def regex_spec(pattern: str, field: str) -> str:
    if not pattern:
        raise SpecError(field, f"invalid field '{field}': the regex must not be empty")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise SpecError(field, f"invalid field '{field}': not a valid regex: {exc}") from exc
    return pattern


def choice_spec(choices: Sequence[str], field: str) -> str:
    if not choices:
        raise SpecError(field, f"invalid field '{field}': the list of choices must not be empty")
    return json.dumps(list(choices), ensure_ascii=False)


def grammar_text_spec(text: str, field: str) -> str:
    if not text.strip():
        raise SpecError(field, f"invalid field '{field}': the grammar must not be empty")
    return text


def response_format_grammar(fmt: Mapping[str, Any]) -> Grammar | None:
    """``response_format`` (already shape-checked): ``text`` -> None, ``json_object``, ``json_schema``."""
    kind = fmt.get("type")
    if kind == "json_object":
        return ("json_object", "")
    if kind == "json_schema":
        spec = fmt.get("json_schema") or {}
        schema = spec.get("schema")
        if schema is None:
            schema = {}
        return ("json", schema_spec(schema, "response_format.json_schema.schema"))
    return None


def forced_tool_schema(tools: Sequence[Mapping[str, Any]], choice: Any, parallel: bool) -> dict[str, Any]:
    """The JSON schema a forced tool call must match (vLLM's formats): a named function -> its ``parameters``
    object (the output is the call's arguments); ``"required"`` -> an array of ``{"name", "parameters"}`` calls of
    any listed tool (one item when ``parallel`` is false)."""
    if isinstance(choice, Mapping):
        name = choice["function"]["name"]
        fn = next(t["function"] for t in tools if t["function"]["name"] == name)
        return _parameters(fn)
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                               "parameters": _parameters(t["function"])},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                              "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def _parameters(fn: Mapping[str, Any]) -> dict[str, Any]:
    params = fn.get("parameters")
    return dict(params) if params else {"type": "object", "properties": {}, "additionalProperties": False}


GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def request_grammar(fields: Mapping[str, Any], forced_tools: dict[str, Any] | None) -> Grammar | None:
    """Module flow: ``fields`` holds the request's ``response_format`` and ``guided_*`` values (None: absent);
    ``forced_tools`` the schema of a forced tool call. Raises :class:`SpecError`."""
    found: list[tuple[str, Grammar]] = []
    fmt = fields.get("response_format")
    if fmt is not None:
        grammar = response_format_grammar(fmt)
        if grammar is not None:
            found.append(("response_format", grammar))
    makers = {"guided_json": lambda v: ("json", schema_spec(v, "guided_json")),
              "guided_regex": lambda v: ("regex", regex_spec(v, "guided_regex")),
              "guided_choice": lambda v: ("choice", choice_spec(v, "guided_choice")),
              "guided_grammar": lambda v: ("grammar", grammar_text_spec(v, "guided_grammar"))}
    for name in GUIDED:
        if fields.get(name) is not None:
            found.append((name, makers[name](fields[name])))
    if forced_tools is not None:
        found.append(("tool_choice", ("json", schema_spec(forced_tools, "tools"))))
    if len(found) > 1:
        first, second = found[0][0], found[1][0]
        raise SpecError(second, f"invalid field '{second}': only one kind of structured output per request "
                                f"('{first}' is set too)")
    return found[0][1] if found else None
