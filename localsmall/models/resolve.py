"""Which files to run: a catalog model and quant, or explicit paths, resolved to files on
disk (the Hugging Face cache, or paths the user gave)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from localsmall.errors import ModelNotFoundError, UsageError
from localsmall.hub import cache as hubcache
from localsmall.hub.remote import RemoteFile
from localsmall.models.catalog import Catalog, Model, parse_model_ref
from localsmall.models.registry import registered_for


@dataclass(frozen=True)
class LocalBuild:
    """Files for one run. `model` is the catalog entry when known."""

    model_path: Path
    mmproj_path: Path | None
    model: Model | None
    quant: str | None
    label: str
    notice: str = ""
    n_ctx: int | None = None          # the plan's context (None: not planned)
    n_gpu_layers: int | None = None   # the plan's GPU layers
    tensor_split: tuple[float, ...] = ()  # the plan's shares of the RPC workers' devices


def cached_file(remote: RemoteFile) -> Path | None:
    """The file's path in the Hugging Face cache, or None. Never touches the network."""
    return hubcache.cached_file(remote)


def projector_file(model: Model) -> Path | None:
    """A downloaded projector of the model (the preferred one first), or None."""
    return _projector(model)


def _projector(model: Model) -> Path | None:
    for projector in model.projectors:
        path = cached_file(projector.remote)
        if path is not None:
            return path
    return None


def resolve_build(catalog: Catalog, *, ref: str | None = None, quant: str | None = None,
                  model_path: Path | None = None, mmproj_path: Path | None = None,
                  vision: bool = True) -> LocalBuild:
    """Files for `MODEL[:QUANT]` (or explicit paths). Raises ModelNotFoundError saying
    what to pull when the files are not on disk."""
    if model_path is not None:
        if ref:
            raise UsageError("give either a MODEL name or --model PATH, not both")
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"model file not found: {model_path}")
        mmproj = Path(mmproj_path).expanduser() if mmproj_path and vision else None
        if mmproj is not None and not mmproj.is_file():
            raise ModelNotFoundError(f"projector file not found: {mmproj_path}")
        notice = "" if mmproj or not vision else "No --mmproj given: images are disabled."
        return LocalBuild(path, mmproj, None, None, path.name, notice)

    name, ref_quant = parse_model_ref(ref)
    if quant and ref_quant and quant.lower() != ref_quant.lower():
        raise UsageError(f"conflicting quants: {ref_quant} in the name and --quant {quant}")
    model = catalog.get(name) if name else catalog.default
    wanted = quant or ref_quant
    for candidate, path, registered_mmproj in _local_candidates(model, wanted):
        mmproj = None
        notice = ""
        if mmproj_path is not None and vision:
            mmproj = Path(mmproj_path).expanduser()
            if not mmproj.is_file():
                raise ModelNotFoundError(f"projector file not found: {mmproj_path}")
        elif vision:
            mmproj = registered_mmproj or _projector(model)
            if mmproj is None:
                notice = ("The vision projector is not downloaded, so images are disabled; "
                          f"run `localsmall pull {model.id}` to get it.")
        return LocalBuild(path, mmproj, model, candidate, f"{model.name} {candidate}", notice)
    target = f"{model.id}:{wanted}" if wanted else model.id
    what = f"{model.name} {wanted} is not" if wanted else f"No build of {model.name} is"
    raise ModelNotFoundError(f"{what} downloaded yet; run `localsmall pull {target}`")


def _local_candidates(model: Model, wanted: str | None
                      ) -> Iterator[tuple[str, Path, Path | None]]:
    """(quant, model file, registered projector) for builds on disk, best first:
    registered builds (e.g. converted ones), then the Hugging Face cache."""
    registered = registered_for(model.id)
    if wanted:
        names = [wanted]
    else:
        catalog_order = [q.quant for q in sorted(model.quants, key=lambda q: q.quality,
                                                 reverse=True)]
        names = catalog_order + [b.quant for b in registered.values()
                                 if b.quant.lower() not in {n.lower() for n in catalog_order}]
    for name in names:
        entry = registered.get(name.lower())
        if entry is not None:
            yield entry.quant, Path(entry.model_path), entry.usable_projector()
            continue
        quant = model.quant(name)  # unknown names raise CatalogError listing the known ones
        path = cached_file(quant.remote)
        if path is not None:
            yield quant.quant, path, None


def local_builds(model: Model) -> dict[str, tuple[str, Path, Path | None]]:
    """Builds of the model on disk, by lower-case quant: (quant, file, registered
    projector). Registered builds win over the Hugging Face cache."""
    found = {key: (entry.quant, Path(entry.model_path), entry.usable_projector())
             for key, entry in registered_for(model.id).items()}
    for quant in model.quants:
        if quant.quant.lower() not in found and (path := cached_file(quant.remote)):
            found[quant.quant.lower()] = (quant.quant, path, None)
    return found
