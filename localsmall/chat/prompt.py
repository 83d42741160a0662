"""From messages to the exact prompt the model reads.

The chat template (the GGUF's own `tokenizer.chat_template`, or localsmall's built-in
one for files without it) lays out the conversation. To match Mistral's reference
tokenizer (mistral-common) token for token, the template is rendered with each piece
of message text replaced by a placeholder: the template's own text (control tokens such
as [INST]) is tokenized with control-token parsing, message text without it, each piece
on its own, and "[IMG]" in the template's output marks where each image goes.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from localsmall.chat.conversation import Message
from localsmall.chat.normalize import has_tool_content, normalize_messages
from localsmall.chat.tools import ToolSpec, tools_json
from localsmall.engine.types import ImageSlot, PromptPiece, TokenRun
from localsmall.errors import EngineError
from localsmall.images import PreparedImage

IMAGE_MARK = "[IMG]"
_SLOT = re.compile("\ue000(\\d+)\ue001")
BUILTIN_TEMPLATE_NAME = "mistral-small-3.2.jinja"

Tokenize = Callable[[str, bool], list[int]]  # (text, parse control tokens) -> ids


@cache
def builtin_template() -> str:
    """localsmall's own Mistral Small 3.2 template."""
    return resources.files("localsmall").joinpath("templates", BUILTIN_TEMPLATE_NAME).read_text(
        encoding="utf-8")


@dataclass(frozen=True)
class _Text:
    """A message's text (or its generated tokens), standing in for a placeholder."""

    text: str
    token_ids: tuple[int, ...] | None = None


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return dt.datetime.now().strftime(fmt)


@cache
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    # mistral-common serialises with json.dumps(ensure_ascii=False): match it.
    env.filters["tojson"] = lambda value, **_: json.dumps(value, ensure_ascii=False)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class ChatTemplate:
    """A compiled chat template that turns messages into prompt pieces."""

    def __init__(self, source: str | None) -> None:
        self.is_builtin = not source
        self.source = source or builtin_template()
        try:
            self._template = _compile(self.source)
        except jinja2.TemplateError as exc:
            raise EngineError(f"the model's chat template does not compile ({exc})") from None

    def _template_messages(self, messages: Sequence[Message],
                           slots: list[_Text]) -> tuple[list[dict[str, Any]], list[PreparedImage]]:
        """Messages in the shape chat templates expect, text swapped for placeholders."""
        images: list[PreparedImage] = []

        def slot(text: str, token_ids: tuple[int, ...] | None = None) -> str:
            slots.append(_Text(text, token_ids))
            return f"\ue000{len(slots) - 1}\ue001"

        out: list[dict[str, Any]] = []
        for m in messages:
            if m.role == "assistant":
                entry: dict[str, Any] = {"role": "assistant",
                                         "content": slot(m.text, m.token_ids)}
                if m.tool_calls and m.token_ids is None:  # generated tokens hold the calls
                    # Ids are nine letters or digits (checked by the template): no
                    # control token can hide in them, so they stay template text.
                    entry["tool_calls"] = [
                        {"id": c.id, "type": "function",
                         "function": {"name": slot(c.name), "arguments": slot(c.arguments)}}
                        for c in m.tool_calls]
                out.append(entry)
            elif m.role == "tool":
                out.append({"role": "tool", "tool_call_id": m.tool_call_id,
                            "content": slot(m.text)})
            elif m.role == "system" or not m.images:
                out.append({"role": m.role, "content": slot(m.text)})
            else:
                blocks: list[dict[str, Any]] = []
                for part in m.parts:
                    if isinstance(part, str):
                        blocks.append({"type": "text", "text": slot(part)})
                    else:
                        images.append(part)
                        blocks.append({"type": "image"})
                out.append({"role": "user", "content": blocks})
        return out, images

    def render(self, messages: Sequence[Message], *, bos: str, eos: str,
               tools: Sequence[ToolSpec] | None = None) -> list[tuple[str, bool] | _Text
                                                                | PreparedImage]:
        """The prompt as segments: (template text, True), message text, images."""
        slots: list[_Text] = []
        template_messages, images = self._template_messages(messages, slots)
        extra: dict[str, Any] = {}
        if tools:
            # Templates get the tools as OpenAI dicts; localsmall's own template writes
            # `tools_json`, a placeholder for mistral-common's exact text.
            slots.append(_Text(tools_json(tools)))
            extra = {"tools": [{"type": "function", "function": {
                         "name": t.name, "description": t.description,
                         "parameters": t.parameters}} for t in tools],
                     "tools_json": f"\ue000{len(slots) - 1}\ue001"}
        try:
            rendered = self._template.render(messages=template_messages, bos_token=bos,
                                             eos_token=eos, add_generation_prompt=True,
                                             **extra)
        except jinja2.TemplateError as exc:
            raise EngineError(f"the chat template refused the conversation: {exc}") from None
        segments: list[tuple[str, bool] | _Text | PreparedImage] = []
        remaining = iter(images)
        pos = 0
        for match in [*_SLOT.finditer(rendered), None]:
            end = match.start() if match else len(rendered)
            for k, text in enumerate(rendered[pos:end].split(IMAGE_MARK)):
                if k:
                    image = next(remaining, None)
                    if image is None:
                        raise EngineError("the chat template placed more images than the "
                                          "conversation has")
                    segments.append(image)
                if text:
                    segments.append((text, True))
            if match:
                segments.append(slots[int(match.group(1))])
                pos = match.end()
        if next(remaining, None) is not None:
            raise EngineError("the model's chat template dropped an image from the prompt")
        return segments


def build_prompt(template: ChatTemplate, messages: Sequence[Message], *, tokenize: Tokenize,
                 bos: str, eos: str, tools: Sequence[ToolSpec] | None = None
                 ) -> list[PromptPiece]:
    """Token runs and image slots for a conversation, ready for the engine: what
    mistral-common's v11 tokenizer encodes for the same messages and tools. A
    conversation with tools, tool calls or tool results is laid out by localsmall's own
    template (model files' templates disagree on where tools go)."""
    messages = normalize_messages(messages)
    if (tools or has_tool_content(messages)) and template.source != builtin_template():
        template = ChatTemplate(None)
    pieces: list[PromptPiece] = []
    run: list[int] = []
    for segment in template.render(messages, bos=bos, eos=eos, tools=tools):
        if isinstance(segment, PreparedImage):
            if run:
                pieces.append(TokenRun(tuple(run)))
                run = []
            pieces.append(ImageSlot(segment))
        elif isinstance(segment, _Text):
            if segment.token_ids is not None:
                run.extend(segment.token_ids)
            elif segment.text:
                run.extend(tokenize(segment.text, False))
        else:
            run.extend(tokenize(segment[0], True))
    if run:
        pieces.append(TokenRun(tuple(run)))
    return pieces
