"""What `localsmall pull` fetches: the named quant, or the one the planner picks for this
machine, plus the vision projector."""

from __future__ import annotations

from dataclasses import dataclass

from localsmall.hub import pull as hub
from localsmall.hub.pull import PullCallback, PullResult
from localsmall.models.catalog import Catalog, Model, Quant, RemoteFile, parse_model_ref
from localsmall.plan.hardware import Hardware


@dataclass(frozen=True)
class PullRequest:
    """The files of one build, and why this build."""

    model: Model
    quant: Quant
    files: tuple[RemoteFile, ...]
    missing: int            # bytes still to download
    reason: str             # why this quant (empty when the user named it)

    @property
    def ref(self) -> str:
        return f"{self.model.id}:{self.quant.quant}"


def pull_request(catalog: Catalog, ref: str | None, *, projector: bool = True,
                 hardware: Hardware | None = None) -> PullRequest:
    """The build `ref` names (MODEL[:QUANT]); without a quant, the plan's choice."""
    from localsmall.errors import LocalsmallError

    name, quant_name = parse_model_ref(ref)
    model = catalog.get(name) if name else catalog.default
    reason = ""
    if quant_name:
        quant = model.quant(quant_name)
    else:
        from localsmall.plan.machine import PlanRequest, make_plan

        plan = make_plan(model, PlanRequest(vision=projector), hardware)
        if plan.choice is None:
            raise LocalsmallError(f"{plan.reason} Name a quant to download it anyway "
                                  f"(e.g. `localsmall pull {model.id}:{model.default_quant}`).")
        quant, reason = model.quant(plan.choice.quant), plan.reason
    files = (quant.remote, model.projector.remote) if projector else (quant.remote,)
    return PullRequest(model, quant, files, hub.missing_bytes(files), reason)


def pull_build(request: PullRequest, on_progress: PullCallback | None = None) -> PullResult:
    """Download and verify the request's files into the Hugging Face cache."""
    return hub.pull(request.files, pull_ref=request.ref, on_progress=on_progress)
