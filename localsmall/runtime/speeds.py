"""What the planner knows about this machine's speed: the cached calibration and bench
results for it, and a calibration run when none is cached (and one may run).

A calibration measures the machine this process runs on, so it never runs for a
simulated machine (LOCALSMALL_HARDWARE): such a plan uses whatever the cache holds for
that machine's CPU, else the assumed-bandwidth estimates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from importlib import metadata, util
from pathlib import Path

from localsmall.errors import LocalsmallError, UsageError
from localsmall.models.catalog import Model
from localsmall.plan.hardware import Hardware, detect
from localsmall.plan.machine import PlanRequest, make_plan
from localsmall.plan.memory import shape_from_catalog
from localsmall.plan.rules import Plan
from localsmall.plan.speed import Calibration, CalibrationProgress, MachineKey, SpeedInputs
from localsmall.plan.speed_cache import load_calibration, load_measured, save_calibration

CALIBRATE_ENV = "LOCALSMALL_CALIBRATE"   # "0": never calibrate (use the cache or estimates)
CALIBRATION_VERSION = 6                  # bump when the calibration's method changes


def llama_build() -> str:
    """llama.cpp's build: llama-cpp-python's version and its compiled libraries (names,
    sizes, dates), read without loading them."""
    try:
        version = metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        version = "unknown"
    spec = util.find_spec("llama_cpp")
    libs: list[tuple[str, int, int]] = []
    if spec is not None and spec.origin:
        folder = Path(spec.origin).parent / "lib"
        with contextlib.suppress(OSError):
            libs = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime))
                          for p in folder.iterdir() if p.is_file() and not p.is_symlink())
    return f"llama-cpp-python {version} ({hashlib.sha256(repr(libs).encode()).hexdigest()[:12]})"


def machine_key(hardware: Hardware, n_threads: int | None = None) -> MachineKey:
    """The key speeds of this machine are cached under."""
    if n_threads is None:
        if hardware.source == "detected":
            from localsmall.engine.devices import default_threads

            n_threads = default_threads()
        else:
            n_threads = max(hardware.cpu.physical_cores, 1)
    placement = os.environ.get("LOCALSMALL_WEIGHT_REPACK", "auto").lower()
    return MachineKey(cpu=hardware.cpu.model, build=llama_build(), device="CPU",
                      threads=n_threads, placement=f"{placement}/v{CALIBRATION_VERSION}")


def calibration_allowed(hardware: Hardware) -> bool:
    """Whether a calibration may run: this very machine, and not turned off."""
    return hardware.source == "detected" and os.environ.get(CALIBRATE_ENV, "1") != "0"


def speed_inputs(model: Model, hardware: Hardware, *, calibrate: bool = True,
                 n_threads: int | None = None, depth: int | None = None,
                 min_speed: float | None = None,
                 on_progress: CalibrationProgress | None = None) -> SpeedInputs:
    """The cached speeds for this machine; with `calibrate`, a calibration runs first
    when none is cached (seconds; `on_progress` hears each step)."""
    key = machine_key(hardware, n_threads)
    calibration = load_calibration(key)
    if calibration is None and calibrate and calibration_allowed(hardware):
        try:
            calibration = run_calibration(model, key, on_progress=on_progress)
        except LocalsmallError:
            calibration = None  # e.g. no room for the temporary files: speeds estimated
    return SpeedInputs(key=key, calibration=calibration, measured=load_measured(key),
                       depth=depth, min_speed=min_speed)


def run_calibration(model: Model, key: MachineKey, *,
                    on_progress: CalibrationProgress | None = None) -> Calibration:
    """Calibrate at the model's real layer width and keep the result."""
    from localsmall.bench.calibrate import CalibrationRequest, calibrate
    from localsmall.bench.calibration_model import LayerShape

    request = CalibrationRequest(shape=LayerShape.of(shape_from_catalog(model)),
                                 n_threads=key.threads)
    calibration = calibrate(request, key=key, on_progress=on_progress)
    save_calibration(calibration)
    return calibration



def plan_with_speeds(model: Model, request: PlanRequest, *, calibrate: bool = True,
                     depth: int | None = None, min_speed: float | None = None,
                     on_progress: CalibrationProgress | None = None) -> Plan:
    """`localsmall plan`: the plan for this machine with its speeds (calibrating first
    when none are cached and `calibrate` allows)."""
    if depth is not None and depth < 0:
        raise UsageError("--depth must be 0 or more")
    hardware = detect()
    speeds = speed_inputs(model, hardware, calibrate=calibrate, depth=depth,
                          min_speed=min_speed, on_progress=on_progress)
    return make_plan(model, dataclasses.replace(request, speeds=speeds), hardware)
