"""Saving and restoring the KV cache (llama.cpp's sequence state) beside a saved chat.

A state file is only as good as its match with the model that reads it: it is tied to
a fingerprint of the model and projector files, the KV cache type and the llama.cpp
build. And it must come from this user: a chat shared by someone else could carry a
forged state with hidden context, so the state's bytes, its layout and the fingerprint
are signed with a keyed MAC (HMAC-SHA256) under a per-user secret kept in the data
folder (mode 0600). Anything that does not match is refused with a reason, and the
caller re-reads the conversation instead: a stale, damaged or foreign state must never
produce a wrong answer.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import hmac
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localsmall.engine.kvcache import KvCache, items_from_json, items_to_json, positions
from localsmall.engine.state_key import SECRET_BYTES, SECRET_FILE, user_secret
from localsmall.errors import EngineError, LocalsmallError
from localsmall.fileio import atomic_output

__all__ = ["SECRET_BYTES", "SECRET_FILE", "StateMeta", "load_kv_state", "save_kv_state",
           "state_mac", "state_path_for", "user_secret"]

STATE_FORMAT = 2   # 1 had an unkeyed checksum: such states are refused
_SAMPLE = 1 << 20  # bytes hashed at each end of a model file for its fingerprint
_MAC_DOMAIN = b"localsmall kvstate v2\0"


@dataclass(frozen=True)
class StateMeta:
    """What a saved KV state holds and what it was made with."""

    fingerprint: str           # model + projector + KV type + llama.cpp build
    items: list[Any]           # the cache layout: token ids and {"image", "n_pos"} spans
    mac: str                   # HMAC-SHA256 of all of the above and the state's bytes
    n_pos: int

    def to_json(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "fingerprint": self.fingerprint, "items": self.items,
                "mac": self.mac, "n_pos": self.n_pos}

    @classmethod
    def from_json(cls, data: Any) -> StateMeta | None:
        """None when the entry is missing or not understood (an older, unsigned format
        included)."""
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            return None
        try:
            fingerprint, items, mac, n_pos = (data["fingerprint"], data["items"], data["mac"],
                                              data["n_pos"])
        except KeyError:
            return None
        if not (isinstance(fingerprint, str) and isinstance(items, list) and
                isinstance(mac, str) and isinstance(n_pos, int) and not isinstance(n_pos, bool)
                and n_pos >= 0):
            return None
        return cls(fingerprint=fingerprint, items=items, mac=mac, n_pos=n_pos)


def state_mac(key: bytes, fingerprint: str, items: list[Any], n_pos: int,
              state: memoryview | bytes | bytearray) -> str:
    """HMAC-SHA256 binding a state's bytes to its description and model fingerprint."""
    mac = hmac.new(key, _MAC_DOMAIN, hashlib.sha256)
    head = json.dumps([fingerprint, items, n_pos], separators=(",", ":")).encode()
    mac.update(len(head).to_bytes(8, "little") + head)
    mac.update(state)
    return mac.hexdigest()


def read_state_bytes(path: Path, max_bytes: int) -> bytearray:
    """A state file's bytes, read once into memory (they are verified and then loaded
    from this copy, never from the file again). Regular files only, at most
    `max_bytes`. Raises OSError."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if info.st_size > max_bytes:
            raise OSError(errno.EFBIG, "larger than this context can hold")
        data = bytearray(info.st_size)
        view, got = memoryview(data), 0
        while got < info.st_size:
            n = os.readv(fd, [view[got:]])
            if n == 0:
                raise OSError(errno.EIO, "the file shrank while it was read")
            got += n
        return data
    finally:
        os.close(fd)


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
    """Write the context's KV cache (the sequence of `kv`) to `path` (atomically) and describe it,
    signed with this user's key."""
    key = user_secret()
    items = items_to_json(kv.items)
    size = int(llama.llama_state_seq_get_size(ctx, kv.seq_id))
    buffer = (ctypes.c_uint8 * size)()
    written = int(llama.llama_state_seq_get_data(ctx, buffer, size, kv.seq_id))
    if written == 0 or written > size:
        raise EngineError(f"llama.cpp could not save the KV cache to {path}")
    data = memoryview(buffer).cast("B")[:written]
    mac = state_mac(key, fingerprint, items, kv.n_past, data)
    with atomic_output(Path(path)) as handle:
        handle.write(data)
    return StateMeta(fingerprint=fingerprint, items=items, mac=mac, n_pos=kv.n_past)


def load_kv_state(llama: Any, ctx: Any, kv: KvCache, path: Path, meta: StateMeta, *,
                  fingerprint: str, n_ctx: int, n_vocab: int, max_bytes: int) -> str | None:
    """Restore a KV cache saved by `save_kv_state`. Returns None when it was restored, or
    the reason it was refused (the cache is then empty and the chat is re-read). The file
    is read once, at most `max_bytes`: the bytes whose signature is checked are the bytes
    llama.cpp loads (no check-then-reopen)."""
    if meta.fingerprint != fingerprint:
        return "it was saved with another model, projector, KV cache type or llama.cpp"
    if meta.n_pos >= n_ctx:
        return f"it holds {meta.n_pos} tokens, more than this {n_ctx}-token context"
    items = items_from_json(meta.items)
    if items is None or positions(items) != meta.n_pos or not all(
            0 <= t < n_vocab for t in items if isinstance(t, int)):
        return "its description is damaged"
    try:
        key = user_secret()
    except LocalsmallError as exc:
        return str(exc)
    try:
        data = read_state_bytes(Path(path), max_bytes)
    except FileNotFoundError:
        return "the state file is missing"
    except OSError as exc:
        return f"the state file cannot be read ({exc.strerror or exc})"
    expected = state_mac(key, meta.fingerprint, meta.items, meta.n_pos, data)
    if not hmac.compare_digest(expected, meta.mac):
        return ("the state file or its description is damaged, or it was not saved by this "
                "account")
    kv.truncate(0)
    buffer = (ctypes.c_uint8 * len(data)).from_buffer(data)
    read = llama.llama_state_seq_set_data(ctx, buffer, len(data), kv.seq_id)
    mem = llama.llama_get_memory(ctx)
    if read == 0 or llama.llama_memory_seq_pos_max(mem, kv.seq_id) != meta.n_pos - 1:
        kv.truncate(0)
        return "llama.cpp could not read it"
    kv.restored(items, meta.n_pos)
    return None
