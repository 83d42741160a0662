"""A chat turn costs only its new tokens, and the cache never changes an answer.

Every test compares replies produced through the KV cache with a fresh evaluation of
the same conversation (empty cache, image embeddings forgotten), with greedy sampling:
the tokens must be identical. Counters from the engine prove what was reused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from localsmall.chat.conversation import Message
from localsmall.chat.session import ChatSession, Reply
from localsmall.engine.model import Engine
from localsmall.engine.state import state_path_for
from localsmall.engine.types import EngineSettings, SamplingSettings, TurnStats
from tests.chatting import say as _say

GREEDY = SamplingSettings(temperature=0, max_tokens=12)


def _fresh_reply(session: ChatSession) -> tuple[list[int], TurnStats]:
    """The last reply, generated again from nothing: empty cache, no cached images."""
    messages = session.conversation.messages
    assert messages[-1].role == "assistant"
    saved = list(messages)
    del messages[-1]
    try:
        prompt = session._fit_context()[0]
        engine = session.engine
        engine.reset()
        assert engine.projector is not None
        engine.projector.forget()
        result = engine.generate(prompt, session.sampling).run()
    finally:
        messages[:] = saved
    return result.token_ids, result.stats


def _last_tokens(session: ChatSession) -> list[int]:
    return list(session.conversation.messages[-1].token_ids or ())


@pytest.fixture
def session(engine: Engine) -> ChatSession:
    engine.reset()
    assert engine.projector is not None
    engine.projector.forget()
    return ChatSession(engine, system_prompt="You answer briefly.", sampling=GREEDY)


def test_follow_ups_read_only_new_tokens_and_match_a_fresh_read(session: ChatSession,
                                                                make_image) -> None:
    session.handle(f"/image {make_image('scene.png', 224, 168)}")
    first = _say(session, "What is in this picture?")
    assert first.stats.images_encoded == 1 and first.stats.reused_tokens == 0
    cached_after_first = first.stats.context_used

    second = _say(session, "What colour dominates?")
    # Turn 2 evaluated exactly what turn 1 left out of the cache: nothing was re-read
    # and the image was not encoded again.
    assert second.stats.reused_tokens == cached_after_first
    assert second.stats.evaluated_tokens == second.stats.prompt_tokens - cached_after_first
    assert second.stats.images_encoded == 0
    third = _say(session, "Thanks. Anything else?")
    assert third.stats.reused_tokens == second.stats.context_used
    assert third.stats.images_encoded == 0

    cached = _last_tokens(session)
    fresh, fresh_stats = _fresh_reply(session)
    assert fresh == cached
    assert fresh_stats.reused_tokens == 0 and fresh_stats.images_encoded == 1
    assert fresh_stats.evaluated_tokens == third.stats.prompt_tokens


def test_after_undo(session: ChatSession, make_image) -> None:
    session.handle(f"/image {make_image('a.png')}")
    _say(session, "Describe it.")
    _say(session, "A question to undo")
    session.handle("/undo")
    # The cache keeps exactly the remaining conversation (through the first reply's
    # end-of-turn token); the undone tail left it.
    kept = session.engine.count_tokens(session._prompt())
    assert session.engine.cached_positions == kept
    reply = _say(session, "A different question")
    assert reply.stats.reused_tokens == kept and reply.stats.images_encoded == 0
    assert _fresh_reply(session)[0] == _last_tokens(session)


def test_after_retry(session: ChatSession) -> None:
    _say(session, "First question")
    _say(session, "Second question")
    original = _last_tokens(session)
    retried = session.handle("/retry")
    assert isinstance(retried, Reply)
    list(retried)
    assert _last_tokens(session) == original
    assert retried.stats.evaluated_tokens == 1  # only the last prompt token, for its logits
    assert _fresh_reply(session)[0] == original


def test_after_a_system_prompt_change(session: ChatSession) -> None:
    _say(session, "Hello")
    session.handle("/system You answer at length.")
    assert session.engine.cached_positions < 10  # rolled back to the shared prefix
    _say(session, "Hello again")
    assert _fresh_reply(session)[0] == _last_tokens(session)


def test_after_a_context_trim(tiny, make_image) -> None:
    settings = EngineSettings(model_path=tiny.f16, mmproj_path=tiny.mmproj, n_ctx=768,
                              n_threads=2)
    with Engine(settings) as small:
        session = ChatSession(small, system_prompt="SYSTEM",
                              sampling=SamplingSettings(temperature=0, max_tokens=16))
        notices: list[str] = []
        turn = 0
        while not notices:
            if turn == 6:
                session.handle(f"/image {make_image('late.png', 168, 112)}")
            reply = _say(session, f"Turn {turn}: " + "please continue the story " * 8)
            notices = reply.notices
            turn += 1
            assert turn < 40, "the context never filled"
        assert turn > 7, "the image turn must come before the trim"
        assert "re-reading the remaining" in notices[0]
        window = session.conversation.messages[session.window_start:]
        assert any(m.images for m in window), "the image turn should survive the trim"
        # The trimmed prompt is read again (only the system prompt is reused), but the
        # image's embeddings are reused: it is not encoded again.
        assert reply.stats.images_encoded == 0
        assert reply.stats.reused_tokens < 10
        assert _fresh_reply(session)[0] == _last_tokens(session)
        after = _say(session, "And then?")
        assert after.stats.reused_tokens == reply.stats.context_used


# A later session in a new process: loads the chat with /load (restoring the KV cache
# saved beside it) and asks the next question; prints what happened as JSON.
LATER_SESSION = """
import json, sys
from pathlib import Path
from localsmall.chat.session import ChatSession
from localsmall.engine.model import Engine
from localsmall.engine.types import EngineSettings, SamplingSettings

