"""Speed of one model x settings combination: load time, prompt processing and token
generation (llama-bench's method, see engine/timing.py), time to first token through
the real chat prompt path, image encoding, and peak memory."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from localsmall.bench import peak_memory as memory
from localsmall.bench.stats import Measurement, rates
from localsmall.bench.types import BenchRequest, SpeedResult
from localsmall.chat.conversation import Message
from localsmall.engine.types import ProgressCallback, SamplingSettings
from localsmall.errors import ContextFullError
from localsmall.images import PreparedImage, prepare_image, prepare_image_bytes
from localsmall.runtime.options import RunOptions, system_prompt_for
from localsmall.runtime.start import open_engine

if TYPE_CHECKING:
    from localsmall.engine.model import Engine
    from localsmall.engine.timing import DecodeTimer
    from localsmall.models.resolve import LocalBuild


class Steps(Protocol):
    """Progress reporting: what runs now, one unit of work done, more work found."""

    def stage(self, label: str) -> None: ...

    def advance(self) -> None: ...

    def grow(self, units: int) -> None: ...


# A typical first chat message: with the default system prompt, about 700 tokens.
CHAT_QUESTION = (
    "I'm planning a three-day trip to Lisbon in early spring with two friends who love "
    "food and old architecture but hate crowds. Could you suggest a rough plan for each "
    "day, a few neighbourhoods worth walking around in the evening, and one or two day "
    "trips that are easy by train? Please keep it practical and tell us roughly what it "
    "would cost per person.")
CHAT_CONTEXT = 2048          # context reserved for the chat prompt when --ctx is not given
SIDE_REPETITIONS = 3         # at most this many runs of the slow whole-prompt measurements
SYNTHETIC_IMAGE_SIDE = 512


def bench_context(request: BenchRequest) -> int:
    """Context the measurements need (llama-bench sizes it to the test, plus room for
    the chat prompt), rounded up to llama.cpp's 256-token granularity."""
    need = request.depth + max(request.n_prompt, request.n_gen)
    if request.chat_prompt:
        need = max(need, CHAT_CONTEXT)
    return max(256, -(-need // 256) * 256)


def side_repetitions(request: BenchRequest) -> int:
    """Runs of time-to-first-token and image encoding (each reads a whole prompt)."""
    return min(request.repetitions, SIDE_REPETITIONS)


def synthetic_image() -> PreparedImage:
    """A 512x512 photo-like test image (smooth gradients plus noise), made on the fly."""
    import numpy as np
    from PIL import Image

    side = SYNTHETIC_IMAGE_SIDE
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    noise = np.random.default_rng(0).normal(0, 12, (side, side, 3))
    rgb = np.stack([200 * x + 30, 160 * y + 40, 120 * (1 - x * y) + 60], axis=-1) + noise
    buffer = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(buffer, "PNG")
    return prepare_image_bytes(buffer.getvalue(), f"generated {side}x{side} image")


def _timed(engine: Engine, request: BenchRequest, steps: Steps, test: str, n: int,
           warm_up: Callable[[DecodeTimer], object],
           run: Callable[[DecodeTimer], float]) -> Measurement:
    """llama-bench's loop: a warm-up, then repetitions from an empty cache (prefilled
    to --depth, untimed), each timed around the decode calls alone."""
    from localsmall.engine.timing import DecodeTimer

    reps = request.repetitions
    with DecodeTimer(engine) as timer:
        steps.stage(f"{test}{n} warm-up")
        warm_up(timer)
        steps.advance()
        seconds = []
        for rep in range(reps):
            steps.stage(f"{test}{n} run {rep + 1}/{reps}")
            timer.clear()
            timer.prefill(request.depth)
            seconds.append(run(timer))
            steps.advance()
    return rates(n, seconds)


def _prompt_speed(engine: Engine, request: BenchRequest, steps: Steps) -> Measurement:
    n = request.n_prompt
    return _timed(engine, request, steps, "pp", n, lambda t: t.prompt(n), lambda t: t.prompt(n))


def _generation_speed(engine: Engine, request: BenchRequest, steps: Steps) -> Measurement:
    n = request.n_gen
    return _timed(engine, request, steps, "tg", n, lambda t: t.generate(1),
                  lambda t: t.generate(n))


def _first_token(engine: Engine, build: LocalBuild, reps: int,
                 steps: Steps) -> tuple[Measurement, int]:
    """Seconds from a new chat's first message to its first reply token: the chat
    template, tokenization, reading the prompt and sampling, from an empty cache."""
    from localsmall.chat.prompt import ChatTemplate, build_prompt

    template = ChatTemplate(engine.info.chat_template)
    messages = [Message.system(system_prompt_for(build, None)), Message.user(CHAT_QUESTION)]
    greedy = SamplingSettings(temperature=0, max_tokens=1)
    seconds, n_tokens = [], 0
    for rep in range(reps):
        steps.stage(f"time to first token {rep + 1}/{reps}")
        engine.reset()
        start = time.perf_counter()
        prompt = build_prompt(template, messages,
                              tokenize=lambda t, s: engine.tokenize(t, special=s),
                              bos=engine.bos_token, eos=engine.eos_token)
        prepared = time.perf_counter() - start
        result = engine.generate(prompt, greedy).run()
        seconds.append(prepared + result.stats.time_to_first_token_s)
        n_tokens = result.stats.prompt_tokens
        steps.advance()
    engine.reset()
    return Measurement.of(seconds), n_tokens


def _image_encode(engine: Engine, image: PreparedImage, reps: int,
                  steps: Steps) -> Measurement:
    """Seconds the projector takes to turn the image into embeddings."""
    projector = engine.projector
    assert projector is not None
    seconds = []
    for rep in range(reps):
        steps.stage(f"image encode {rep + 1}/{reps}")
        projector.forget()
        start = time.perf_counter()
        projector.encode(image)
        seconds.append(time.perf_counter() - start)
        steps.advance()
    projector.forget()
    return Measurement.of(seconds)


def display_name(build: LocalBuild) -> str:
    """How tables name a build: its quant, or its file name."""
    return build.quant or Path(build.model_path).name


def _flash_attn_name(value: bool | None) -> str:
    return {None: "auto", True: "on", False: "off"}[value]


def measure_speed(options: RunOptions, request: BenchRequest, steps: Steps,
                  on_progress: ProgressCallback | None = None) -> SpeedResult:
    """Load the build `options` name and measure it. `steps` advances once per unit of
    work counted by `speed_units`."""
    steps.stage("loading the model")
    if options.n_ctx is None:
        options = replace(options, n_ctx=bench_context(request))
    notes: list[str] = []
    gpu_before = memory.device_free_bytes()
    memory.reset_peak_rss()
    start = time.perf_counter()
    engine, build = open_engine(options, on_progress=on_progress)
    load_s = time.perf_counter() - start
    with engine:
        steps.advance()
        pp = _prompt_speed(engine, request, steps) if request.n_prompt else None
        tg = _generation_speed(engine, request, steps) if request.n_gen else None
        ttft, ttft_tokens = None, 0
        if request.chat_prompt:
            try:
                ttft, ttft_tokens = _first_token(engine, build, side_repetitions(request), steps)
            except ContextFullError:
                notes.append("time to first token skipped: the chat prompt does not fit "
                             "in --ctx")
        image_encode, image_tokens = None, 0
        if engine.projector is not None:
            image = prepare_image(request.image) if request.image else synthetic_image()
            image_encode = _image_encode(engine, image, side_repetitions(request), steps)
            image_tokens = image.n_tokens
        if engine.repack_note:
            notes.append(engine.repack_note)
        info, settings = engine.info, engine.settings
        result = SpeedResult(
            name=display_name(build), model=build.label, quant=build.quant or info.description,
            file=str(build.model_path), size_bytes=Path(build.model_path).stat().st_size,
            n_params=info.n_params, threads=engine.n_threads,
            gpu_layers=settings.n_gpu_layers, kv_type=settings.kv_type,
            flash_attn=_flash_attn_name(settings.flash_attn), n_batch=settings.n_batch,
            n_ctx=engine.n_ctx, depth=request.depth, n_prompt=request.n_prompt,
            n_gen=request.n_gen, pp=pp, tg=tg, load_s=load_s, ttft=ttft,
            ttft_tokens=ttft_tokens, image_encode=image_encode, image_tokens=image_tokens,
            peak_rss_bytes=memory.peak_rss_bytes(),
            device_memory_bytes=memory.device_used_bytes(gpu_before,
                                                         memory.device_free_bytes()),
            notes=tuple(notes))
    return result


def speed_units(request: BenchRequest, has_projector: bool) -> int:
    """Progress units `measure_speed` reports for one combination."""
    units = 1  # loading
    if request.n_prompt:
        units += 1 + request.repetitions
    if request.n_gen:
        units += 1 + request.repetitions
    if request.chat_prompt:
        units += side_repetitions(request)
    if has_projector:
        units += side_repetitions(request)
    return units
