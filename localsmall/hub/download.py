"""One file over HTTP into a partial file that survives the process: a later run resumes
with a Range request from the last byte on disk, not from zero.

huggingface_hub resumes only inside one process and deletes its partial file on any
error, so a multi-GB pull interrupted by Ctrl-C, a crash or a dropped connection would
start over. The partial here is owned by localsmall (see hubcache.partial_path), the
sha256 is computed as the bytes arrive (the bytes already on disk are hashed first), and
the caller renames the file only once the hash matches.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from localsmall.errors import DiskSpaceError, HubError

CHUNK = 1024 * 1024
RETRIES = 5            # attempts in a row without progress before giving up
RETRY_WAIT_S = 1.0
READ_TIMEOUT_S = 30.0

PositionCallback = Callable[[int], None]  # bytes done so far (absolute)


def hash_file(path: Path, hasher: Any, on_position: PositionCallback | None = None,
              limit: int | None = None) -> int:
    """Feed a file (or its first `limit` bytes) to `hasher`; returns the bytes read."""
    done = 0
    with open(path, "rb") as handle:
        while limit is None or done < limit:
            block = handle.read(CHUNK if limit is None else min(CHUNK, limit - done))
            if not block:
                break
            hasher.update(block)
            done += len(block)
            if on_position is not None:
                on_position(done)
    return done


def sha256_of(path: Path, on_position: PositionCallback | None = None) -> str:
    """The sha256 hex digest of a file."""
    hasher = hashlib.sha256()
    hash_file(path, hasher, on_position)
    return hasher.hexdigest()


def fetch(url: str, partial: Path, *, size: int, headers: dict[str, str],
          on_position: PositionCallback | None = None) -> str:
    """Complete `partial` from `url` (a file of `size` bytes); returns its sha256.
    What is already in `partial` is kept and only the rest is requested."""
    import httpx2

    partial.parent.mkdir(parents=True, exist_ok=True)
    if partial.exists() and partial.stat().st_size > size:
        partial.unlink()  # not a prefix of this file: start over
    failures = last_kept = 0
    while True:
        # The bytes on disk are the truth: hash them, then ask for the rest.
        hasher = hashlib.sha256()
        offset = hash_file(partial, hasher) if partial.exists() else 0
        if on_position is not None:
            on_position(offset)
        if offset >= size:
            return hasher.hexdigest()
        try:
            offset, hasher = _stream(url, partial, offset, size, headers, hasher, on_position)
            return hasher.hexdigest()
        except (httpx2.TransportError, _Stalled) as exc:
            kept = partial.stat().st_size if partial.exists() else 0
            failures = 1 if kept > last_kept else failures + 1  # count tries without progress
            last_kept = max(kept, last_kept)
            if failures > RETRIES:
                raise HubError(
                    f"the download broke off ({exc}); {kept:,} of {size:,} bytes are kept: "
                    "run the same command again to resume") from None
            time.sleep(RETRY_WAIT_S * failures)


class _Stalled(Exception):
    """The server closed the body before the bytes it promised."""


def _stream(url: str, partial: Path, offset: int, size: int, headers: dict[str, str],
            hasher: Any, on_position: PositionCallback | None) -> tuple[int, Any]:
    """One GET from `offset`; returns the new offset and hasher (fresh if the server
    ignored the Range and sent the whole file)."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    request_headers = dict(headers, **({"Range": f"bytes={offset}-"} if offset else {}))
    request_headers["Accept-Encoding"] = "identity"
    with get_session().stream("GET", url, headers=request_headers, timeout=READ_TIMEOUT_S,
                              follow_redirects=True) as response:
        hf_raise_for_status(response)
        if offset and response.status_code != 206:
            offset, hasher = 0, hashlib.sha256()  # Range ignored: the body starts at byte 0
        start = offset
        try:
            with open(partial, "ab" if offset else "wb") as handle:
                for block in response.iter_bytes():  # as received: keep every byte
                    handle.write(block)
                    hasher.update(block)
                    offset += len(block)
                    if on_position is not None:
                        on_position(offset)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskSpaceError(
                    f"the disk filled up while downloading ({offset:,} of {size:,} bytes "
                    f"kept in {partial}); free some space and run the same command again"
                ) from None
            raise
    if offset < size:
        raise _Stalled(f"connection closed after {offset - start:,} bytes")
    return offset, hasher
