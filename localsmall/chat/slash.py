"""The chat's slash commands (/image, /save, /undo, ...): each parses its arguments, acts
on the session and says what it did as a `CommandResult`. Nothing here prints."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from localsmall.chat.conversation import Conversation, Message
from localsmall.chat.results import LoadedChat, Reply, SavedChat, SessionStats
from localsmall.errors import UsageError
from localsmall.images import PreparedImage


class CommandTarget(Protocol):
    """What the slash commands use of a chat session (`chat.session.ChatSession`)."""

    pending_images: list[PreparedImage]
    conversation: Conversation

    def attach(self, path: str) -> PreparedImage: ...
    def set_system(self, text: str) -> None: ...
    def clear(self) -> None: ...
    def undo(self) -> Message | None: ...
    def retry(self) -> Reply: ...
    def save(self, path: Path, *, embed_images: bool = False) -> SavedChat: ...
    def load(self, path: Path) -> LoadedChat: ...
    def stats(self) -> SessionStats: ...


@dataclass(frozen=True)
class CommandResult:
    """What a slash command did, for the UI to show."""

    kind: Literal["info", "notice", "stats", "help", "exit", "reply"]
    message: str = ""
    data: Any = None


@dataclass(frozen=True)
class CommandSpec:
    name: str
    args: str
    help: str
    handler: Callable[[CommandTarget, str], CommandResult | Reply]


def run_command(session: CommandTarget, line: str) -> CommandResult | Reply | None:
    """Run the slash command on `line` ("/name args"); None when it is no command but a
    path dropped into the terminal (a message)."""
    name, _, args = line[1:].partition(" ")
    spec = COMMANDS.get(name.lower()) or COMMANDS.get(ALIASES.get(name.lower(), ""))
    if spec is None and _looks_like_path(line):
        return None
    if spec is None:
        raise UsageError(f"unknown command /{name}; type /help for the list")
    return spec.handler(session, args.strip())


def _looks_like_path(text: str) -> bool:
    first = text.split()[0]
    return "/" in first[1:] and Path(first.replace("\\ ", " ")).exists()


def _cmd_image(session: CommandTarget, args: str) -> CommandResult:
    if not args:
        raise UsageError("usage: /image PATH [PATH...]")
    try:
        paths = shlex.split(args)
    except ValueError as exc:
        raise UsageError(f"/image: {exc}") from None
    added = [session.attach(p) for p in paths]
    names = ", ".join(f"{Path(i.source).name} ({i.width}x{i.height}, {i.n_tokens} tokens)"
                      for i in added)
    count = len(session.pending_images)
    return CommandResult("info", f"Attached {names}. {count} image{'s' if count > 1 else ''} "
                                 "will go with your next message.")


def _cmd_system(session: CommandTarget, args: str) -> CommandResult:
    if not args:
        return CommandResult("info", f"System prompt:\n{session.conversation.system or '(none)'}")
    session.set_system(args)
    return CommandResult("info", "System prompt replaced; it applies from the next reply.")


def _cmd_clear(session: CommandTarget, args: str) -> CommandResult:
    session.clear()
    return CommandResult("info", "Conversation cleared.")


def _cmd_undo(session: CommandTarget, args: str) -> CommandResult:
    removed = session.undo()
    if removed is None:
        return CommandResult("info", "Nothing to undo.")
    preview = removed.text.strip().replace("\n", " ")
    preview = preview[:60] + ("…" if len(preview) > 60 else "")
    return CommandResult("info", f"Removed the last exchange ({preview!r}).")


def _cmd_retry(session: CommandTarget, args: str) -> Reply:
    return session.retry()


def _cmd_save(session: CommandTarget, args: str) -> CommandResult:
    try:
        words = shlex.split(args)
    except ValueError as exc:
        raise UsageError(f"/save: {exc}") from None
    embed = "--embed" in words
    paths = [w for w in words if w != "--embed"]
    if len(paths) != 1:
        raise UsageError("usage: /save [--embed] FILE")
    saved = session.save(Path(paths[0]), embed_images=embed)
    how = "embedded" if embed else "by reference"
    state = (f"; KV cache of {saved.state_tokens:,} tokens beside it, so /load continues "
             "at once" if saved.state_tokens else "")
    return CommandResult("info", f"Saved {saved.messages} messages to {saved.path} "
                                 f"(images {how}){state}.")


def _cmd_load(session: CommandTarget, args: str) -> CommandResult:
    try:
        words = shlex.split(args)
    except ValueError as exc:
        raise UsageError(f"/load: {exc}") from None
    if len(words) != 1:
        raise UsageError("usage: /load FILE")
    loaded = session.load(Path(words[0]))
    message = f"Loaded {len(loaded.conversation.messages)} messages from {words[0]}"
    if loaded.state_tokens:
        message += (f"; its KV cache is restored ({loaded.state_tokens:,} tokens), nothing to "
                    "read again.")
    else:
        message += f"; no saved KV cache used ({loaded.state_ignored}): it will be read again."
    return CommandResult("reply", message, data=loaded.conversation)


def _cmd_stats(session: CommandTarget, args: str) -> CommandResult:
    return CommandResult("stats", data=session.stats())


def _cmd_help(session: CommandTarget, args: str) -> CommandResult:
    return CommandResult("help", data=list(COMMANDS.values()))


def _cmd_exit(session: CommandTarget, args: str) -> CommandResult:
    return CommandResult("exit")


_SPECS = [
    CommandSpec("image", "PATH...", "attach images to your next message (or drop a path "
                "into the message)", _cmd_image),
    CommandSpec("system", "[TEXT]", "show or replace the system prompt", _cmd_system),
    CommandSpec("clear", "", "start over (keeps the system prompt)", _cmd_clear),
    CommandSpec("undo", "", "remove the last question and its answer", _cmd_undo),
    CommandSpec("retry", "", "answer the last question again", _cmd_retry),
    CommandSpec("save", "[--embed] FILE", "save the chat (--embed stores images inside)",
                _cmd_save),
    CommandSpec("load", "FILE", "load a saved chat", _cmd_load),
    CommandSpec("stats", "", "speed, context use and token counts", _cmd_stats),
    CommandSpec("help", "", "this list", _cmd_help),
    CommandSpec("exit", "", "leave (also Ctrl-D)", _cmd_exit),
]
COMMANDS: dict[str, CommandSpec] = {spec.name: spec for spec in _SPECS}
ALIASES = {"quit": "exit", "q": "exit", "img": "image", "?": "help", "reset": "clear"}


def command_names() -> list[str]:
    """Every slash command, for completion."""
    return sorted([*COMMANDS, *ALIASES])

