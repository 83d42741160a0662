"""A chat session: the conversation, its turns and keeping it inside the context.

Nothing here prints. The UI feeds user input to `ChatSession.handle`, which returns
either a `Reply` to stream or a `CommandResult` to show.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from localsmall.chat import system_state
from localsmall.chat.conversation import (
    Conversation,
    Message,
    load_conversation,
    save_conversation,
)
from localsmall.chat.cost import TURN_TEXT, ImagePolicy, cost_note, image_limit
from localsmall.chat.prompt import ChatTemplate, build_prompt
from localsmall.chat.results import LoadedChat, Reply, SavedChat, SessionStats
from localsmall.chat.slash import CommandResult, run_command
from localsmall.chat.speeds import MEASURED, Speeds, measured_speeds
from localsmall.chat.tools import ToolSpec
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


@dataclass
class Totals:
    evaluated: int = 0
    reused: int = 0
    generated: int = 0


class ChatSession:
    """The state of one chat and the operations the user can perform on it."""

    def __init__(self, engine: Engine, *, system_prompt: str, sampling: SamplingSettings,
                 template: ChatTemplate | None = None, model_label: str = "",
                 tools: tuple[ToolSpec, ...] = (), images: ImagePolicy | None = None) -> None:
        self.engine = engine
        self.tools = tools             # offered to the model in every prompt
        self.template = template or ChatTemplate(engine.info.chat_template)
        self.conversation = Conversation(system=system_prompt)
        self.sampling = sampling
        self.pending_images: list[PreparedImage] = []
        self.window_start = 0          # first message still sent to the model
        self.dropped_turns = 0
        self.last_stats: TurnStats | None = None
        self.totals = Totals()
        self.model_label = model_label or engine.info.description
        self.image_policy = images or ImagePolicy()
        self.history: list[TurnStats] = []   # recent turns, for measured speeds
        self.restored_input = ""       # a message taken back after an interrupted start
        self.autosave_path: Path | None = None  # where each turn is saved (chat --resume)
        self.system_state: system_state.Restored | None = None  # see start_system_prompt
        self._token_memo = functools.lru_cache(maxsize=4096)(
            lambda text, special: tuple(engine.tokenize(text, special=special)))

    # --- input ---------------------------------------------------------------------------

    def handle(self, line: str) -> CommandResult | Reply | None:
        """Act on one line of user input: a slash command or a message."""
        stripped = line.strip()
        if not stripped and not self.pending_images:
            return None
        if stripped.startswith("/") and not stripped.startswith("//"):
            result = run_command(self, stripped)
            if result is not None:
                return result
        return self.ask(line)  # a message (or a dropped absolute path, not a command)

    def speeds(self) -> Speeds | None:
        """The best speeds known here: measured in this chat, else the policy's (an
        earlier session's, else the plan's estimate); see chat.speeds."""
        return measured_speeds(self.history, self.image_policy.base)

    def prepare(self, path: str, *, max_tokens: int | None = None) -> PreparedImage:
        """Read an image at `max_tokens`, else at the session's budget (see chat.cost)."""
        budget = max_tokens if max_tokens is not None else image_limit(self.image_policy,
                                                                        self.speeds())
        return prepare_image(path, max_tokens=budget)

    def cost_note(self, image: PreparedImage, *, explicit: bool = False) -> str:
        """What `image` will cost on this machine, when that is worth saying.
        `explicit`: its size was asked for (/image --tokens), not chosen automatically.
        Counts the text the turn reads besides the image (see unread_text)."""
        policy = self.image_policy
        automatic = policy.auto and policy.max_tokens is None and not explicit
        text, ahead = self.unread_text(image)
        return cost_note(image, self.speeds(), automatic=automatic, policy=policy,
                         text=text, ahead=ahead)

    def unread_text(self, image: PreparedImage | None = None) -> tuple[int, float]:
        """(text positions the turn with `image` reads besides images, positions a
        background read of the system prompt still has to read). The first counts what
        the cache does not hold yet: the system prompt before it is read, a long pasted
        message, the turns after a trim. Before the message is sent (an image attached
        with /image), a short question (TURN_TEXT) stands in for it."""
        messages = self.conversation.messages
        last = messages[-1] if messages else None
        sent = last is not None and last.role == "user" and (image is None or image in
                                                             last.images)
        pending, ahead = self.engine.ahead_positions()
        try:
            _, todo = self.engine.reuse_estimate(self._prompt())
        except Exception:  # an estimate: a prompt that cannot be laid out says nothing
            return TURN_TEXT, ahead
        images = sum(i.n_tokens for i in last.images) if sent and last is not None else 0
        text = max(todo - images - pending, 0)
        return (text if sent else text + TURN_TEXT), ahead

    # --- the system prompt's cache (chat.system_state) -----------------------------------

    def system_tokens(self) -> list[int]:
        """The tokens every prompt of this chat starts with (the system prompt, tools and
        the template's opening: see chat.system_state.shared_start)."""
        head = [Message.system(self.conversation.system)] if self.conversation.system else []
        return system_state.shared_start(self.engine, lambda text: build_prompt(
            self.template, [*head, Message.user(text)], tokenize=self._tokenize,
            bos=self.engine.bos_token, eos=self.engine.eos_token, tools=self.tools or None))

    def system_notice(self) -> str:
        """Why the system prompt's saved state was not used, when that is news ("")."""
        return system_state.notice(self.system_state)

    def start_system_prompt(self, files: system_state.StateFiles | None
                            ) -> system_state.Restored:
        """Load the system prompt's KV state saved by an earlier start (`files`), else
        read it in the background and save it there (see chat.system_state.start)."""
        self.system_state = system_state.start(self, files)
        return self.system_state

    def attach(self, path: str, *, max_tokens: int | None = None) -> PreparedImage:
        """Queue an image for the next message (again: replaces the queued copy, so
        `/image --tokens N PATH` resizes an attached image)."""
        image = self.prepare(path, max_tokens=max_tokens)
        self.pending_images[:] = [i for i in self.pending_images if i.source != image.source]
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
            images.append(self.prepare(candidate))
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
            notes = [n for n in (self.cost_note(i) for i in dropped) if n]
            return self._start_reply(abandon, images, notes)
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
                            bos=self.engine.bos_token, eos=self.engine.eos_token,
                            tools=self.tools or None)

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

    def _start_reply(self, abandon: Callable[[], None], images: tuple[PreparedImage, ...],
                     notes: list[str] | None = None) -> Reply:
        prompt, notices = self._fit_context()
        notices = self.template.take_notices() + notices  # a template fallback, once

        def start(on_progress: ProgressCallback | None) -> Generation:
            return self.engine.generate(prompt, self.sampling, on_progress)

        return Reply(start, notices + (notes or []), abandon=abandon,
                     commit=self._commit_reply, images=images)

    def _remember_speeds(self) -> None:
        remember = self.image_policy.remember
        speeds = self.speeds() if remember is not None else None
        if remember is not None and speeds is not None and speeds.source == MEASURED:
            # A read-only cache only costs the next session a better first guess.
            with contextlib.suppress(OSError):
                remember(speeds)

    def _commit_reply(self, reply: Reply) -> None:
        assert reply.generation is not None
        result = reply.generation.result
        stats = result.stats
        self.last_stats = stats
        self.history = [*self.history[-7:], stats]
        self._remember_speeds()
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
            return self._start_reply(abandon, messages[-1].images if messages else ())
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
        self.engine.settle()  # a background read stops here: the cache is as it is now
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

    def autosave(self, *, with_state: bool = False) -> str | None:
        """Save the chat to `autosave_path` (atomically, like /save), so that a crash or a
        closed terminal never loses it; `with_state` also writes the KV cache (done when
        the chat ends: it can be large). Returns why it could not be saved, or None;
        never raises, because the chat must go on."""
        if self.autosave_path is None:
            return None
        try:
            if with_state:
                self.save(self.autosave_path)
            else:
                snapshot = replace(self.conversation, kv_state=None)
                save_conversation(snapshot, self.autosave_path)
                # The state saved earlier describes an older conversation: drop it.
                state_path_for(self.autosave_path).unlink(missing_ok=True)
        except Exception as exc:  # a full disk or a bad folder must not end the chat
            return f"the chat could not be saved to {self.autosave_path} ({exc})"
        return None

    def resume(self) -> LoadedChat | None:
        """Continue the chat last saved to `autosave_path` (None when there is none)."""
        if self.autosave_path is None or not self.autosave_path.is_file():
            return None
        return self.load(self.autosave_path)

    def load(self, path: Path) -> LoadedChat:
        """Load a saved chat; restore its KV cache when it matches this model exactly."""
        path = Path(path).expanduser()
        conversation = load_conversation(path)
        # Generated token ids are kept only when they belong to this vocabulary and still
        # spell the saved text (ids out of range must never reach llama.cpp).
        messages = [m if m.token_ids is None or (self.engine.valid_tokens(m.token_ids) and
                                                 self.engine.detokenize(m.token_ids) == m.text)
                    else replace(m, token_ids=None) for m in conversation.messages]
        self.conversation = Conversation(system=conversation.system, messages=messages)
        self.window_start = 0
        self.pending_images.clear()
        meta = StateMeta.from_json(conversation.kv_state)
        if meta is None:
            return LoadedChat(self.conversation, 0, "it was saved without one"
                              if conversation.kv_state is None else
                              "its description is damaged or unsigned (an older localsmall)")
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
