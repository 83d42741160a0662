"""The catalog of models and their published builds (models.toml), validated on load.

The catalog is data, not code: adding a quant or a mirror is an edit to models.toml.
Loading checks every field once and raises `CatalogError` naming the bad entry, so the
rest of localsmall can trust what it gets.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from localsmall.engine.types import SamplingSettings
from localsmall.errors import CatalogError
from localsmall.hub.remote import RemoteFile
from localsmall.models.shape import DecoderShape

CATALOG_SCHEMA = 1


@dataclass(frozen=True)
class Architecture(DecoderShape):
    """The shape of the model, used to predict memory before a file is downloaded."""

    vision_n_embd: int = 0
    vision_n_layers: int = 0
    vision_max_image_tokens: int = 1024
    vision_n_ff: int = 0
    vision_n_head: int = 0
    vision_patch_size: int = 14
    vision_merge: int = 2


@dataclass(frozen=True)
class Quant:
    """A quantized text-model build (one GGUF file). `embd_type` and `output_type` are the
    ggml types of its token embedding and output head (they sit outside the repeating
    layers, so the planner sizes them apart); None when unknown."""

    quant: str
    remote: RemoteFile
    quality: int
    kld: float
    embd_type: str | None = None
    output_type: str | None = None


@dataclass(frozen=True)
class ProjectorFile:
    """A vision projector (mmproj GGUF) that goes with every quant of its model."""

    type: str
    remote: RemoteFile


@dataclass(frozen=True)
class SystemPrompt:
    """The default system prompt, with {name}, {today} and {yesterday} placeholders."""

    name: str
    text: str

    def render(self, today: dt.date | None = None) -> str:
        """Fill the placeholders for today's date."""
        day = today or dt.date.today()
        values = {
            "name": self.name,
            "today": day.isoformat(),
            "yesterday": (day - dt.timedelta(days=1)).isoformat(),
        }
        # str.format would choke on the literal braces a prompt may contain.
        text = self.text
        for key, value in values.items():
            text = text.replace("{" + key + "}", value)
        return text


@dataclass(frozen=True)
class Model:
    """A model family entry: its builds, defaults and prompt."""

    id: str
    aliases: tuple[str, ...]
    name: str
    source_repo: str
    license: str
    context_length: int
    default_context: int
    min_context: int
    default_quant: str
    architecture: Architecture
    sampling: SamplingSettings      # recommended (no seed or max_tokens)
    system_prompt: SystemPrompt
    quants: tuple[Quant, ...]
    projectors: tuple[ProjectorFile, ...]

    def quant(self, name: str) -> Quant:
        """The build for a quant name (case-insensitive)."""
        for quant in self.quants:
            if quant.quant.lower() == name.lower():
                return quant
        known = ", ".join(q.quant for q in self.quants)
        raise CatalogError(f"{self.id} has no quant {name!r}; choose one of: {known}")

    @property
    def projector(self) -> ProjectorFile:
        """The preferred projector (the first listed)."""
        return self.projectors[0]


@dataclass(frozen=True)
class Catalog:
    """All models localsmall knows."""

    models: tuple[Model, ...]

    def get(self, name: str) -> Model:
        """Find a model by id or alias (case-insensitive)."""
        wanted = name.lower()
        for model in self.models:
            if wanted == model.id.lower() or wanted in (a.lower() for a in model.aliases):
                return model
        known = ", ".join(m.id for m in self.models)
        raise CatalogError(f"unknown model {name!r}; known models: {known}")

    @property
    def default(self) -> Model:
        """The model `localsmall chat` uses when none is named."""
        return self.models[0]


def parse_model_ref(ref: str | None) -> tuple[str | None, str | None]:
    """Split `MODEL[:QUANT]` into its parts; either may be None."""
    if not ref:
        return None, None
    model, _, quant = ref.partition(":")
    return (model or None), (quant or None)


# --- loading and validation ---------------------------------------------------------


class _Fields:
    """Typed access to one TOML table, with errors that name the entry."""

    def __init__(self, table: Any, where: str) -> None:
        if not isinstance(table, dict):
            raise CatalogError(f"models.toml: {where} must be a table")
        self.table = table
        self.where = where

    def get(self, key: str, kind: type, default: Any = ...) -> Any:
        if key not in self.table:
            if default is ...:
                raise CatalogError(f"models.toml: {self.where} is missing {key!r}")
            return default
        value = self.table[key]
        # TOML integers are acceptable where a float is expected.
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
        if not ok or (kind is int and isinstance(value, bool)):
            raise CatalogError(
                f"models.toml: {self.where}.{key} must be {kind.__name__}, got {value!r}"
            )
        return float(value) if kind is float else value

    def positive(self, key: str) -> int:
        value = self.get(key, int)
        if value <= 0:
            raise CatalogError(f"models.toml: {self.where}.{key} must be positive")
        return int(value)


def _remote(fields: _Fields) -> RemoteFile:
    sha = fields.get("sha256", str, None)
    if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
        raise CatalogError(f"models.toml: {fields.where}.sha256 is not a lowercase sha256 hex")
    repo = fields.get("repo", str)
    if repo.count("/") != 1:
        raise CatalogError(f"models.toml: {fields.where}.repo must look like 'owner/name'")
    return RemoteFile(
        repo=repo,
        file=fields.get("file", str),
        size=fields.positive("size"),
        size_exact=fields.get("size_exact", bool, True),
        sha256=sha,
    )


