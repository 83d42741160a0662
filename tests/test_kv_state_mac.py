"""KV states are trusted only from this account: signed with a keyed MAC under a
per-user secret (mode 0600). A forged or foreign state is ignored with a reason, the
chat is read again, and answers stay right."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from localsmall.chat.session import ChatSession
from localsmall.engine.model import Engine
from localsmall.engine.state import (
    SECRET_BYTES,
    SECRET_FILE,
    state_mac,
    state_path_for,
    user_secret,
)
from localsmall.engine.types import SamplingSettings
from localsmall.errors import LocalsmallError
from localsmall.paths import data_dir
from tests.chatting import say as _say

GREEDY = SamplingSettings(temperature=0, max_tokens=6)


def _saved_chat(engine: Engine, tmp_path: Path) -> Path:
    engine.reset()
    session = ChatSession(engine, system_prompt="S", sampling=GREEDY)
    _say(session, "Remember the number 7")
    saved = session.save(tmp_path / "chat.json")
    assert saved.state_tokens > 0
    return saved.path


def _load(engine: Engine, path: Path) -> tuple[ChatSession, int, str]:
    engine.reset()
    session = ChatSession(engine, system_prompt="S", sampling=GREEDY)
    loaded = session.load(path)
    return session, loaded.state_tokens, loaded.state_ignored


def test_secret_is_private_and_stable() -> None:
    key = user_secret()
    path = data_dir() / SECRET_FILE
    assert len(key) == SECRET_BYTES and user_secret() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in path.parent.iterdir() if p.name != SECRET_FILE]  # no temp left
    path.chmod(0o644)  # readable by others: not a secret any more
    with pytest.raises(LocalsmallError, match="private"):
        user_secret()


def test_state_from_the_same_user_loads(engine: Engine, tmp_path: Path) -> None:
    path = _saved_chat(engine, tmp_path)
    session, restored, reason = _load(engine, path)
    assert reason == "" and restored == engine.cached_positions > 0
    reply = _say(session, "Which number?")
    assert reply.stats.reused_tokens == restored


def test_state_of_another_account_is_ignored(engine: Engine, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = _saved_chat(engine, tmp_path)
    monkeypatch.setenv("LOCALSMALL_HOME", str(tmp_path / "someone-else"))
    session, restored, reason = _load(engine, path)
    assert restored == 0 and engine.cached_positions == 0
    assert "not saved by this account" in reason
    assert _say(session, "Still fine?").stats.reused_tokens == 0  # the chat is read again


def test_forged_states_are_refused(engine: Engine, tmp_path: Path) -> None:
    path = _saved_chat(engine, tmp_path)
    state = state_path_for(path).read_bytes()
    data = json.loads(path.read_text())
    meta = data["kv_state"]

    # An old-style entry: an unkeyed checksum anyone can compute, no MAC.
    digest = hashlib.blake2b(json.dumps(meta["items"], separators=(",", ":")).encode(),
                             digest_size=32)
    digest.update(state)
    old = {"format": 1, "fingerprint": meta["fingerprint"], "items": meta["items"],
           "checksum": digest.hexdigest(), "n_pos": meta["n_pos"]}
    forgeries = [old,
                 {k: v for k, v in meta.items() if k != "mac"},   # no MAC
                 meta | {"mac": state_mac(os.urandom(SECRET_BYTES), meta["fingerprint"],
                                          meta["items"], meta["n_pos"], state)},  # other key
                 meta | {"mac": "0" * 64}]
    for forged in forgeries:
        path.write_text(json.dumps(data | {"kv_state": forged}))
        _, restored, reason = _load(engine, path)
        assert restored == 0 and engine.cached_positions == 0 and reason, forged


def test_changed_state_bytes_are_refused(engine: Engine, tmp_path: Path) -> None:
    path = _saved_chat(engine, tmp_path)
    state_file = state_path_for(path)
    data = bytearray(state_file.read_bytes())
    data[-1] ^= 1
    state_file.write_bytes(bytes(data))
    _, restored, reason = _load(engine, path)
    assert restored == 0 and "damaged" in reason
    state_file.unlink()
    os.mkfifo(state_file)  # not a regular file: refused without blocking
    _, restored, reason = _load(engine, path)
    assert restored == 0 and "cannot be read" in reason
