"""A chat session: the conversation, its slash commands and keeping it inside the context.

Nothing here prints. The UI feeds user input to `ChatSession.handle`, which returns
either a `Reply` to stream or a `CommandResult` to show.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from localsmall.chat.conversation import (
    Conversation,
    Message,
    load_conversation,
    save_conversation,
)
from localsmall.chat.prompt import ChatTemplate, build_prompt
from localsmall.engine.model import Engine, Generation
from localsmall.engine.state import StateMeta, state_path_for
from localsmall.engine.types import ProgressCallback, PromptPiece, SamplingSettings, TurnStats
from localsmall.errors import ContextFullError, UsageError
from localsmall.images import PreparedImage, prepare_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
# A path dropped into the terminal: quoted, or a run of non-space characters (with
# backslash-escaped spaces) that starts like a path and ends like an image file.
_DROPPED_PATH = re.compile(
    r"""(?:'(?P<sq>[^']+)'|"(?P<dq>[^"]+)"|(?P<bare>(?:file://)?[~./][^\s\\]*(?:\\ [^\s\\]*)*))""")


@dataclass(frozen=True)
class CommandResult:
    """What a slash command did, for the UI to show."""

    kind: Literal["info", "notice", "stats", "help", "exit", "reply"]
    message: str = ""
    data: Any = None


@dataclass(frozen=True)
class SessionStats:
    """Counters for /stats."""

    turns: int
    messages: int
    images: int
    context_used: int
    context_size: int
    last: TurnStats | None
    total_prompt_evaluated: int
    total_prompt_reused: int
    total_generated: int
    dropped_turns: int
    model: str


@dataclass(frozen=True)
class SavedChat:
    path: Path
    messages: int
    state_tokens: int          # positions of KV cache saved beside the chat (0: none)


@dataclass(frozen=True)
class LoadedChat:
    conversation: Conversation
    state_tokens: int          # positions restored into the KV cache (0: none)
    state_ignored: str         # why a saved KV cache was not used ("" when it was)


@dataclass
class Totals:
    evaluated: int = 0
    reused: int = 0
    generated: int = 0


@dataclass(frozen=True)
class CommandSpec:
    name: str
    args: str
    help: str
    handler: Callable[[ChatSession, str], CommandResult | Reply]


class Reply:
    """A reply being streamed. Iterate for text pieces; when iteration ends (or the
    reply is interrupted and closed) the reply joins the conversation."""

    def __init__(self, session: ChatSession, generation: Generation, notices: list[str],
                 abandon: Callable[[], None]) -> None:
        self.session = session
        self.generation = generation
        self.notices = notices
        self._abandon = abandon  # undoes what started the reply if it produced nothing
        self._done = False

    def __iter__(self) -> Iterator[str]:
        try:
            for event in self.generation:
                yield event.text
        finally:
            self._finish()

    @property
    def text(self) -> str:
        return self.generation.result.text

    @property
    def stats(self) -> TurnStats:
        return self.generation.result.stats

    def close(self) -> None:
        """Stop the reply early (Ctrl-C). What was generated so far is kept."""
        self.generation.close()
        self._finish()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        if not self.generation.result.token_ids and self.stats.stop_reason in ("", "interrupted"):
            self._abandon()  # stopped (or failed) before a single token: as if never sent
        else:
            self.session._commit_reply(self)


