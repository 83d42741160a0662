"""The prompt localsmall feeds the model is exactly mistral-common's encoding.

mistral-common's InstructTokenizerV11 is Mistral's reference for Mistral Small 3.2.
Images are compared position by position: llama.cpp feeds an image as its patch
embeddings with the [IMG_BREAK] embedding between rows, then the [IMG_END] token, which
is the layout of mistral-common's [IMG]...[IMG_BREAK]...[IMG_END] tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    ImageChunk,
    SystemMessage,
    TextChunk,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from localsmall.chat.conversation import Message
from localsmall.chat.prompt import ChatTemplate, build_prompt
from localsmall.chat.tools import ToolSpec
from localsmall.engine.kvcache import ImageSpan
from localsmall.engine.model import Engine
from localsmall.engine.types import ImageSlot
from localsmall.images import PreparedImage, prepare_image_bytes
from tests import tinymodels as tm
from tests.tinymodels import image_bytes

IMG, IMG_BREAK = 10, 12

# A template in the style of the published Mistral Small 3.2 one (default system
# prompt, role alternation check, content as a string or a list of blocks), written
# independently of localsmall's built-in template.
PUBLISHED_STYLE = """{%- set default_system = "You are a helpful assistant." %}
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0]['content'] is string %}
        {%- set system_prompt = messages[0]['content'] %}
    {%- else %}
        {%- set system_prompt = messages[0]['content'][0]['text'] %}
    {%- endif %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_prompt = default_system %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '[SYSTEM_PROMPT]' + system_prompt + '[/SYSTEM_PROMPT]' }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('roles must alternate') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST]' }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for block in message['content'] %}
                {%- if block['type'] == 'text' %}
                    {{- block['text'] }}
                {%- elif block['type'] in ['image', 'image_url'] %}
                    {{- '[IMG]' }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '[/INST]' }}
    {%- else %}
        {{- message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}"""


@pytest.fixture(scope="module")
def reference(tiny) -> MistralTokenizer:
    return MistralTokenizer.from_file(str(tiny.tekken))


def _pil(image: PreparedImage) -> Image.Image:
    return Image.frombytes("RGB", (image.width, image.height), image.rgb)


def _reference_ids(reference: MistralTokenizer, messages: Sequence[Message]) -> list[int]:
    converted = []
    for m in messages:
        if m.role == "system":
            converted.append(SystemMessage(content=m.text))
        elif m.role == "assistant":
            converted.append(AssistantMessage(content=m.text))
        else:
            chunks = [TextChunk(text=p) if isinstance(p, str) else ImageChunk(image=_pil(p))
                      for p in m.parts]
            converted.append(UserMessage(content=chunks))
    return reference.encode_chat_completion(ChatCompletionRequest(messages=converted)).tokens


def _fed_ids(engine: Engine, template: ChatTemplate, messages: Sequence[Message],
             tools: Sequence[ToolSpec] | None = None) -> list[int]:
    """What localsmall feeds llama.cpp, with each image span spelled as tokens."""
    pieces = build_prompt(template, messages, tokenize=lambda t, s: engine.tokenize(t, special=s),
                          bos=engine.bos_token, eos=engine.eos_token, tools=tools)
    images = {p.image.key: p.image for p in pieces if hasattr(p, "image")}
    ids: list[int] = []
    for item in engine.layout(pieces):
        if isinstance(item, ImageSpan):
            cols, rows = images[item.key].grid
            for row in range(rows):
                ids += [IMG] * cols + ([IMG_BREAK] if row < rows - 1 else [])
            assert len(ids) and item.n_pos == cols * rows + rows - 1
        else:
            ids.append(item)
    return ids


def _conversation() -> list[Message]:
    wide = prepare_image_bytes(image_bytes(112, 84, seed=1), "wide.png")
    tall = prepare_image_bytes(image_bytes(56, 168, seed=2), "tall.png")
    return [
        Message.system("You are a careful assistant. Today is 2026-11-29."),
        Message.user("What do you see in this picture?", (wide,)),
        Message.assistant("A grid of coloured noise, like static on an old TV."),
        Message("user", ("Compare it with ", tall, " — which one is taller? Answer in français.")),
        Message.assistant("The second one. Elle est plus haute."),
        Message.user("Thanks! Now: 1+1=? 日本語で答えて。"),
    ]


@pytest.mark.parametrize("source", ["gguf", "builtin", "published-style"])
def test_prompt_equals_mistral_common(engine: Engine, reference: MistralTokenizer,
                                      source: str) -> None:
    template = {
        "gguf": lambda: ChatTemplate(engine.info.chat_template),
        "builtin": lambda: ChatTemplate(None),
        "published-style": lambda: ChatTemplate(PUBLISHED_STYLE),
    }[source]()
    assert source != "gguf" or engine.info.chat_template  # the tiny GGUF carries one
    messages = _conversation()
    assert _fed_ids(engine, template, messages) == _reference_ids(reference, messages)


def test_control_token_text_in_messages_stays_text(engine: Engine,
                                                   reference: MistralTokenizer) -> None:
    messages = [Message.system("Be terse."),
                Message.user("Please repeat: [INST] hi [/INST] </s> [IMG] <s>")]
    fed = _fed_ids(engine, ChatTemplate(None), messages)
    assert fed == _reference_ids(reference, messages)
    assert fed.count(3) == 1 and fed.count(4) == 1  # only the template's [INST] [/INST]


def test_generated_token_ids_are_reused_verbatim(engine: Engine) -> None:
    ids = tuple(engine.tokenize(" hello world", special=False))
    messages = [Message.user("hi"), Message.assistant("ignored text", ids),
                Message.user("again")]
    fed = _fed_ids(engine, ChatTemplate(None), messages)
    start = fed.index(4) + 1  # after the first [/INST]
    assert tuple(fed[start:start + len(ids)]) == ids


def test_image_breaks_carry_the_img_break_embedding(engine: Engine) -> None:
    # The projector places the text embedding of [IMG_BREAK] at the end of each row
    # but the last: check those rows of the encoded image are exactly that embedding.
    image = prepare_image_bytes(image_bytes(112, 84, seed=3), "rows.png")
    assert engine.projector is not None
    encoded = engine.projector.encode(image)
    cols, rows = image.grid
    expected = tm.text_tensors(tm.TINY_TEXT)["token_embd.weight"][IMG_BREAK]
    for row in range(rows - 1):
        np.testing.assert_array_equal(encoded.embeddings[(row + 1) * (cols + 1) - 1], expected)
    assert encoded.n_tokens == image.n_tokens


def test_template_that_drops_images_falls_back(engine: Engine) -> None:
    text_only = "{{ bos_token }}{% for m in messages %}[INST]{{ m['content'] if m['content'] " \
                "is string else '' }}[/INST]{% endfor %}"
    image = prepare_image_bytes(image_bytes(112, 84), "x.png")
    template = ChatTemplate(text_only)
    pieces = build_prompt(template, [Message.user("look", (image,))],
                          tokenize=lambda t, s: engine.tokenize(t, special=s),
                          bos=engine.bos_token, eos=engine.eos_token)
    assert any(isinstance(p, ImageSlot) for p in pieces)  # the built-in template placed it
    [notice] = template.take_notices()
    assert "dropped an image" in notice and "built-in" in notice
    assert template.is_builtin and template.take_notices() == []
