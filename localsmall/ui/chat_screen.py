"""The interactive chat: prompt_toolkit for input, Rich for the conversation.

Enter sends; Alt-Enter (or Esc then Enter, or a trailing backslash) starts a new line.
Tab completes slash commands and file paths. Ctrl-C stops a reply and keeps the chat;
at the prompt, Ctrl-C twice or Ctrl-D leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import HTML
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings
from rich.markdown import Markdown
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from localsmall import interrupt
from localsmall.chat.conversation import Conversation
from localsmall.chat.results import LoadedChat, Reply, SessionStats
from localsmall.chat.session import ChatSession
from localsmall.chat.slash import CommandResult, command_names
from localsmall.engine.types import TurnStats
from localsmall.errors import LocalsmallError, debug_enabled
from localsmall.images import PreparedImage
from localsmall.ui.console import err, error, muted, notice, out, terminal_safe, warn
from localsmall.ui.markdown_stream import MarkdownStream
from localsmall.ui.progress import WorkProgress

PATH_COMMANDS = ("/image ", "/img ", "/load ", "/save ")


@dataclass(frozen=True)
class ChatHeader:
    """What the banner says about the session."""

    title: str
    details: list[str]
    notices: list[str]


class ChatCompleter(Completer):
    """Slash commands, then file paths (for /image, /load, /save and dropped paths)."""

    def __init__(self) -> None:
        self._paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, complete_event: Any) -> Any:
        text = document.text_before_cursor
        if text.startswith("/") and " " not in text:
            for name in command_names():
                if name.startswith(text[1:]):
                    yield Completion("/" + name, start_position=-len(text))
            return
        word = document.get_word_before_cursor(WORD=True)
        if text.startswith(PATH_COMMANDS) or word.startswith(("/", "~", "./", "../")):
            sub = Document(word, len(word))
            yield from self._paths.get_completions(sub, complete_event)


def _key_bindings() -> KeyBindings:
    kb = KeyBindings()

    @kb.add("escape", "enter")
    @kb.add("c-j")
    def _newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    @kb.add("enter")
    def _submit(event: Any) -> None:
        buffer = event.current_buffer
        if buffer.text.endswith("\\"):
            buffer.delete_before_cursor(1)
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    return kb


def _history(path: Path | None) -> Any:
    """The input history: a file private to the user (0600, like saved chats: it holds
    everything typed), or memory only when it cannot be made so."""
    if path is None:
        return InMemoryHistory()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND |
                     getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            os.fchmod(fd, 0o600)  # a file made by an older version may be wider
        finally:
            os.close(fd)
        return FileHistory(str(path))
    except OSError:
        return InMemoryHistory()


def status_line(stats: TurnStats, *, scaled: Sequence[PreparedImage] = ()) -> str:
    """One line about the last reply: speed, first-token time (split into image encoding
    and prompt reading on image turns), context, cache reuse, images scaled down."""
    share = 100 * stats.context_used / stats.context_size if stats.context_size else 0
    prompt = f"prompt {stats.reused_tokens:,} cached + {stats.evaluated_tokens:,} new"
    if stats.evaluated_tokens and stats.read_s > 0:
        prompt += f" ({stats.read_tps:.0f} tok/s)"
    first = f"first token {stats.time_to_first_token_s:.2f}s"
    waited = f"system prompt {stats.waited_s:.1f}s + " if stats.waited_s >= 0.05 else ""
    if stats.images_encoded:
        count = stats.images_encoded
        first += (f" = {waited}{count} image{'s' if count > 1 else ''} encoded "
                  f"{stats.image_encode_s:.1f}s + prompt read {stats.read_s:.1f}s")
    elif waited:
        first += f" = {waited}prompt read {stats.read_s:.1f}s"
    parts = [f"{stats.generated_tokens} tokens · {stats.generation_tps:.1f} tok/s", first,
             f"context {stats.context_used:,}/{stats.context_size:,} ({share:.0f}%)", prompt]
    for image in scaled:
        parts.append(f"{Path(image.source).name} scaled to {image.n_tokens} of "
                     f"{image.full_tokens} tokens for speed (/image --tokens N to change)")
    if stats.stop_reason == "length":
        parts.append("hit --max-tokens")
    elif stats.stop_reason == "context":
        parts.append("stopped: context full")
    return " · ".join(parts)


def _stats_table(stats: SessionStats) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="muted")
    table.add_column()
    table.add_row("model", stats.model)
    images = f"{stats.images} image{'' if stats.images == 1 else 's'}"
    table.add_row("turns", f"{stats.turns} ({stats.messages} messages, {images})")
    share = 100 * stats.context_used / stats.context_size if stats.context_size else 0
    table.add_row("context", f"{stats.context_used:,} / {stats.context_size:,} tokens "
                             f"({share:.0f}%)")
    table.add_row("prompt tokens", f"{stats.total_prompt_evaluated:,} read, "
                                   f"{stats.total_prompt_reused:,} reused from the cache")
    table.add_row("generated", f"{stats.total_generated:,} tokens")
    if stats.dropped_turns:
        table.add_row("dropped", f"{stats.dropped_turns} old turns (context full)")
    if stats.last is not None:
        last = stats.last
        table.add_row("last reply", status_line(last))
        table.add_row("prompt speed", f"{last.prompt_tps:.1f} tok/s")
    return table


def _help_table(specs: list[Any]) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(style="muted")
    table.add_column()
    for spec in specs:
        table.add_row("/" + spec.name, spec.args, spec.help)
    table.add_row("", "", "")
    table.add_row("Alt-Enter", "", "new line (or end a line with \\)")
    table.add_row("Ctrl-C", "", "stop a reply; twice at the prompt to leave")
    return table


class ChatScreen:
    """Runs the read-reply loop for a session."""

    def __init__(self, session: ChatSession, *, history_path: Path | None = None) -> None:
        self.session = session
        self.console = out()
        self.prompt: PromptSession[str] = PromptSession(
            history=_history(history_path), completer=ChatCompleter(),
            complete_while_typing=False, key_bindings=_key_bindings(), multiline=True,
            bottom_toolbar=self._toolbar, enable_history_search=False)
        self._save_warned = False

    def _toolbar(self) -> Any:
        s = self.session
        used, size = s.engine.cached_positions, s.engine.n_ctx
        bits = [f"context {used:,}/{size:,}"]
        pending, left = s.engine.ahead_positions()
        if pending:  # redrawn as the user types: how far the system prompt's read is
            bits.append(f"reading the system prompt ({left:,.0f} tokens left)")
        if s.pending_images:
            names = ", ".join(Path(i.source).name for i in s.pending_images)
            bits.append(f"attached: {escape(names)}")
        bits.append("/help · Alt-Enter new line · Ctrl-D exit")
        return HTML(" " + " · ".join(bits))

    def banner(self, header: ChatHeader) -> None:
        body = "\n".join(escape(d) for d in header.details)
        self.console.print(Panel(body, title=f"[bold]{escape(header.title)}[/]",
                                 title_align="left", border_style="cyan", expand=False))
        for message in header.notices:
            notice(message)

    def run(self) -> None:
        """Loop until /exit, Ctrl-D or two Ctrl-C in a row at the prompt.

        Outside the input prompt, Ctrl-C only sets the interrupt flag (see
        localsmall.interrupt) and never raises wherever Python happens to be: the engine
        reads the flag (a reply stops at its next token, reading a prompt or encoding an
        image stops within a graph node). The prompt, which owns the terminal while it
        reads, sees Ctrl-C as a key."""
        interrupts = 0
        with interrupt.interrupting():
            while interrupts < 2:
                try:
                    if self._turn():
                        break
                    interrupts = 0
                except KeyboardInterrupt:  # Ctrl-C at the prompt
                    interrupts += 1
                    if interrupts < 2:
                        muted("(Ctrl-C again or Ctrl-D to leave)")
                except EOFError:
                    break
            self._save(with_state=True)

    def _turn(self) -> bool:
        """Read one input and act on it; True means leave. Whatever goes wrong while
        acting on it costs one line, never the chat."""
        default, self.session.restored_input = self.session.restored_input, ""
        # While the prompt reads, Ctrl-C raises as prompt_toolkit expects (a key in its raw
        # mode; KeyboardInterrupt while it sets up). A Ctrl-C that no turn took (between
        # two prompts) counts as one at the prompt: twice leaves, as the user expects.
        with interrupt.raising():
            try:
                line = self.prompt.prompt(HTML("<ansigreen><b>you ›</b></ansigreen> "),
                                          default=default)
            except asyncio.CancelledError:
                # A Ctrl-C that lands while prompt_toolkit starts or stops its event loop
                # cancels the loop's task instead of raising KeyboardInterrupt.
                raise KeyboardInterrupt from None
        try:
            result = self.session.handle(line)
            if result is None:
                return False
            if isinstance(result, Reply):
                self.stream(result)
                return False
            return self.show(result)
        except LocalsmallError as exc:
            error(str(exc))
        except KeyboardInterrupt:
            muted("(interrupted)")
        except Exception as exc:
            unexpected_error(exc)
        finally:
            self._save(with_state=False)
        return False

    def _save(self, *, with_state: bool) -> None:
        """Autosave the chat for `localsmall chat --resume`; warn once if it fails."""
        problem = self.session.autosave(with_state=with_state)
        if problem and not self._save_warned:
            self._save_warned = True
            warn(problem)

    def stream(self, reply: Reply) -> None:
        """Show a reply as it arrives: progress while the prompt is read, then Markdown.
        Ctrl-C ends the reply at its next token (the engine reads the interrupt flag);
        during the prompt it raises KeyboardInterrupt from the engine, where it is safe."""
        for message in reply.notices:
            notice(message)
        progress = WorkProgress(err())
        markdown = MarkdownStream(self.console)
        started = stopped_early = False
        tokens = reply.stream(progress)  # the engine reports to the bar it is given here
        try:
            for _ in tokens:
                if not started:
                    progress.stop()
                    self.console.print("[bold cyan]mistral ›[/]")
                    started = True
                markdown.update(reply.text)
        except KeyboardInterrupt:
            stopped_early = True
        except BaseException:
            _quietly(reply.close, progress.stop, markdown.finish)
            raise
        reply.close()  # a no-op unless the loop ended early; commits what came
        progress.stop()
        if stopped_early or reply.stats.stop_reason == "interrupted":
            markdown.finish()
            if started:
                muted("(stopped)")
            else:
                muted("(stopped before the answer began; your message is back in the input)")
            return
        if not started:
            self.console.print("[bold cyan]mistral ›[/]")
        markdown.finish()
        muted(status_line(reply.stats, scaled=reply.downscaled))

    def show(self, result: CommandResult) -> bool:
        """Render a command's result; True means leave the chat."""
        if result.kind == "exit":
            return True
        if result.kind == "help":
            self.console.print(_help_table(result.data))
        elif result.kind == "stats":
            self.console.print(_stats_table(result.data))
        elif result.kind == "reply":
            notice(result.message)
            self.replay(result.data)
        elif result.kind == "notice":
            notice(result.message)
        else:
            self.console.print(f"[notice]{escape(result.message)}[/]")
        return False

    def show_resumed(self, loaded: LoadedChat) -> None:
        """The chat continued by --resume, and whether its KV cache came back."""
        count = len(loaded.conversation.messages)
        how = (f"{loaded.state_tokens:,} tokens restored from its KV cache"
               if loaded.state_tokens else
               f"it will be read again: {loaded.state_ignored}" if loaded.state_ignored
               else "it will be read again")
        notice(f"Resumed the last chat ({count} message{'s' if count != 1 else ''}; {how}).")
        self.replay(loaded.conversation)

    def replay(self, conversation: Conversation) -> None:
        """Show a loaded conversation. Its text comes from a file: control and escape
        sequences are made visible and harmless (terminal_safe) before printing."""
        for message in conversation.messages:
            if message.role == "user":
                images = "".join(
                    f" [muted][image {escape(terminal_safe(Path(i.source).name))}][/]"
                    for i in message.images)
                self.console.print(f"[user]you ›[/] {escape(terminal_safe(message.text))}"
                                   f"{images}")
            else:
                self.console.print("[bold cyan]mistral ›[/]")
                self.console.print(Markdown(terminal_safe(message.text)))


def unexpected_error(exc: BaseException) -> None:
    """A failure that is not one of localsmall's own: one line (the traceback with
    LOCALSMALL_DEBUG=1), and the chat goes on."""
    if debug_enabled():
        traceback.print_exception(exc)
    text = " ".join(str(exc).split()) or "no details"
    error(f"{type(exc).__name__}: {text} (the chat goes on)")


def _quietly(*steps: Any) -> None:
    """Clean-up steps after a failure: each runs even if another fails."""
    for step in steps:
        with contextlib.suppress(Exception):  # the first failure is the one reported
            step()


def run_chat(session: ChatSession, header: ChatHeader, *, history_path: Path | None,
             resumed: LoadedChat | None = None) -> None:
    """The interactive chat, until the user leaves; `resumed` is a chat continued from
    the last session (shown before the prompt)."""
    screen = ChatScreen(session, history_path=history_path)
    screen.banner(header)
    if resumed is not None:
        screen.show_resumed(resumed)
    screen.run()
