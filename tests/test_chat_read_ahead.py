"""`localsmall chat` in a real pseudo-terminal while the system prompt is read in the
background: typing during the read, Ctrl-C during it, and the next start loading the
saved state instead of reading again (chat.system_state)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pexpect

PROMPT = "you ›"
# A long system prompt read one position per llama_decode call (--batch 1): the read is
# still going when the first message is typed on any machine this suite runs on (and the
# tests hold whether or not it is).
SYSTEM = " ".join(f"Rule {i}: answer in plain words." for i in range(300))


STREAMED_TEXT = r"mistral ›(?:\x1b\[[0-9;?]*[ -/]*[@-~]|\s)*[^\x1b\s]"


def _spawn(tiny, *extra: str, env: dict[str, str] | None = None) -> pexpect.spawn:
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm-256color", **(env or {}))
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    args = ["-m", "localsmall", "chat", "--model", str(tiny.f16), "--no-vision",
            "--ctx", "4096", "--threads", "1", "--batch", "1", "--temperature", "0",
            "--system", SYSTEM, *(extra or ("-n", "6"))]
    return pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", cwd=str(root),
                         dimensions=(40, 220), timeout=120)


def _transcript(child: pexpect.spawn, log: Path) -> str:
    """The text of a chat that has ended: it left cleanly, without a traceback."""
    child.close()
    text = log.read_text()
    assert child.exitstatus == 0 and "Traceback" not in text, text
    return text


def _chat_once(tiny, saved: Path, log: Path) -> str:
    """Start a chat, type at once, save the chat, leave; the transcript's text."""
    child = _spawn(tiny)
    with log.open("w") as out:
        child.logfile_read = out
        child.expect(PROMPT)
        child.send("Hello there\r")          # typed while the system prompt is read
        child.expect("tok/s")
        child.expect(PROMPT)
        child.send(f"/save {saved}\r")
        child.expect("Saved 2 messages")
        child.expect(PROMPT)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    return _transcript(child, log)


def _cached(transcript: str) -> int:
    found = re.findall(r"prompt ([\d,]+) cached \+", transcript)
    assert found, transcript
    return int(found[-1].replace(",", ""))


def test_typing_during_the_read_and_the_next_start_loads_it(tiny, tmp_path: Path) -> None:
    first = _chat_once(tiny, tmp_path / "one.json", tmp_path / "one.log")
    second = _chat_once(tiny, tmp_path / "two.json", tmp_path / "two.log")
    # Both first turns found the system prompt in the cache: read ahead by the first
    # start, loaded from disk by the second (which waited for no read).
    assert _cached(first) > 300 and _cached(second) == _cached(first)
    assert "system prompt" not in second.split("Hello there", 1)[1]
    replies = [json.loads((tmp_path / f"{n}.json").read_text())["messages"][1]
               for n in ("one", "two")]
    assert replies[0] == replies[1]           # the same answer either way
    assert list((Path(os.environ["LOCALSMALL_HOME"]) / "cache" / "system-prompts").glob(
        "*.kvstate"))


def test_ctrl_c_during_the_read_keeps_the_chat(tiny, tmp_path: Path) -> None:
    # Ctrl-C once the turn shows the read's bar (LOCALSMALL_PROGRESS_AFTER=0: at once),
    # or, on a machine fast enough to finish the read first, once the reply streams
    # (it may run to the end of the context, so it is still streaming).
    log = tmp_path / "ctrl-c.log"
    child = _spawn(tiny, "-n", "4000", "--ctx", "8192", env={"LOCALSMALL_PROGRESS_AFTER": "0"})
    with log.open("w") as out:
        child.logfile_read = out
        child.expect(PROMPT)
        child.send("Hello there\r")
        during_read = child.expect(["reading system prompt", STREAMED_TEXT]) == 0
        child.sendcontrol("c")
        child.expect(r"\(stopped before the answer began" if during_read else r"\(stopped")
        child.expect(PROMPT)
        child.send(" again\r")               # the chat goes on (the message came back)
        child.expect(STREAMED_TEXT)
        child.sendcontrol("c")
        child.expect(r"\(stopped\)")
        child.expect(PROMPT)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    _transcript(child, log)


def test_leaving_during_the_read(tiny, tmp_path: Path) -> None:
    log = tmp_path / "exit.log"
    child = _spawn(tiny)
    with log.open("w") as out:
        child.logfile_read = out
        child.expect(PROMPT)
        child.send("/exit\r")                # the read is cancelled, the engine closed
        child.expect(pexpect.EOF)
    _transcript(child, log)
