"""The chat session on the real engine: turns, images, every slash command, saving,
context overflow and interruption."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from localsmall.chat.session import ChatSession, Reply
from localsmall.chat.slash import CommandResult
from localsmall.engine.model import Engine
from localsmall.engine.types import EngineSettings, SamplingSettings
from localsmall.errors import ContextFullError, ConversationFileError, ImageError, UsageError
from tests.chatting import say as _say

GREEDY = SamplingSettings(temperature=0, max_tokens=8)


@pytest.fixture
def session(engine: Engine) -> ChatSession:
    engine.reset()
    return ChatSession(engine, system_prompt="You are a test.", sampling=GREEDY)


def _run(session: ChatSession, line: str) -> CommandResult:
    result = session.handle(line)
    assert isinstance(result, CommandResult)
    return result


def test_streaming_text_turns(session: ChatSession) -> None:
    reply = session.handle("Hello!")
    assert isinstance(reply, Reply)
    pieces = list(reply)
    assert "".join(pieces) == reply.text and len(pieces) == 8
    assert [m.role for m in session.conversation.messages] == ["user", "assistant"]
    second = _say(session, "And then?")
    # The follow-up reads only its own tokens: the first turn is reused from the cache.
    assert second.stats.reused_tokens >= reply.stats.prompt_tokens + 7
    assert len(session.conversation.turns()) == 2


def test_image_command_and_dropped_paths(session: ChatSession, make_image) -> None:
    first, second = make_image("one.png", seed=1), make_image("two.png", seed=2)
    result = _run(session, f"/image {first}")
    assert "one.png" in result.message and len(session.pending_images) == 1
    reply = _say(session, f"Compare with {second} please")
    message = session.conversation.messages[0]
    assert len(message.images) == 2 and message.text == "Compare with please"
    assert reply.stats.images_encoded == 2
    assert session.pending_images == []


def test_quoted_and_escaped_dropped_paths(session: ChatSession, tmp_path: Path,
                                          make_image) -> None:
    spaced = make_image("my photo.png")
    text, images = session.extract_dropped_images(f"look at '{spaced}' now")
    assert len(images) == 1 and text == "look at now"
    escaped = str(spaced).replace(" ", "\\ ")
    text, images = session.extract_dropped_images(f"{escaped} what is it?")
    assert len(images) == 1 and text == "what is it?"
    text, images = session.extract_dropped_images("a file called photo.png, no path")
    assert images == [] and text == "a file called photo.png, no path"


def test_bad_images_leave_the_chat_intact(session: ChatSession, tmp_path: Path) -> None:
    _say(session, "first question")
    before = list(session.conversation.messages)
    (tmp_path / "fake.png").write_text("not an image")
    with pytest.raises(ImageError, match="not an image"):
        session.handle(f"/image {tmp_path / 'fake.png'}")
    with pytest.raises(ImageError, match="no such file"):
        session.handle(f"what is {tmp_path / 'missing.jpg'}?")
    assert session.conversation.messages == before and session.pending_images == []
    _say(session, "still working?")
    assert len(session.conversation.messages) == 4


def test_system_command(session: ChatSession) -> None:
    assert "You are a test." in _run(session, "/system").message
    _run(session, "/system Answer in French.")
    assert session.conversation.system == "Answer in French."
    reply = _say(session, "Hi")
    assert reply.stats.reused_tokens < 5  # the new system prompt changed the prefix


def test_undo_and_retry(session: ChatSession) -> None:
    _say(session, "one")
    _say(session, "two")
    assert "two" in _run(session, "/undo").message
    assert [m.text for m in session.conversation.messages if m.role == "user"] == ["one"]
    original = session.conversation.messages[-1]
    retried = session.handle("/retry")
    assert isinstance(retried, Reply)
    list(retried)
    assert len(session.conversation.messages) == 2
    # Greedy sampling: the same prompt gives the same reply, read from the cache.
    assert session.conversation.messages[-1].text == original.text
    assert retried.stats.evaluated_tokens <= 1
    session.handle("/undo")
    assert session.conversation.messages == []
    assert "Nothing to undo" in _run(session, "/undo").message
    with pytest.raises(UsageError, match="no reply to retry"):
        session.handle("/retry")


def test_clear(session: ChatSession) -> None:
    _say(session, "remember this")
    _run(session, "/clear")
    assert session.conversation.messages == [] and session.engine.cached_positions == 0
    assert session.conversation.system == "You are a test."


def test_stats_help_exit(session: ChatSession) -> None:
    _say(session, "count me")
    stats = _run(session, "/stats").data
    assert stats.turns == 1 and stats.total_generated == 8
    assert stats.context_used == session.engine.cached_positions > 0
    names = {spec.name for spec in _run(session, "/help").data}
    assert {"image", "system", "clear", "undo", "retry", "save", "load", "stats", "help",
            "exit"} <= names
    assert _run(session, "/exit").kind == "exit"
    assert _run(session, "/quit").kind == "exit"
    with pytest.raises(UsageError, match="unknown command"):
        session.handle("/frobnicate")


@pytest.mark.parametrize("embed", [False, True])
def test_save_and_load_round_trip(session: ChatSession, tmp_path: Path, make_image,
                                  embed: bool) -> None:
    picture = make_image("pic.png", seed=5)
    _run(session, f"/image {picture}")
    _say(session, "What is in it?")
    _say(session, "Are you sure?")
    target = tmp_path / "chat.json"
    _run(session, f"/save {'--embed ' if embed else ''}{target}")
    saved = json.loads(target.read_text())
    image_part = saved["messages"][0]["content"][0]
    assert ("png_base64" in image_part) == embed and ("path" in image_part) != embed
    if embed:
        picture.unlink()  # an embedded chat does not need the original file

    other = ChatSession(session.engine, system_prompt="", sampling=GREEDY)
    result = _run(other, f"/load {target}")
    assert result.kind == "reply"
    assert other.conversation.system == "You are a test."
    assert [m.text for m in other.conversation.messages] == \
        [m.text for m in session.conversation.messages]
    assert other.conversation.messages[0].images[0].key == \
        session.conversation.messages[0].images[0].key
    reply = _say(other, "One more question")
    assert reply.stats.prompt_tokens > 0 and len(other.conversation.messages) == 6


def test_load_rejects_bad_files(session: ChatSession, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConversationFileError, match="could not be read"):
        session.handle(f"/load {bad}")
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ConversationFileError, match="not a localsmall chat"):
        session.handle(f"/load {bad}")
    with pytest.raises(ConversationFileError, match="no such file"):
        session.handle(f"/load {tmp_path / 'absent.json'}")


def test_save_leaves_no_partial_file_on_failure(session: ChatSession, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _say(session, "hello")
    target = tmp_path / "chat.json"
    target.write_text("previous save")

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("localsmall.fileio.os.fsync", full_disk)
    from localsmall.errors import DiskSpaceError

    with pytest.raises(DiskSpaceError, match="no space"):
        session.handle(f"/save {target}")
    assert target.read_text() == "previous save"
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]


def test_context_overflow_drops_oldest_turns(tiny) -> None:
    settings = EngineSettings(model_path=tiny.f16, n_ctx=512, n_threads=2)
    with Engine(settings) as small:
        session = ChatSession(small, system_prompt="SYSTEM PROMPT STAYS",
                              sampling=SamplingSettings(temperature=0, max_tokens=16))
        trims: list[int] = []
        for i in range(12):
            reply = _say(session, f"Question {i}: " + "tell me more " * 12)
            if any("dropped" in n for n in reply.notices):
                trims.append(i)
                # What the README promises: a trim frees a quarter of the context
                # beyond the room kept for the reply, so that trims stay rare.
                free = 512 - reply.stats.prompt_tokens
                assert free >= session.reply_reserve() + 512 // 4, free
        assert len(trims) >= 2 and session.window_start > 0 and session.dropped_turns > 0
        # each turn takes ~60 positions: after a trim, the next turn still fits
        assert all(b - a > 1 for a, b in itertools.pairwise(trims)), trims
        sent = session._messages_for_model()
        assert sent[0].role == "system" and sent[0].text == "SYSTEM PROMPT STAYS"
        assert sent[1].role == "user"  # whole turns are dropped, never half of one
        assert len(session.conversation.messages) == 24  # the transcript keeps everything
        before = len(session.conversation.messages)
        with pytest.raises(ContextFullError, match="larger --ctx"):
            session.handle("x " * 2000)
        assert len(session.conversation.messages) == before


def test_interrupt_keeps_partial_reply(session: ChatSession) -> None:
    session.sampling = SamplingSettings(temperature=0, max_tokens=50)
    reply = session.handle("Write a long answer")
    assert isinstance(reply, Reply)
    tokens = iter(reply)
    for _ in range(3):
        next(tokens)
    reply.close()  # what the UI does on Ctrl-C
    last = session.conversation.messages[-1]
    assert last.role == "assistant" and last.interrupted
    assert len(last.token_ids or ()) == 3
    follow = _say(session, "go on")
    assert follow.stats.reused_tokens > 0


def test_interrupt_before_the_first_token_takes_the_message_back(session: ChatSession,
                                                                 make_image) -> None:
    picture = make_image("p.png")
    session.handle(f"/image {picture}")
    reply = session.handle("never answered")
    assert isinstance(reply, Reply)
    reply.close()  # Ctrl-C while the prompt is being read
    assert session.conversation.messages == []
    assert session.restored_input == "never answered"
    assert len(session.pending_images) == 1  # the image is still attached


def test_interrupt_during_prompt_reading(session: ChatSession) -> None:
    def interrupt(progress) -> None:
        raise KeyboardInterrupt

    reply = session.handle("interrupted while reading")
    assert isinstance(reply, Reply)
    with pytest.raises(KeyboardInterrupt):
        list(reply.stream(interrupt))
    assert session.conversation.messages == []
    assert session.restored_input == "interrupted while reading"
    _say(session, "works again")
    assert len(session.conversation.messages) == 2
