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

import errno
import hashlib
import hmac
import json
import os
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localsmall.errors import LocalsmallError
from localsmall.paths import data_dir

STATE_FORMAT = 2   # 1 had an unkeyed checksum: such states are refused
_SAMPLE = 1 << 20  # bytes hashed at each end of a model file for its fingerprint
SECRET_FILE = "kvstate.key"
SECRET_BYTES = 32
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


def _secret_path() -> Path:
    return data_dir() / SECRET_FILE


def user_secret() -> bytes:
    """This user's key for signing KV states, created on first use: random bytes in a
    file of mode 0600, written under a temporary name and linked into place (so two
    sessions starting at once agree on one key, and no half-written key is ever read).
    Raises LocalsmallError when it cannot be read or created."""
    path = _secret_path()
    for _ in range(3):
        try:
            return _read_secret(path)
        except FileNotFoundError:
            pass
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{SECRET_FILE}.", dir=path.parent)  # 0600
            try:
                os.write(fd, secrets.token_bytes(SECRET_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)  # fails if another session created it first
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        except OSError as exc:
            raise LocalsmallError(f"cannot create the key that signs saved KV states in "
                                  f"{path.parent}: {exc.strerror or exc}") from None
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(path) from None
        raise LocalsmallError(f"cannot read the KV state key {path}: "
                              f"{exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        key = os.read(fd, SECRET_BYTES + 1)
    finally:
        os.close(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_mode & 0o077 or len(key) != SECRET_BYTES \
            or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
        raise LocalsmallError(f"the KV state key {path} is not a private {SECRET_BYTES}-byte "
                              "file of yours; delete it (saved KV states will be re-read)")
    return key


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