model, mmproj, chat = sys.argv[1:4]
settings = EngineSettings(model_path=Path(model), mmproj_path=Path(mmproj), n_ctx=2048,
                          n_threads=2)
with Engine(settings) as engine:
    session = ChatSession(engine, system_prompt="ignored",
                          sampling=SamplingSettings(temperature=0, max_tokens=12))
    loaded = session.handle("/load " + chat)
    restored = engine.cached_positions
    reply = session.handle("Last question")
    for _ in reply:
        pass
    print(json.dumps({"notice": loaded.message, "restored": restored,
                      "system": session.conversation.system,
                      "reused": reply.stats.reused_tokens,
                      "evaluated": reply.stats.evaluated_tokens,
                      "images_encoded": reply.stats.images_encoded,
                      "tokens": reply.generation.result.token_ids}))
"""


def test_save_and_load_continue_without_reading(engine: Engine, tiny, tmp_path: Path,
                                                make_image) -> None:
    target = tmp_path / "chat.json"
    session = ChatSession(engine, system_prompt="S", sampling=GREEDY)
    session.handle(f"/image {make_image('saved.png')}")
    _say(session, "Look at this")
    _say(session, "More?")
    saved = session.save(target)
    assert saved.state_tokens == engine.cached_positions > 0
    expected = _say(session, "Last question")
    expected_next = expected.generation.result.token_ids
    assert _fresh_reply(session)[0] == expected_next  # what a fresh read answers

    # A later session is a new process with the same files: its llama.cpp has never
    # seen this conversation.
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", LATER_SESSION, str(tiny.f16),
                           str(tiny.mmproj), str(target)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    later = json.loads(done.stdout.strip().splitlines()[-1])
    assert later["system"] == "S" and "no saved KV cache" not in later["notice"]
    assert later["restored"] == saved.state_tokens  # the cache came back from the file
    assert later["reused"] == saved.state_tokens and later["images_encoded"] == 0
    assert later["evaluated"] == expected.stats.evaluated_tokens  # only the new question
    assert later["tokens"] == expected_next


def _saved_chat(engine: Engine, tmp_path: Path) -> Path:
    engine.reset()
    session = ChatSession(engine, system_prompt="S", sampling=GREEDY)
    _say(session, "Remember me")
    return session.save(tmp_path / "chat.json").path


def _reload(engine: Engine, path: Path) -> tuple[ChatSession, str]:
    engine.reset()  # as in a new session: nothing cached before the load
    session = ChatSession(engine, system_prompt="S", sampling=GREEDY)
    loaded = session.load(path)
    assert loaded.state_tokens == 0 and engine.cached_positions == 0
    return session, loaded.state_ignored


def test_corrupt_state_is_ignored(engine: Engine, tmp_path: Path) -> None:
    path = _saved_chat(engine, tmp_path)
    state = state_path_for(path)
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    session, reason = _reload(engine, path)
    assert "damaged" in reason
    reply = _say(session, "Still right?")
    assert reply.stats.reused_tokens == 0
    assert _fresh_reply(session)[0] == _last_tokens(session)


def test_tampered_description_is_ignored(engine: Engine, tmp_path: Path) -> None:
    path = _saved_chat(engine, tmp_path)
    data = json.loads(path.read_text())
    data["kv_state"]["items"][3] += 1  # a different token at the same position
    path.write_text(json.dumps(data))
    _, reason = _reload(engine, path)
    assert "damaged" in reason


def test_truncated_state_is_ignored(engine: Engine, tmp_path: Path) -> None:
    path = _saved_chat(engine, tmp_path)
    state = state_path_for(path)
    state.write_bytes(state.read_bytes()[:100])
    _, reason = _reload(engine, path)
    assert "damaged" in reason
    state.unlink()
    _, reason = _reload(engine, path)
    assert "missing" in reason


def test_state_of_another_build_is_ignored(engine: Engine, tiny, tmp_path: Path) -> None:
    path = _saved_chat(engine, tmp_path)
    with Engine(EngineSettings(model_path=tiny.q4_k_m, mmproj_path=tiny.mmproj, n_ctx=1024,
                               n_threads=2)) as other:
        session, reason = _reload(other, path)
        assert "another model" in reason
        reply = _say(session, "Works anyway")
        assert reply.stats.reused_tokens == 0


def test_generated_tokens_are_kept_in_the_conversation(session: ChatSession) -> None:
    reply = _say(session, "Hi")
    message = session.conversation.messages[-1]
    assert message == Message.assistant(reply.text, tuple(reply.generation.result.token_ids))
