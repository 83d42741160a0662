"""The system prompt's KV cache, read once per machine and model and kept on disk.

Every chat starts with the same few hundred positions (the default system prompt), and on
a CPU reading them costs most of a minute with the 24B model: without this, the first
turn of every chat paid for it. So a chat start either loads the system prompt's KV
state saved by an earlier start (well under a second), or reads it in the background
while the user types (engine.read_ahead) and saves it for the next start.

One state per model file, projector, KV cache type, llama.cpp build and the settings
that change the cache's contents, in the cache directory: a `.kvstate` file signed like
a saved chat's (engine.state: a damaged, stale or foreign one is refused with a reason
and the prompt is read again) and a JSON description beside it. A state is used only
when it holds exactly the tokens the chat starts with; another system prompt reads its
own and replaces the file. `localsmall serve` warms its default system prompt the same
way, into one of its slots (server.slots), sharing the file with `chat` when both start
with the same tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from localsmall import paths
from localsmall.engine.kvcache import common_prefix, items_from_json
from localsmall.engine.state import StateMeta
from localsmall.engine.types import PromptPiece, TurnStats
from localsmall.fileio import atomic_write_bytes, read_regular_file

if TYPE_CHECKING:
    from localsmall.chat.session import ChatSession
    from localsmall.engine.model import Engine

MIN_POSITIONS = 32        # a shorter start is read with the first turn, not kept
MAX_META_BYTES = 4 << 20  # the description: token ids, a few thousand at most
LABEL = "reading system prompt"


@dataclass(frozen=True)
class StateFiles:
    """Where the system prompt state of one engine configuration lives."""

    state: Path
    meta: Path


def state_files(engine: Engine, *, root: Path | None = None) -> StateFiles:
    """The files for this engine's model, projector, KV type, llama.cpp build and the
    settings that change what the cache holds (flash attention, GPU layers)."""
    s = engine.settings
    key = json.dumps([engine.fingerprint, s.flash_attn, s.n_gpu_layers])
    name = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
    folder = root or paths.cache_dir() / "system-prompts"
    return StateFiles(folder / f"{name}.kvstate", folder / f"{name}.json")


def shared_start(engine: Engine, prompt_for: Callable[[str], Sequence[PromptPiece]]
                 ) -> list[int]:
    """The tokens every prompt starts with: the layouts of the prompts for two different
    first messages (`prompt_for(text)`), up to where they part (the system prompt, tools
    and the template's opening)."""
    first, second = engine.layout(prompt_for("a")), engine.layout(prompt_for("b"))
    tokens: list[int] = []
    for item in first[:common_prefix(first, second)]:
        if not isinstance(item, int):
            break
        tokens.append(item)
    return tokens


@dataclass(frozen=True)
class Restored:
    """What a chat start found: `n_pos` positions loaded (0: none), and `problem`, why a
    saved state could not be used when that deserves a word ("" otherwise)."""

    n_pos: int
    problem: str = ""


def restore(engine: Engine, tokens: list[int], files: StateFiles) -> Restored:
    """Load the saved state when it holds exactly `tokens` and its signature and model
    match; else leave the cache empty."""
    try:
        raw = read_regular_file(files.meta, MAX_META_BYTES)
    except FileNotFoundError:
        return Restored(0)
    except OSError as exc:
        return Restored(0, f"its description cannot be read ({exc.strerror or exc})")
    try:
        meta = StateMeta.from_json(json.loads(raw))
    except ValueError:
        meta = None
    if meta is None:
        return Restored(0, "its description is damaged")
    if items_from_json(meta.items) != tokens:
        return Restored(0)  # another system prompt or template: read and replace it
    reason = engine.load_state(files.state, meta)
    return Restored(0, reason) if reason else Restored(meta.n_pos)


def forget(files: StateFiles) -> None:
    """Remove the description first: a state file without one is never used."""
    files.meta.unlink(missing_ok=True)


def keep(files: StateFiles, meta: StateMeta | None) -> None:
    """Write the description of a state just saved to `files.state` (atomically)."""
    if meta is not None:
        atomic_write_bytes(files.meta, json.dumps(meta.to_json()).encode())


def notice(restored: Restored | None) -> str:
    """Why a saved state was not used, when that is news ("")."""
    if restored is None or not restored.problem:
        return ""
    return (f"The saved system prompt state could not be used ({restored.problem}); "
            "reading the system prompt again.")


def warm(engine: Engine, tokens: list[int], files: StateFiles | None, *,
         on_done: Callable[[TurnStats], None] | None = None) -> Restored:
    """Bring `tokens` into the engine's current sequence (empty so far): load the state
    saved for them in `files`, else read them in the background (Engine.read_ahead: the
    next turn waits for it) and save them there for the next start. `on_done` gets the
    read's stats, in the read's thread, when it was not cancelled. Nothing happens for
    fewer than MIN_POSITIONS tokens or a sequence that already holds some."""
    if len(tokens) < MIN_POSITIONS or engine.cached_positions:
        return Restored(0)
    restored = restore(engine, tokens, files) if files is not None else Restored(0)
    if restored.n_pos:
        return restored
    save_to = None
    if files is not None:
        with contextlib.suppress(OSError):
            forget(files)
            save_to = files.state

    def done(stats: TurnStats, meta: StateMeta | None) -> None:  # in the read's thread
        if on_done is not None:
            on_done(stats)
        if files is not None:
            keep(files, meta)

    engine.read_ahead(tokens, label=LABEL, save_to=save_to, on_done=done)
    return restored


def start(session: ChatSession, files: StateFiles | None) -> Restored:
    """A chat start: load the saved state of the tokens the session's prompts start
    with, else read them in the background (the first turn waits for it) and save them
    to `files` for the next start (see `warm`). The read also times this machine: its
    stats join the session's history for the cost notes."""

    def done(stats: TurnStats) -> None:  # in the read's thread
        session.history = [*session.history[-7:], stats]

    return warm(session.engine, session.system_tokens(), files, on_done=done)
