"""The chat screen's pieces that render: streamed Markdown and the status line."""

from __future__ import annotations

import io

from rich.console import Console

from localsmall.engine.types import TurnStats
from localsmall.ui.chat_screen import status_line
from localsmall.ui.markdown_stream import MarkdownStream


def _console(terminal: bool = True) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=60, force_terminal=terminal, color_system=None), buffer


class FakeClock:
    """A clock the test moves by hand: redraws do not depend on the machine's speed."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


REPLY = "# Title\n\nSome **bold** words and a list:\n\n" + "".join(
    f"- item {i}\n" for i in range(30)) + "\n```python\nprint('hi')\n```\n"


def test_markdown_is_rendered_as_it_streams() -> None:
    console, buffer = _console()
    clock = FakeClock()
    stream = MarkdownStream(console, clock=clock)
    seen_while_streaming = ""
    for end in range(1, len(REPLY) + 1, 7):
        clock.now += 1.0  # each update comes well after the last redraw
        stream.update(REPLY[:end])
        if end > len(REPLY) // 2 and not seen_while_streaming:
            seen_while_streaming = buffer.getvalue()
    # Before the end, the first half of the reply is already on the screen, rendered.
    assert "Title" in seen_while_streaming and "item 5" in seen_while_streaming
    assert "**" not in seen_while_streaming and "# Title" not in seen_while_streaming
    stream.update(REPLY)
    stream.finish()
    text = buffer.getvalue()
    assert "**" not in text and "bold" in text          # Markdown, not raw text
    assert "```" not in text and "print('hi')" in text
    for i in range(30):
        assert f"item {i}" in text


def test_redraws_are_throttled() -> None:
    console, buffer = _console()
    clock = FakeClock()
    stream = MarkdownStream(console, min_interval_s=0.08, clock=clock)
    stream.update("first words")
    drawn = buffer.getvalue()
    assert "first words" in drawn                       # the first update is drawn at once
    for i in range(50):                                 # all within the interval: no redraw
        clock.now += 0.001
        stream.update(f"first words and more {i}")
    assert buffer.getvalue() == drawn
    clock.now += 0.08                                   # the interval has passed
    stream.update("first words and the rest")
    assert "the rest" in buffer.getvalue()[len(drawn):]
    stream.finish()


def test_long_replies_are_printed_once_not_redrawn() -> None:
    # Without a terminal the live window is never drawn: what reaches the output is
    # exactly what was printed for good, line by line.
    console, buffer = _console(terminal=False)
    stream = MarkdownStream(console, min_interval_s=0)  # draw every update
    lines = [f"line number {i}" for i in range(100)]
    for i in range(1, 101):
        stream.update("\n\n".join(lines[:i]))
    stream.finish()
    printed = [line.strip() for line in buffer.getvalue().splitlines() if line.strip()]
    assert printed == lines


def test_status_line() -> None:
    stats = TurnStats(prompt_tokens=1200, reused_tokens=1100, evaluated_tokens=100,
                      images_encoded=1, generated_tokens=51, image_encode_s=13.2,
                      prompt_eval_s=2.0, time_to_first_token_s=2.5, generation_s=10.0,
                      stop_reason="eos", context_used=1250, context_size=32768)
    line = status_line(stats)
    assert "51 tokens · 5.0 tok/s" in line
    assert "first token 2.50s" in line
    assert "context 1,250/32,768 (4%)" in line
    assert "prompt 1,100 cached + 100 new (50 tok/s)" in line
    assert "1 image encoded (13.2s)" in line


def test_loaded_chats_cannot_drive_the_terminal(tmp_path) -> None:
    """Escape and control sequences in a loaded chat are shown, not obeyed."""
    import stat

    from localsmall.chat.conversation import Conversation, Message
    from localsmall.ui.chat_screen import ChatScreen, _history
    from localsmall.ui.console import terminal_safe

    evil = "hi\x1b]0;pwned\x07\x1b[2J\x9b31m\rX\x08\x7f\ttab\nline"
    assert terminal_safe(evil) == "hi␛]0;pwned␇␛[2J\ufffd31m␍X␈␡\ttab\nline"
    console, buffer = _console()
    screen = ChatScreen.__new__(ChatScreen)  # only its console is needed to replay
    screen.console = console
    screen.replay(Conversation(system="", messages=[Message.user(evil),
                                                    Message.assistant(evil)]))
    shown = buffer.getvalue()
    assert not any(c in shown for c in "\x1b\x07\x08\x7f\r\x9b")
    assert shown.count("␛]0;pwned") == 2

    history = tmp_path / "state" / "chat_history"
    _history(history)
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
    history.chmod(0o644)  # an older, wider file is narrowed
    _history(history)
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
