"""Starting a run: plan the build (pulling it if the user accepts), load it into an
engine, and open a chat session on it. `chat`, `run` and `bench` start here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from localsmall.chat.session import ChatSession
from localsmall.engine.types import ProgressCallback
from localsmall.hub.pull import PullCallback
from localsmall.models.resolve import LocalBuild
from localsmall.plan.hardware import Hardware
from localsmall.runtime.choose import plan_build
from localsmall.runtime.options import (
    RunOptions,
    SessionOptions,
    engine_settings,
    sampling_for,
    system_prompt_for,
    validate_run_options,
)
from localsmall.runtime.pull import OfferPull

if TYPE_CHECKING:
    from localsmall.engine.model import Engine


def prepare(options: RunOptions, *, offer_pull: OfferPull | None = None,
            on_download: PullCallback | None = None,
            hardware: Hardware | None = None) -> LocalBuild:
    """The build to run with its planned context and GPU layers, pulling what is
    missing when `offer_pull` accepts (see localsmall.runtime.choose)."""
    validate_run_options(options)
    if options.rpc:
        from localsmall.runtime.remote import plan_remote_build

        return plan_remote_build(options, offer_pull=offer_pull, on_download=on_download,
                                 hardware=hardware)
    return plan_build(options, offer_pull=offer_pull, on_download=on_download,
                      hardware=hardware)


def load_engine(build: LocalBuild, options: RunOptions,
                on_progress: ProgressCallback | None = None) -> Engine:
    """Load a prepared build. The caller closes the engine."""
    from localsmall.engine.model import Engine  # loads llama.cpp: only when needed

    return Engine(engine_settings(build, options), on_progress)


def open_engine(options: RunOptions, on_progress: ProgressCallback | None = None, *,
                offer_pull: OfferPull | None = None, on_download: PullCallback | None = None
                ) -> tuple[Engine, LocalBuild]:
    """Plan, pull if accepted, and load. The caller closes the engine."""
    build = prepare(options, offer_pull=offer_pull, on_download=on_download)
    return load_engine(build, options, on_progress), build


def start_session(engine: Engine, build: LocalBuild, options: SessionOptions) -> ChatSession:
    """A chat session on a loaded build, with the model's sampling and system prompt
    unless the options override them."""
    return ChatSession(engine, system_prompt=system_prompt_for(build, options.system,
                                                               disabled=options.no_system),
                       sampling=sampling_for(build, options.sampling), model_label=build.label)
