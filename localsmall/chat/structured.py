"""Structured replies for one-shot use (`localsmall run --schema/--tools`): reading the
tools and schema files, the sampling that enforces them, and the reply's tool calls."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from localsmall.chat.toolparse import ToolCallParser
from localsmall.chat.tools import (
    ResponseFormat,
    ToolCall,
    ToolChoice,
    ToolSpec,
    parse_response_format,
    parse_tools,
    reply_constraint,
)
from localsmall.engine.types import SamplingSettings
from localsmall.errors import ToolsError

MAX_FILE_BYTES = 4 << 20


def _read_json(path: Path, what: str) -> Any:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ToolsError(f"{what} file {path} could not be read ({exc.strerror or exc})") \
            from None
    if len(data) > MAX_FILE_BYTES:
        raise ToolsError(f"{what} file {path} is larger than 4 MiB")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ToolsError(f"{what} file {path} is not valid JSON ({exc})") from None


def load_tools_file(path: Path) -> tuple[ToolSpec, ...]:
    """Tools from a JSON file: OpenAI's `tools` list (or an object holding one)."""
    data = _read_json(path, "tools")
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    try:
        tools = parse_tools(data)
    except ToolsError as exc:
        raise ToolsError(f"{path}: {exc}") from None
    if not tools:
        raise ToolsError(f"{path} holds no tools")
    return tools


def load_schema_file(path: Path) -> ResponseFormat:
    """A JSON schema from a file (or an OpenAI response_format object), checked."""
    from localsmall.engine.grammar import SchemaError, check_schema

    data = _read_json(path, "schema")
    if isinstance(data, dict) and data.get("type") in ("json_schema", "json_object") \
            and ("json_schema" in data or data["type"] == "json_object"):
        fmt = parse_response_format(data)
    elif isinstance(data, dict):
        fmt = ResponseFormat("json_schema", data, True)
    else:
        raise ToolsError(f"{path}: a JSON schema must be an object")
    try:
        check_schema(fmt.schema or {"type": "object"})
    except SchemaError as exc:
        raise ToolsError(f"{path}: {exc}") from None
    return fmt


def structured_sampling(sampling: SamplingSettings, *, tools: Sequence[ToolSpec] = (),
                        tool_choice: ToolChoice | None = None,
                        response_format: ResponseFormat | None = None) -> SamplingSettings:
    """`sampling` with the constraint the tools / response format call for."""
    return replace(sampling, constraint=reply_constraint(
        tools=tools, tool_choice=tool_choice, response_format=response_format))


@dataclass(frozen=True)
class ToolReply:
    """A reply read for tool calls: its text and its calls."""

    content: str
    tool_calls: tuple[ToolCall, ...]

    def to_json(self) -> dict[str, Any]:
        """OpenAI's shape: {"content", "tool_calls": [{id, type, function: {name, arguments}}]}."""
        return {"content": self.content or None, "tool_calls": [
            {"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for c in self.tool_calls]}


def read_tool_reply(pieces: Iterable[str]) -> ToolReply:
    """Read a streamed reply (control tokens spelled out) for its text and tool calls."""
    parser = ToolCallParser()
    for piece in pieces:
        parser.feed(piece)
    parser.finish()
    return ToolReply(parser.content, tuple(parser.calls))
