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


def test_markdown_is_rendered_as_it_streams() -> None:
    console, buffer = _console()
    stream = MarkdownStream(console)
    reply = "# Title\n\nSome **bold** words and a list:\n\n" + "".join(
        f"- item {i}\n" for i in range(30)) + "\n```python\nprint('hi')\n```\n"
    for end in range(1, len(reply) + 1, 7):
        stream.update(reply[:end])
    stream.update(reply)
    stream.finish()
    text = buffer.getvalue()
    assert "**" not in text and "bold" in text          # Markdown, not raw text
    assert "```" not in text and "print('hi')" in text
    for i in range(30):
        assert f"item {i}" in text


def test_long_replies_are_printed_once_not_redrawn() -> None:
    # Without a terminal the live window is never drawn: what reaches the output is
    # exactly what was printed for good, line by line.
    console, buffer = _console(terminal=False)
    stream = MarkdownStream(console)
    lines = [f"line number {i}" for i in range(100)]
    for i in range(1, 101):
        stream._last_draw = 0  # draw every update
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
