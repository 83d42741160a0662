"""The tool-call parser on replies written in Mistral's formats, whole and split into
stream pieces at every position."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localsmall.chat.toolparse import (
    ArgsDelta,
    CallStart,
    Delta,
    TextDelta,
    ToolCallParser,
    parse_reply,
)
from localsmall.chat.tools import ToolCall

# Replies as Mistral Small 3.2 writes them (tokenizer v11: [TOOL_CALLS]name[CALL_ID]id[ARGS]),
# and in the older JSON-list form of earlier Mistral models.
SINGLE = '[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Paris", "unit": "celsius"}'
SEVERAL = ('[TOOL_CALLS]get_weather[CALL_ID]Xy7Kp2Qw9[ARGS]{"city": "Paris"}'
           '[TOOL_CALLS]get_weather[CALL_ID]Zz1Aa2Bb3[ARGS]{"city": "Tokyo"}'
           '[TOOL_CALLS]convert[CALL_ID]Qq9Ww8Ee7[ARGS]{"value": 21.5, "to": ["F", "K"]}')
TEXT_FIRST = ("Let me check the weather [in two cities] for you.\n\n"
              '[TOOL_CALLS]get_weather[CALL_ID]p0o9i8u7Y[ARGS]{"city": "Zürich"}')
NO_ID = '[TOOL_CALLS]search[ARGS]{"q": "llama.cpp [grammar]"}'
JSON_LIST = ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
             '{"name": "convert", "arguments": {"value": 1}, "id": "abcdefghi"}]')
PLAIN = "No tools needed: 2 + 2 = 4. Brackets like [TOOL] and [ARGS are just text."

EXPECTED: dict[str, tuple[str, list[ToolCall]]] = {
    SINGLE: ("", [ToolCall("a1B2c3D4e", "get_weather",
                           '{"city": "Paris", "unit": "celsius"}')]),
    SEVERAL: ("", [ToolCall("Xy7Kp2Qw9", "get_weather", '{"city": "Paris"}'),
                   ToolCall("Zz1Aa2Bb3", "get_weather", '{"city": "Tokyo"}'),
                   ToolCall("Qq9Ww8Ee7", "convert", '{"value": 21.5, "to": ["F", "K"]}')]),
    TEXT_FIRST: ("Let me check the weather [in two cities] for you.\n\n",
                 [ToolCall("p0o9i8u7Y", "get_weather", '{"city": "Zürich"}')]),
    NO_ID: ("", [ToolCall("gen000001", "search", '{"q": "llama.cpp [grammar]"}')]),
    JSON_LIST: ("", [ToolCall("gen000001", "get_weather", '{"city": "Paris"}'),
                     ToolCall("abcdefghi", "convert", '{"value": 1}')]),
    PLAIN: (PLAIN, []),
}


def _ids() -> object:
    counter = itertools.count(1)
    return lambda: f"gen{next(counter):06d}"


def _run(pieces: list[str]) -> tuple[list[Delta], ToolCallParser]:
    parser = ToolCallParser(id_factory=_ids())  # type: ignore[arg-type]
    deltas: list[Delta] = []
    for piece in pieces:
        deltas += parser.feed(piece)
    deltas += parser.finish()
    return deltas, parser


def _check_deltas(deltas: list[Delta], content: str, calls: list[ToolCall]) -> None:
    """The deltas add up to the content and the calls, each call started before its
    arguments arrive."""
    assert "".join(d.text for d in deltas if isinstance(d, TextDelta)) == content
    starts = [d for d in deltas if isinstance(d, CallStart)]
    assert [(s.index, s.id, s.name) for s in starts] == [(i, c.id, c.name)
                                                         for i, c in enumerate(calls)]
    for i, call in enumerate(calls):
        first = deltas.index(starts[i])
        args = [d for d in deltas if isinstance(d, ArgsDelta) and d.index == i]
        assert all(deltas.index(a) > first for a in args)
        assert "".join(a.text for a in args) == call.arguments


@pytest.mark.parametrize("reply", list(EXPECTED), ids=["single", "several", "text-first",
                                                       "no-id", "json-list", "plain"])
def test_whole_reply(reply: str) -> None:
    content, calls = EXPECTED[reply]
    assert parse_reply(reply, id_factory=_ids()) == (content, calls)  # type: ignore[arg-type]
    for call in calls:
        json.loads(call.arguments)


@pytest.mark.parametrize("reply", list(EXPECTED), ids=["single", "several", "text-first",
                                                       "no-id", "json-list", "plain"])
def test_split_in_two_at_every_position(reply: str) -> None:
    content, calls = EXPECTED[reply]
    for cut in range(len(reply) + 1):
        deltas, parser = _run([reply[:cut], reply[cut:]])
        assert (parser.content, parser.calls) == (content, calls), cut
        _check_deltas(deltas, content, calls)


@settings(max_examples=150, deadline=None)
@given(reply=st.sampled_from(list(EXPECTED)), data=st.data())
def test_split_into_any_pieces(reply: str, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.sets(st.integers(0, len(reply)), max_size=30)))
    pieces = [reply[a:b] for a, b in zip([0, *cuts], [*cuts, len(reply)], strict=True)]
    deltas, parser = _run(pieces)
    content, calls = EXPECTED[reply]
    assert (parser.content, parser.calls) == (content, calls)
    _check_deltas(deltas, content, calls)


def test_character_by_character_streams_early() -> None:
    parser = ToolCallParser(id_factory=_ids())  # type: ignore[arg-type]
    seen: list[tuple[int, Delta]] = []
    for i, ch in enumerate(TEXT_FIRST):
        seen += [(i, d) for d in parser.feed(ch)]
    # text goes out as it comes (a "[" waits for the next character only)
    first_text = next(i for i, d in seen if isinstance(d, TextDelta))
    assert first_text == 0
    # the call starts as soon as [ARGS] is complete, before any argument arrives
    start = next(i for i, d in seen if isinstance(d, CallStart))
    assert TEXT_FIRST[start - len("[ARGS]") + 1:start + 1] == "[ARGS]"
    assert any(isinstance(d, ArgsDelta) for i, d in seen if i < len(TEXT_FIRST) - 1)


def test_generated_ids_look_like_mistral_ids() -> None:
    _, calls = parse_reply(NO_ID)
    assert len(calls[0].id) == 9 and calls[0].id.isalnum()


def test_malformed_calls_are_kept_as_text() -> None:
    assert parse_reply("[TOOL_CALLS]get_weather") == ("[TOOL_CALLS]get_weather", [])
    assert parse_reply("[TOOL_CALLS] [not json") == ("[TOOL_CALLS] [not json", [])
