"""A conversation with tools, tool calls and tool results becomes exactly the tokens
mistral-common's InstructTokenizerV11 encodes for the same ChatCompletionRequest."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    ImageChunk,
    SystemMessage,
    TextChunk,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import FunctionCall, Tool
from mistral_common.protocol.instruct.tool_calls import ToolCall as RefCall
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from localsmall.chat.conversation import Message
from localsmall.chat.normalize import normalize_messages
from localsmall.chat.prompt import ChatTemplate
from localsmall.chat.tools import ToolCall, ToolSpec, parse_tools
from localsmall.engine.model import Engine
from localsmall.images import PreparedImage, prepare_image_bytes
from tests.test_prompt import PUBLISHED_STYLE, _fed_ids
from tests.tinymodels import image_bytes

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city. Ünïcode ok.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string",
                                                 "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert", "parameters": {"type": "object", "properties": {
            "value": {"type": "number"}}}, "strict": True}},
]
TOOL_CALLS_ID, CALL_ID_ID, ARGS_ID = 9, 33, 32


@pytest.fixture(scope="module")
def reference(tiny) -> MistralTokenizer:
    return MistralTokenizer.from_file(str(tiny.tekken))


def _pil(image: PreparedImage) -> Image.Image:
    return Image.frombytes("RGB", (image.width, image.height), image.rgb)


def _ref_message(m: Message) -> Any:
    if m.role == "system":
        return SystemMessage(content=m.text)
    if m.role == "tool":
        return ToolMessage(tool_call_id=m.tool_call_id, content=m.text)
    if m.role == "assistant":
        calls = [RefCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                 for c in m.tool_calls]
        return AssistantMessage(content=m.text or None, tool_calls=calls or None)
    return UserMessage(content=[TextChunk(text=p) if isinstance(p, str)
                                else ImageChunk(image=_pil(p)) for p in m.parts])


def _reference_ids(reference: MistralTokenizer, messages: Sequence[Message],
                   tools: list[dict[str, Any]] | None) -> list[int]:
    request = ChatCompletionRequest(
        messages=[_ref_message(m) for m in messages],
        tools=[Tool.from_openai(t) for t in tools] if tools else None)
    return reference.encode_chat_completion(request).tokens


def _ours(engine: Engine, messages: Sequence[Message], tools: list[dict[str, Any]] | None,
          template: ChatTemplate | None = None) -> list[int]:
    return _fed_ids(engine, template or ChatTemplate(engine.info.chat_template), messages,
                    tools=parse_tools(tools) if tools else None)


def _weather(city: str, call_id: str) -> ToolCall:
    return ToolCall(call_id, "get_weather", json.dumps({"city": city}))


def _conversation() -> list[Message]:
    photo = prepare_image_bytes(image_bytes(112, 84, seed=4), "sky.png")
    return [
        Message.system("You are a weather bot. Today is 2026-11-30."),
        Message.user("What's the weather where this was taken, and in Tokyo?", (photo,)),
        Message.assistant("", tool_calls=(_weather("Paris", "paris0001"),
                                          _weather("Tokyo", "tokyo0002"))),
        # results come back out of order: Tokyo first
        Message.tool_result("tokyo0002", '{"temp": 25, "sky": "clear"}'),
        Message.tool_result("paris0001", "21 °C, light rain"),
        Message.assistant("Paris: 21 °C and rain. Tokyo: 25 °C, clear."),
        Message.user("Convert Paris to Fahrenheit please."),
        Message.assistant("Let me convert that.",
                          tool_calls=(ToolCall("conv00003", "convert", '{"value":21}'),)),
        Message.tool_result("conv00003", "69.8"),
    ]


@pytest.mark.parametrize("template", ["gguf", "published-style"])
def test_tools_calls_and_results_equal_mistral_common(engine: Engine, reference: MistralTokenizer,
                                                       template: str) -> None:
    messages = _conversation()
    chosen = ChatTemplate(PUBLISHED_STYLE) if template == "published-style" else None
    ours = _ours(engine, messages, TOOLS, chosen)
    assert ours == _reference_ids(reference, messages, TOOLS)
    # two calls in one turn, then a call after text: three [TOOL_CALLS], each with an id
    assert ours.count(TOOL_CALLS_ID) == 3 and ours.count(CALL_ID_ID) == 3
    # results are read in the order of the calls
    text = engine.detokenize(ours, special=True)
    assert text.index("paris0001[TOOL_CONTENT]") < text.index("tokyo0002[TOOL_CONTENT]")


def test_tools_without_calls_and_multi_turn(engine: Engine, reference: MistralTokenizer) -> None:
    messages = [Message.system("Be brief."), Message.user("Hi"), Message.assistant("Hello! "),
                Message.user("Weather in Oslo?")]
    ours = _ours(engine, messages, TOOLS)
    assert ours == _reference_ids(reference, messages, TOOLS)
    # tools sit right before the last [INST]
    assert ours.index(5) > ours.index(4) and ours[ours.index(6) + 1] == 3


def test_control_token_text_in_tools_stays_text(engine: Engine,
                                                reference: MistralTokenizer) -> None:
    tools = [{"type": "function", "function": {
        "name": "search", "description": "Finds [INST] things </s> [TOOL_CALLS]",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
    messages = [
        Message.user("Search for [ARGS] please"),
        Message.assistant("", tool_calls=(ToolCall("srch00001", "search",
                                                   json.dumps({"q": "[CALL_ID] [/INST]"})),)),
        Message.tool_result("srch00001", "[TOOL_RESULTS] nothing [/TOOL_RESULTS] <s>"),
    ]
    ours = _ours(engine, messages, tools)
    assert ours == _reference_ids(reference, messages, tools)
    assert ours.count(3) == 1 and ours.count(TOOL_CALLS_ID) == 1 and ours.count(ARGS_ID) == 1


def test_consecutive_messages_merge_as_mistral_common_does(engine: Engine,
                                                           reference: MistralTokenizer) -> None:
    photo = prepare_image_bytes(image_bytes(84, 112, seed=5), "tall.png")
    messages = [Message.system("One."), Message.system("Two."),
                Message("user", ("first part", "second part")),
                Message("user", ("look at this:", photo)),  # text then image: image first
                Message.assistant("Fine."), Message.assistant("Really."),
                Message.user("ok")]
    assert _ours(engine, messages, None) == _reference_ids(reference, messages, None)


def test_call_ids_that_mistral_refuses_are_replaced_consistently() -> None:
    messages = [Message.user("hi"),
                Message.assistant("", tool_calls=(ToolCall("call_abc-123", "f", "{}"),)),
                Message.tool_result("call_abc-123", "done")]
    normal = normalize_messages(messages)
    new_id = normal[1].tool_calls[0].id
    assert new_id.isalnum() and len(new_id) == 9 and normal[2].tool_call_id == new_id
    assert normalize_messages(messages)[1].tool_calls[0].id == new_id  # stable


def test_tool_specs_from_openai_shapes() -> None:
    from localsmall.errors import ToolsError

    specs = parse_tools(TOOLS)
    assert specs[1] == ToolSpec("convert", "", TOOLS[1]["function"]["parameters"], True)
    for bad in ([{"type": "function"}], [{"function": {"name": "bad name"}}], {"x": 1},
                [TOOLS[0], TOOLS[0]]):
        with pytest.raises(ToolsError) as err:
            parse_tools(bad)
        assert err.value.param == "tools"


def test_tool_calls_and_results_survive_save_and_load(tmp_path) -> None:
    from localsmall.chat.conversation import Conversation, load_conversation, save_conversation

    conversation = Conversation(system="s", messages=_conversation()[6:])
    saved = save_conversation(conversation, tmp_path / "chat.json")
    loaded = load_conversation(saved)
    assert loaded.messages == conversation.messages
    assert loaded.messages[1].tool_calls[0].name == "convert"
    assert loaded.messages[2].role == "tool" and loaded.messages[2].tool_call_id == "conv00003"
