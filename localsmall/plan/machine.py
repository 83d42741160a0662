"""The planner applied to this machine and the files on disk: exact sizes for the builds
already downloaded (their tensor tables), catalog estimates for the others."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from localsmall.errors import LocalsmallError, UsageError
from localsmall.models.catalog import Model
from localsmall.models.resolve import local_builds, projector_file
from localsmall.plan.hardware import Hardware, detect
from localsmall.plan.memory import (
    MemoryEstimate,
    RunShape,
    TextWeights,
    VisionWeights,
    estimate,
    text_weights_from_file,
    vision_weights_from_file,
)
from localsmall.plan.rules import Plan, budget_for, plan
from localsmall.plan.speed import SpeedInputs

MIN_CTX = 256  # the smallest --ctx accepted: below it not even a short question fits


@dataclass(frozen=True)
class PlanRequest:
    """What the user pinned on the command line (None: let the planner choose)."""

    ctx: int | None = None
    kv_type: str = "f16"
    quants: tuple[str, ...] | None = None
    n_gpu_layers: int | None = None
    vision: bool = True
    flash_attn: bool | None = None
    n_batch: int = 512
    speeds: SpeedInputs | None = None   # this machine's speeds and the speed target


def local_weights(model: Model) -> dict[str, TextWeights]:
    """Exact weight sizes of the builds on disk, by lower-case quant name."""
    weights = {}
    for key, (_, path, _) in local_builds(model).items():
        try:
            weights[key] = text_weights_from_file(path)
        except LocalsmallError:
            continue  # an unreadable file: the catalog estimate stands in
    return weights


def local_vision(model: Model, mmproj: Path | None = None) -> VisionWeights | None:
    """Exact projector sizes when a projector is on disk."""
    path = mmproj or projector_file(model)
    if path is None:
        return None
    try:
        return vision_weights_from_file(path, max_tokens=model.architecture
                                        .vision_max_image_tokens)
    except LocalsmallError:
        return None


def check_ctx(ctx: int | None) -> None:
    """--ctx is at least MIN_CTX tokens (None: the planner chooses)."""
    if ctx is not None and ctx < MIN_CTX:
        raise UsageError(f"--ctx must be at least {MIN_CTX} tokens")


def make_plan(model: Model, request: PlanRequest, hardware: Hardware | None = None) -> Plan:
    """The plan for this machine (detected unless given)."""
    check_ctx(request.ctx)
    return plan(model, hardware or detect(), ctx=request.ctx, kv_type=request.kv_type,
                quants=request.quants, n_gpu_layers=request.n_gpu_layers,
                vision=request.vision, local=local_weights(model),
                local_vision=local_vision(model), n_batch=request.n_batch,
                flash_attn=request.flash_attn is not False, speeds=request.speeds)


@dataclass(frozen=True)
class FilePlacement:
    """Settings for a GGUF the user named with --model."""

    n_ctx: int
    n_gpu_layers: int
    memory: MemoryEstimate
    fits: bool


def place_file(model: Model, path: Path, mmproj: Path | None, request: PlanRequest,
               hardware: Hardware | None = None) -> FilePlacement:
    """The most GPU layers and the largest context (down to the catalog's floor) with
    which a given file fits this machine."""
    hardware = hardware or detect()
    text = text_weights_from_file(path)
    vision = (vision_weights_from_file(mmproj, max_tokens=model.architecture
                                       .vision_max_image_tokens) if mmproj else None)
    budget = budget_for(hardware)
    contexts = _contexts(model, text, request.ctx)
    memory = None
    for n_ctx in contexts:
        run = RunShape(n_ctx=n_ctx, kv_type=request.kv_type, n_batch=request.n_batch,
                       flash_attn=request.flash_attn is not False)
        for ngl in _gpu_layer_choices(text, request, budget.gpu_names):
            memory = estimate(text, run, n_gpu_layers=ngl, gpus=budget.gpu_names,
                              split=budget.split, vision=vision)
            if budget.allows(memory):
                return FilePlacement(n_ctx, memory.n_gpu_layers, memory, True)
    assert memory is not None
    return FilePlacement(contexts[-1], memory.n_gpu_layers, memory, False)


def _contexts(model: Model, text: TextWeights, ctx: int | None) -> list[int]:
    if ctx is not None:
        return [ctx]
    steps = [min(model.default_context, text.shape.n_ctx_train)]
    while steps[-1] // 2 >= min(model.min_context, steps[0]):
        steps.append(steps[-1] // 2)
    return steps


def _gpu_layer_choices(text: TextWeights, request: PlanRequest,
                       gpus: Sequence[str]) -> list[int]:
    if request.n_gpu_layers is not None:
        return [request.n_gpu_layers]
    if not gpus:
        return [0]
    return list(range(text.shape.n_layers + 1, -1, -1))
