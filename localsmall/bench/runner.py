"""`run_bench`: every target x every sweep value, measured one after another (one model
in memory at a time), then the quality pass, gathered into one report."""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import replace
from pathlib import Path

from localsmall.bench.quality import measure_quality, quality_units
from localsmall.bench.speed import measure_speed, speed_units
from localsmall.bench.system import snapshot
from localsmall.bench.types import (
    BenchCallback,
    BenchReport,
    BenchRequest,
    BenchStep,
    QualityRequest,
    QualityResult,
    SpeedResult,
)
from localsmall.engine.types import KV_TYPES, Progress
from localsmall.errors import CatalogError, ModelNotFoundError, UsageError
from localsmall.images import prepare_image
from localsmall.models.resolve import LocalBuild
from localsmall.runtime.options import RunOptions, find_build

# Builds tried as the quality reference beyond the ones being measured, best first;
# among those found the largest file wins (for quants of one model, more bytes means
# more precision).
REFERENCE_QUANTS = ("F32", "BF16", "F16", "Q8_0")

Target = tuple[RunOptions, LocalBuild]


class _Tracker:
    """Counts progress units and reports them (the Steps protocol of speed.py)."""

    def __init__(self, on_event: BenchCallback | None, total: int) -> None:
        self._on_event = on_event
        self.total = total
        self.done = 0
        self.prefix = ""
        self._label = ""

    def _emit(self) -> None:
        if self._on_event is not None:
            label = f"{self.prefix}: {self._label}" if self.prefix else self._label
            self._on_event(BenchStep(min(self.done, self.total), self.total, label))

    def stage(self, label: str) -> None:
        self._label = label
        self._emit()

    def advance(self) -> None:
        self.done += 1
        self._emit()

    def grow(self, units: int) -> None:
        self.total += units
        self._emit()

    def engine_progress(self, event: Progress) -> None:
        if self._on_event is not None:
            self._on_event(event)


def validate_request(request: BenchRequest) -> None:
    """Reject impossible values before anything is loaded."""
    checks = [
        (not request.targets, "nothing to benchmark: give a model"),
        (request.n_prompt < 0, "-p/--n-prompt must be 0 or more"),
        (request.n_gen < 0, "-n/--n-gen must be 0 or more"),
        (request.n_prompt == 0 and request.n_gen == 0 and request.quality is None,
         "-p and -n are both 0: nothing to measure"),
        (request.repetitions < 1, "-r/--repetitions must be at least 1"),
        (request.depth < 0, "--depth must be 0 or more"),
        (any(t is not None and t < 1 for t in request.threads),
         "--threads values must be at least 1"),
        (any(g is not None and g < -1 for g in request.gpu_layers),
         "--gpu-layers values must be -1 (all) or more"),
        (any(k not in KV_TYPES for k in request.kv_types),
         f"--kv-type values must be among {', '.join(KV_TYPES)}"),
    ]
    for failed, message in checks:
        if failed:
            raise UsageError(message)
    if request.quality is not None and request.quality.chunk < 16:
        raise UsageError("the quality chunk must be at least 16 tokens")
    need = request.depth + max(request.n_prompt, request.n_gen)
    for options in request.targets:
        if options.n_ctx is not None and options.n_ctx < need:
            raise UsageError(f"--ctx {options.n_ctx} is too small for --depth {request.depth} "
                             f"plus -p/-n: it needs at least {need} tokens")


def _combinations(request: BenchRequest, targets: list[Target]) -> list[Target]:
    """Every target x gpu layers x threads x KV type, one model's runs together."""
    combos = []
    for (options, build), layers, threads, kv in itertools.product(
            targets, request.gpu_layers, request.threads, request.kv_types):
        combos.append((replace(options, n_gpu_layers=layers, n_threads=threads, kv_type=kv),
                       build))
    return combos


def _describe(options: RunOptions, build: LocalBuild, request: BenchRequest) -> str:
    parts = [build.quant or Path(build.model_path).name]
    if len(request.threads) > 1:
        parts.append(f"{options.n_threads} threads")
    if len(request.gpu_layers) > 1:
        parts.append(f"{options.n_gpu_layers} GPU layers")
    if len(request.kv_types) > 1:
        parts.append(f"KV {options.kv_type}")
    return " · ".join(parts)


