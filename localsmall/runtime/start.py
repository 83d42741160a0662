"""Starting a run: plan the build (pulling it if the user accepts), load it into an
engine, and open a chat session on it. `chat`, `run` and `bench` start here."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from localsmall.chat.cost import PLANNED, ImagePolicy, Speeds
from localsmall.chat.session import ChatSession
from localsmall.engine.types import ProgressCallback
from localsmall.errors import UsageError
from localsmall.hub.pull import PullCallback
from localsmall.models.resolve import LocalBuild
from localsmall.plan.hardware import Hardware
from localsmall.plan.speed import CalibrationProgress
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
            hardware: Hardware | None = None,
            on_calibrate: CalibrationProgress | None = None) -> LocalBuild:
    """The build to run with its planned context and GPU layers, pulling what is
    missing when `offer_pull` accepts (see localsmall.runtime.choose)."""
    validate_run_options(options)
    if options.rpc:
        from localsmall.runtime.remote import plan_remote_build

        return plan_remote_build(options, offer_pull=offer_pull, on_download=on_download,
                                 hardware=hardware)
    return plan_build(options, offer_pull=offer_pull, on_download=on_download,
                      hardware=hardware, on_calibrate=on_calibrate)


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


def image_policy(engine: Engine, build: LocalBuild, *, max_tokens: int | None = None,
                 hardware: Hardware | None = None) -> ImagePolicy:
    """How a session sizes images: `max_tokens` when the user gave one; on a CPU-only
    plan, a budget from the speeds (the plan's estimate until the chat measures them);
    on a GPU, full resolution."""
    from localsmall.images import MIN_IMAGE_BUDGET
    from localsmall.plan.assumed import cpu_prompt_speed
    from localsmall.plan.hardware import detect

    if max_tokens is not None and max_tokens < MIN_IMAGE_BUDGET:
        raise UsageError(f"--image-tokens must be at least {MIN_IMAGE_BUDGET}")
    info = engine.info
    if info.n_gpu_layers != 0 or not info.has_vision:
        return ImagePolicy(max_tokens=max_tokens)
    hardware = hardware or detect()
    mmproj = build.mmproj_path
    vision_bytes = Path(mmproj).stat().st_size if mmproj is not None else 0
    speed = cpu_prompt_speed(hardware, n_params=info.n_params,
                             n_lookup_params=info.n_vocab * info.n_embd,
                             vision_params=vision_bytes // 2,  # F16 projectors
                             n_threads=engine.n_threads)
    return ImagePolicy(max_tokens=max_tokens, auto=True,
                       planned=Speeds(speed.prompt_tps, speed.image_tps, PLANNED))


def start_session(engine: Engine, build: LocalBuild, options: SessionOptions) -> ChatSession:
    """A chat session on a loaded build, with the model's sampling and system prompt
    unless the options override them, and its image policy (see image_policy)."""
    return ChatSession(engine, system_prompt=system_prompt_for(build, options.system,
                                                               disabled=options.no_system),
                       sampling=sampling_for(build, options.sampling), model_label=build.label,
                       images=image_policy(engine, build, max_tokens=options.image_tokens))
