"""Starting a run: plan the build (pulling it if the user accepts), load it into an
engine, and open a chat session on it. `chat`, `run` and `bench` start here."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from localsmall.chat.cost import ImagePolicy
from localsmall.chat.session import ChatSession
from localsmall.chat.speeds import PLANNED, Speeds
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
    plan, a budget from the best speeds known (an earlier session's measurement on this
    machine, else its cached kernel calibration, else the plan's estimate, until the chat
    measures its own); on a GPU, full resolution."""
    from localsmall.images import MIN_IMAGE_BUDGET
    from localsmall.plan.hardware import detect
    from localsmall.runtime import speed_memory
    from localsmall.runtime.calibrated_speeds import cached_calibration, calibrated_speeds

    if max_tokens is not None and max_tokens < MIN_IMAGE_BUDGET:
        raise UsageError(f"--image-tokens must be at least {MIN_IMAGE_BUDGET}")
    info = engine.info
    shape = ImagePolicy(max_tokens=max_tokens, n_batch=engine.settings.n_batch,
                        together=engine.reads_images_together)
    if info.n_gpu_layers != 0 or not info.has_vision:
        return shape
    hardware = hardware or detect()
    planned = planned_speeds(engine, build, hardware)
    remember = None
    try:
        where = speed_memory.memory_path(model=Path(build.model_path), mmproj=build.mmproj_path,
                                         n_threads=engine.n_threads, cpu=hardware.cpu.model)
    except OSError:
        stored = None
    else:
        stored = speed_memory.recall(where)
        remember = functools.partial(speed_memory.remember, where)
    if stored is not None:  # a measurement beats the calibration: no need to read either
        return replace(shape, auto=True, base=stored, remember=remember)
    calibration = cached_calibration(hardware, engine.n_threads)
    calibrated = (calibrated_speeds(calibration, model_path=Path(build.model_path),
                                    planned=planned) if calibration is not None else None)
    return replace(shape, auto=True, base=calibrated or planned, remember=remember)


def planned_speeds(engine: Engine, build: LocalBuild, hardware: Hardware) -> Speeds:
    """The plan's estimate of an image turn's costs here: a llama_decode call reads every
    weight once at the plan's memory bandwidth, a position costs the plan's prompt FLOPs,
    the encoder reads its weights once per image and costs its FLOPs per token."""
    from localsmall.plan.assumed import BANDWIDTH_EFFICIENCY, cpu_bandwidth, cpu_prompt_speed

    info = engine.info
    mmproj = build.mmproj_path
    vision_bytes = Path(mmproj).stat().st_size if mmproj is not None else 0
    n_lookup = info.n_vocab * info.n_embd
    speed = cpu_prompt_speed(hardware, n_params=info.n_params, n_lookup_params=n_lookup,
                             vision_params=vision_bytes // 2,  # F16 projectors
                             n_threads=engine.n_threads)
    bandwidth = cpu_bandwidth(hardware) * BANDWIDTH_EFFICIENCY
    weights = info.size_bytes * (1 - n_lookup / max(info.n_params, 1))
    return Speeds(batch_s=weights / bandwidth, token_s=1 / speed.prompt_tps,
                  encode_s=vision_bytes / bandwidth,
                  encode_token_s=1 / speed.image_tps if speed.image_tps else 0.0,
                  source=PLANNED)


def start_session(engine: Engine, build: LocalBuild, options: SessionOptions) -> ChatSession:
    """A chat session on a loaded build, with the model's sampling and system prompt
    unless the options override them, and its image policy (see image_policy). The
    system prompt's KV cache is loaded from disk, or read in the background and saved
    there (chat.system_state; `session.system_state` says which and any problem)."""
    from localsmall.chat import system_state

    session = ChatSession(engine, system_prompt=system_prompt_for(build, options.system,
                                                                  disabled=options.no_system),
                          sampling=sampling_for(build, options.sampling),
                          model_label=build.label,
                          images=image_policy(engine, build, max_tokens=options.image_tokens))
    try:
        files: system_state.StateFiles | None = system_state.state_files(engine)
    except OSError:  # a model file that cannot be fingerprinted: read, keep nothing
        files = None
    session.start_system_prompt(files)
    return session
