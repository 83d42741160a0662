"""`localsmall chat` end to end in a real pseudo-terminal (pexpect): type, attach an image,
watch a streamed reply, interrupt it, keep chatting, leave."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pexpect
import pyte
import pytest

PROMPT = "you ›"


def _spawn(tiny, *extra: str) -> pexpect.spawn:
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm-256color")
    args = ["-m", "localsmall", "chat", "--model", str(tiny.f16), "--mmproj", str(tiny.mmproj),
            "--ctx", "4096", "--threads", "2", "--temperature", "0", *extra]
    child = pexpect.spawn(sys.executable, args, env=env, encoding="utf-8",
                          dimensions=(40, 220), timeout=90)
    child.expect(PROMPT)
    return child


@pytest.fixture
def transcript(tmp_path: Path) -> Path:
    return tmp_path / "terminal.log"


def test_chat_in_a_terminal(tiny, make_image, transcript: Path) -> None:
    picture = make_image("cat.png", 224, 168)
    # Replies stop at 200 tokens: long enough to interrupt one while it streams.
    child = _spawn(tiny, "-n", "200")
    with transcript.open("w") as log:
        child.logfile_read = log
        assert "vision on" in child.before

        child.send("Hello, who are you?\r")
        child.expect("mistral ›")
        child.expect(r"tok/s")             # the status line after a full reply
        child.expect(PROMPT)

        child.send(f"/image {picture}\r")
        child.expect("Attached cat.png")
        child.expect(PROMPT)
        child.send("What is in this picture?\r")
        child.expect(r"1 image encoded")
        child.expect(PROMPT)

        # A long reply, stopped with Ctrl-C once it is streaming.
        child.send("Tell me a very long story.\r")
        child.expect("mistral ›")
        child.expect(r"\S{3}")             # some streamed text
        child.sendcontrol("c")
        child.expect(r"\(stopped\)")
        child.expect(PROMPT)

        child.send("/stats\r")
        child.expect(r"3 \(6 messages, 1 image\)")
        child.expect(PROMPT)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, transcript.read_text()


def test_ctrl_c_twice_at_the_prompt_leaves(tiny) -> None:
    child = _spawn(tiny)
    child.sendcontrol("c")
    child.expect("Ctrl-C again")
    child.sendcontrol("c")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_errors_keep_the_chat_going(tiny, tmp_path: Path) -> None:
    child = _spawn(tiny, "-n", "4")
    child.send(f"/image {tmp_path / 'missing.png'}\r")
    child.expect("error:.*missing.png: no such file")
    child.expect(PROMPT)
    child.send("/nonsense\r")
    child.expect("unknown command /nonsense")
    child.expect(PROMPT)
    child.send("still here?\r")
    child.expect("tok/s")
    child.expect(PROMPT)
    child.send("/exit\r")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_history_across_sessions_and_tab_completion(tiny, make_image) -> None:
    picture = make_image("holiday-photo.png")
    first = _spawn(tiny, "-n", "2")
    first.send("a line worth remembering\r")
    first.expect("tok/s")
    first.expect(PROMPT)
    first.sendcontrol("d")
    first.expect(pexpect.EOF)
    first.close()

    second = _spawn(tiny, "-n", "2")
    second.send("\x1b[A")                     # Up: the previous session's input
    second.expect("a line worth remembering")
    second.sendcontrol("u")                   # clear the line
    second.send("/ima\t")                     # a command name
    second.expect("/image")
    second.send(f" {picture.parent}/holiday-\t")  # a path
    second.expect("photo.png")
    second.send("\r")
    second.expect("Attached holiday-photo.png")
    second.expect(PROMPT)
    second.sendcontrol("d")
    second.expect(pexpect.EOF)
    second.close()
    assert second.exitstatus == 0


def _screen_text(transcript: str) -> str:
    """What a terminal shows after this output (pyte emulates it)."""
    screen = pyte.Screen(220, 40)
    pyte.Stream(screen).feed(transcript)
    return "\n".join(line.rstrip() for line in screen.display)


def test_progress_bars_appear_while_a_turn_is_read_and_vanish(tiny, make_image) -> None:
    """An image turn in a real terminal: the encoding and reading bars are drawn while the
    engine works (LOCALSMALL_PROGRESS_AFTER=0 makes every step "slow enough", so this
    holds on any machine) and are gone once the answer streams."""
    picture = make_image("photo.png", 224, 168)
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm-256color",
               LOCALSMALL_PROGRESS_AFTER="0")
    args = ["-m", "localsmall", "chat", "--model", str(tiny.f16), "--mmproj", str(tiny.mmproj),
            "--ctx", "4096", "--threads", "1", "--batch", "8", "--temperature", "0", "-n", "8"]
    child = pexpect.spawn(sys.executable, args, env=env, encoding="utf-8",
                          dimensions=(40, 220), timeout=90)
    log = io.StringIO()
    child.logfile_read = log
    child.expect(PROMPT)
    words = " ".join(f"word{i}" for i in range(150))
    child.send(f"/image {picture}\r")
    child.expect("Attached photo.png")
    child.expect(PROMPT)
    child.send(f"Describe the picture, then repeat: {words}\r")
    child.expect("encoding photo.png")     # the vision encoder's bar
    child.expect("reading prompt")         # the prompt's bar, with its count
    child.expect(r"\d+/\d+")
    child.expect("mistral ›")
    child.expect("tok/s")
    child.expect(PROMPT)
    shown = _screen_text(log.getvalue())
    assert "first token" in shown and "image encoded" in shown
    assert "reading prompt" not in shown and "encoding photo.png" not in shown  # vanished
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
