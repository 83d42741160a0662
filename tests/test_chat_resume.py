"""A chat is never lost: a failing turn costs one line and the chat goes on, every turn is
saved (atomically, mode 0600, in the state folder), and `chat --resume` continues the last
chat after a crash, with its KV cache when the chat ended cleanly."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from localsmall import paths
from localsmall.chat.session import ChatSession
from localsmall.engine.model import Engine
from localsmall.engine.state import state_path_for
from localsmall.engine.types import SamplingSettings
from localsmall.ui.chat_screen import ChatScreen

SHORT = SamplingSettings(temperature=0, max_tokens=3)
PROMPT = "you ›"


class ScriptedPrompt:
    """Stands in for prompt_toolkit: hands out lines, and notes what the autosaved chat
    held each time it was asked (that is, after each turn)."""

    def __init__(self, lines: list[str], autosave: Path) -> None:
        self._lines: Iterator[str] = iter(lines)
        self._autosave = autosave
        self.saved_messages: list[int] = []

    def prompt(self, *args: Any, **kwargs: Any) -> str:
        if self._autosave.exists():
            data = json.loads(self._autosave.read_text(encoding="utf-8"))
            self.saved_messages.append(len(data["messages"]))
        else:
            self.saved_messages.append(0)
        try:
            return next(self._lines)
        except StopIteration:
            raise EOFError from None


def _screen(engine: Engine, tmp_path: Path, lines: list[str]
            ) -> tuple[ChatScreen, ScriptedPrompt]:
    engine.reset()
    session = ChatSession(engine, system_prompt="You are a test.", sampling=SHORT)
    session.autosave_path = tmp_path / "state" / "last_chat.json"
    screen = ChatScreen(session, history_path=None)
    scripted = ScriptedPrompt(lines, session.autosave_path)
    screen.prompt = scripted  # type: ignore[assignment]
    return screen, scripted


def _fail_once(monkeypatch: pytest.MonkeyPatch, engine: Engine, turn: int) -> None:
    """Make the engine raise an error that is not localsmall's own, once, inside a turn
    (the `turn`-th, counting from 1)."""
    real = engine._evaluate
    calls = [0]

    def evaluate(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == turn:
            monkeypatch.setattr(engine, "_evaluate", real)
            raise RuntimeError("something nobody expected\nwith a second line")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_evaluate", evaluate)


def test_a_failing_turn_costs_one_line_and_the_chat_goes_on(
        engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    screen, scripted = _screen(engine, tmp_path, ["hello", "this one breaks", "after"])
    _fail_once(monkeypatch, engine, 2)
    screen.run()
    err = capsys.readouterr().err
    text = " ".join(err.split())  # as one line, whatever the console's width
    assert text.count("RuntimeError") == 1
    assert ("error: RuntimeError: something nobody expected with a second line (the chat "
            "goes on)") in text
    assert "Traceback" not in err
    messages = screen.session.conversation.messages
    assert [m.text for m in messages if m.role == "user"] == ["hello", "after"]
    # Saved after every turn: nothing before the first, one exchange after it (the failed
    # turn added nothing), two at the end.
    assert scripted.saved_messages == [0, 2, 2, 4]
    saved = screen.session.autosave_path
    assert saved is not None
    assert len(json.loads(saved.read_text(encoding="utf-8"))["messages"]) == 4
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    # Leaving the chat also saved its KV cache, for a quick --resume.
    assert state_path_for(saved).is_file()
    assert [p.name for p in saved.parent.iterdir() if p.name.startswith(".")] == []


def test_debug_shows_the_traceback(engine: Engine, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("LOCALSMALL_DEBUG", "1")
    screen, _ = _screen(engine, tmp_path, ["this one breaks", "after"])
    _fail_once(monkeypatch, engine, 1)
    screen.run()
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError" in err
    assert len(screen.session.conversation.messages) == 2


def test_an_unsaveable_chat_warns_once_and_goes_on(engine: Engine, tmp_path: Path,
                                                   capsys) -> None:
    screen, _ = _screen(engine, tmp_path, ["one", "two"])
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    screen.session.autosave_path = blocker / "last_chat.json"
    screen.run()
    err = capsys.readouterr().err
    assert err.count("could not be saved") == 1
    assert len(screen.session.conversation.messages) == 4


def _spawn(tiny, *extra: str) -> pexpect.spawn:
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm-256color")
    args = ["-m", "localsmall", "chat", "--model", str(tiny.f16), "--ctx", "2048",
            "--threads", "2", "--temperature", "0", "-n", "3", *extra]
    return pexpect.spawn(sys.executable, args, env=env, encoding="utf-8",
                         dimensions=(40, 200), timeout=120)


def _leave(child: pexpect.spawn) -> None:
    """At the prompt, leave with Ctrl-D: the chat must end cleanly."""
    child.expect(PROMPT)
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_resume_after_a_crash_and_after_a_clean_exit(tiny) -> None:
    first = _spawn(tiny)
    first.expect(PROMPT)
    first.send("remember the word pelican\r")
    first.expect("tok/s")
    first.expect(PROMPT)
    first.kill(signal.SIGKILL)  # a crash: nothing runs after this
    first.close()

    saved = paths.last_chat_file()
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    second = _spawn(tiny, "--resume")
    second.expect(r"Resumed the last chat \(2 messages; it will be read again")
    second.expect("remember the word pelican")   # the chat is shown again
    second.expect(PROMPT)
    second.send("/stats\r")
    second.expect(r"1 \(2 messages")
    second.expect(PROMPT)
    second.send("and now?\r")
    second.expect("tok/s")
    _leave(second)

    third = _spawn(tiny, "--resume")
    third.expect(r"Resumed the last chat \(4 messages; \d+ tokens restored from its KV cache")
    third.expect(PROMPT)
    third.send("/stats\r")
    third.expect(r"2 \(4 messages")
    _leave(third)


def test_resume_without_a_saved_chat_starts_a_new_one(tiny) -> None:
    child = _spawn(tiny, "--resume")
    child.expect("no earlier chat to resume")
    _leave(child)


def test_a_damaged_saved_chat_does_not_stop_the_chat(tiny) -> None:
    saved = paths.last_chat_file()
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text("{ not json", encoding="utf-8")
    child = _spawn(tiny, "--resume")
    child.expect("could not be resumed")
    child.expect(PROMPT)
    child.send("hello\r")
    child.expect("tok/s")
    _leave(child)
    assert len(json.loads(saved.read_text(encoding="utf-8"))["messages"]) == 2
