"""Tools, tool calls and response formats: OpenAI's request shapes, checked and turned
into localsmall's own frozen values, and laid out as Mistral's tokenizer (v11) writes them.

mistral-common is the reference for the layout: the tool list is the JSON of
`{"type": "function", "function": {"name", "description", "parameters"}}` entries, call
arguments are re-serialised with `json.dumps(..., ensure_ascii=False)`, and call ids are
nine letters or digits.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from localsmall.engine.types import Constraint
from localsmall.errors import ToolsError

CALL_ID_LENGTH = 9
_CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolCall:
    """One function call. `arguments` is JSON text, as in OpenAI's API."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolSpec:
    """One tool the model may call (an entry of OpenAI's `tools`)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    strict: bool = False


@dataclass(frozen=True)
class ToolChoice:
    """How the reply may use the tools: `named` forces the function `name`."""

    mode: Literal["auto", "none", "required", "named"] = "auto"
    name: str | None = None


@dataclass(frozen=True)
class ResponseFormat:
    """OpenAI's `response_format`: free text, any JSON object, or JSON matching `schema`."""

    kind: Literal["text", "json_object", "json_schema"] = "text"
    schema: dict[str, Any] | None = None
    strict: bool = False
    name: str = ""


def new_call_id() -> str:
    """A fresh call id: nine random letters and digits (what the model was trained on)."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(CALL_ID_LENGTH))


def canonical_call_id(call_id: str) -> str:
    """`call_id` if it is nine letters or digits, else nine such characters derived from it
    (the same every time, so a call and its result still match and the prompt stays the
    same from one request to the next). Mistral's tokenizer refuses other ids."""
    if _CALL_ID.match(call_id):
        return call_id
    digest = hashlib.sha256(call_id.encode("utf-8")).digest()
    return "".join(_ALPHABET[b % len(_ALPHABET)] for b in digest[:CALL_ID_LENGTH])


