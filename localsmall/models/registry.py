"""Local builds that are not in the Hugging Face cache (for example files made by
`localsmall convert`), recorded so that chat, plan and bench find them by name.

The registry is a small JSON file in the user's state directory, rewritten atomically.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from localsmall import paths
from localsmall.errors import LocalsmallError
from localsmall.fileio import atomic_write_bytes

REGISTRY_VERSION = 1


@dataclass(frozen=True)
class RegisteredBuild:
    """One local build: a text GGUF (and its projector, if any) for a catalog model."""

    model_id: str
    quant: str
    model_path: str
    mmproj_path: str | None = None
    source: str = ""          # where it came from (e.g. "converted from /path")

    def usable_projector(self) -> Path | None:
        """Its projector file, when one was registered and is still there."""
        mmproj = Path(self.mmproj_path) if self.mmproj_path else None
        return mmproj if mmproj is not None and mmproj.is_file() else None


def registry_file() -> Path:
    return paths.state_dir() / "builds.json"


def list_registered() -> list[RegisteredBuild]:
    """Registered builds whose files still exist."""
    file = registry_file()
    if not file.is_file():
        return []
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        builds = [RegisteredBuild(**entry) for entry in data.get("builds", [])]
    except (OSError, ValueError, TypeError) as exc:
        raise LocalsmallError(f"{file} is damaged ({exc}); delete it and re-register "
                              "your converted builds") from None
    return [b for b in builds if Path(b.model_path).is_file()]


def _write(builds: list[RegisteredBuild]) -> None:
    data = {"version": REGISTRY_VERSION, "builds": [asdict(b) for b in builds]}
    atomic_write_bytes(registry_file(), json.dumps(data, indent=1).encode())


def register_build(build: RegisteredBuild) -> None:
    """Add or replace the entry for (model, quant)."""
    builds = [b for b in list_registered()
              if (b.model_id, b.quant.lower()) != (build.model_id, build.quant.lower())]
    _write([*builds, build])


def unregister_build(model_id: str, quant: str) -> RegisteredBuild | None:
    """Remove an entry (the files stay); returns what was removed."""
    builds = list_registered()
    keep = [b for b in builds if (b.model_id, b.quant.lower()) != (model_id, quant.lower())]
    removed = [b for b in builds if b not in keep]
    if removed:
        _write(keep)
    return removed[0] if removed else None


def registered_for(model_id: str) -> dict[str, RegisteredBuild]:
    """The model's registered builds, by lower-case quant."""
    return {b.quant.lower(): b for b in list_registered() if b.model_id == model_id}


def find_registered(model_id: str, quant: str) -> RegisteredBuild | None:
    """The registered build for (model, quant), if any."""
    return registered_for(model_id).get(quant.lower())
