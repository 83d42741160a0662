"""Progress of a turn reaches whoever shows it: the chat screen's bar gets the engine's
events (image encoding, prompt reading), bars wait for slow work and vanish, and the
log form (for the server) says elapsed time and ETA."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import ClassVar

import pytest
from prompt_toolkit.application import create_app_session
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from localsmall.chat.session import ChatSession, Reply
from localsmall.engine.model import Engine
from localsmall.engine.progress_log import ProgressLog, progress_line
from localsmall.engine.types import Progress, SamplingSettings
from localsmall.ui import chat_screen
from localsmall.ui.chat_screen import ChatScreen
from localsmall.ui.progress import WorkProgress

GREEDY = SamplingSettings(temperature=0.0, max_tokens=3)


class RecordingProgress(WorkProgress):
    """The screen's bar, recording what it is given (and drawing nothing)."""

    made: ClassVar[list[RecordingProgress]] = []

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(Console(file=io.StringIO()), enabled=False)
        self.seen: list[Progress] = []
        RecordingProgress.made.append(self)

    def __call__(self, event: Progress) -> None:
        self.seen.append(event)
        super().__call__(event)


@pytest.fixture
def screen(engine: Engine) -> Iterator[ChatScreen]:
    engine.reset()
    session = ChatSession(engine, system_prompt="You are a test.", sampling=GREEDY)
    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        yield ChatScreen(session)


def test_the_screen_gives_the_engine_its_progress_bar(screen: ChatScreen, make_image,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The bug of issue 16: the engine got None because the screen set the callback after
    the reply had been created. Whatever the order, the engine must receive the very bar
    the screen shows, and that bar must see the image being encoded and the prompt read."""
    monkeypatch.setattr(chat_screen, "WorkProgress", RecordingProgress)
    RecordingProgress.made.clear()
    given: list[object] = []
    engine = screen.session.engine
    real_generate = engine.generate

    def spy(prompt, sampling, on_progress=None):  # type: ignore[no-untyped-def]
        given.append(on_progress)
        return real_generate(prompt, sampling, on_progress)

    monkeypatch.setattr(engine, "generate", spy)
    picture = make_image("p.png", 224, 168)
    reply = screen.session.handle(f"What is this? {picture}")
    assert isinstance(reply, Reply)
    screen.stream(reply)

    assert len(given) == 1 and given[0] is not None
    (bar,) = RecordingProgress.made
    assert given[0] is bar
    stages = {event.stage for event in bar.seen}
    assert stages == {"image", "prompt"}
    reading = [e for e in bar.seen if e.stage == "prompt"]
    assert reading[0].done == 0 and reading[-1].done == reading[-1].total  # start to end
    assert len(screen.session.conversation.messages) == 2


def test_a_reply_streams_once_with_the_callback_it_is_given(engine: Engine) -> None:
    engine.reset()
    session = ChatSession(engine, system_prompt="", sampling=GREEDY)
    reply = session.handle("hello")
    assert isinstance(reply, Reply)
    seen: list[Progress] = []
    assert list(reply.stream(seen.append))
    assert seen and all(e.stage == "prompt" for e in seen)
    with pytest.raises(RuntimeError):
        reply.stream(seen.append)


def _terminal() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=True, width=100, color_system=None), buffer


def test_bars_wait_for_slow_work_then_draw_at_once_and_vanish() -> None:
    console, buffer = _terminal()
    clock = [0.0]
    bar = WorkProgress(console, enabled=True, after_s=0.5)
    bar._clock = lambda: clock[0]  # type: ignore[method-assign]
    bar(Progress("prompt", 0, 400, "reading prompt"))
    bar(Progress("prompt", 100, 400, "reading prompt"))
    assert not bar.shown and buffer.getvalue() == ""       # quick so far: nothing drawn
    clock[0] = 0.6
    bar(Progress("prompt", 200, 400, "reading prompt"))
    assert bar.shown and "reading prompt" in buffer.getvalue()  # drawn at once
    assert "200/400" in buffer.getvalue()
    bar.stop()
    assert not bar.shown

    quick, quiet = _terminal()
    fast = WorkProgress(quick, enabled=True, after_s=0.5)
    fast._clock = lambda: 0.0  # type: ignore[method-assign]
    fast(Progress("prompt", 0, 10, "reading prompt"))
    fast(Progress("prompt", 10, 10, "reading prompt"))
    fast.stop()
    assert quiet.getvalue() == ""


def test_the_threshold_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALSMALL_PROGRESS_AFTER", "0")
    assert WorkProgress(enabled=True).after_s == 0.0
    monkeypatch.setenv("LOCALSMALL_PROGRESS_AFTER", "nonsense")
    assert WorkProgress(enabled=True).after_s == 0.5


def test_progress_log_lines_say_elapsed_and_eta() -> None:
    lines: list[str] = []
    clock = [0.0]
    log = ProgressLog(lines.append, every_s=2.0, clock=lambda: clock[0])
    log(Progress("image", 1, 24, "encoding cat.png"))
    for step in range(2, 25):
        clock[0] = step * 0.5
        log(Progress("image", step, 24, "encoding cat.png"))
    log(Progress("image", 24, 24, "encoding cat.png"))  # the end is said once
    assert lines[0] == "encoding cat.png: 1/24 (4%), 0.0 s"
    assert lines[-1] == "encoding cat.png: 24/24 (100%), 12.0 s"
    assert len(lines) == 7  # every 2 s of the 12 s, and the end
    assert progress_line(Progress("prompt", 100, 400, "reading prompt"), 20.0) == (
        "reading prompt: 100/400 (25%), 20.0 s, about 60 s left")


def test_progress_log_keeps_short_steps_out_of_the_server_log() -> None:
    lines: list[str] = []
    clock = [0.0]
    log = ProgressLog(lines.append, every_s=5.0, after_s=1.0, clock=lambda: clock[0])
    log(Progress("prompt", 1, 10, "reading prompt"))
    clock[0] = 0.4
    log(Progress("prompt", 10, 10, "reading prompt"))  # done in 0.4 s: nothing said
    log(Progress("image", 1, 24, "encoding cat.png"))
    clock[0] = 7.0
    log(Progress("image", 12, 24, "encoding cat.png"))
    clock[0] = 14.0
    log(Progress("image", 24, 24, "encoding cat.png"))
    assert lines == ["encoding cat.png: 12/24 (50%), 6.6 s, about 7 s left",
                     "encoding cat.png: 24/24 (100%), 13.6 s"]


def test_the_bar_crosses_a_whole_batch_while_it_is_read(engine: Engine) -> None:
    # Inside one llama_decode call the bar moves with the graph nodes llama.cpp has
    # computed; the share must be of the nodes a batch really reports, or the bar stops
    # halfway and jumps (as it did on the full-size model: 235 of 448, then done).
    from localsmall.engine.types import TokenRun

    words = " ".join(f"word{i}" for i in range(120))
    tokens = tuple(engine.tokenize(f"<s>[INST]{words}[/INST]", special=True))
    assert len(tokens) < engine.settings.n_batch  # one call
    for _ in range(2):  # the second read knows the count the first one made
        engine.reset()
        events: list[Progress] = []
        engine.generate([TokenRun(tokens)], SamplingSettings(temperature=0, max_tokens=1),
                        on_progress=events.append).run()
        seen = [p.done for p in events if p.stage == "prompt"]
        inside = [d for d in seen if 0 < d < len(tokens)]
        assert inside and max(inside) >= 0.75 * len(tokens)
        assert seen[-1] == len(tokens)
