"""The builds on this machine: what `localsmall list` shows and `localsmall rm` removes.

A build is a text GGUF of a catalog model, either in the Hugging Face cache (pulled) or
registered (converted locally). Unfinished pulls are listed too, with how far they got.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from localsmall import paths
from localsmall.errors import ModelNotFoundError, UsageError
from localsmall.hub import cache as hubcache
from localsmall.hub.remote import RemoteFile
from localsmall.models.catalog import Catalog, Model, parse_model_ref
from localsmall.models.registry import list_registered, registered_for, unregister_build
from localsmall.models.resolve import projector_file

PROJECTOR_NAMES = ("projector", "mmproj")

Verified = Literal["yes", "not checked", "local"]


@dataclass(frozen=True)
class StoredBuild:
    """One build on disk (or one download in progress)."""

    model_id: str
    quant: str
    path: Path
    size: int
    verified: Verified      # sha256 checked by localsmall / never / a local conversion
    projector: bool         # a vision projector for this build is on disk
    source: Literal["hub", "registered", "partial"]
    total: int = 0          # for a partial download: the full size

    def to_json(self) -> dict[str, Any]:
        """JSON-ready fields (`localsmall list --json`)."""
        return asdict(self) | {"path": str(self.path)}


@dataclass(frozen=True)
class Removed:
    """What `rm` did."""

    label: str
    freed: int
    kept: tuple[Path, ...] = ()  # files left in place (registered builds made elsewhere)


def _verified(path: Path, remote: RemoteFile) -> Verified:
    expected = remote.sha256 or hubcache.blob_sha256(path)
    recorded = hubcache.verified_sha256(path)
    return "yes" if recorded is not None and recorded == expected else "not checked"


def _model_builds(model: Model) -> list[StoredBuild]:
    has_projector = projector_file(model) is not None
    found = []
    registered = registered_for(model.id)
    for build in registered.values():
        path = Path(build.model_path)
        found.append(StoredBuild(model.id, build.quant, path, path.stat().st_size, "local",
                               bool(build.mmproj_path) or has_projector, "registered"))
    for quant in model.quants:
        cached = hubcache.cached_file(quant.remote)
        if cached is not None and quant.quant.lower() not in registered:
            found.append(StoredBuild(model.id, quant.quant, cached, cached.stat().st_size,
                                   _verified(cached, quant.remote), has_projector, "hub"))
    by_file = {q.remote.file: q for q in model.quants}
    for repo in sorted({q.remote.repo for q in model.quants}):
        for partial in hubcache.partial_downloads(repo):
            if partial.file in by_file:
                found.append(StoredBuild(model.id, by_file[partial.file].quant, partial.path,
                                       partial.size, "not checked", has_projector, "partial",
                                       total=partial.total))
    return found


def list_builds(catalog: Catalog) -> list[StoredBuild]:
    """Every build of every catalog model on this machine, best quality first."""
    builds = []
    for model in catalog.models:
        order = {q.quant.lower(): -q.quality for q in model.quants}
        builds.extend(sorted(_model_builds(model), key=lambda b: (order.get(b.quant.lower(), 0),
                                                                  b.source)))
    return builds


def remove_build(catalog: Catalog, ref: str) -> Removed:
    """Delete `MODEL:QUANT` (a pulled file with any partial download of it, or a
    registered build) or `MODEL:projector`."""
    name, quant = parse_model_ref(ref)
    if not name or not quant:
        raise UsageError("say which build to remove as MODEL:QUANT, e.g. "
                         "mistral-small-3.2:Q4_K_M (see `localsmall list`)")
    model = catalog.get(name)
    if quant.lower() in PROJECTOR_NAMES:
        freed = sum(hubcache.remove_file(p.remote) for p in model.projectors)
        if not freed:
            raise ModelNotFoundError(f"no projector of {model.id} is downloaded")
        return Removed(f"{model.id} vision projector", freed)
    registered = unregister_build(model.id, quant)
    if registered is not None:
        shared = {b.mmproj_path for b in list_registered()}  # still used by other builds
        mmproj = registered.mmproj_path if registered.mmproj_path not in shared else None
        return _remove_registered(model, registered.quant, [registered.model_path, mmproj])
    entry = model.quant(quant)
    freed = hubcache.remove_file(entry.remote)
    if not freed:
        raise ModelNotFoundError(f"{model.id}:{entry.quant} is not downloaded "
                                 "(see `localsmall list`)")
    return Removed(f"{model.id}:{entry.quant}", freed)


def _remove_registered(model: Model, quant: str, files: list[str | None]) -> Removed:
    """Files localsmall made (under its data folder) are deleted; others stay."""
    freed, kept = 0, []
    data = paths.data_dir().resolve()
    for name in files:
        if not name:
            continue
        path = Path(name)
        if path.is_file() and path.resolve().is_relative_to(data):
            freed += path.stat().st_size
            path.unlink()
        elif path.is_file():
            kept.append(path)
    return Removed(f"{model.id}:{quant}", freed, tuple(kept))
