"""From an API request's messages to the exact prompt the model reads.

Plain conversations go through the same chat template and tokenization as `chat`, so
the prompt matches Mistral's reference tokenizer. Assistant replies that this server
generated are laid out with the very tokens it generated (`ReplyMemory`), so a client
resending the conversation finds it all in the KV cache even where re-tokenizing the
reply's text would give other tokens. A reply that called tools comes back as its content
and `tool_calls` (ids, names, argument strings) rather than as text: it is remembered by
those too, so the resent call is the generated call, token for token.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING

from localsmall.chat.conversation import Message
from localsmall.chat.prompt import ChatTemplate, build_prompt
from localsmall.chat.tools import ToolCall, arguments_text
from localsmall.engine.types import PromptPiece
from localsmall.errors import EngineError, ToolsError
from localsmall.images import PreparedImage
from localsmall.server.errors import invalid
from localsmall.server.requests import ApiMessage, ChatRequest, ImageRef

if TYPE_CHECKING:
    from localsmall.engine.model import Engine

REPLY_MEMORY = 512


def calls_key(content: str, calls: Sequence[ToolCall]) -> Hashable:
    """How a reply with tool calls is known when a client sends it back: its content and
    each call's id, name and arguments (as requests read them: JSON re-serialized, so
    the client's own formatting of the arguments does not matter)."""
    return ("tool_calls", content,
            tuple((c.id, c.name, arguments_text(c.arguments)) for c in calls))


class ReplyMemory:
    """The token ids of recent replies, by their text, or by their content and tool calls
    (thread-safe)."""

    def __init__(self, size: int = REPLY_MEMORY) -> None:
        self._replies: OrderedDict[Hashable, tuple[int, ...]] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def remember(self, key: Hashable, token_ids: tuple[int, ...]) -> None:
        """Remember `token_ids` under a reply's text (or a `calls_key`)."""
        if not key or not token_ids:
            return
        with self._lock:
            self._replies[key] = token_ids
            self._replies.move_to_end(key)
            while len(self._replies) > self._size:
                self._replies.popitem(last=False)

    def remember_calls(self, *, content: str | None, calls: Sequence[ToolCall],
                       token_ids: tuple[int, ...]) -> None:
        """Remember a reply that called tools under what the client was answered
        (`content`, `calls`, parsed from the text those tokens spell). As in `chat`, the
        tokens are the calls as the model wrote them: where it wrote no [CALL_ID] the
        parser made an id up, which the tool results then name."""
        if calls:
            self.remember(calls_key(content or "", calls), token_ids)

    def tokens_for(self, key: Hashable) -> tuple[int, ...] | None:
        with self._lock:
            return self._replies.get(key)


class PromptBuilder:
    """Builds prompts for one loaded engine (safe to call from several threads)."""

    def __init__(self, engine: Engine, *, system_prompt: str) -> None:
        self.engine = engine
        self.template = ChatTemplate(engine.info.chat_template)
        self.system_prompt = system_prompt
        self.replies = ReplyMemory()
        self._memo = functools.lru_cache(maxsize=8192)(
            lambda text, special: tuple(engine.tokenize(text, special=special)))

    def tokenize(self, text: str, special: bool) -> list[int]:
        return list(self._memo(text, special))

    def messages(self, request: ChatRequest,
                 images: Mapping[ImageRef, PreparedImage]) -> list[Message]:
        """The request's messages as localsmall messages (the default system prompt
        first when the request has none)."""
        out: list[Message] = []
        if self.system_prompt and not any(m.role == "system" for m in request.messages):
            out.append(Message.system(self.system_prompt))
        for i, m in enumerate(request.messages):
            out.append(self._message(m, i, images))
        return out

    def _message(self, m: ApiMessage, i: int,
                 images: Mapping[ImageRef, PreparedImage]) -> Message:
        if m.role == "tool":
            return Message.tool_result(m.tool_call_id or "", m.text)
        if m.role == "assistant":
            if m.tool_calls:  # the generated tokens when this is a reply of ours, unchanged
                tokens = self.replies.tokens_for(calls_key(m.text, m.tool_calls))
                return Message.assistant(m.text, tokens, tool_calls=m.tool_calls)
            return Message.assistant(m.text, self.replies.tokens_for(m.text))
        if m.role == "system":
            return Message.system(m.text)
        parts = tuple(images[p] if isinstance(p, ImageRef) else p for p in m.parts)
        return Message("user", parts)

    def build(self, request: ChatRequest,
              images: Mapping[ImageRef, PreparedImage]) -> list[PromptPiece]:
        """Token runs and images for the request."""
        messages = self.messages(request, images)
        try:
            return build_prompt(self.template, messages, tokenize=self.tokenize,
                                bos=self.engine.bos_token, eos=self.engine.eos_token,
                                tools=request.tools or None)
        except ToolsError as exc:
            raise invalid(exc.param or "messages", str(exc)) from None
        except EngineError as exc:
            raise invalid("messages", str(exc)) from None
