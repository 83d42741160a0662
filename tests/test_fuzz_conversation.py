"""Fuzzing saved chats for /load (localsmall.chat.conversation and ChatSession.load):
any JSON, any structure, any token ids and any image path give a conversation or a
ConversationFileError; token ids outside the vocabulary never reach llama.cpp (whose
`at()` would abort the whole process)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from localsmall.chat.conversation import (
    Conversation,
    Message,
    from_json,
    load_conversation,
    save_conversation,
)
from localsmall.chat.session import ChatSession, Reply
from localsmall.engine.model import Engine
from localsmall.engine.types import ImageSlot, SamplingSettings, TokenRun
from localsmall.errors import ConversationFileError, EngineError
from tests.fuzzing import fuzz_settings, only_own_errors

TARGET = "chats for /load"
GREEDY = SamplingSettings(temperature=0, max_tokens=4)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) |
    st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4),
    max_leaves=6)
ODD = st.none() | st.integers() | st.text(max_size=4) | st.lists(st.integers(), max_size=2)
TOKEN_IDS = st.one_of(st.none(), ODD, st.lists(st.one_of(
    st.integers(-(2**64), 2**64), st.floats(), st.booleans(), st.text(max_size=3)), max_size=6))


@st.composite
def chat_documents(draw: st.DrawFn) -> Any:
    """Documents near the real schema, each field possibly of the wrong type."""
    def maybe(valid: st.SearchStrategy[Any]) -> Any:
        return draw(JSON) if draw(st.integers(0, 7)) == 0 else draw(valid)

    parts = st.lists(st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
        st.fixed_dictionaries({"type": st.just("image"), "path": st.sampled_from(
            ["/dev/null", "/dev/zero", "/", "/nonexistent.png", "."])}),
        st.fixed_dictionaries({"type": st.just("image"), "png_base64": st.text(max_size=12)}),
        ODD), max_size=3)
    messages = st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool"]), "content": parts},
        optional={"token_ids": TOKEN_IDS, "interrupted": ODD,
                  "tool_calls": st.one_of(ODD, st.lists(st.fixed_dictionaries(
                      {"id": st.text(max_size=9), "name": st.text(max_size=5),
                       "arguments": st.one_of(st.text(max_size=8), ODD)}), max_size=2)),
                  "tool_call_id": st.one_of(st.text(max_size=9), ODD)}), max_size=3)
    return {"format": maybe(st.just("localsmall-chat")), "version": maybe(st.just(1)),
            "system": maybe(st.text(max_size=10)), "messages": maybe(messages),
            "kv_state": maybe(st.none())}


def _parse(data: Any) -> Conversation | ConversationFileError:
    result = only_own_errors(TARGET, lambda: from_json(data, "chat"))
    assert isinstance(result, Conversation | ConversationFileError)
    return result


@given(document=chat_documents())
@fuzz_settings(max_examples=1000)
def test_documents_near_the_schema(document: Any) -> None:
    result = _parse(document)
    if isinstance(result, Conversation):
        for message in result.messages:
            assert message.role in ("user", "assistant", "tool")
            assert all(isinstance(p, str) for p in message.parts if not hasattr(p, "rgb"))
            assert message.token_ids is None or all(
                type(t) is int and 0 <= t < 2**31 for t in message.token_ids)


@given(document=JSON)
@fuzz_settings(max_examples=1000)
def test_any_json(document: Any) -> None:
    _parse(document)


def _load(path: Path) -> Conversation | ConversationFileError:
    result = only_own_errors(TARGET, lambda: load_conversation(path), max_peak_bytes=32 << 20)
    assert isinstance(result, Conversation | ConversationFileError)
    return result


def test_json_nested_100000_deep(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    for doc in ("[" * 100_000 + "]" * 100_000,
                '{"format": "localsmall-chat", "version": 1, "messages": ' + "[" * 100_000):
        path.write_text(doc)
        result = _load(path)
        assert isinstance(result, ConversationFileError)


def test_chat_file_that_is_a_fifo_or_a_device(tmp_path: Path) -> None:
    fifo = tmp_path / "chat.fifo"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), tmp_path):
        result = _load(path)  # returns at once: nothing blocks on a writer or reads forever
        assert isinstance(result, ConversationFileError), path


@pytest.mark.parametrize("name", ["fifo", "/dev/zero", "/dev/null", "dir", "missing"])
def test_image_paths_that_are_not_regular_files(tmp_path: Path, name: str) -> None:
    if name == "fifo":
        path = tmp_path / "image.png"
        os.mkfifo(path)
    elif name == "dir":
        path = tmp_path
    else:
        path = tmp_path / "nothing.png" if name == "missing" else Path(name)
    doc = {"format": "localsmall-chat", "version": 1, "system": "",
           "messages": [{"role": "user", "content": [{"type": "image", "path": str(path)}]}]}
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps(doc))
    result = _load(chat)
    assert isinstance(result, ConversationFileError)


def test_image_errors_stay_on_one_line(tmp_path: Path) -> None:
    import base64

    from tests.tinymodels import image_bytes

    png = base64.b64encode(image_bytes(56, 56)).decode()
    for part in ({"type": "image", "png_base64": png, "source": "a\nb", "sha256": "x"},
                 {"type": "image", "path": str(tmp_path / "no\nfile.png")}):
        doc = {"format": "localsmall-chat", "version": 1, "system": "",
               "messages": [{"role": "user", "content": [part]}]}
        assert isinstance(_parse(doc), ConversationFileError)  # one line: checked by _parse


# --- token ids through the real engine ---------------------------------------------------


def test_the_engine_refuses_ids_outside_its_vocabulary(engine: Engine) -> None:
    for bad in (engine.n_vocab, engine.n_vocab + 1000, 2**31 - 1, -1):
        with pytest.raises(EngineError, match="vocabulary"):
            engine.detokenize([bad])
        with pytest.raises(EngineError, match="vocabulary"):
            engine.generate([TokenRun((1, bad))], GREEDY).run()
    assert engine.detokenize([engine.n_vocab - 1]) is not None


def _chat_with_ids(tmp_path: Path, ids: list[int]) -> Path:
    conversation = Conversation(system="S", messages=[
        Message.user("Hi"), Message.assistant("Hello", tuple(ids))])
    return save_conversation(conversation, tmp_path / "chat.json")


@given(ids=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=8))
@fuzz_settings(max_examples=300)
def test_loaded_ids_never_reach_llama_cpp(engine: Engine, tmp_path: Path,
                                          ids: list[int]) -> None:
    session = ChatSession(engine, system_prompt="S", sampling=GREEDY)
    path = _chat_with_ids(tmp_path, ids)
    loaded = only_own_errors(TARGET, lambda: session.load(path))
    assert not isinstance(loaded, Exception)
    kept = session.conversation.messages[-1].token_ids
    assert kept is None or all(t < engine.n_vocab for t in kept)
    pieces = session._prompt()  # what the next turn would send to the engine
    assert engine.count_tokens(pieces) > 0
    assert all(0 <= t < engine.n_vocab for p in pieces if not isinstance(p, ImageSlot)
               for t in p.ids)


def test_a_chat_with_foreign_ids_goes_on(engine: Engine, tmp_path: Path) -> None:
    engine.reset()
    session = ChatSession(engine, system_prompt="S", sampling=GREEDY)
    session.load(_chat_with_ids(tmp_path, [5, engine.n_vocab + 7, 2**31 - 1]))
    assert session.conversation.messages[-1].token_ids is None  # read again as text
    reply = session.handle("And now?")
    assert isinstance(reply, Reply)
    for _ in reply:
        pass
    assert reply.generation.result.token_ids
