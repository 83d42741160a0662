"""`localsmall plan`: which build runs best on this machine, and why."""

from __future__ import annotations

from typing import Annotated

import typer

from localsmall.commands.options import JsonOpt, KvTypeOpt, ModelArg, NoVisionOpt, check_kv_type


def plan(
    model: ModelArg = None,
    ctx: Annotated[int | None, typer.Option(
        "--ctx", "-c", help="Plan for this context length (default: the largest useful one, "
        "32768, shrinking when memory is short).")] = None,
    kv_type: KvTypeOpt = "f16",
    no_vision: NoVisionOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Show every quant with where it would run, memory, speed and quality; mark the best."""
    from localsmall.models.catalog import load_catalog, parse_model_ref
    from localsmall.models.resolve import local_builds
    from localsmall.plan.machine import PlanRequest, make_plan

    check_kv_type(kv_type)
    name, quant = parse_model_ref(model)
    catalog_model = load_catalog().get(name) if name else load_catalog().default
    request = PlanRequest(ctx=ctx, kv_type=kv_type, vision=not no_vision,
                          quants=(catalog_model.quant(quant).quant,) if quant else None)
    result = make_plan(catalog_model, request)
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