class ChatSession:
    """The state of one chat and the operations the user can perform on it."""

    def __init__(self, engine: Engine, *, system_prompt: str, sampling: SamplingSettings,
                 template: ChatTemplate | None = None, model_label: str = "") -> None:
        self.engine = engine
        self.template = template or ChatTemplate(engine.info.chat_template)
        self.conversation = Conversation(system=system_prompt)
        self.sampling = sampling
        self.pending_images: list[PreparedImage] = []
        self.window_start = 0          # first message still sent to the model
        self.dropped_turns = 0
        self.last_stats: TurnStats | None = None
        self.totals = Totals()
        self.model_label = model_label or engine.info.description
        self.on_progress: ProgressCallback | None = None
        self.restored_input = ""       # a message taken back after an interrupted start
        self._token_memo = functools.lru_cache(maxsize=4096)(
            lambda text, special: tuple(engine.tokenize(text, special=special)))

    # --- input ---------------------------------------------------------------------------

    def handle(self, line: str) -> CommandResult | Reply | None:
        """Act on one line of user input: a slash command or a message."""
        stripped = line.strip()
        if not stripped and not self.pending_images:
            return None
        if stripped.startswith("/") and not stripped.startswith("//"):
            name, _, args = stripped[1:].partition(" ")
            spec = COMMANDS.get(name.lower()) or COMMANDS.get(ALIASES.get(name.lower(), ""))
            if spec is None and _looks_like_path(stripped):
                return self.ask(line)  # a dropped absolute path, not a command
            if spec is None:
                raise UsageError(f"unknown command /{name}; type /help for the list")
            return spec.handler(self, args.strip())
        return self.ask(line)

    def attach(self, path: str) -> PreparedImage:
        """Queue an image for the next message."""
        image = prepare_image(path)
        self.pending_images.append(image)
        return image

    def extract_dropped_images(self, text: str) -> tuple[str, list[PreparedImage]]:
        """Image paths pasted or dropped into a message, taken out of its text."""
        images: list[PreparedImage] = []

        def take(match: re.Match[str]) -> str:
            raw = match.group("sq") or match.group("dq") or ""
            trailing = ""
            if match.group("bare"):
                # Punctuation after a bare path belongs to the sentence: "see ~/a.png?"
                raw = match.group("bare").rstrip(".,;:!?)]}>")
                trailing = match.group("bare")[len(raw):]
            candidate = raw.replace("\\ ", " ").removeprefix("file://")
            if not candidate.lower().endswith(IMAGE_SUFFIXES):
                return match.group(0)
            if "/" not in candidate and not candidate.startswith("~"):
                return match.group(0)
            images.append(prepare_image(candidate))
            return trailing

        cleaned = _DROPPED_PATH.sub(take, text)
        return (re.sub(r"[ \t]{2,}", " ", cleaned).strip() if images else text), images

    # --- turns ---------------------------------------------------------------------------

    def ask(self, text: str) -> Reply:
        """Send a user message (with queued and dropped-in images) and start the reply."""
        text, dropped = self.extract_dropped_images(text)
        images = tuple(self.pending_images) + tuple(dropped)
        if not text.strip() and not images:
            raise UsageError("nothing to send")
        message = Message.user(text.strip(), images)
        self.conversation.messages.append(message)
        self.pending_images.clear()

        def abandon() -> None:
            # Nothing was answered: take the message back, ready to edit and resend.
            if self.conversation.messages and self.conversation.messages[-1] is message:
                self.conversation.messages.pop()
            self.pending_images[:0] = list(images)
            self.restored_input = text.strip()

        try:
            return self._start_reply(abandon)
        except BaseException:
            abandon()
            raise

    def _messages_for_model(self) -> list[Message]:
        head = [Message.system(self.conversation.system)] if self.conversation.system else []
        return head + self.conversation.messages[self.window_start:]

    def _tokenize(self, text: str, special: bool) -> list[int]:
        # Each turn re-renders the whole conversation; remembering the tokens of the
        # messages already seen keeps a follow-up's overhead independent of history.
        return list(self._token_memo(text, special))

    def _prompt(self) -> list[PromptPiece]:
        return build_prompt(self.template, self._messages_for_model(), tokenize=self._tokenize,
                            bos=self.engine.bos_token, eos=self.engine.eos_token)

    def reply_reserve(self) -> int:
        """Context positions kept free for the reply."""
        wanted = self.sampling.max_tokens or 1024
        return max(16, min(wanted, self.engine.n_ctx // 4))

    def _fit_context(self) -> tuple[list[PromptPiece], list[str]]:
        """The prompt, after dropping the oldest turns (never the system prompt or the
        newest message) until it fits with room for the reply.

        Dropping turns changes the prompt right after the system prompt, so everything
        after it must be read again (shifting the cached keys instead would be faster
        but would not give the answers a fresh read gives). To make that rare, a trim
        frees a quarter of the context more than it strictly needs."""
        budget = self.engine.n_ctx - self.reply_reserve()
        original_start = self.window_start
        prompt = self._prompt()
        needed = self.engine.count_tokens(prompt)
        if needed <= budget:
            return prompt, []
        target = budget - self.engine.n_ctx // 4
        dropped = 0
        while needed > target:
            turns = [(s, e) for s, e in self.conversation.turns() if s >= self.window_start]
            if len(turns) <= 1:
                if needed <= budget:
                    break
                self.window_start = original_start
                raise ContextFullError(
                    f"this message needs {needed} tokens but only {budget} fit in the "
                    f"context ({self.engine.n_ctx}, with {self.reply_reserve()} kept for the "
                    "reply); shorten it, send fewer images, or restart with a larger --ctx")
            self.window_start = turns[1][0]
            dropped += 1
            prompt = self._prompt()
            needed = self.engine.count_tokens(prompt)
        self.dropped_turns += dropped
        reread = self.engine.reuse_estimate(prompt)[1]
        images = any(m.images for m in self.conversation.messages[self.window_start:])
        notice = (f"Context full: dropped the {dropped} oldest turn{'s' if dropped > 1 else ''}"
                  f" (the system prompt stays); re-reading the remaining {reread:,} tokens")
        notice += " (images are not encoded again)." if images else "."
        return prompt, [notice]

    def _start_reply(self, abandon: Callable[[], None]) -> Reply:
        prompt, notices = self._fit_context()
        generation = self.engine.generate(prompt, self.sampling, self.on_progress)
        return Reply(self, generation, notices, abandon)

    def _commit_reply(self, reply: Reply) -> None:
        result = reply.generation.result
        stats = result.stats
        self.last_stats = stats
        self.totals.evaluated += stats.evaluated_tokens
        self.totals.reused += stats.reused_tokens
        self.totals.generated += stats.generated_tokens
        message = Message.assistant(result.text, tuple(result.token_ids),
                                    interrupted=stats.stop_reason == "interrupted")
        self.conversation.messages.append(message)

    def retry(self) -> Reply:
        """Generate the last reply again."""
        messages = self.conversation.messages
        if not messages or messages[-1].role != "assistant":
            raise UsageError("there is no reply to retry")
        removed = messages.pop()

        def abandon() -> None:
            messages.append(removed)  # keep the previous answer

        try:
            return self._start_reply(abandon)
        except BaseException:
            abandon()
            raise

    def undo(self) -> Message | None:
        """Remove the last exchange (the last user message and its reply)."""
        messages = self.conversation.messages
        if not messages:
            return None
        turns = self.conversation.turns()
        start = turns[-1][0] if turns else len(messages) - 1
        removed = messages[start]
        del messages[start:]
        self.window_start = min(self.window_start, len(messages))
        self.engine.rollback(self._prompt())  # drop the undone tail from the KV cache
        return removed

    def clear(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.conversation.messages.clear()
        self.pending_images.clear()
        self.window_start = 0
        self.engine.reset()

    def set_system(self, text: str) -> None:
        self.conversation.system = text
        self.engine.rollback(self._prompt())

    def save(self, path: Path, *, embed_images: bool = False) -> SavedChat:
        """Save the conversation, and the KV cache beside it so /load needs no re-read."""
        path = Path(path).expanduser()
        final_state = state_path_for(path)
        new_state = final_state.with_name(f".{final_state.name}.new")
        state = self.engine.save_state(new_state) if self.engine.cached_positions else None
        snapshot = replace(self.conversation, kv_state=state.to_json() if state else None)
        try:
            save_conversation(snapshot, path, embed_images=embed_images)
            if state is not None:
                os.replace(new_state, final_state)
            else:
                final_state.unlink(missing_ok=True)
        finally:
            new_state.unlink(missing_ok=True)  # a failed save leaves the old files as they were
        return SavedChat(path, len(snapshot.messages), state.n_pos if state else 0)

    def load(self, path: Path) -> LoadedChat:
        """Load a saved chat; restore its KV cache when it matches this model exactly."""
        path = Path(path).expanduser()
        conversation = load_conversation(path)
        # Generated token ids are kept only when they still spell the saved text.
        messages = [m if m.token_ids is None or self.engine.detokenize(m.token_ids) == m.text
                    else replace(m, token_ids=None) for m in conversation.messages]
        self.conversation = Conversation(system=conversation.system, messages=messages)
        self.window_start = 0
        self.pending_images.clear()
        meta = StateMeta.from_json(conversation.kv_state)
        if meta is None:
            return LoadedChat(self.conversation, 0, "it was saved without one"
                              if conversation.kv_state is None else "its description is damaged")
        reason = self.engine.load_state(state_path_for(path), meta)
        return LoadedChat(self.conversation, 0 if reason else meta.n_pos, reason or "")

    def stats(self) -> SessionStats:
        return SessionStats(
            turns=len(self.conversation.turns()),
            messages=len(self.conversation.messages),
            images=sum(len(m.images) for m in self.conversation.messages),
            context_used=self.engine.cached_positions, context_size=self.engine.n_ctx,
            last=self.last_stats, total_prompt_evaluated=self.totals.evaluated,
            total_prompt_reused=self.totals.reused, total_generated=self.totals.generated,
            dropped_turns=self.dropped_turns, model=self.model_label)


def _looks_like_path(text: str) -> bool:
    first = text.split()[0]
    return "/" in first[1:] and Path(first.replace("\\ ", " ")).exists()


# --- slash commands ------------------------------------------------------------------


def _cmd_image(session: ChatSession, args: str) -> CommandResult:
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


def _cmd_system(session: ChatSession, args: str) -> CommandResult:
    if not args:
        return CommandResult("info", f"System prompt:\n{session.conversation.system or '(none)'}")
    session.set_system(args)
    return CommandResult("info", "System prompt replaced; it applies from the next reply.")


def _cmd_clear(session: ChatSession, args: str) -> CommandResult:
    session.clear()
    return CommandResult("info", "Conversation cleared.")


def _cmd_undo(session: ChatSession, args: str) -> CommandResult:
    removed = session.undo()
    if removed is None:
        return CommandResult("info", "Nothing to undo.")
    preview = removed.text.strip().replace("\n", " ")
    preview = preview[:60] + ("…" if len(preview) > 60 else "")
    return CommandResult("info", f"Removed the last exchange ({preview!r}).")


def _cmd_retry(session: ChatSession, args: str) -> Reply:
    return session.retry()


def _cmd_save(session: ChatSession, args: str) -> CommandResult:
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


def _cmd_load(session: ChatSession, args: str) -> CommandResult:
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


def _cmd_stats(session: ChatSession, args: str) -> CommandResult:
    return CommandResult("stats", data=session.stats())


def _cmd_help(session: ChatSession, args: str) -> CommandResult:
    return CommandResult("help", data=list(COMMANDS.values()))


def _cmd_exit(session: ChatSession, args: str) -> CommandResult:
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

