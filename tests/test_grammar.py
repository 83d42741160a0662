"""Constrained replies through the real llama.cpp with the tiny random model: JSON that
parses and validates, forced tool calls whose arguments match the tool's schema, a lazy
grammar that leaves free text alone until [TOOL_CALLS]."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

import jsonschema
import pytest

from localsmall.chat.conversation import Message
from localsmall.chat.prompt import ChatTemplate, build_prompt
from localsmall.chat.toolparse import ToolCallParser
from localsmall.chat.tools import (
    ResponseFormat,
    ToolChoice,
    ToolSpec,
    parse_tools,
    reply_constraint,
)
from localsmall.engine.json_grammar import SchemaError, integer_range, json_schema_grammar
from localsmall.engine.model import Engine
from localsmall.engine.types import Constraint, SamplingSettings, TurnResult
from localsmall.errors import ToolsError
from tests.tool_schemas import CONVERT, WEATHER

TOOLS = parse_tools([{"type": "function", "function": {"name": "get_weather",
                                                       "parameters": WEATHER}},
                     {"type": "function", "function": {"name": "convert",
                                                       "parameters": CONVERT}}])
SCHEMAS = {"get_weather": WEATHER, "convert": CONVERT}
SEEDS = (1, 2)  # a token costs 0.1-1 s on a shared 2-core CPU: keep replies short


def _prompt(engine: Engine, tools: tuple[ToolSpec, ...] = TOOLS) -> list[Any]:
    messages = [Message.system("You are helpful."), Message.user("Weather in Paris in F?")]
    return build_prompt(ChatTemplate(None), messages, bos=engine.bos_token,
                        eos=engine.eos_token, tools=tools,
                        tokenize=lambda t, s: engine.tokenize(t, special=s))


def _generate(engine: Engine, constraint: Constraint | None, seed: int, *,
              max_tokens: int = 60, **extra: Any) -> tuple[str, TurnResult]:
    sampling = SamplingSettings(temperature=1.0, seed=seed, max_tokens=max_tokens,
                                constraint=constraint, **extra)
    engine.reset()  # the same start whichever test used the shared engine before
    generation = engine.generate(_prompt(engine), sampling)
    _STREAMED[:] = [event.piece for event in generation]
    return "".join(_STREAMED), generation.result


_STREAMED: list[str] = []  # the pieces of the last reply, as the engine streamed them


def _calls(pieces: str) -> ToolCallParser:
    """The parser fed the last reply token by token (as a server streams it)."""
    assert "".join(_STREAMED) == pieces
    parser = ToolCallParser()
    for piece in _STREAMED:
        parser.feed(piece)
    parser.finish()
    return parser


def _check_call(parser: ToolCallParser, names: set[str]) -> None:
    assert parser.content == "" and len(parser.calls) == 1, parser.calls
    call = parser.calls[0]
    assert call.name in names and re.fullmatch(r"[a-zA-Z0-9]{9}", call.id)
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


@pytest.mark.parametrize("seed", SEEDS)
def test_json_schema_replies_validate(engine: Engine, seed: int) -> None:
    schema = {"type": "object", "properties": {
        "answer": {"enum": ["yes", "no", None]}, "score": {"type": "integer", "minimum": -3,
                                                             "maximum": 250},
        "ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 3}},
        "required": ["answer", "score", "ok"], "additionalProperties": False}
    constraint = reply_constraint(response_format=ResponseFormat("json_schema", schema, True))
    pieces, result = _generate(engine, constraint, seed)
    assert result.stats.stop_reason == "eos", pieces
    jsonschema.validate(json.loads(result.text), schema)
    assert pieces == result.text  # no control token slipped in


def test_json_object_replies_are_objects(engine: Engine) -> None:
    constraint = reply_constraint(response_format=ResponseFormat("json_object"))
    # Random weights wander inside strings: check the start, then close the object by
    # favouring "}" and see the reply end right there.
    pieces, _ = _generate(engine, constraint, seed=1, max_tokens=6)
    assert pieces.startswith("{") and pieces == pieces.lstrip()
    close = tuple((t, 100.0) for t in engine.tokenize("{}", special=False))
    pieces, result = _generate(engine, constraint, seed=1, logit_bias=close)
    assert result.stats.stop_reason == "eos" and json.loads(pieces) == {}


def test_required_tool_choice_forces_a_valid_call(engine: Engine) -> None:
    # (the named, auto and parallel tests below draw more calls, at other seeds)
    constraint = reply_constraint(tools=TOOLS, tool_choice=ToolChoice("required"),
                                  parallel_tool_calls=False)
    pieces, result = _generate(engine, constraint, seed=2)
    assert result.stats.stop_reason == "eos" and pieces.startswith("[TOOL_CALLS]")
    _check_call(_calls(pieces), {"get_weather", "convert"})


def test_named_tool_choice_calls_that_function(engine: Engine) -> None:
    constraint = reply_constraint(tools=TOOLS, tool_choice=ToolChoice("named", "convert"))
    pieces, result = _generate(engine, constraint, seed=3)
    assert result.stats.stop_reason == "eos"
    _check_call(_calls(pieces), {"convert"})


def test_parallel_calls_each_validate(engine: Engine) -> None:
    constraint = reply_constraint(tools=TOOLS, tool_choice=ToolChoice("required"))
    pieces, _ = _generate(engine, constraint, seed=7, max_tokens=50)
    parser = _calls(pieces)
    complete = parser.calls if pieces.endswith("}") else parser.calls[:-1]
    assert complete and pieces.count("[TOOL_CALLS]") >= 1
    for call in complete:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_auto_leaves_free_text_alone(engine: Engine) -> None:
    lazy = reply_constraint(tools=TOOLS, tool_choice=ToolChoice("auto"))
    assert lazy is not None and lazy.lazy
    # The same sampling without the grammar (control tokens forbidden alike) gives the
    # same reply: text before [TOOL_CALLS] is not constrained at all.
    free = Constraint(allowed_control=lazy.allowed_control)
    constrained, _ = _generate(engine, lazy, seed=1, max_tokens=12)
    unconstrained, _ = _generate(engine, free, seed=1, max_tokens=12)
    assert constrained == unconstrained and "[TOOL_CALLS]" not in constrained
    with pytest.raises(ValueError):
        json.loads(constrained)


def test_auto_constrains_a_call_once_started(engine: Engine) -> None:
    lazy = reply_constraint(tools=TOOLS, tool_choice=ToolChoice("auto"),
                            parallel_tool_calls=False)
    forced = ((engine.control_tokens["[TOOL_CALLS]"], 100.0),)  # the model "chooses" a call
    pieces, result = _generate(engine, lazy, seed=4, logit_bias=forced)
    assert result.stats.stop_reason == "eos" and pieces.startswith("[TOOL_CALLS]")
    _check_call(_calls(pieces), {"get_weather", "convert"})


def test_tool_choice_none_forbids_calls(engine: Engine) -> None:
    constraint = reply_constraint(tools=TOOLS, tool_choice=ToolChoice("none"))
    forced = ((engine.control_tokens["[TOOL_CALLS]"], 100.0),)
    pieces, _ = _generate(engine, constraint, seed=1, max_tokens=5, logit_bias=forced)
    assert "[TOOL_CALLS]" not in pieces and pieces
    biased, _ = _generate(engine, None, seed=1, max_tokens=1, logit_bias=forced)
    assert biased == "[TOOL_CALLS]"  # the bias alone would have made it call


def test_schemas_that_cannot_be_enforced_are_refused() -> None:
    with pytest.raises(ToolsError) as err:
        reply_constraint(response_format=ResponseFormat(
            "json_schema", {"type": "string", "pattern": "^a+$"}))
    assert err.value.param == "response_format" and "pattern" in str(err.value)
    strict = ToolSpec("f", "", {"type": "object", "properties": {
        "x": {"type": "array", "uniqueItems": True}}}, strict=True)
    with pytest.raises(ToolsError) as err:
        reply_constraint(tools=(strict,), tool_choice=ToolChoice("required"))
    assert err.value.param == "tools"
    lenient = replace(strict, strict=False)  # falls back to any JSON object
    constraint = reply_constraint(tools=(lenient,), tool_choice=ToolChoice("required"))
    assert constraint is not None and "object" in constraint.grammar
    with pytest.raises(SchemaError, match="reference"):
        json_schema_grammar({"$ref": "https://example.com/s.json"})


def _range_regex(lo: int | None, hi: int | None) -> re.Pattern[str]:
    # The range grammar only uses digit literals, classes, groups, {n} and |.
    text = integer_range(lo, hi).replace('"', "").replace(" ", "")
    return re.compile(text)


@pytest.mark.parametrize("lo,hi", [(0, 9), (-5, 120), (7, 7), (-130, -12), (95, 1003),
                                   (None, 20), (-20, None), (3, None)])
def test_integer_ranges_hold_exactly_their_numbers(lo: int | None, hi: int | None) -> None:
    pattern = _range_regex(lo, hi)
    for n in range(-1500, 1500):
        inside = (lo is None or n >= lo) and (hi is None or n <= hi)
        assert bool(pattern.fullmatch(str(n))) == inside, n
    assert not pattern.fullmatch("007") and not pattern.fullmatch("-0")


# --- what the grammars accept and refuse (no generation: each token checked in turn) ------


def _accepts(engine: Engine, constraint: Constraint | None, text: str) -> bool:
    assert constraint is not None
    return engine.constraint_accepts(constraint, engine.tokenize(text, special=True))


def test_schema_grammar_accepts_valid_and_refuses_invalid_json(engine: Engine) -> None:
    fmt = ResponseFormat("json_schema", WEATHER, True)
    constraint = reply_constraint(response_format=fmt)
    good = ['{"city": "Paris", "unit": "celsius"}',
            '{"city":"","unit":"fahrenheit","days":14}',
            '{\n  "city": "Oslo",\n  "unit": "celsius",\n  "days": 1\n}',
            '{"city": "a\\"b\\u00e9", "unit": "celsius"}']
    bad = ['{"city": "Paris"}', '{"city": "Toulouse", "unit": "celsius"}',
           '{"city": "P", "unit": "celsius", "days": 15}',
           '{"city": "P", "unit": "celsius", "days": 0}',
           '{"city": "P", "unit": "kelvin"}', '{"city": "P", "unit": "celsius", "x": 1}',
           '{"city": "P", "unit": "celsius"} trailing', '{"city": "a\nb", "unit": "celsius"}',
           '{"city": "[INST]", "unit": "celsius"}']  # a control token inside a string
    for text in good:
        jsonschema.validate(json.loads(text), WEATHER)
        assert _accepts(engine, constraint, text), text
    for text in bad:
        assert not _accepts(engine, constraint, text), text


def test_tool_call_grammar_accepts_mistral_calls_only(engine: Engine) -> None:
    required = reply_constraint(tools=TOOLS, tool_choice=ToolChoice("required"))
    call = '[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Rome", "unit": "celsius"}'
    other = '[TOOL_CALLS]convert[ARGS]{"value": -40, "to": ["K", "F"]}'
    assert _accepts(engine, required, call)
    assert _accepts(engine, required, other)  # [CALL_ID] may be left out
    assert _accepts(engine, required, call + other)  # parallel calls
    for bad in ["Sure! " + call, call.replace("get_weather", "get_time"),
                call.replace("a1B2c3D4e", "a1B2c3D4"), call.replace('"Rome"', "Rome"),
                other.replace("-40", "-41"), call.replace("[TOOL_CALLS]", "[INST]")]:
        assert not _accepts(engine, required, bad), bad
    single = reply_constraint(tools=TOOLS, tool_choice=ToolChoice("named", "convert"))
    assert _accepts(engine, single, other) and not _accepts(engine, single, other + other)
    assert not _accepts(engine, single, call)
    lazy = reply_constraint(tools=TOOLS, tool_choice=ToolChoice("auto"))
    assert _accepts(engine, lazy, "Plain text, [brackets] and {braces} are free.")
    assert _accepts(engine, lazy, "Let me check. " + call)
    assert not _accepts(engine, lazy, "Let me check. " + call.replace('"Rome"', "1"))
