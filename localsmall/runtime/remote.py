"""Runs with RPC workers (`--rpc`): read the workers' memory, choose the build and split
it over this machine and the workers (localsmall.plan.rpc), pulling what is missing."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from localsmall.errors import ModelNotFoundError, UsageError
from localsmall.models.catalog import Model, load_catalog, parse_model_ref
from localsmall.models.resolve import LocalBuild, projector_file, resolve_build
from localsmall.plan.hardware import Hardware, detect
from localsmall.plan.rpc import RpcPlan, RpcSplit, WorkerMemory, best_split, plan_rpc
from localsmall.plan.rules import budget_for
from localsmall.runtime.choose import WontFitError
from localsmall.runtime.pull import build_request, pull_build

if TYPE_CHECKING:
    from localsmall.hub.pull import PullCallback
    from localsmall.runtime.options import RunOptions
    from localsmall.runtime.pull import OfferPull


def worker_memories(endpoints: Sequence[str]) -> tuple[WorkerMemory, ...]:
    """Every device of the workers with its free memory, asked over the network (the
    workers are checked and registered with llama.cpp on the way)."""
    from localsmall.engine import rpc

    return tuple(WorkerMemory(d.endpoint, d.name, d.memory_free, d.memory_total)
                 for d in rpc.connect(endpoints))


def plan_for_workers(model: Model, options: RunOptions, workers: Sequence[WorkerMemory],
                     hardware: Hardware, quants: Sequence[str] | None = None) -> RpcPlan:
    """The RPC plan of a catalog model for these options."""
    from localsmall.plan.machine import local_vision, local_weights

    return plan_rpc(model, workers=workers, local_budget=budget_for(hardware).ram,
                    ctx=options.n_ctx, kv_type=options.kv_type, n_batch=options.n_batch,
                    flash_attn=options.flash_attn is not False, vision=options.vision,
                    quants=quants, local=local_weights(model), local_vision=local_vision(model))


def plan_remote_build(options: RunOptions, *, offer_pull: OfferPull | None = None,
                      on_download: PullCallback | None = None,
                      hardware: Hardware | None = None,
                      workers: Sequence[WorkerMemory] | None = None) -> LocalBuild:
    """The build to run over this machine and the workers, with its split."""
    if options.n_gpu_layers is not None:
        raise UsageError("--gpu-layers does not combine with --rpc: the plan places the "
                         "layers on this machine and the workers")
    hardware = hardware or detect()
    workers = tuple(workers) if workers is not None else worker_memories(options.rpc)
    catalog = load_catalog()
    if options.model_path is not None:
        build = resolve_build(catalog, ref=options.ref, model_path=options.model_path,
                              mmproj_path=options.mmproj_path, vision=options.vision)
        return _with_split(build, _split_file(build, options, workers, hardware))
    name, ref_quant = parse_model_ref(options.ref)
    model = catalog.get(name) if name else catalog.default
    quant = options.quant or ref_quant
    plan = plan_for_workers(model, options, workers, hardware,
                            quants=(model.quant(quant).quant,) if quant else None)
    if plan.choice is None:
        raise WontFitError(f"{plan.reason} See `localsmall plan --rpc ...`.")
    choice = plan.choice
    vision = options.vision and choice.vision
    try:
        build = resolve_build(catalog, ref=model.id, quant=choice.quant,
                              mmproj_path=options.mmproj_path, vision=vision)
    except ModelNotFoundError:
        _pull(model, choice.quant, vision, plan.reason, offer_pull, on_download)
        build = resolve_build(catalog, ref=model.id, quant=choice.quant,
                              mmproj_path=options.mmproj_path, vision=vision)
    return _with_split(build, _split_file(build, options, workers, hardware, model))


def _split_file(build: LocalBuild, options: RunOptions, workers: Sequence[WorkerMemory],
                hardware: Hardware, model: Model | None = None) -> RpcSplit:
    """The split of the files on disk (exact sizes from their tensor tables)."""
    from localsmall.plan.memory import (
        RunShape,
        text_weights_from_file,
        vision_weights_from_file,
    )
    from localsmall.plan.rules import context_steps

    model = model or load_catalog().default
    text = text_weights_from_file(Path(build.model_path))
    vision = (vision_weights_from_file(Path(build.mmproj_path), max_tokens=model.architecture
                                       .vision_max_image_tokens)
              if build.mmproj_path else None)
    requested = min(options.n_ctx or model.default_context, text.shape.n_ctx_train)
    steps = ([options.n_ctx] if options.n_ctx else
             [n for n in context_steps(model, requested, False) if n <= requested])
    runs = [RunShape(n_ctx=n, kv_type=options.kv_type, n_batch=options.n_batch,
                     flash_attn=options.flash_attn is not False) for n in steps or [requested]]
    split = best_split(text, runs, local_budget=budget_for(hardware).ram, workers=workers,
                       vision=vision)
    if not split.fits:
        short = [s for s in split.shares if not s.fits]
        names = ", ".join(s.endpoint or "this machine" for s in short)
        raise WontFitError(
            f"{Path(build.model_path).name} does not fit over this machine and the workers "
            f"even at {split.n_ctx:,} tokens: {names} would run out of memory; add a "
            "worker or use a smaller quant")
    return split


def _with_split(build: LocalBuild, split: RpcSplit) -> LocalBuild:
    return dataclasses.replace(build, n_ctx=split.n_ctx, n_gpu_layers=split.n_gpu_layers,
                               tensor_split=split.tensor_split)


def _pull(model: Model, quant: str, vision: bool, reason: str, offer_pull: OfferPull | None,
          on_download: PullCallback | None) -> None:
    projector = vision and projector_file(model) is None
    request = build_request(model, model.quant(quant), projector=projector, reason=reason)
    if offer_pull is None or not offer_pull(request):
        raise ModelNotFoundError(f"{model.name} {quant} is not downloaded yet; run "
                                 f"`localsmall pull {request.ref}`")
    pull_build(request, on_progress=on_download)
