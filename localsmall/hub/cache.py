"""The Hugging Face cache on disk: where a file of a repo lives, which downloads are
half done, which files localsmall has verified, and removing a file cleanly.

Settings are read from the environment on every call, with huggingface_hub's names and
precedence (HF_HUB_CACHE, HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE), and passed to
huggingface_hub explicitly, so they hold even when they change after it was imported.
The layout is the standard one: models--owner--name/{blobs,snapshots,refs}, blobs named
by their ETag (the sha256 for LFS files), snapshots linking to them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from localsmall import paths
from localsmall.fileio import atomic_write_bytes
from localsmall.hub.remote import RemoteFile

DEFAULT_ENDPOINT = "https://huggingface.co"
PARTIAL_SUFFIX = ".localsmall.incomplete"   # our resumable partial: blobs/<etag> + this
# huggingface_hub's own temporary files: blobs/<etag>.<8 hex>.incomplete
_HF_TEMP = re.compile(r"^(?P<etag>.+)\.[0-9a-f]{8}\.incomplete$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TRUE = {"1", "on", "yes", "true"}


def cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub would choose it now."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expandvars(os.environ[name])).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(os.path.expandvars(home)).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def endpoint() -> str:
    """The Hub to talk to (HF_ENDPOINT, e.g. a mirror)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: no network at all."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


def repo_dir(repo: str) -> Path:
    """A model repository's folder in the cache."""
    return cache_dir() / ("models--" + repo.replace("/", "--"))


def partial_path(repo: str, etag: str) -> Path:
    """Where localsmall keeps the resumable part of a blob being downloaded."""
    return repo_dir(repo) / "blobs" / (etag + PARTIAL_SUFFIX)


def lock_path(repo: str, etag: str) -> Path:
    """huggingface_hub's lock for a blob: localsmall takes the same one."""
    return cache_dir() / ".locks" / ("models--" + repo.replace("/", "--")) / f"{etag}.lock"


