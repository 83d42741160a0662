"""Reading tool calls out of the model's reply while it streams.

Mistral Small 3.2 (tokenizer v11) writes a call as
`[TOOL_CALLS]name[CALL_ID]id[ARGS]{json}`, several in a row for parallel calls, possibly
after some text; older Mistral models wrote `[TOOL_CALLS][{"name": ..., "arguments": {...}}]`.
Feed the reply piece by piece with control tokens spelled out (`TokenEvent.piece`); each
`feed` returns what became known: text, the start of a call (its id and name), or a piece of
a call's arguments, so a server can stream them at once. Text that might be the start of
a marker split across pieces is held back until the next piece tells.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from localsmall.chat.tools import ToolCall, new_call_id

TOOL_CALLS = "[TOOL_CALLS]"
CALL_ID = "[CALL_ID]"
ARGS = "[ARGS]"


@dataclass(frozen=True)
class TextDelta:
    """Reply text outside tool calls."""

    text: str


@dataclass(frozen=True)
class CallStart:
    """A new call: its position in the reply's calls, its id and function name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgsDelta:
    """More of the arguments (JSON text) of call `index`."""

    index: int
    text: str


Delta = TextDelta | CallStart | ArgsDelta
_State = Literal["text", "name", "id", "args", "json"]


def _held_back(buffer: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `buffer` that could begin one of `markers`."""
    for k in range(min(len(buffer), max(len(m) for m in markers) - 1), 0, -1):
        tail = buffer[-k:]
        if any(m.startswith(tail) for m in markers):
            return k
    return 0


class ToolCallParser:
    """Turns a streamed reply into text and tool calls (see the module doc)."""

    def __init__(self, *, id_factory: Callable[[], str] = new_call_id) -> None:
        self._new_id = id_factory
        self._state: _State = "text"
        self._buf = ""
        self._raw = ""          # the current call as written, in case it proves malformed
        self._name = ""
        self._id = ""
        self._args: list[str] = []
        self._json_pos = 0      # JSON form: where the next list element starts
        self._json_calls = 0    # JSON form: calls read from the current list
        self.calls: list[ToolCall] = []
        self._content: list[str] = []

    @property
    def content(self) -> str:
        """The reply's text outside tool calls (so far)."""
        return "".join(self._content)

    def feed(self, piece: str) -> list[Delta]:
        """Take the next piece of the reply; returns the deltas it completes."""
        self._buf += piece
        out: list[Delta] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[Delta]:
        """The reply ended: flush held-back text and close the call in progress."""
        out: list[Delta] = []
        if self._state == "args":
            if self._buf:
                self._emit_args(self._buf, out)
            self._close_call()
        elif self._state == "json":
            self._finish_json(out)
        elif self._state in ("name", "id"):
            self._text(self._raw + self._buf, out)  # a call that never reached [ARGS]
        else:
            self._text(self._buf, out)
        self._buf, self._raw = "", ""
        self._state = "text"
        return out

    # --- states ------------------------------------------------------------------------

    def _step(self, out: list[Delta]) -> bool:
        """Consume what the buffer allows; True when the state changed (go again)."""
        if self._state == "text":
            return self._until_call(out, self._text)
        if self._state == "args":
            return self._until_call(out, self._emit_args)
        if self._state == "json":
            self._parse_json(out)
            return False
        return self._header(out)

    def _until_call(self, out: list[Delta], emit: Callable[[str, list[Delta]], None]) -> bool:
        """Pass text (or arguments) on up to the next [TOOL_CALLS]."""
        at = self._buf.find(TOOL_CALLS)
        if at < 0:
            keep = _held_back(self._buf, (TOOL_CALLS,))
            emit(self._buf[:len(self._buf) - keep], out)
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        emit(self._buf[:at], out)
        if self._state == "args":
            self._close_call()
        self._buf = self._buf[at + len(TOOL_CALLS):]
        self._raw, self._name, self._id = TOOL_CALLS, "", ""
        self._state = "name"
        return True

    def _header(self, out: list[Delta]) -> bool:
        """The name (and id) of a v11 call, or the start of the JSON form."""
        if self._state == "name" and not self._name.strip():
            stripped = self._buf.lstrip()
            if stripped[:1] in ("[", "{"):
                self._raw += self._buf
                self._state, self._buf = "json", stripped
                self._json_pos = 1 if stripped[0] == "[" else 0
                self._json_calls = 0
                return True
        markers = (CALL_ID, ARGS) if self._state == "name" else (ARGS,)
        hits = [(self._buf.find(m), m) for m in markers if m in self._buf]
        if not hits:
            keep = _held_back(self._buf, markers)
            self._take_header(self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        at, marker = min(hits)
        self._take_header(self._buf[:at])
        self._raw += marker
        self._buf = self._buf[at + len(marker):]
        if marker == CALL_ID:
            self._state = "id"
        else:
            self._start_call(out)
        return True

    def _take_header(self, text: str) -> None:
        self._raw += text
        if self._state == "name":
            self._name += text
        else:
            self._id += text

    def _start_call(self, out: list[Delta]) -> None:
        call_id = self._id.strip() or self._new_id()
        self._id, self._name = call_id, self._name.strip()
        self._args = []
        self._state = "args"
        out.append(CallStart(len(self.calls), call_id, self._name))

    def _emit_args(self, text: str, out: list[Delta]) -> None:
        if text:
            self._args.append(text)
            out.append(ArgsDelta(len(self.calls), text))

    def _close_call(self) -> None:
        self.calls.append(ToolCall(self._id, self._name, "".join(self._args)))
        self._raw = ""

    def _text(self, text: str, out: list[Delta]) -> None:
        if text:
            self._content.append(text)
            out.append(TextDelta(text))

    # --- the older JSON form -----------------------------------------------------------

    def _parse_json(self, out: list[Delta]) -> None:
        """Emit each complete {"name", "arguments"} object of the list as it closes."""
        decoder = json.JSONDecoder()
        while True:
            rest = self._buf[self._json_pos:]
            start = len(rest) - len(rest.lstrip(" \n\t\r,"))
            if not rest[start:] or rest[start] == "]":
                return
            try:
                value, end = decoder.raw_decode(rest, start)
            except json.JSONDecodeError:
                return
            self._json_pos += end
            self._json_call(value, out)

    def _json_call(self, value: Any, out: list[Delta]) -> None:
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return
        arguments = value.get("arguments", {})
        text = arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                       ensure_ascii=False)
        call_id = value.get("id")
        call_id = call_id if isinstance(call_id, str) and call_id else self._new_id()
        out.append(CallStart(len(self.calls), call_id, value["name"]))
        out.append(ArgsDelta(len(self.calls), text))
        self.calls.append(ToolCall(call_id, value["name"], text))
        self._json_calls += 1

    def _finish_json(self, out: list[Delta]) -> None:
        self._parse_json(out)
        if not self._json_calls:
            self._text(self._raw, out)  # not the JSON form after all: keep it as text
            return
        rest = self._buf[self._json_pos:].strip().lstrip(",").strip()
        rest = rest[1:].strip() if rest.startswith("]") else rest
        self._text(rest, out)


def parse_reply(text: str, *, id_factory: Callable[[], str] = new_call_id
                ) -> tuple[str, list[ToolCall]]:
    """A whole reply's text (control tokens spelled out) and its tool calls."""
    parser = ToolCallParser(id_factory=id_factory)
    parser.feed(text)
    parser.finish()
    return parser.content, parser.calls
