"""A command's options and what they mean for a run: the files they point at, llama.cpp
settings, sampling and the system prompt. Shared by chat, run and bench."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from pathlib import Path

from localsmall.engine.types import EngineSettings, SamplingSettings
from localsmall.errors import UsageError
from localsmall.models.catalog import Catalog, load_catalog
from localsmall.models.resolve import LocalBuild, resolve_build
from localsmall.plan.machine import check_ctx


@dataclass(frozen=True)
class RunOptions:
    """What the user asked for on the command line (None: use the default)."""

    ref: str | None = None
    quant: str | None = None
    model_path: Path | None = None
    mmproj_path: Path | None = None
    vision: bool = True
    n_ctx: int | None = None
    n_gpu_layers: int | None = None
    n_threads: int | None = None
    kv_type: str = "f16"
    flash_attn: bool | None = None
    n_batch: int = 512
    verbose: bool = False
    n_seq: int = 1   # conversations the context keeps at once (`serve --slots`)
    rpc: tuple[str, ...] = ()   # RPC workers (HOST:PORT) that take part of the model
    min_speed: float | None = None   # generation tokens/s the plan must reach (--min-speed)


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling overrides from the command line."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    max_tokens: int | None = None


@dataclass(frozen=True)
class SessionOptions:
    """How a chat session talks: sampling overrides and the system prompt."""

    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    system: str | None = None        # the user's system prompt (None: the model's default)
    no_system: bool = False          # send no system prompt at all
    image_tokens: int | None = None  # the user's image budget (None: see image_policy)


def validate_run_options(options: RunOptions) -> None:
    """Reject impossible values before anything is loaded."""
    check_ctx(options.n_ctx)
    if options.n_threads is not None and options.n_threads < 1:
        raise UsageError("--threads must be at least 1")
    if options.n_batch < 1:
        raise UsageError("--batch must be at least 1")
    check_speed_target(options.min_speed, model_path=options.model_path,
                       rpc=bool(options.rpc))


def check_speed_target(min_speed: float | None, *, model_path: Path | None = None,
                       rpc: bool = False) -> None:
    """--min-speed only where the planner can act on it and knows the speed: choosing
    among the catalog's builds and contexts, on this machine."""
    if min_speed is None:
        return
    if model_path is not None:
        raise UsageError("--min-speed picks a build and context from the catalog; with "
                         "--model FILE the build is fixed: leave out --min-speed (and pass "
                         "--ctx for a faster, shorter context)")
    if rpc:
        raise UsageError("--min-speed does not work with --rpc: a split over RPC workers "
                         "is not measured here, its speed is only an estimate; leave out "
                         "--min-speed")


def find_build(options: RunOptions, catalog: Catalog | None = None) -> LocalBuild:
    """The files the options point at (no planning, no download)."""
    return resolve_build(catalog or load_catalog(), ref=options.ref, quant=options.quant,
                         model_path=options.model_path, mmproj_path=options.mmproj_path,
                         vision=options.vision)


def engine_settings(build: LocalBuild, options: RunOptions) -> EngineSettings:
    """llama.cpp settings for a build: the user's flags, else the build's plan."""
    catalog_model = build.model or load_catalog().default
    n_ctx = options.n_ctx or build.n_ctx or catalog_model.default_context
    if options.n_gpu_layers is not None:
        n_gpu_layers = options.n_gpu_layers
    else:
        n_gpu_layers = build.n_gpu_layers or 0
    return EngineSettings(
        model_path=build.model_path, mmproj_path=build.mmproj_path,
        n_ctx=n_ctx, n_batch=options.n_batch, n_threads=options.n_threads,
        n_gpu_layers=n_gpu_layers, kv_type=options.kv_type, flash_attn=options.flash_attn,
        verbose=options.verbose, rpc_servers=options.rpc, tensor_split=build.tensor_split,
        n_seq=options.n_seq)


def sampling_for(build: LocalBuild, overrides: SamplingOptions) -> SamplingSettings:
    """The catalog's recommended sampling, with the user's overrides."""
    base = (build.model or load_catalog().default).sampling
    temperature = overrides.temperature if overrides.temperature is not None else base.temperature
    if temperature < 0:
        raise UsageError("--temperature must be 0 or more")
    top_p = overrides.top_p if overrides.top_p is not None else base.top_p
    if not 0 < top_p <= 1:
        raise UsageError("--top-p must be in (0, 1]")
    if overrides.max_tokens is not None and overrides.max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    return replace(base, temperature=temperature, top_p=top_p,
                   top_k=overrides.top_k if overrides.top_k is not None else base.top_k,
                   seed=overrides.seed, max_tokens=overrides.max_tokens)


def system_prompt_for(build: LocalBuild, override: str | None, *, disabled: bool = False,
                      today: dt.date | None = None) -> str:
    """The system prompt: the user's, none, or the model's default with today's date."""
    if disabled:
        return ""
    if override is not None:
        return override
    return (build.model or load_catalog().default).system_prompt.render(today)
