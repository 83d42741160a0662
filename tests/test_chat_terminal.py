"""`localsmall chat` end to end in a real pseudo-terminal (pexpect): type, attach an image,
watch a streamed reply, interrupt it, keep chatting, leave."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pexpect
import pytest

PROMPT = "you ›"
# Text of a reply on the screen: after the reply's header, past the terminal's escape
# sequences (cursor moves, erased lines) and blank space, a printable character.
STREAMED_TEXT = r"mistral ›(?:\x1b\[[0-9;?]*[ -/]*[@-~]|\s)*[^\x1b\s]"


def _spawn(tiny, *extra: str, model: tuple[str, ...] | None = None) -> pexpect.spawn:
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm-256color")
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    if model is None:
        model = ("--model", str(tiny.f16), "--mmproj", str(tiny.mmproj))
    args = ["-m", "localsmall", "chat", *model, "--ctx", "4096", "--threads", "2",
            "--temperature", "0", *extra]
    child = pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", cwd=str(root),
                          dimensions=(40, 220), timeout=90)
    return child


@pytest.fixture
def transcript(tmp_path: Path) -> Path:
    return tmp_path / "terminal.log"


def test_chat_in_a_terminal(tiny, make_image, transcript: Path, tmp_path: Path) -> None:
    picture = make_image("cat.png", 224, 168)
    saved = tmp_path / "chat.json"
    child = _spawn(tiny, "-n", "6")
    with transcript.open("w") as log:
        child.logfile_read = log
        child.expect(PROMPT)
        assert "vision on" in child.before

        # Alt-Enter (Esc, Enter) and a trailing backslash start new lines; Enter sends.
        child.send("Hello,")
        child.send("\x1b\r")
        child.send("who are you?\\")
        child.send("\r")
        child.send("Answer briefly.\r")
        child.expect(STREAMED_TEXT)
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
        child.send(f"/save {saved}\r")
        child.expect("Saved 4 messages")   # keys typed before the next prompt can be lost
        child.expect(PROMPT)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, transcript.read_text()
    first = json.loads(saved.read_text())["messages"][0]["content"]
    assert [part["text"] for part in first] == ["Hello,\nwho are you?\nAnswer briefly."]


def test_ctrl_c_stops_a_streaming_reply(tiny, transcript: Path) -> None:
    # Replies may run to the end of the context, so however fast the machine is, the
    # reply is still streaming when Ctrl-C comes: it is sent once text is on the screen.
    child = _spawn(tiny, "-n", "4000", "--no-vision")
    with transcript.open("w") as log:
        child.logfile_read = log
        child.expect(PROMPT)
        for turn, message in enumerate(["Tell me a very long story.", "Go on, please."]):
            child.send(message + "\r")
            child.expect(STREAMED_TEXT)
            child.sendcontrol("c")
            child.expect(r"\(stopped\)")
            child.expect(PROMPT)
            # the interrupted reply stays in the conversation and the chat goes on
            child.send("/stats\r")
            child.expect(rf"{turn + 1} \({2 * turn + 2} messages, 0 images\)")
            child.expect(PROMPT)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, transcript.read_text()


def test_ctrl_c_twice_at_the_prompt_leaves(tiny) -> None:
    child = _spawn(tiny)
    child.expect(PROMPT)
    child.sendcontrol("c")
    child.expect("Ctrl-C again")
    child.sendcontrol("c")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_errors_keep_the_chat_going(tiny, tmp_path: Path) -> None:
    child = _spawn(tiny, "-n", "4")
    child.expect(PROMPT)
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
    first.expect(PROMPT)
    first.send("a line worth remembering\r")
    first.expect("tok/s")
    first.expect(PROMPT)
    first.sendcontrol("d")
    first.expect(pexpect.EOF)
    first.close()

    second = _spawn(tiny, "-n", "2")
    second.expect(PROMPT)
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


def test_chat_offers_to_download_the_planned_build(tiny, hub) -> None:
    # Nothing on disk: chat offers the plan's build (Q4_K_M on the tests' machine) and its
    # projector, telling their size, and downloads them when the user says yes. (The Hub
    # serves the tiny model under the catalog's names.)
    from localsmall.models.catalog import load_catalog
    from localsmall.units import gib

    model = load_catalog().default
    quant, projector = model.quant("Q4_K_M").remote, model.projector.remote
    hub.state.add(quant.repo, quant.file, Path(tiny.q4_k_m).read_bytes())
    hub.state.add(projector.repo, projector.file, Path(tiny.mmproj).read_bytes())
    size = gib(quant.size + projector.size)  # as the catalog lists them: known up front
    child = _spawn(tiny, "-n", "2", model=())
    child.expect(r"mistral-small-3\.2:Q4_K_M is not downloaded yet\. Download it now "
                 rf"\({size}\)\?")
    assert not hub.state.data_requests(quant.file)  # nothing before the answer
    child.send("y\r")
    child.expect(PROMPT)
    assert "vision on" in child.before and "Q4_K_M" in child.before
    child.send("Hello\r")
    child.expect("tok/s")
    child.expect(PROMPT)
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert len(hub.state.data_requests(quant.file)) == 1
    assert len(hub.state.data_requests(projector.file)) == 1