def _function_of(entry: Any, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ToolsError(f"{where} must be an object", param="tools")
    if entry.get("type", "function") != "function":
        raise ToolsError(f"{where}: only tools of type 'function' are supported", param="tools")
    function = entry.get("function")
    if not isinstance(function, dict):
        raise ToolsError(f"{where} needs a 'function' object", param="tools")
    return function


def parse_tools(value: Any) -> tuple[ToolSpec, ...]:
    """OpenAI's `tools` list as ToolSpecs; raises ToolsError naming what is wrong."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ToolsError("tools must be a list of {type: function, function: {...}}",
                         param="tools")
    specs: list[ToolSpec] = []
    for i, entry in enumerate(value):
        function = _function_of(entry, f"tools[{i}]")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolsError(f"tools[{i}]: function name {name!r} must be 1-64 letters, digits,"
                             " '_' or '-'", param="tools")
        description = function.get("description") or ""
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {}
        if not isinstance(description, str) or not isinstance(parameters, dict):
            raise ToolsError(f"tools[{i}] ({name}): description must be a string and "
                             "parameters a JSON schema object", param="tools")
        specs.append(ToolSpec(name, description, parameters, bool(function.get("strict"))))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ToolsError("tools: two functions have the same name", param="tools")
    return tuple(specs)


def parse_tool_choice(value: Any, tools: Sequence[ToolSpec]) -> ToolChoice:
    """OpenAI's `tool_choice` ("auto", "none", "required" or a named function)."""
    if value is None:
        return ToolChoice("auto")
    modes: dict[Any, Literal["auto", "none", "required"]] = {
        "auto": "auto", "none": "none", "required": "required", "any": "required"}
    if isinstance(value, str) and value in modes:
        if modes[value] == "required" and not tools:
            raise ToolsError("tool_choice 'required' needs tools", param="tool_choice")
        return ToolChoice(modes[value])
    name = None
    if isinstance(value, dict) and value.get("type", "function") == "function":
        function = value.get("function")
        name = function.get("name") if isinstance(function, dict) else None
    elif isinstance(value, str):
        name = value  # the CLI's --tool-choice NAME
    if not isinstance(name, str):
        raise ToolsError("tool_choice must be 'auto', 'none', 'required' or "
                         "{type: function, function: {name: ...}}", param="tool_choice")
    if name not in {t.name for t in tools}:
        raise ToolsError(f"tool_choice names {name!r}, which is not among the tools",
                         param="tool_choice")
    return ToolChoice("named", name)


def parse_response_format(value: Any) -> ResponseFormat:
    """OpenAI's `response_format` (`text`, `json_object`, `json_schema`)."""
    if value is None:
        return ResponseFormat()
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in ("text", "json_object"):
        return ResponseFormat(kind)
    if kind != "json_schema":
        raise ToolsError("response_format type must be 'text', 'json_object' or 'json_schema'",
                         param="response_format")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise ToolsError("response_format json_schema needs {name, schema: {...}}",
                         param="response_format")
    return ResponseFormat("json_schema", spec.get("schema") or {}, bool(spec.get("strict")),
                          str(spec.get("name") or ""))


# --- Mistral's layout --------------------------------------------------------------------


def tools_json(tools: Sequence[ToolSpec]) -> str:
    """The [AVAILABLE_TOOLS] text, exactly as mistral-common writes it."""
    return json.dumps([{"type": "function",
                        "function": {"name": t.name, "description": t.description,
                                     "parameters": t.parameters}} for t in tools],
                      ensure_ascii=False)


def arguments_text(arguments: str | dict[str, Any] | None) -> str:
    """A call's arguments as they appear after [ARGS] (mistral-common parses them and writes
    them back with `json.dumps`; text that is not JSON is written as a JSON string)."""
    if isinstance(arguments, dict):
        return json.dumps(arguments, ensure_ascii=False)
    if not arguments:
        return "{}"
    try:
        return json.dumps(json.loads(arguments), ensure_ascii=False)
    except json.JSONDecodeError:
        return json.dumps(arguments, ensure_ascii=False)


def tool_by_name(tools: Sequence[ToolSpec], name: str) -> ToolSpec | None:
    """The tool called `name`, if any."""
    return next((t for t in tools if t.name == name), None)


# --- constraining the reply ----------------------------------------------------------------


def _parameters_schema(tool: ToolSpec) -> dict[str, Any] | None:
    """The schema the arguments are held to: the tool's parameters, or (for a tool that is
    not strict and whose schema cannot be enforced) any JSON object."""
    from localsmall.engine.grammar import SchemaError, check_schema

    schema = tool.parameters or {"type": "object"}
    try:
        check_schema(schema)
    except SchemaError as exc:
        if tool.strict:
            raise ToolsError(f"tool {tool.name}: {exc}", param="tools") from None
        return None
    return schema


def reply_constraint(*, tools: Sequence[ToolSpec] = (), tool_choice: ToolChoice | None = None,
                     parallel_tool_calls: bool = True,
                     response_format: ResponseFormat | None = None) -> Constraint | None:
    """The constraint for a reply (None: free text). `required` and named tool choices
    force calls whose arguments match the tool's schema; `auto` lets the model write text
    or start a call, and holds a started call to the format; `none` forbids calls. A
    `json_object`/`json_schema` response format holds the reply to JSON (with `auto`
    the reply is either that JSON or calls). Raises ToolsError for schemas it cannot
    enforce."""
    from localsmall.engine.grammar import (
        SchemaError,
        forbid_tool_calls,
        json_constraint,
        tool_call_constraint,
    )

    choice = tool_choice or ToolChoice("auto")
    fmt = response_format or ResponseFormat()
    json_schema: dict[str, Any] | None = None
    if fmt.kind != "text":
        json_schema = fmt.schema if fmt.kind == "json_schema" and fmt.schema else {
            "type": "object"}
    try:
        if not tools or choice.mode == "none":
            if json_schema is not None:
                return json_constraint(json_schema)
            return forbid_tool_calls() if tools else None
        offered = [t for t in tools if choice.mode != "named" or t.name == choice.name]
        pairs = [(t.name, _parameters_schema(t)) for t in offered]
        if choice.mode == "auto":
            return tool_call_constraint(pairs, parallel=parallel_tool_calls, lazy=True,
                                        or_json=json_schema)
        return tool_call_constraint(pairs, parallel=parallel_tool_calls and
                                    choice.mode == "required")
    except SchemaError as exc:
        raise ToolsError(f"response_format: {exc}", param="response_format") from None
