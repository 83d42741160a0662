"""A conversation: messages with text and images, and its file format for /save and /load.

Saved conversations are JSON. Images are stored by reference (their path and content
hash) or embedded (PNG, base64) so a chat can move to another machine. Writing goes
through a temporary file, so a crash or a full disk never leaves half a file.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from localsmall.chat.tools import ToolCall
from localsmall.errors import ConversationFileError, ImageError
from localsmall.fileio import atomic_write_bytes, read_regular_file
from localsmall.images import PreparedImage, prepare_image, prepare_image_bytes

FILE_FORMAT = "localsmall-chat"
FILE_VERSION = 1
MAX_FILE_BYTES = 1 << 30       # a chat with a few embedded images is far smaller
MAX_TOKEN_ID = (1 << 31) - 1   # llama_token is an int32; the engine checks its vocabulary

Role = Literal["system", "user", "assistant", "tool"]
Part = str | PreparedImage


@dataclass(frozen=True)
class Message:
    """One message. `parts` holds text and images in order. For assistant messages,
    `token_ids` are the tokens the model generated (reused verbatim in later prompts,
    so the KV cache matches); `interrupted` marks a reply stopped by the user.
    An assistant message may carry `tool_calls`; a "tool" message is the result of the
    call `tool_call_id`, its text in `parts`."""

    role: Role
    parts: tuple[Part, ...]
    token_ids: tuple[int, ...] | None = None
    interrupted: bool = False
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))

    @property
    def images(self) -> tuple[PreparedImage, ...]:
        return tuple(p for p in self.parts if isinstance(p, PreparedImage))

    @classmethod
    def user(cls, text: str, images: tuple[PreparedImage, ...] = ()) -> Message:
        parts: tuple[Part, ...] = (*images, text) if text else tuple(images)
        return cls("user", parts)

    @classmethod
    def system(cls, text: str) -> Message:
        return cls("system", (text,))

    @classmethod
    def assistant(cls, text: str, token_ids: tuple[int, ...] | None = None,
                  interrupted: bool = False, tool_calls: tuple[ToolCall, ...] = ()) -> Message:
        return cls("assistant", (text,), token_ids, interrupted, tuple(tool_calls))

    @classmethod
    def tool_result(cls, call_id: str, text: str) -> Message:
        """The result of the tool call `call_id`."""
        return cls("tool", (text,), tool_call_id=call_id)


@dataclass
class Conversation:
    """The system prompt and the turns of a chat."""

    system: str
    messages: list[Message] = field(default_factory=list)
    kv_state: dict[str, Any] | None = None  # description of a saved KV cache, if any

    def with_system(self) -> list[Message]:
        """Messages as the model sees them: the system prompt first."""
        head = [Message.system(self.system)] if self.system else []
        return head + self.messages

    def turns(self) -> list[tuple[int, int]]:
        """(start, end) message index ranges of each exchange: a user message and the
        replies after it."""
        starts = [i for i, m in enumerate(self.messages) if m.role == "user"]
        return [(s, starts[k + 1] if k + 1 < len(starts) else len(self.messages))
                for k, s in enumerate(starts)]


# --- file format ---------------------------------------------------------------------


def _image_to_json(image: PreparedImage, embed: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "image", "source": image.source, "sha256": image.key}
    if embed:
        entry["png_base64"] = base64.b64encode(image.to_png()).decode()
    else:
        entry["path"] = str(Path(image.source).expanduser().resolve())
    return entry


def to_json(conversation: Conversation, *, embed_images: bool = False) -> dict[str, Any]:
    """A JSON-ready dict of the conversation."""
    messages = []
    for m in conversation.messages:
        parts = [{"type": "text", "text": p} if isinstance(p, str)
                 else _image_to_json(p, embed_images) for p in m.parts]
        entry: dict[str, Any] = {"role": m.role, "content": parts}
        if m.token_ids is not None:
            entry["token_ids"] = list(m.token_ids)
        if m.interrupted:
            entry["interrupted"] = True
        if m.tool_calls:
            entry["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments}
                                   for c in m.tool_calls]
        if m.tool_call_id is not None:
            entry["tool_call_id"] = m.tool_call_id
        messages.append(entry)
    data = {"format": FILE_FORMAT, "version": FILE_VERSION,
            "system": conversation.system, "messages": messages}
    if conversation.kv_state is not None:
        data["kv_state"] = conversation.kv_state
    return data


def save_conversation(conversation: Conversation, path: Path, *,
                      embed_images: bool = False) -> Path:
    """Write the conversation to `path` atomically."""
    data = json.dumps(to_json(conversation, embed_images=embed_images), ensure_ascii=False,
                      indent=1).encode("utf-8")
    atomic_write_bytes(Path(path).expanduser(), data)
    return Path(path).expanduser()


def _image_from_json(entry: dict[str, Any], where: str) -> PreparedImage:
    try:
        if "png_base64" in entry:
            data = base64.b64decode(_string(entry["png_base64"], "png_base64"), validate=True)
            source = " ".join(str(entry.get("source", "")).split())[:200]
            image = prepare_image_bytes(data, source or "embedded image")
        else:
            image = prepare_image(_string(entry["path"], "path"))
    except (KeyError, binascii.Error) as exc:
        raise ConversationFileError(f"{where}: image entry is malformed ({exc})") from None
    except ImageError as exc:
        raise ConversationFileError(f"{where}: {' '.join(str(exc).split())}") from None
    if image.key != entry.get("sha256", image.key):
        raise ConversationFileError(f"{where}: the image {image.source!r} has changed since the "
                                    "chat was saved")
    return image


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} is {type(value).__name__}, not text")
    return value


def _token_ids(raw: Any) -> tuple[int, ...] | None:
    """Saved token ids: whole numbers an int32 can hold (the engine checks them against
    its vocabulary before use)."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise TypeError("token_ids is not a list")
    for t in raw:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= MAX_TOKEN_ID:
            raise ValueError(f"token id {t!r} is not a valid token")
    return tuple(raw)