def cached_file(remote: RemoteFile, revision: str = "main") -> Path | None:
    """The file's snapshot path in the cache, or None. Never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id=remote.repo, filename=remote.file,
                                   cache_dir=cache_dir(), revision=revision)
    if isinstance(found, str) and Path(found).is_file():
        return Path(found)
    return None


def snapshot_links(remote: RemoteFile) -> list[Path]:
    """Every snapshot entry of this file (one per cached revision)."""
    snapshots = repo_dir(remote.repo) / "snapshots"
    if not snapshots.is_dir():
        return []
    return [p for p in (s / remote.file for s in snapshots.iterdir())
            if p.is_symlink() or p.exists()]


def blob_sha256(path: Path) -> str | None:
    """The sha256 a cached file must have, read from its blob's name (LFS blobs are
    named by their sha256), or None when the name is not one."""
    name = Path(os.path.realpath(path)).name
    return name if _SHA256.match(name) else None


@dataclass(frozen=True)
class Partial:
    """An unfinished download kept for resuming."""

    path: Path
    file: str          # the repository file it belongs to
    size: int          # bytes on disk
    total: int         # bytes of the whole file


def _note(partial: Path) -> Path:
    return partial.with_name(partial.name + ".json")


def note_partial(partial: Path, file: str, total: int) -> None:
    """Record which file a partial blob belongs to (its name is only the ETag)."""
    atomic_write_bytes(_note(partial), json.dumps({"file": file, "total": total}).encode())


def partial_downloads(repo: str) -> list[Partial]:
    """localsmall's resumable partial downloads in a repository's cache folder."""
    blobs = repo_dir(repo) / "blobs"
    found = []
    for path in sorted(blobs.glob("*" + PARTIAL_SUFFIX)) if blobs.is_dir() else []:
        try:
            note = json.loads(_note(path).read_text(encoding="utf-8"))
            found.append(Partial(path, str(note["file"]), path.stat().st_size,
                                 int(note["total"])))
        except (OSError, ValueError, KeyError, TypeError):
            found.append(Partial(path, "", path.stat().st_size, 0))
    return found


def remove_partial(partial: Path) -> int:
    """Delete a partial download and its note; returns the bytes freed."""
    freed = partial.stat().st_size if partial.exists() else 0
    partial.unlink(missing_ok=True)
    _note(partial).unlink(missing_ok=True)
    return freed


def remove_file(remote: RemoteFile, *, etag: str | None = None) -> int:
    """Delete a file from the cache: its snapshot links, the blob they point to, any
    partial download of it and its verification record. Returns the bytes freed."""
    freed = 0
    blobs = set()
    for link in snapshot_links(remote):
        target = Path(os.path.realpath(link))
        if target != link:
            blobs.add(target)
        with contextlib.suppress(OSError):
            freed += link.stat().st_size if target == link else 0
            link.unlink()
    if etag:
        blobs.add(repo_dir(remote.repo) / "blobs" / etag)
    for blob in blobs:
        with contextlib.suppress(FileNotFoundError):
            freed += blob.stat().st_size
            blob.unlink()
        forget_verified(blob)
    for partial in partial_downloads(remote.repo):
        if partial.file == remote.file or partial.path.name == f"{etag}{PARTIAL_SUFFIX}":
            freed += remove_partial(partial.path)
    return freed


def clean_orphans(repo: str) -> int:
    """Remove temporary files that no running download owns: huggingface_hub's per-process
    `.incomplete` files whose lock is free (left by a killed process), and localsmall
    partials whose blob is complete. Returns how many were removed."""
    from filelock import FileLock, Timeout

    blobs = repo_dir(repo) / "blobs"
    if not blobs.is_dir():
        return 0
    removed = 0
    for path in blobs.iterdir():
        if path.name.endswith(PARTIAL_SUFFIX):
            if (blobs / path.name[: -len(PARTIAL_SUFFIX)]).is_file():  # finished elsewhere
                remove_partial(path)
                removed += 1
            continue
        match = _HF_TEMP.match(path.name)
        if match is None:
            continue
        lock = FileLock(str(lock_path(repo, match["etag"])), timeout=0)
        try:
            with lock:
                path.unlink(missing_ok=True)
                removed += 1
        except Timeout:
            continue  # another process is downloading it right now
    return removed


def free_disk(path: Path) -> int:
    """Free bytes on the disk holding `path` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return shutil.disk_usage(Path.cwd()).free


# --- verification records -----------------------------------------------------------------


@dataclass(frozen=True)
class Verified:
    """A blob whose sha256 localsmall computed, valid while size and mtime match."""

    sha256: str
    size: int
    mtime_ns: int


def _records_file() -> Path:
    return paths.state_dir() / "verified.json"


def _records() -> dict[str, dict[str, int | str]]:
    try:
        data = json.loads(_records_file().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def record_verified(path: Path, sha256: str) -> None:
    """Remember that a cached file hashed to `sha256` (so it is not hashed again)."""
    blob = Path(os.path.realpath(path))
    stat = blob.stat()
    records = _records()
    records[str(blob)] = {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    atomic_write_bytes(_records_file(), json.dumps(records, indent=1).encode())


def forget_verified(path: Path) -> None:
    records = _records()
    if records.pop(str(Path(os.path.realpath(path))), None) is not None:
        atomic_write_bytes(_records_file(), json.dumps(records, indent=1).encode())


def verified_sha256(path: Path) -> str | None:
    """The sha256 recorded for this file, if it has not changed since."""
    blob = Path(os.path.realpath(path))
    record = _records().get(str(blob))
    if not record:
        return None
    try:
        stat = blob.stat()
    except OSError:
        return None
    if record.get("size") != stat.st_size or record.get("mtime_ns") != stat.st_mtime_ns:
        return None
    sha = record.get("sha256")
    return sha if isinstance(sha, str) else None
