"""From messages to the exact prompt the model reads.

The chat template (the GGUF's own `tokenizer.chat_template`, or localsmall's built-in
one for files without it) lays out the conversation. To match Mistral's reference
tokenizer (mistral-common) token for token, the template is rendered with each piece
of message text replaced by a placeholder: the template's own text (control tokens such
as [INST]) is tokenized with control-token parsing, message text without it, each piece
on its own, and "[IMG]" in the template's output marks where each image goes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from localsmall.chat.conversation import Message
from localsmall.chat.normalize import has_tool_content, normalize_messages
from localsmall.chat.template_sandbox import (
    MAX_OUTPUT_CHARS,
    TemplateLimitError,
    compile_template,
    render_bounded,
)
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


class ChatTemplate:
    """A compiled chat template that turns messages into prompt pieces.

    A model's template is untrusted: it renders in a sandbox bounded in time and output
    (see template_sandbox); when it does not compile, fails or breaks a bound, the
    built-in template takes over for the rest of the session and `take_notices` says so."""

    def __init__(self, source: str | None) -> None:
        self.is_builtin = not source
        self.source = source or builtin_template()
        self._notices: list[str] = []
        try:
            self._template = compile_template(self.source)
        except TemplateLimitError as exc:
            if self.is_builtin:
                raise EngineError(f"the built-in chat template does not compile ({exc})") \
                    from None
            self._fall_back(f"the model's chat template does not compile ({exc})")

    def _fall_back(self, reason: str) -> None:
        self._notices.append(f"{reason[:300]}; using localsmall's built-in Mistral Small 3.2 "
                             "template instead.")
        self.is_builtin = True
        self.source = builtin_template()
        self._template = compile_template(self.source)

    def take_notices(self) -> list[str]:
        """Notices about a fallback to the built-in template, each given once."""
        notices, self._notices = self._notices, []
        return notices

    def _template_messages(self, messages: Sequence[Message],
                           slots: list[_Text]
                           ) -> tuple[list[dict[str, Any]], list[PreparedImage], int]:
        """Messages in the shape chat templates expect, text swapped for placeholders;
        and the index of the last message's first placeholder."""
        images: list[PreparedImage] = []
        last_start = 0

        def slot(text: str, token_ids: tuple[int, ...] | None = None) -> str:
            slots.append(_Text(text, token_ids))
            return f"\ue000{len(slots) - 1}\ue001"

        out: list[dict[str, Any]] = []
        for m in messages:
            last_start = len(slots)
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
        return out, images, last_start

    def render(self, messages: Sequence[Message], *, bos: str, eos: str,
               tools: Sequence[ToolSpec] | None = None) -> list[tuple[str, bool] | _Text
                                                                | PreparedImage]:
        """The prompt as segments: (template text, True), message text, images."""
        slots: list[_Text] = []
        template_messages, images, last_start = self._template_messages(messages, slots)
        last = {id(t) for t in slots[last_start:]}  # the last message's placeholders
        extra: dict[str, Any] = {}
        if tools:
            # Templates get the tools as OpenAI dicts; localsmall's own template writes
            # `tools_json`, a placeholder for mistral-common's exact text.
            slots.append(_Text(tools_json(tools)))
            extra = {"tools": [{"type": "function", "function": {
                         "name": t.name, "description": t.description,
                         "parameters": t.parameters}} for t in tools],
                     "tools_json": f"\ue000{len(slots) - 1}\ue001"}
        variables = {"messages": template_messages, "bos_token": bos, "eos_token": eos,
                     "add_generation_prompt": True, **extra}
        # The prompt is the messages' text in the template's frame: anything far larger
        # is a runaway template.
        limit = MAX_OUTPUT_CHARS + 2 * sum(len(t.text) for t in slots)
        try:
            rendered = render_bounded(self._template, variables, max_chars=limit)
            segments = _segments(rendered, slots, images)
            if last and not any(id(s) in last for s in segments):
                raise _LayoutError("it left the conversation's last message out")
            return segments
        except (TemplateLimitError, _LayoutError) as exc:
            if self.is_builtin:
                raise EngineError(f"the chat template refused the conversation: {exc}") \
                    from None
            self._fall_back(f"the model's chat template failed ({exc})")
            return self.render(messages, bos=bos, eos=eos, tools=tools)


class _LayoutError(Exception):
    """The rendered prompt does not place the conversation's text and images right."""


def _segments(rendered: str, slots: list[_Text], images: list[PreparedImage]
              ) -> list[tuple[str, bool] | _Text | PreparedImage]:
    """Split a rendered prompt into template text, message text (by placeholder) and
    images (by [IMG] mark), checking that each image is placed exactly once."""
    segments: list[tuple[str, bool] | _Text | PreparedImage] = []
    remaining = iter(images)
    pos = 0
    for match in [*_SLOT.finditer(rendered), None]:
        end = match.start() if match else len(rendered)
        for k, text in enumerate(rendered[pos:end].split(IMAGE_MARK)):
            if k:
                image = next(remaining, None)
                if image is None:
                    raise _LayoutError("it placed more images than the conversation has")
                segments.append(image)
            if text:
                segments.append((text, True))
        if match:
            index = int(match.group(1))
            if index >= len(slots):
                raise _LayoutError("it wrote a placeholder of its own")
            segments.append(slots[index])
            pos = match.end()
    if next(remaining, None) is not None:
        raise _LayoutError("it dropped an image from the prompt")
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