def _ggml_type(fields: _Fields, key: str) -> str | None:
    """An optional ggml tensor type name (Q4_K, Q6_K, F16, ...), checked against gguf's."""
    from localsmall.gguf_header import block_size

    value = fields.get(key, str, None)
    try:
        if value is not None:
            block_size(value)  # the common types without importing gguf
    except KeyError:
        raise CatalogError(f"models.toml: {fields.where}.{key} = {value!r} is not a ggml "
                           "type") from None
    return value.upper() if value is not None else None


def _model(table: Any, index: int) -> Model:
    f = _Fields(table, f"models[{index}]")
    model_id = f.get("id", str)
    where = f"model {model_id!r}"
    arch = _Fields(f.get("architecture", dict), f"{where}.architecture")
    architecture = Architecture(
        **{k: arch.positive(k) for k in ("n_layers", "n_embd", "n_head", "n_head_kv",
                                         "head_dim", "n_ff", "n_vocab")},
        vision_n_embd=arch.get("vision_n_embd", int, 0),
        vision_n_layers=arch.get("vision_n_layers", int, 0),
        vision_max_image_tokens=arch.get("vision_max_image_tokens", int, 1024),
        vision_n_ff=arch.get("vision_n_ff", int, 0),
        vision_n_head=arch.get("vision_n_head", int, 0),
        vision_patch_size=arch.get("vision_patch_size", int, 14),
        vision_merge=arch.get("vision_merge", int, 2),
    )
    samp = _Fields(f.get("sampling", dict, {}), f"{where}.sampling")
    default = SamplingSettings()
    sampling = SamplingSettings(
        temperature=samp.get("temperature", float, default.temperature),
        top_p=samp.get("top_p", float, default.top_p),
        top_k=samp.get("top_k", int, default.top_k),
        min_p=samp.get("min_p", float, default.min_p),
        repeat_penalty=samp.get("repeat_penalty", float, default.repeat_penalty),
    )
    sp = _Fields(f.get("system_prompt", dict), f"{where}.system_prompt")
    quants = []
    for i, q in enumerate(f.get("quants", list)):
        qf = _Fields(q, f"{where}.quants[{i}]")
        quants.append(Quant(quant=qf.get("quant", str), remote=_remote(qf),
                            quality=qf.get("quality", int), kld=qf.get("kld", float),
                            embd_type=_ggml_type(qf, "embd_type"),
                            output_type=_ggml_type(qf, "output_type")))
    projectors = []
    for i, p in enumerate(f.get("projectors", list)):
        pf = _Fields(p, f"{where}.projectors[{i}]")
        projectors.append(ProjectorFile(type=pf.get("type", str), remote=_remote(pf)))
    if not quants:
        raise CatalogError(f"models.toml: {where} lists no quants")
    if not projectors:
        raise CatalogError(f"models.toml: {where} lists no projectors")
    names = [q.quant.lower() for q in quants]
    if len(set(names)) != len(names):
        raise CatalogError(f"models.toml: {where} lists a quant twice")
    model = Model(
        id=model_id,
        aliases=tuple(f.get("aliases", list, [])),
        name=f.get("name", str),
        source_repo=f.get("source_repo", str),
        license=f.get("license", str),
        context_length=f.positive("context_length"),
        default_context=f.positive("default_context"),
        min_context=f.positive("min_context"),
        default_quant=f.get("default_quant", str),
        architecture=architecture,
        sampling=sampling,
        system_prompt=SystemPrompt(name=sp.get("name", str), text=sp.get("text", str)),
        quants=tuple(quants),
        projectors=tuple(projectors),
    )
    model.quant(model.default_quant)  # must name a listed quant
    if not model.min_context <= model.default_context <= model.context_length:
        raise CatalogError(f"models.toml: {where} needs min_context <= default_context "
                           "<= context_length")
    return model


def parse_catalog(text: str) -> Catalog:
    """Parse and validate catalog TOML text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"models.toml is not valid TOML: {exc}") from None
    if data.get("schema") != CATALOG_SCHEMA:
        raise CatalogError(f"models.toml: expected schema = {CATALOG_SCHEMA}")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise CatalogError("models.toml lists no [[models]]")
    parsed = tuple(_model(m, i) for i, m in enumerate(models))
    ids = [m.id for m in parsed]
    if len(set(ids)) != len(ids):
        raise CatalogError("models.toml: two models share an id")
    return Catalog(models=parsed)


def _catalog_text() -> str:
    # Installed wheels carry models.toml inside the package; a source checkout
    # keeps it at the repository root.
    packaged = resources.files("localsmall").joinpath("models.toml")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    checkout = Path(__file__).resolve().parents[2] / "models.toml"
    if checkout.is_file():
        return checkout.read_text(encoding="utf-8")
    raise CatalogError("models.toml is missing from this installation; reinstall localsmall")


@cache
def load_catalog() -> Catalog:
    """The built-in catalog (parsed once per process)."""
    return parse_catalog(_catalog_text())
