"""The per-user secret that signs saved KV states (see engine.state).

It lives in the data folder, in a file of mode 0600 owned by the user, created on first
use under a temporary name and linked into place, so two sessions starting at once agree
on one key and no half-written key is ever read.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import tempfile
from pathlib import Path

from localsmall.errors import DiskSpaceError, LocalsmallError
from localsmall.paths import data_dir

SECRET_FILE = "kvstate.key"
SECRET_BYTES = 32


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
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskSpaceError(f"no space left on the disk to write {path}; free some "
                                     "space and try again") from None
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
