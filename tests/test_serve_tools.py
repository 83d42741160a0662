"""`localsmall serve` with tools and structured output, through the openai client: a
random-weight model never chooses a tool on its own, so the constraints are tested by
forcing (named and required tool choices, json_schema); the arguments and replies must
parse and validate. The parser itself is tested on recorded outputs in test_toolparse."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from tests.conftest import TinyModels
from tests.serveprocess import ServerProcess, running_server
from tests.tool_schemas import CONVERT, WEATHER

SCHEMAS = {"get_weather": WEATHER, "convert": CONVERT}
TOOLS: Any = [{"type": "function", "function": {"name": n, "description": f"{n} tool",
                                               "parameters": s}} for n, s in SCHEMAS.items()]
MESSAGES: Any = [{"role": "system", "content": "You are helpful."},
                 {"role": "user", "content": "Weather in Paris in F?"}]
SAMPLE = {"temperature": 1.0, "max_tokens": 80}


@pytest.fixture(scope="module")
def server(tiny: TinyModels, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    args = ["--model", str(tiny.f16), "--no-vision", "--ctx", "4096", "--gpu-layers", "0",
            "--threads", "1", "--slots", "2"]
    with running_server(tmp_path_factory.mktemp("serve-tools"), args) as running:
        yield running


@pytest.fixture
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="-", max_retries=0, timeout=300)


def _check_calls(calls: list[Any], names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.function.name in names
        assert re.fullmatch(r"[a-zA-Z0-9]{9}", call.id)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("seed", [1, 2])
def test_named_tool_choice(server: ServerProcess, client: openai.OpenAI, seed: int) -> None:
    reply = client.chat.completions.create(
        model=server.model_id(), messages=MESSAGES, tools=TOOLS, seed=seed, **SAMPLE,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    _check_calls(choice.message.tool_calls, {"get_weather"})


def _streamed_calls(stream: Any) -> tuple[list[dict[str, str]], str | None]:
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        assert not choice.delta.content
        for part in choice.delta.tool_calls or ():
            entry = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += part.id or ""
            entry["name"] += (part.function.name or "") if part.function else ""
            entry["arguments"] += (part.function.arguments or "") if part.function else ""
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("seed", [3, 4])
def test_required_tool_choice_streamed(server: ServerProcess, client: openai.OpenAI,
                                       seed: int) -> None:
    stream = client.chat.completions.create(
        model=server.model_id(), messages=MESSAGES, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, seed=seed, stream=True, **SAMPLE)
    calls, finish = _streamed_calls(stream)
    assert finish == "tool_calls" and len(calls) == 1
    for call in calls:
        assert call["name"] in SCHEMAS and re.fullmatch(r"[a-zA-Z0-9]{9}", call["id"])
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_reply_validates(server: ServerProcess, client: openai.OpenAI,
                                     stream: bool) -> None:
    schema = {"type": "object", "properties": {
        "answer": {"enum": ["yes", "no", None]},
        "score": {"type": "integer", "minimum": -3, "maximum": 250},
        "ok": {"type": "boolean"}},
        "required": ["answer", "score", "ok"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model=server.model_id(), messages=MESSAGES, seed=5, stream=stream, **SAMPLE,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "verdict", "schema": schema, "strict": True}})
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
    else:
        text = reply.choices[0].message.content
    jsonschema.validate(json.loads(text), schema)


def test_json_object_reply_parses(server: ServerProcess, client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=server.model_id(), messages=MESSAGES,
                                           seed=6, response_format={"type": "json_object"},
                                           **SAMPLE)
    if reply.choices[0].finish_reason == "stop":  # a random model may ramble past 80 tokens
        assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_tool_result_turn(server: ServerProcess, client: openai.OpenAI) -> None:
    model = server.model_id()
    first = client.chat.completions.create(  # "convert" has no free-text argument
        model=model, messages=MESSAGES, tools=TOOLS, seed=7, temperature=1.0, max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "convert"}})
    calls = first.choices[0].message.tool_calls
    _check_calls(calls, {"convert"})
    # The client runs the tools and sends the results back (in reverse order).
    follow: Any = [*MESSAGES, first.choices[0].message.model_dump(exclude_none=True)]
    follow += [{"role": "tool", "tool_call_id": c.id, "content": f"result of {c.function.name}"}
               for c in reversed(calls)]
    second = client.chat.completions.create(model=model, messages=follow, tools=TOOLS,
                                            tool_choice="none", max_tokens=5, seed=8)
    assert second.choices[0].finish_reason == "length"
    assert not second.choices[0].message.tool_calls
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    # The conversation up to and with the call is still in the cache: the resent call is
    # laid out with the tokens the model generated, not re-read from its arguments (the
    # last generated token was never fed back).
    assert second.usage.prompt_tokens_details.cached_tokens >= \
        first.usage.prompt_tokens + first.usage.completion_tokens - 1


def test_streamed_tool_call_resent_is_cached(server: ServerProcess,
                                             client: openai.OpenAI) -> None:
    model = server.model_id()
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, seed=11, temperature=1.0,
        max_tokens=200, tool_choice="required", stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    calls, finish = _streamed_calls(iter(chunks))
    assert finish == "tool_calls" and calls
    usage = chunks[-1].usage
    assistant: Any = {"role": "assistant", "content": None, "tool_calls": [
        {"id": c["id"], "type": "function",
         "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]}
    follow: Any = [*MESSAGES, assistant,
                   *[{"role": "tool", "tool_call_id": c["id"], "content": "42"}
                     for c in calls]]
    second = client.chat.completions.create(model=model, messages=follow, tools=TOOLS,
                                            tool_choice="none", max_tokens=3, seed=8)
    assert second.usage.prompt_tokens_details.cached_tokens >= \
        usage.prompt_tokens + usage.completion_tokens - 1


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format"),
])
def test_bad_tool_requests(server: ServerProcess, client: openai.OpenAI,
                           kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=server.model_id(), messages=MESSAGES, **kwargs)
    assert error.value.param == param
