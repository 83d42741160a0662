"""The system prompt's KV cache: read in the background while the user types, kept on
disk, loaded by the next start (chat.system_state, engine.read_ahead), and counted by the
cost model while it is unread. Real llama.cpp with the tiny model."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from localsmall import interrupt
from localsmall.chat import system_state
from localsmall.chat.cost import TURN_TEXT, ImagePolicy, cost_note, image_seconds
from localsmall.chat.session import ChatSession
from localsmall.chat.speeds import PLANNED, Speeds
from localsmall.engine.model import Engine
from localsmall.engine.types import SamplingSettings
from tests.chatting import say

GREEDY = SamplingSettings(temperature=0.0, seed=1, max_tokens=4)
SYSTEM = "You are a careful assistant. " + " ".join(f"rule{i} applies." for i in range(40))


def _start(engine: Engine, files: system_state.StateFiles | None, system: str = SYSTEM
           ) -> ChatSession:
    session = ChatSession(engine, system_prompt=system, sampling=GREEDY)
    session.start_system_prompt(files)
    return session


@pytest.fixture
def files(tmp_path: Path, engine: Engine) -> system_state.StateFiles:
    return system_state.state_files(engine, root=tmp_path / "states")


def _first_start(engine: Engine, files: system_state.StateFiles) -> tuple[ChatSession, str]:
    """A start with nothing saved: the system prompt is read in the background and
    saved; the first turn waits for it and reuses all of it."""
    session = _start(engine, files)
    assert session.system_state == system_state.Restored(0)
    reply = say(session, "Hello there")
    n = len(session.system_tokens())
    assert n >= system_state.MIN_POSITIONS
    assert reply.stats.reused_tokens == n  # read ahead, not with the turn
    assert files.state.is_file() and files.meta.is_file()
    return session, reply.text


def test_second_start_loads_the_saved_system_prompt(engine: Engine, files) -> None:
    first, text = _first_start(engine, files)
    n = len(first.system_tokens())
    engine.reset()
    calls = engine.decode_calls
    second = _start(engine, files)
    assert second.system_state == system_state.Restored(n)
    assert engine.cached_positions == n and not engine.ahead_running
    assert engine.decode_calls == calls        # loaded, not evaluated
    reply = say(second, "Hello there")
    assert reply.stats.reused_tokens == n
    assert reply.text == text                  # the same answer as from a fresh read


def test_the_first_turn_answers_as_without_read_ahead(engine: Engine, files) -> None:
    _, text = _first_start(engine, files)
    engine.reset()
    plain = ChatSession(engine, system_prompt=SYSTEM, sampling=GREEDY)
    reply = say(plain, "Hello there")
    assert reply.stats.reused_tokens == 0 and reply.text == text


def test_another_system_prompt_or_configuration_is_not_reused(engine: Engine, files) -> None:
    _first_start(engine, files)
    engine.reset()
    other = _start(engine, files, system=SYSTEM + " Be brief.")
    assert other.system_state == system_state.Restored(0)  # read again, silently
    reply = say(other, "Hello there")
    assert reply.stats.reused_tokens == len(other.system_tokens())
    saved = json.loads(files.meta.read_text())
    assert len(saved["items"]) == len(other.system_tokens())  # replaced by the new one
    # Another model file, KV type or llama.cpp build (the fingerprint), or other
    # settings that change the cache, keep their states apart.
    root = files.state.parent
    engine.__dict__["fingerprint"] = "another model"
    try:
        assert system_state.state_files(engine, root=root) != files
    finally:
        del engine.__dict__["fingerprint"]
    settings = engine.settings
    try:
        engine.settings = type(settings)(**{**settings.__dict__, "flash_attn": True})
        assert system_state.state_files(engine, root=root) != files
    finally:
        engine.settings = settings


@pytest.mark.parametrize("damage", ["state", "meta", "foreign"])
def test_a_damaged_state_is_read_again_with_a_notice(engine: Engine, files, damage) -> None:
    _, text = _first_start(engine, files)
    if damage == "state":
        data = bytearray(files.state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        files.state.write_bytes(bytes(data))
    elif damage == "meta":
        files.meta.write_text("{not json")
    else:  # saved for another model: same tokens, another fingerprint
        meta = json.loads(files.meta.read_text())
        files.meta.write_text(json.dumps(meta | {"fingerprint": "0" * 32}))
    engine.reset()
    session = _start(engine, files)
    assert session.system_state is not None and session.system_state.n_pos == 0
    assert session.system_notice().startswith("The saved system prompt state could not be "
                                               "used (")
    reply = say(session, "Hello there")          # read again, same answer, no traceback
    assert reply.text == text
    assert reply.stats.reused_tokens == len(session.system_tokens())
    engine.reset()
    assert _start(engine, files).system_state == system_state.Restored(
        len(session.system_tokens()))              # and saved again, sound


def test_ctrl_c_while_the_turn_waits_for_the_read(engine: Engine, files) -> None:
    # The read's thread is held after reading (its on_done waits for the read's stop
    # event), so the turn surely waits for it, however fast this machine is.
    session = ChatSession(engine, system_prompt=SYSTEM, sampling=GREEDY)
    held = threading.Event()

    def hold(stats: object, meta: object) -> None:
        held.set()
        assert engine._ahead is not None
        engine._ahead.stop.wait(30)

    engine.read_ahead(session.system_tokens(), label=system_state.LABEL, on_done=hold)
    assert held.wait(30) and engine.ahead_running
    reply = session.handle("Hello there")
    assert reply is not None and not isinstance(reply, str)
    interrupt.request()
    with pytest.raises(KeyboardInterrupt):
        for _ in reply.stream():  # type: ignore[union-attr]
            pass
    reply.close()  # type: ignore[union-attr]
    assert not engine.ahead_running and not interrupt.requested()
    assert session.restored_input == "Hello there" and not session.conversation.messages
    again = say(session, "Hello there")        # the chat goes on: the read was kept
    assert again.stats.reused_tokens == len(session.system_tokens())


def test_anything_else_cancels_the_read(engine: Engine, files, tmp_path: Path) -> None:
    session = ChatSession(engine, system_prompt=SYSTEM, sampling=GREEDY)
    engine.read_ahead(session.system_tokens(), label=system_state.LABEL)
    session.save(tmp_path / "chat.json")       # waits for no read: cancels it first
    assert not engine.ahead_running
    engine.read_ahead(session.system_tokens(), label=system_state.LABEL)
    session.clear()
    assert not engine.ahead_running and engine.cached_positions == 0


SPEEDS = Speeds(batch_s=2.0, token_s=0.1, encode_s=1.0, encode_token_s=0.01, source=PLANNED)


def test_the_cost_model_counts_text_the_cache_does_not_hold(engine: Engine,
                                                            make_image) -> None:
    session = ChatSession(engine, system_prompt=SYSTEM, sampling=GREEDY,
                          images=ImagePolicy(base=SPEEDS, max_tokens=16))
    image = session.attach(make_image("p.png"))
    n = len(session.system_tokens())
    text, ahead = session.unread_text(image)
    assert ahead == 0 and text >= n - 1 + TURN_TEXT  # the system prompt is not read yet
    note = session.cost_note(image, explicit=True)
    seconds = image_seconds(image.n_tokens, SPEEDS, session.image_policy, text=text)
    assert f"about {seconds:.0f} s" in note and "tokens of text not read yet" in note
    assert seconds >= image_seconds(image.n_tokens, SPEEDS) + (n - 1) * SPEEDS.token_s
    say(session, "Hello")                      # now the system prompt is in the cache
    assert session.unread_text(image)[0] < TURN_TEXT + 16


def test_a_read_still_running_costs_its_own_calls() -> None:
    policy = ImagePolicy(n_batch=512)
    base = image_seconds(100, SPEEDS, policy)
    assert image_seconds(100, SPEEDS, policy, ahead=400) == pytest.approx(
        base + SPEEDS.batch_s + 400 * SPEEDS.token_s)
    from localsmall.images import PreparedImage  # noqa: F401 - the note's input type

    assert "still being read" in _note(ahead=400)


def _note(*, ahead: float) -> str:
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Image:
        source: str = "p.png"
        n_tokens: int = 100
        full_tokens: int = 100
        downscaled: bool = False

    return cost_note(Image(), SPEEDS, automatic=False, ahead=ahead)  # type: ignore[arg-type]
