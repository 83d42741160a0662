"""Writing files so that a final name only ever holds a complete file."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from localsmall.errors import DiskSpaceError, LocalsmallError


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` for writers that open files by name (GGUF writers,
    llama.cpp's quantizer). When the block ends without error the temporary file is
    renamed to `path`; on any error (Ctrl-C included) it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not tmp.is_file():
            raise LocalsmallError(f"nothing was written to {path}")
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskSpaceError(f"no space left on the disk to write {path}; "
                                 "free some space and try again") from None
        raise LocalsmallError(f"could not write {path}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """`atomic_path`, opened for writing: the file takes its final name only once the
    block has ended without error."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        yield handle


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_output`)."""
    with atomic_output(path) as handle:
        handle.write(data)


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The contents of a regular file of at most `max_bytes`. A device, FIFO, socket or
    directory is refused without blocking on it (opened non-blocking, checked on the open
    descriptor, so a swapped path cannot slip in between), and reading stops at the bound
    whatever the file claims. Raises OSError (FileNotFoundError for a missing file)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if info.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"larger than {max_bytes} bytes")
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise OSError(errno.EFBIG, f"larger than {max_bytes} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)
