"""`localsmall plan`: which build runs best on this machine, and why."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Annotated

import typer

from localsmall.commands.options import (
    JsonOpt,
    KvTypeOpt,
    MinSpeedOpt,
    ModelArg,
    NoVisionOpt,
    check_kv_type,
    check_min_speed,
)

if TYPE_CHECKING:
    from localsmall.models.catalog import Model


def plan(
    model: ModelArg = None,
    ctx: Annotated[int | None, typer.Option(
        "--ctx", "-c", help="Plan for this context length (default: the largest useful one, "
        "32768, shrinking when memory is short).")] = None,
    kv_type: KvTypeOpt = "f16",
    no_vision: NoVisionOpt = False,
    rpc: Annotated[list[str] | None, typer.Option(
        "--rpc", help="Split over these RPC workers: HOST:PORT (asked for their memory), or "
        "HOST:PORT=16GiB to plan for a worker not running yet; comma-separated or repeated.",
        show_default=False)] = None,
    depth: Annotated[int | None, typer.Option(
        "--depth", "-d", help="Show speeds with this many tokens already in the context "
        "(default: the whole context).", show_default=False)] = None,
    min_speed: MinSpeedOpt = None,
    no_calibrate: Annotated[bool, typer.Option(
        "--no-calibrate", help="Do not time this machine when no calibration is cached "
        "(speeds are then estimated; also LOCALSMALL_CALIBRATE=0).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show every quant with where it would run, memory, speed and quality; mark the best."""
    from localsmall.models.catalog import load_catalog, parse_model_ref
    from localsmall.models.resolve import local_builds
    from localsmall.plan.machine import PlanRequest
    from localsmall.runtime.options import check_speed_target
    from localsmall.runtime.speeds import plan_with_speeds
    from localsmall.ui.progress import CalibrationLine

    check_kv_type(kv_type)
    check_speed_target(check_min_speed(min_speed), rpc=bool(rpc))
    name, quant = parse_model_ref(model)
    catalog_model = load_catalog().get(name) if name else load_catalog().default
    request = PlanRequest(ctx=ctx, kv_type=kv_type, vision=not no_vision,
                          quants=(catalog_model.quant(quant).quant,) if quant else None)
    if rpc:
        _plan_rpc(catalog_model, rpc, ctx=ctx, kv_type=kv_type, vision=not no_vision,
                  quant=quant, as_json=as_json)
        return
    with CalibrationLine() as calibrating:
        result = plan_with_speeds(catalog_model, request, calibrate=not no_calibrate,
                                  depth=depth, min_speed=min_speed, on_progress=calibrating)
    local = set(local_builds(catalog_model))
    if as_json:
        from localsmall.plan.rules import plan_dict
        from localsmall.ui.console import print_json

        data = plan_dict(result)
        for option in data["options"]:
            option["local"] = option["quant"].lower() in local
        print_json(data)
        return
    from localsmall.ui.plan_view import show_plan

    show_plan(result, local, gpus=any(o.gpu_bytes for o in result.options))


def _plan_rpc(model: Model, specs: list[str], *, ctx: int | None, kv_type: str, vision: bool,
              quant: str | None, as_json: bool) -> None:
    from localsmall.models.resolve import local_builds
    from localsmall.plan.hardware import detect
    from localsmall.plan.rpc import WorkerMemory, parse_worker_memory
    from localsmall.runtime.options import RunOptions
    from localsmall.runtime.remote import plan_for_workers, worker_memories

    parts = [p.strip() for spec in specs for p in spec.split(",") if p.strip()]
    workers: list[WorkerMemory] = []
    for i, part in enumerate(parts):
        simulated = parse_worker_memory(part)
        if simulated is None:  # a running worker: each of its devices, as llama.cpp sees it
            workers.extend(worker_memories([part]))
        else:
            workers.append(dataclasses.replace(simulated, name=f"sim{i}"))
    options = RunOptions(n_ctx=ctx, kv_type=kv_type, vision=vision)
    result = plan_for_workers(model, options, workers, detect(),
                              quants=(model.quant(quant).quant,) if quant else None)
    if as_json:
        import json

        from localsmall.plan.rpc import rpc_plan_dict
        from localsmall.ui.console import stdout_write

        stdout_write(json.dumps(rpc_plan_dict(result), indent=2) + "\n")
        return
    from localsmall.ui.rpc_plan_view import show_rpc_plan

    show_rpc_plan(result, set(local_builds(model)))
