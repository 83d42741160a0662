"""`localsmall chat` end to end in a real pseudo-terminal (pexpect): type, attach an image,
watch a streamed reply, interrupt it, keep chatting, leave."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pexpect
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
    # Short replies: the test waits for whole replies, so their length sets its time.
    child = _spawn(tiny, "-n", "6")
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

        child.send("/stats\r")
        child.expect(r"2 \(4 messages, 1 image\)")
        child.expect(PROMPT)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, transcript.read_text()


def test_ctrl_c_stops_a_reply_whatever_the_speed(tiny, transcript: Path) -> None:
    """Replies have no length limit here: one that ignored Ctrl-C would run until the
    context is full, so the test does not depend on how fast the model answers."""
    child = _spawn(tiny)
    with transcript.open("w") as log:
        child.logfile_read = log
        for turn in (1, 2):
            child.send("Tell me a very long story.\r")
            child.expect("mistral ›")
            child.expect(r"\S{3}")             # some streamed text
            child.sendcontrol("c")
            child.expect(r"\(stopped\)")
            child.expect(PROMPT)
            child.send("/stats\r")             # the stopped reply stays in the chat
            child.expect(rf"{turn} \({2 * turn} messages")
            child.expect(PROMPT)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, transcript.read_text()
    assert "hit --max-tokens" not in transcript.read_text()


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
