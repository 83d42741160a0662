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

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 6},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 14}},
    "required": ["city", "unit"], "additionalProperties": False}
CONVERT = {"type": "object", "properties": {
    "value": {"type": "number", "minimum": -40, "maximum": 300},
    "to": {"type": "array", "items": {"enum": ["F", "K"]}, "minItems": 1, "maxItems": 2}},
    "required": ["value", "to"]}
TOOLS = parse_tools([{"type": "function", "function": {"name": "get_weather",
                                                       "parameters": WEATHER}},
                     {"type": "function", "function": {"name": "convert",
                                                       "parameters": CONVERT}}])
SCHEMAS = {"get_weather": WEATHER, "convert": CONVERT}
SEEDS = (1, 2, 3)


def _prompt(engine: Engine, tools: tuple[ToolSpec, ...] = TOOLS) -> list[Any]:
    messages = [Message.system("You are helpful."), Message.user("Weather in Paris in F?")]
    return build_prompt(ChatTemplate(None), messages, bos=engine.bos_token,
                        eos=engine.eos_token, tools=tools,
                        tokenize=lambda t, s: engine.tokenize(t, special=s))


def _generate(engine: Engine, constraint: Constraint | None, seed: int, *,
              max_tokens: int = 60, **extra: Any) -> tuple[str, TurnResult]:
    sampling = SamplingSettings(temperature=1.0, seed=seed, max_tokens=max_tokens,
                                constraint=constraint, **extra)
    generation = engine.generate(_prompt(engine), sampling)
    pieces = "".join(event.piece for event in generation)
    return pieces, generation.result


def _calls(pieces: str) -> ToolCallParser:
    parser = ToolCallParser()
    parser.feed(pieces)
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
        "ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 5}},
        "required": ["answer", "score", "ok"], "additionalProperties": False}
    constraint = reply_constraint(response_format=ResponseFormat("json_schema", schema, True))
    pieces, result = _generate(engine, constraint, seed)
    assert result.stats.stop_reason == "eos", pieces
    jsonschema.validate(json.loads(result.text), schema)
    assert pieces == result.text  # no control token slipped in


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_json_object_replies_parse(engine: Engine, seed: int) -> None:
    pieces, result = _generate(engine, reply_constraint(
        response_format=ResponseFormat("json_object")), seed)
    assert result.stats.stop_reason == "eos"
    assert isinstance(json.loads(result.text), dict)


@pytest.mark.parametrize("seed", SEEDS)
def test_required_tool_choice_forces_a_valid_call(engine: Engine, seed: int) -> None:
    constraint = reply_constraint(tools=TOOLS, tool_choice=ToolChoice("required"),
                                  parallel_tool_calls=False)
    pieces, result = _generate(engine, constraint, seed)
    assert result.stats.stop_reason == "eos" and pieces.startswith("[TOOL_CALLS]")
    _check_call(_calls(pieces), {"get_weather", "convert"})


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_named_tool_choice_calls_that_function(engine: Engine, seed: int) -> None:
    constraint = reply_constraint(tools=TOOLS, tool_choice=ToolChoice("named", "convert"))
    pieces, result = _generate(engine, constraint, seed)
    assert result.stats.stop_reason == "eos"
    _check_call(_calls(pieces), {"convert"})


def test_parallel_calls_each_validate(engine: Engine) -> None:
    constraint = reply_constraint(tools=TOOLS, tool_choice=ToolChoice("required"))
    pieces, _ = _generate(engine, constraint, seed=7, max_tokens=150)
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
    for seed in SEEDS[:2]:
        constrained, _ = _generate(engine, lazy, seed, max_tokens=25)
        unconstrained, _ = _generate(engine, free, seed, max_tokens=25)
        assert constrained == unconstrained and "[TOOL_CALLS]" not in constrained
        with pytest.raises(ValueError):
            json.loads(constrained)


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_auto_constrains_a_call_once_started(engine: Engine, seed: int) -> None:
    lazy = reply_constraint(tools=TOOLS, tool_choice=ToolChoice("auto"),
                            parallel_tool_calls=False)
    forced = ((engine.control_tokens["[TOOL_CALLS]"], 100.0),)  # the model "chooses" a call
    pieces, result = _generate(engine, lazy, seed, logit_bias=forced)
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
