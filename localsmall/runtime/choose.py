"""Which build a run uses, with which context and GPU layers: the same plan as
`localsmall plan`, unless the user pinned a quant, --ctx or --gpu-layers.

Already-downloaded builds run as they are; when the plan's build is missing, the caller
is asked (`offer_pull`) whether to download it, with its size; without an answer the
error names the `localsmall pull` command to run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from localsmall.errors import LocalsmallError, ModelNotFoundError, UsageError
from localsmall.hub.pull import PullCallback
from localsmall.models.catalog import Model, load_catalog, parse_model_ref
from localsmall.models.resolve import LocalBuild, local_builds, projector_file, resolve_build
from localsmall.plan.hardware import Hardware, detect
from localsmall.plan.machine import PlanRequest, make_plan, place_file
from localsmall.plan.rules import QuantOption
from localsmall.plan.speed import CalibrationProgress
from localsmall.runtime.options import RunOptions
from localsmall.runtime.pull import OfferPull, build_request, pull_build
from localsmall.runtime.speeds import speed_inputs
from localsmall.units import gib_fixed


class WontFitError(LocalsmallError):
    """No build fits this machine's memory with the settings asked for."""


def plan_build(options: RunOptions, *, offer_pull: OfferPull | None = None,
               on_download: PullCallback | None = None,
               hardware: Hardware | None = None,
               on_calibrate: CalibrationProgress | None = None) -> LocalBuild:
    """The build to run, planned for this machine (pulled first if accepted). With a
    speed target the machine's speeds are needed: a calibration runs first when none is
    cached (`on_calibrate` hears its steps)."""
    request = PlanRequest(ctx=options.n_ctx, kv_type=options.kv_type,
                          n_gpu_layers=options.n_gpu_layers, vision=options.vision,
                          flash_attn=options.flash_attn, n_batch=options.n_batch)
    if options.model_path is not None:
        return _plan_file(options, request, hardware)
    catalog = load_catalog()
    name, ref_quant = parse_model_ref(options.ref)
    if options.quant and ref_quant and options.quant.lower() != ref_quant.lower():
        raise UsageError(f"conflicting quants: {ref_quant} in the name and --quant "
                         f"{options.quant}")
    model = catalog.get(name) if name else catalog.default
    hardware = hardware or detect()
    if options.min_speed is not None:
        request = dataclasses.replace(request, speeds=speed_inputs(
            model, hardware, n_threads=options.n_threads, min_speed=options.min_speed,
            on_progress=on_calibrate))
    option, hint = _choose(model, options.quant or ref_quant, request, hardware, offer_pull,
                           on_download)
    if option is None:  # a registered build whose quant the catalog does not know
        return _plan_registered(model, options, request, hardware)
    build = resolve_build(catalog, ref=model.id, quant=option.quant,
                          mmproj_path=options.mmproj_path,
                          vision=options.vision and option.vision)
    notices = [build.notice, hint]
    if options.vision and not option.vision:
        notices[0] = ("Images are off: the vision projector does not fit in memory next to "
                      "the model.")
    return dataclasses.replace(build, n_ctx=option.n_ctx, n_gpu_layers=option.n_gpu_layers,
                               notice=" ".join(n for n in notices if n))


def _choose(model: Model, quant: str | None, request: PlanRequest, hardware: Hardware,
            offer_pull: OfferPull | None, on_download: PullCallback | None
            ) -> tuple[QuantOption | None, str]:
    """The option to run (None: a registered build the catalog does not know) and a
    hint when a better build than the one on disk exists."""
    local = local_builds(model)
    if quant is not None and quant.lower() not in {q.quant.lower() for q in model.quants}:
        if quant.lower() in local:
            return None, ""
        model.quant(quant)  # raises CatalogError naming the known quants
    pinned = (model.quant(quant).quant,) if quant else None
    plan = make_plan(model, dataclasses.replace(request, quants=pinned), hardware)
    if plan.choice is not None and plan.choice.quant.lower() in local:
        return plan.choice, ""
    on_disk = tuple(q.quant for q in model.quants if q.quant.lower() in local)
    if quant is None and on_disk:
        local_plan = make_plan(model, dataclasses.replace(request, quants=on_disk), hardware)
        if local_plan.choice is not None:
            hint = (f"{plan.choice.quant} would suit this machine better: `localsmall pull "
                    f"{model.id}:{plan.choice.quant}`." if plan.choice is not None else "")
            return local_plan.choice, hint
    if plan.choice is None:
        if quant is None and local and not on_disk:
            return None, ""  # only registered builds unknown to the catalog
        raise WontFitError(f"{plan.reason} See `localsmall plan`.")
    _pull(model, plan.choice, plan.reason, request.vision, offer_pull, on_download)
    # Now the file is here, its tensor table gives exact sizes: place it again.
    exact = make_plan(model, dataclasses.replace(request, quants=(plan.choice.quant,)),
                      hardware)
    return exact.choice or plan.choice, ""


def _pull(model: Model, choice: QuantOption, reason: str, vision: bool,
          offer_pull: OfferPull | None, on_download: PullCallback | None) -> None:
    projector = vision and choice.vision and projector_file(model) is None
    request = build_request(model, model.quant(choice.quant), projector=projector,
                            reason=reason)
    if offer_pull is None or not offer_pull(request):
        raise ModelNotFoundError(f"{model.name} {choice.quant} is not downloaded yet; run "
                                 f"`localsmall pull {request.ref}`")
    pull_build(request, on_progress=on_download)


def _plan_registered(model: Model, options: RunOptions, request: PlanRequest,
                     hardware: Hardware) -> LocalBuild:
    """A registered build the catalog does not know: sized from its own file."""
    build = resolve_build(load_catalog(), ref=model.id, quant=options.quant or
                          parse_model_ref(options.ref)[1], mmproj_path=options.mmproj_path,
                          vision=options.vision)
    return _with_placement(model, build, request, hardware)


def _plan_file(options: RunOptions, request: PlanRequest, hardware: Hardware | None) -> LocalBuild:
    """A GGUF given with --model: sized from its tensor table."""
    build = resolve_build(load_catalog(), ref=options.ref, model_path=options.model_path,
                          mmproj_path=options.mmproj_path, vision=options.vision)
    return _with_placement(load_catalog().default, build, request, hardware)


def _with_placement(model: Model, build: LocalBuild, request: PlanRequest,
                    hardware: Hardware | None) -> LocalBuild:
    if request.ctx is not None and request.n_gpu_layers is not None:
        return build  # the user decided both: nothing to plan
    placement = place_file(model, Path(build.model_path), build.mmproj_path, request, hardware)
    if not placement.fits:
        memory = placement.memory
        raise WontFitError(
            f"{Path(build.model_path).name} does not fit in this machine's memory even at "
            f"{placement.n_ctx:,} tokens (it needs about {gib_fixed(memory.ram)} of RAM"
            + (f" and {gib_fixed(memory.gpu)} of GPU memory" if memory.gpu else "")
            + "); pass both --ctx and --gpu-layers to try anyway")
    return dataclasses.replace(build, n_ctx=placement.n_ctx,
                               n_gpu_layers=placement.n_gpu_layers)
