"""The JSON shapes OpenAI clients expect: completions, stream chunks, usage, models."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from localsmall.engine.types import TurnStats

if TYPE_CHECKING:
    from localsmall.chat.toolparse import ArgsDelta, CallStart, TextDelta
    from localsmall.chat.tools import ToolCall


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(stats: TurnStats, completion_tokens: int) -> dict[str, Any]:
    """Token counts; `cached_tokens` are prompt positions found in the KV cache."""
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": stats.prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.reused_tokens}}


def timings(stats: TurnStats, trace: dict[str, float] | None = None) -> dict[str, Any]:
    """Where the time went (an extra field, as llama.cpp's server sends; OpenAI clients
    ignore it): prompt positions evaluated and reused, and the speeds; with `trace`
    (LOCALSMALL_SERVE_TRACE=1, see trace.py) the moment each stage of the request ended."""
    extra = {"trace": dict(trace)} if trace is not None else {}
    return extra | {"prompt_n": stats.evaluated_tokens, "cache_n": stats.reused_tokens,
            "prompt_ms": round(stats.prompt_eval_s * 1000, 3),
            "images_encoded": stats.images_encoded,
            "first_token_ms": round(stats.time_to_first_token_s * 1000, 3),
            "predicted_n": stats.generated_tokens,
            "predicted_ms": round(stats.generation_s * 1000, 3),
            "predicted_per_second": round(stats.generation_tps, 3)}


def completion(*, id: str, model: str, created: int, message: dict[str, Any],
               finish_reason: str, usage: dict[str, Any],
               timings: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {"id": id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage}
    if timings is not None:
        body["timings"] = timings
    return body


def chunk(*, id: str, model: str, created: int, delta: dict[str, Any],
          finish_reason: str | None = None, with_usage: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None,
                     "finish_reason": finish_reason}]}
    if with_usage:
        body["usage"] = None
    return body


def usage_chunk(*, id: str, model: str, created: int, usage: dict[str, Any]) -> dict[str, Any]:
    """The last chunk when stream_options.include_usage is set: no choices, the usage."""
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None, "choices": [], "usage": usage}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    import orjson

    text = data.encode() if isinstance(data, str) else orjson.dumps(data)
    return b"data: " + text + b"\n\n"


def model_list(model_ids: tuple[str, ...], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [
        {"id": m, "object": "model", "created": created, "owned_by": "localsmall"}
        for m in model_ids]}


def now() -> int:
    return int(time.time())


def tool_calls_json(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """Tool calls as in a completion's message."""
    return [{"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def reply_message(text: str, *, tools: bool) -> tuple[dict[str, Any], list[ToolCall]]:
    """The assistant message for a finished reply (its tool calls parsed when the request
    offered tools) and the tools it called."""
    if not tools:
        return {"role": "assistant", "content": text, "refusal": None}, []
    from localsmall.chat.toolparse import parse_reply

    content, calls = parse_reply(text)
    message: dict[str, Any] = {"role": "assistant", "content": content or None,
                               "refusal": None}
    if calls:
        message["tool_calls"] = tool_calls_json(calls)
    return message, calls


def stream_delta(delta: TextDelta | CallStart | ArgsDelta) -> dict[str, Any]:
    """A parsed piece of a streamed reply as an OpenAI `delta`."""
    from localsmall.chat.toolparse import CallStart, TextDelta

    if isinstance(delta, TextDelta):
        return {"content": delta.text}
    if isinstance(delta, CallStart):
        return {"tool_calls": [{"index": delta.index, "id": delta.id, "type": "function",
                                "function": {"name": delta.name, "arguments": ""}}]}
    return {"tool_calls": [{"index": delta.index, "function": {"arguments": delta.text}}]}