def _message(entry: Any, i: int, where: str) -> Message:
    if not isinstance(entry, dict):
        raise TypeError(f"message {i} is not an object")
    role = entry["role"]
    if role not in ("user", "assistant", "tool"):
        raise ConversationFileError(f"{where}: message {i} has unknown role {role!r:.40}")
    content = entry["content"]
    if not isinstance(content, list):
        raise TypeError(f"message {i} has no list of parts")
    parts: list[Part] = []
    for part in content:
        if not isinstance(part, dict):
            raise TypeError(f"message {i} has a part that is not an object")
        if part["type"] == "text":
            parts.append(_string(part["text"], "a text part"))
        elif part["type"] == "image":
            parts.append(_image_from_json(part, f"{where}: message {i}"))
        else:
            raise ConversationFileError(f"{where}: unknown part type {part['type']!r:.40}")
    calls = entry.get("tool_calls", [])
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise TypeError(f"message {i} has tool_calls that are not a list of objects")
    call_id = entry.get("tool_call_id")
    return Message(role, tuple(parts), _token_ids(entry.get("token_ids")),
                   entry.get("interrupted", False) is True,
                   tuple(ToolCall(_string(c["id"], "a tool call id"),
                                  _string(c["name"], "a tool name"),
                                  _string(c["arguments"], "tool arguments")) for c in calls),
                   None if call_id is None else _string(call_id, "tool_call_id"))


def from_json(data: Any, where: str = "conversation") -> Conversation:
    """Parse a saved conversation, validating as it goes (ConversationFileError)."""
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
        raise ConversationFileError(f"{where} is not a localsmall chat file")
    if data.get("version") != FILE_VERSION:
        raise ConversationFileError(f"{where} has unsupported version "
                                    f"{data.get('version')!r:.40}")
    try:
        if not isinstance(data["messages"], list):
            raise TypeError("messages is not a list")
        messages = [_message(entry, i, where) for i, entry in enumerate(data["messages"])]
        kv_state = data.get("kv_state")
        return Conversation(system=_string(data.get("system", ""), "system"), messages=messages,
                            kv_state=kv_state if isinstance(kv_state, dict) else None)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConversationFileError(f"{where} is damaged ({exc!r:.200})") from None


def load_conversation(path: Path) -> Conversation:
    """Read a conversation saved with `save_conversation` (a regular file, read with a
    size bound; ConversationFileError for anything else)."""
    file = Path(path).expanduser()
    try:
        raw = read_regular_file(file, MAX_FILE_BYTES)
    except FileNotFoundError:
        raise ConversationFileError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConversationFileError(f"{path} could not be read ({exc.strerror or exc})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversationFileError(f"{path} could not be read ({exc})") from None
    except RecursionError:
        raise ConversationFileError(f"{path} is not a localsmall chat file (its JSON is "
                                    "nested too deep)") from None
    return from_json(data, str(path))
