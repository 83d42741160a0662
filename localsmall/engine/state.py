"""Saving and restoring the KV cache (llama.cpp's sequence state) beside a saved chat.

A state file is only as good as its match with the model that reads it: it is tied to
a fingerprint of the model and projector files, the KV cache type and the llama.cpp
build, and to a checksum of its own bytes. Anything that does not match is refused
with a reason, and the caller re-reads the conversation instead: a stale or damaged
state must never produce a wrong answer.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localsmall.engine.kvcache import KvCache, items_from_json, items_to_json, positions
from localsmall.errors import EngineError
from localsmall.fileio import atomic_path

STATE_FORMAT = 1
_SAMPLE = 1 << 20  # bytes hashed at each end of a model file for its fingerprint


@dataclass(frozen=True)
class StateMeta:
    """What a saved KV state holds and what it was made with."""

    fingerprint: str           # model + projector + KV type + llama.cpp build
    items: list[Any]           # the cache layout: token ids and {"image", "n_pos"} spans
    checksum: str              # blake2b of the state file
    n_pos: int

    def to_json(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "fingerprint": self.fingerprint, "items": self.items,
                "checksum": self.checksum, "n_pos": self.n_pos}

    @classmethod
    def from_json(cls, data: Any) -> StateMeta | None:
        """None when the entry is missing or not understood."""
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            return None
        try:
            return cls(fingerprint=str(data["fingerprint"]), items=list(data["items"]),
                       checksum=str(data["checksum"]), n_pos=int(data["n_pos"]))
        except (KeyError, TypeError, ValueError):
            return None


def file_fingerprint(path: Path) -> str:
    """A fast identity for a large file: its size and hashes of both ends. Distinguishes
    different quants and builds without reading gigabytes."""
    size = os.path.getsize(path)
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        digest.update(f.read(_SAMPLE))
        if size > 2 * _SAMPLE:
            f.seek(size - _SAMPLE)
            digest.update(f.read(_SAMPLE))
    return digest.hexdigest()


def state_checksum(path: Path, items: list[Any]) -> str:
    """blake2b of a whole state file and of the layout that describes it, so a change to
    either is detected."""
    digest = hashlib.blake2b(json.dumps(items, separators=(",", ":")).encode(), digest_size=32)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def engine_fingerprint(model_path: Path, mmproj_path: Path | None, kv_type: str,
                       llama_build: str) -> str:
    """Everything the bytes of a KV state depend on."""
    parts = [file_fingerprint(model_path),
             file_fingerprint(mmproj_path) if mmproj_path else "no-projector",
             kv_type, llama_build]
    return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()


def state_path_for(conversation_path: Path) -> Path:
    """Where the KV state of a saved chat lives: beside it."""
    return conversation_path.with_name(conversation_path.name + ".kvstate")


def save_kv_state(llama: Any, ctx: Any, kv: KvCache, path: Path, *,
                  fingerprint: str) -> StateMeta:
    """Write the KV cache of `kv`'s sequence to `path` (atomically) and describe it."""
    empty = (llama.llama_token * 1)()
    items = items_to_json(kv.items)
    with atomic_path(Path(path)) as tmp:
        written = llama.llama_state_seq_save_file(ctx, str(tmp).encode(), kv.seq_id, empty,
                                                   0)
        if written == 0:
            raise EngineError(f"llama.cpp could not save the KV cache to {path}")
        checksum = state_checksum(tmp, items)
    return StateMeta(fingerprint=fingerprint, items=items, checksum=checksum, n_pos=kv.n_past)


def load_kv_state(llama: Any, ctx: Any, kv: KvCache, path: Path, meta: StateMeta, *,
                  fingerprint: str, n_ctx: int) -> str | None:
    """Restore a KV cache saved by `save_kv_state`. Returns None when it was restored, or
    the reason it was refused (the cache is then empty and the chat is re-read)."""
    reason = _refusal(Path(path), meta, fingerprint=fingerprint, n_ctx=n_ctx)
    if reason is not None:
        return reason
    items = items_from_json(meta.items)
    if items is None or positions(items) != meta.n_pos:
        return "its description is damaged"
    kv.truncate(0)
    tokens = (llama.llama_token * 1)()
    count = ctypes.c_size_t(0)
    read = llama.llama_state_seq_load_file(ctx, str(path).encode(), kv.seq_id, tokens, 1,
                                           ctypes.byref(count))
    mem = llama.llama_get_memory(ctx)
    if read == 0 or llama.llama_memory_seq_pos_max(mem, kv.seq_id) != meta.n_pos - 1:
        kv.truncate(0)
        return "llama.cpp could not read it"
    kv.restored(items, meta.n_pos)
    return None


def _refusal(path: Path, meta: StateMeta, *, fingerprint: str, n_ctx: int) -> str | None:
    if meta.fingerprint != fingerprint:
        return "it was saved with another model, projector, KV cache type or llama.cpp"
    if not path.is_file():
        return "the state file is missing"
    if meta.n_pos >= n_ctx:
        return f"it holds {meta.n_pos} tokens, more than this {n_ctx}-token context"
    if state_checksum(path, meta.items) != meta.checksum:
        return "the state file or its description is damaged"
    return None
