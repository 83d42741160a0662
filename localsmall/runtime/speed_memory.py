"""Speeds measured in one session, kept for the next on this machine (chat.speeds' STORED).

`localsmall run --image` has only one turn: without a memory its image budget would
always rest on the plan's estimate, which is optimistic on a busy CPU (issue 12). Each
chat turn that measures something writes the fitted speeds here; the next session with
the same model file, projector, thread count and CPU starts from them. One small JSON
file per such combination under the cache directory; a damaged one is ignored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

from localsmall import paths
from localsmall.chat.speeds import STORED, Speeds
from localsmall.fileio import atomic_write_bytes, read_regular_file

MAX_FILE_BYTES = 4096
FIELDS = ("batch_s", "token_s", "encode_s", "encode_token_s")


def memory_path(*, model: Path, mmproj: Path | None, n_threads: int, cpu: str,
                root: Path | None = None) -> Path:
    """Where the speeds of this model, projector, thread count and CPU are kept."""
    parts = [cpu, str(n_threads)]
    for path in (model, mmproj):
        if path is None:
            parts.append("-")
            continue
        info = Path(path).stat()
        parts += [str(Path(path).resolve()), str(info.st_size), str(info.st_mtime_ns)]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]
    return (root or paths.cache_dir() / "speeds") / f"image-turn-{key}.json"


def recall(path: Path) -> Speeds | None:
    """The speeds stored at `path`, marked STORED (None: none, or unreadable)."""
    try:
        raw = json.loads(read_regular_file(path, MAX_FILE_BYTES))
        values = {name: float(raw[name]) for name in FIELDS}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    speeds = Speeds(**values, source=STORED)
    return speeds if speeds.valid() else None


def remember(path: Path, speeds: Speeds) -> None:
    """Keep `speeds` for the next session (replacing what was there)."""
    if not speeds.valid():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in asdict(replace(speeds, source=STORED)).items() if k in FIELDS}
    atomic_write_bytes(path, json.dumps(data).encode())
