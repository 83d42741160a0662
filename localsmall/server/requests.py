"""Parsing and validating a chat completion request (the JSON body) into a dataclass.

Every problem raises an `ApiError` naming the parameter (`messages[2].content`,
`temperature`...), the way OpenAI's API answers, so a client sees exactly what to fix.
Unknown fields are ignored, as OpenAI clients send extras (`user`, `metadata`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from localsmall.chat.tools import (
    ResponseFormat,
    ToolCall,
    ToolChoice,
    ToolSpec,
    arguments_text,
    parse_response_format,
    parse_tool_choice,
    parse_tools,
)
from localsmall.errors import ToolsError
from localsmall.server.errors import ApiError, invalid

Role = Literal["system", "user", "assistant", "tool"]
MAX_STOP = 4
MAX_MESSAGES = 10_000


@dataclass(frozen=True)
class ImageRef:
    """An `image_url` part: a data: or http(s) URL, and where it sits in the request."""

    url: str
    param: str

    def __hash__(self) -> int:
        # By where it sits (unique in a request): hashing a data: URL of megabytes
        # would cost ~0.2 ms per request; equal refs still have equal hashes.
        return hash(self.param)


@dataclass(frozen=True)
class ApiMessage:
    role: Role
    parts: tuple[str | ImageRef, ...]
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[ApiMessage, ...]
    stream: bool = False
    include_usage: bool = False
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    parallel_tool_calls: bool = True
    response_format: ResponseFormat = field(default_factory=ResponseFormat)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict[str, Any], key: str, low: float, high: float,
            *, low_open: bool = False) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(key, f"'{key}' must be a number")
    if value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise invalid(key, f"'{key}' must be in {interval}; got {value}")
    return float(value)


def _boolean(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(key, f"'{key}' must be true or false")
    return value


def _max_tokens(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise invalid(key, f"'{key}' must be a whole number of at least 1")
        return int(value)
    return None


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, list) or len(value) > MAX_STOP
            or not all(isinstance(s, str) and s for s in value)):
        raise invalid("stop", f"'stop' must be a non-empty string or a list of up to "
                      f"{MAX_STOP} non-empty strings")
    return tuple(value)


def _content(value: Any, param: str, role: str) -> tuple[str | ImageRef, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        raise invalid(param, f"'{param}' must be a string or a list of content parts")
    parts: list[str | ImageRef] = []
    for i, part in enumerate(value):
        where = f"{param}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise invalid(f"{where}.image_url", f"'{where}.image_url.url' must be a URL")
            if role != "user":
                raise invalid(where, "images are only accepted in user messages")
            parts.append(ImageRef(url, f"{where}.image_url"))
        else:
            raise invalid(where, f"'{where}' must be a text part or an image_url part")
    return tuple(parts)


def _tool_calls(value: Any, param: str) -> tuple[ToolCall, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise invalid(param, f"'{param}' must be a list")
    calls = []
    for i, call in enumerate(value):
        where = f"{param}[{i}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid(where, f"'{where}' must have a function with a name")
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str | dict):
            raise invalid(f"{where}.function.arguments", "tool call arguments must be a "
                          "JSON string")
        arguments = arguments_text(arguments)
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise invalid(f"{where}.id", f"'{where}.id' must be a non-empty string")
        calls.append(ToolCall(call_id, function["name"], arguments))
    return tuple(calls)


def _message(raw: Any, i: int) -> ApiMessage:
    param = f"messages[{i}]"
    if not isinstance(raw, dict):
        raise invalid(param, f"'{param}' must be an object")
    role = raw.get("role")
    if role == "developer":  # newer OpenAI clients' name for the system message
        role = "system"
    if role not in ("system", "user", "assistant", "tool"):
        raise invalid(f"{param}.role", f"'{param}.role' must be system, user, assistant or "
                      f"tool; got {role!r}")
    parts = _content(raw.get("content"), f"{param}.content", role)
    calls = _tool_calls(raw.get("tool_calls"), f"{param}.tool_calls") if role == "assistant" \
        else ()
    tool_call_id = raw.get("tool_call_id")
    if role == "tool" and not (isinstance(tool_call_id, str) and tool_call_id):
        raise invalid(f"{param}.tool_call_id", "a tool message needs its 'tool_call_id'")
    if role in ("system", "user", "tool") and not parts and role != "system":
        raise invalid(f"{param}.content", f"'{param}.content' is missing")
    if role == "assistant" and not parts and not calls:
        raise invalid(f"{param}.content", "an assistant message needs content or tool_calls")
    name = raw.get("name") if isinstance(raw.get("name"), str) else None
    return ApiMessage(role, parts, calls, tool_call_id if role == "tool" else None, name)


def _messages(body: dict[str, Any]) -> tuple[ApiMessage, ...]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise invalid("messages", "'messages' must be a non-empty list")
    if len(raw) > MAX_MESSAGES:
        raise invalid("messages", f"at most {MAX_MESSAGES} messages")
    return tuple(_message(m, i) for i, m in enumerate(raw))


def _tool_fields(body: dict[str, Any]) -> tuple[tuple[ToolSpec, ...], ToolChoice,
                                                ResponseFormat]:
    try:
        tools = parse_tools(body.get("tools"))
        return (tools, parse_tool_choice(body.get("tool_choice"), tools),
                parse_response_format(body.get("response_format")))
    except ToolsError as exc:
        raise invalid(exc.param or "tools", str(exc)) from None


def parse_chat_request(body: Any, *, model_ids: tuple[str, ...]) -> ChatRequest:
    """Validate a /v1/chat/completions body. Raises ApiError (400, or 404 for a model
    this server does not run)."""
    if not isinstance(body, dict):
        raise invalid("body", "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "'model' is required")
    if model not in model_ids:
        raise ApiError(404, f"The model '{model}' does not exist; this server runs "
                       f"'{model_ids[0]}'", param="model", code="model_not_found")
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise invalid("n", "only n=1 is supported (one choice per request)")
    if body.get("logprobs"):
        raise invalid("logprobs", "logprobs are not supported")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("stream_options", "'stream_options' must be an object")
    tools, tool_choice, response_format = _tool_fields(body)
    return ChatRequest(
        model=model, messages=_messages(body), stream=_boolean(body, "stream", False),
        include_usage=bool((options or {}).get("include_usage", False)),
        temperature=_number(body, "temperature", 0, 2), top_p=_number(body, "top_p", 0, 1,
                                                                      low_open=True),
        max_tokens=_max_tokens(body), stop=_stop(body), seed=_seed(body),
        presence_penalty=_number(body, "presence_penalty", -2, 2) or 0.0,
        frequency_penalty=_number(body, "frequency_penalty", -2, 2) or 0.0,
        tools=tools, tool_choice=tool_choice,
        parallel_tool_calls=_boolean(body, "parallel_tool_calls", True),
        response_format=response_format)


def _seed(body: dict[str, Any]) -> int | None:
    seed = body.get("seed")
    if seed is None:
        return None
    if not _is_int(seed):
        raise invalid("seed", "'seed' must be a whole number")
    return int(seed) & 0xFFFFFFFF
