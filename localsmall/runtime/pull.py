"""What a pull fetches: the named quant, or the one the planner picks for this machine,
plus the vision projector. `localsmall pull` asks for one; a run whose planned build is
missing offers one to the user (`OfferPull`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from localsmall.errors import LocalsmallError
from localsmall.hub import pull as hub
from localsmall.hub.pull import PullCallback, PullResult
from localsmall.hub.remote import RemoteFile
from localsmall.models.catalog import Catalog, Model, Quant, parse_model_ref
from localsmall.plan.hardware import Hardware
from localsmall.plan.machine import PlanRequest, make_plan


@dataclass(frozen=True)
class PullRequest:
    """The files of one build, how much is left to download, and why this build."""

    model: Model
    quant: Quant
    files: tuple[RemoteFile, ...]
    missing: int            # bytes still to download
    reason: str             # why this quant (empty when the user named it)

    @property
    def ref(self) -> str:
        return f"{self.model.id}:{self.quant.quant}"


OfferPull = Callable[[PullRequest], bool]
"""Asks the user whether to download a build a run needs (True: download it)."""


def build_request(model: Model, quant: Quant, *, projector: bool, reason: str = ""
                  ) -> PullRequest:
    """The pull of one quant, with the model's preferred projector when asked."""
    files = (quant.remote, model.projector.remote) if projector else (quant.remote,)
    return PullRequest(model, quant, files, hub.missing_bytes(files), reason)


def pull_request(catalog: Catalog, ref: str | None, *, projector: bool = True,
                 hardware: Hardware | None = None) -> PullRequest:
    """The build `ref` names (MODEL[:QUANT]); without a quant, the plan's choice."""
    name, quant_name = parse_model_ref(ref)
    model = catalog.get(name) if name else catalog.default
    if quant_name:
        return build_request(model, model.quant(quant_name), projector=projector)
    plan = make_plan(model, PlanRequest(vision=projector), hardware)
    if plan.choice is None:
        raise LocalsmallError(f"{plan.reason} Name a quant to download it anyway "
                              f"(e.g. `localsmall pull {model.id}:{model.default_quant}`).")
    return build_request(model, model.quant(plan.choice.quant), projector=projector,
                         reason=plan.reason)


def pull_build(request: PullRequest, on_progress: PullCallback | None = None) -> PullResult:
    """Download and verify the request's files into the Hugging Face cache."""
    return hub.pull(request.files, pull_ref=request.ref, on_progress=on_progress)