def _catalog_candidates(options: RunOptions) -> list[Target]:
    """Higher-precision local builds of the same catalog model, if any."""
    found = []
    for quant in REFERENCE_QUANTS:
        candidate = replace(options, quant=quant, ref=(options.ref or "").partition(":")[0]
                            or None)
        try:
            found.append((candidate, find_build(candidate)))
        except (ModelNotFoundError, CatalogError):
            continue
    return found


def pick_reference(quality: QualityRequest, targets: list[Target]) -> Target:
    """The explicit reference, or the highest-precision build available."""
    if quality.reference is not None:
        return quality.reference, find_build(quality.reference)
    candidates = list(targets)
    first_options, first_build = targets[0]
    if first_build.model is not None:
        model_id = first_build.model.id
        if all(b.model is not None and b.model.id == model_id for _, b in targets):
            candidates += _catalog_candidates(first_options)
    return max(candidates, key=lambda t: Path(t[1].model_path).stat().st_size)


def _check_image(request: BenchRequest, targets: list[Target]) -> None:
    if request.image is None:
        return
    prepare_image(request.image)  # a bad image fails now, not after an hour of measuring
    for _, build in targets:
        if build.mmproj_path is None:
            raise UsageError(f"--image needs a vision projector for {build.label}: pass "
                             "--mmproj PATH (or pull the model's projector)")


def remember_speeds(results: list[SpeedResult], created: str) -> None:
    """Keep the CPU-only results for `localsmall plan`, whose estimate for the same
    quant, machine, llama.cpp build and threads they replace (plan.speed)."""
    from localsmall.plan.hardware import detect
    from localsmall.plan.speed import MeasuredSpeed
    from localsmall.plan.speed_cache import save_measured
    from localsmall.runtime.speeds import machine_key

    kept = [r for r in results if r.gpu_layers == 0 and (r.tg or r.pp)]
    if not kept:
        return
    hardware = detect()
    save_measured([MeasuredSpeed(
        key=machine_key(hardware, r.threads), quant=r.name, file=r.file,
        size_bytes=r.size_bytes, tg_tps=r.tg.mean if r.tg else None,
        pp_tps=r.pp.mean if r.pp else None, depth=r.depth, n_ctx=r.n_ctx,
        kv_type=r.kv_type, gpu_layers=r.gpu_layers, created=created,
        n_prompt=min(r.n_prompt, r.n_batch) or 512) for r in kept])


def run_bench(request: BenchRequest, on_event: BenchCallback | None = None) -> BenchReport:
    """Measure every combination (and the quality, if asked) and return the report."""
    validate_request(request)
    created = dt.datetime.now(dt.UTC).astimezone().isoformat(timespec="seconds")
    targets = [(options, find_build(options)) for options in request.targets]
    _check_image(request, targets)
    reference = pick_reference(request.quality, targets) if request.quality else None
    # -p 0 -n 0 with --quality: quality only, no speed runs
    combos = _combinations(request, targets) if request.n_prompt or request.n_gen else []
    total = sum(speed_units(request, build.mmproj_path is not None) for _, build in combos)
    if reference is not None:
        total += quality_units(targets, reference[1])
    tracker = _Tracker(on_event, total)
    tracker.stage("looking at this machine")
    system = snapshot()
    speed = []
    for index, (options, build) in enumerate(combos):
        tracker.prefix = f"[{index + 1}/{len(combos)}] {_describe(options, build, request)}"
        speed.append(measure_speed(options, request, tracker, tracker.engine_progress))
    remember_speeds(speed, created)
    quality: list[QualityResult] = []
    text_name = ""
    if request.quality is not None and reference is not None:
        tracker.prefix = "quality"
        # quality runs once per build, with the first value of each sweep
        def settle(target: Target) -> Target:
            return (replace(target[0], n_threads=request.threads[0],
                            n_gpu_layers=request.gpu_layers[0], kv_type=request.kv_types[0]),
                    target[1])

        quality, text_name = measure_quality([settle(t) for t in targets], settle(reference),
                                             request.quality, tracker, tracker.engine_progress)
    return BenchReport(created=created, system=system, n_prompt=request.n_prompt,
                       n_gen=request.n_gen, repetitions=request.repetitions,
                       depth=request.depth, speed=tuple(speed), quality=tuple(quality),
                       quality_text=text_name)
