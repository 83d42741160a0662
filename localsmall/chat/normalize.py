"""Messages put in the shape Mistral's tokenizer encodes: what mistral-common's request
normalizer (the one used for tokenizer v11) does before it writes tokens.

- Consecutive messages of one role become one message: texts are joined by a blank line,
  assistant tool calls are concatenated; system and tool messages stay separate.
- Tool results are put in the order of the calls they answer (the calls of the assistant
  messages since the previous block of results), so results that came back out of order
  read as the model expects.
- A user message made of text followed by a single image reads the image first.
- An assistant's text loses its trailing spaces; call ids that are not nine letters or
  digits are replaced by nine derived from them (the same for a call and its result).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from itertools import groupby

from localsmall.chat.conversation import Message, Part
from localsmall.chat.tools import ToolCall, arguments_text, canonical_call_id
from localsmall.images import PreparedImage

JOIN = "\n\n"


def _join_parts(messages: Sequence[Message]) -> tuple[Part, ...]:
    """Parts of several messages as one: adjacent texts joined by a blank line, empty
    texts dropped, images kept in place."""
    out: list[Part] = []
    text: list[str] = []
    for m in messages:
        for part in m.parts:
            if isinstance(part, PreparedImage):
                if text:
                    out.append(JOIN.join(text))
                    text = []
                out.append(part)
            elif part:
                text.append(part)
    if text:
        out.append(JOIN.join(text))
    return tuple(out)


def _image_first(parts: tuple[Part, ...]) -> tuple[Part, ...]:
    if (len(parts) >= 2 and isinstance(parts[-1], PreparedImage)
            and all(isinstance(p, str) for p in parts[:-1])):
        return (parts[-1], *parts[:-1])
    return parts


def _canonical_call(call: ToolCall) -> ToolCall:
    return ToolCall(canonical_call_id(call.id), call.name, arguments_text(call.arguments))


def _assistant(group: Sequence[Message]) -> Message:
    calls = tuple(_canonical_call(c) for m in group for c in m.tool_calls)
    if len(group) == 1 and group[0].token_ids is not None:
        return replace(group[0], tool_calls=calls)  # generated tokens are reused verbatim
    parts = _join_parts(group)
    text = "".join(p for p in parts if isinstance(p, str)).rstrip(" ")
    return Message("assistant", (text,), None, group[-1].interrupted, calls)


def _tool_results(group: Sequence[Message], latest_calls: list[str]) -> list[Message]:
    results = [Message("tool", (JOIN.join(p for p in m.parts if isinstance(p, str) and p),),
                       tool_call_id=canonical_call_id(m.tool_call_id or "null"))
               for m in group]
    # mistral-common's sort: by the position of the call, then by arrival (last wins on
    # repeated ids, as its dictionaries do).
    call_index = {call_id: i for i, call_id in enumerate(latest_calls)}
    arrival = {m.tool_call_id: i for i, m in enumerate(results)}
    results.sort(key=lambda m: (call_index.get(m.tool_call_id or "null", float("inf")),
                                arrival[m.tool_call_id]))
    return results


def normalize_messages(messages: Sequence[Message]) -> list[Message]:
    """The conversation as mistral-common's v11 normalizer leaves it (see module doc)."""
    out: list[Message] = []
    latest_calls: list[str] = []
    for role, grouped in groupby(messages, key=lambda m: m.role):
        group = list(grouped)
        if role == "user":
            out.append(Message("user", _image_first(_join_parts(group))))
        elif role == "assistant":
            message = _assistant(group)
            out.append(message)
            latest_calls.extend(c.id for c in message.tool_calls)
        elif role == "tool":
            out.extend(_tool_results(group, latest_calls))
            latest_calls.clear()
        else:
            out.extend(Message("system", _join_parts([m]) or ("",)) for m in group)
    return out or [Message("user", ())]


def has_tool_content(messages: Sequence[Message]) -> bool:
    """Whether any message carries tool calls or tool results."""
    return any(m.role == "tool" or m.tool_calls for m in messages)
