"""The speed cache: kernel calibrations and `localsmall bench` results of this machine,
kept in the user's cache directory (one small JSON file, written atomically).

Each entry carries its MachineKey (CPU, llama.cpp build, device, threads, weight
placement): an entry for another key is kept but never used for this one. A file that
is damaged or from another version is ignored (it only holds data that can be measured
again), never an error.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from localsmall import paths
from localsmall.fileio import atomic_write_bytes, read_regular_file
from localsmall.plan.speed import Calibration, KernelTiming, MachineKey, MeasuredSpeed

VERSION = 1
MAX_BYTES = 4 << 20            # far beyond what the entries below need
MAX_CALIBRATIONS = 16          # the latest per key, for this many keys
MAX_MEASURED = 64


def cache_file() -> Path:
    """Where calibrations and bench results are kept."""
    return paths.cache_dir() / "speed.json"


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_regular_file(path, MAX_BYTES))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != VERSION:
        return {}
    return data


def _key(data: Any) -> MachineKey:
    return MachineKey(cpu=str(data["cpu"]), build=str(data["build"]), device=str(data["device"]),
                      threads=int(data["threads"]), placement=str(data["placement"]))


def _calibration(data: Any) -> Calibration:
    kernels = {str(k): KernelTiming(float(v["gen_s"]), float(v["pp_s"]))
               for k, v in data["kernels"].items()}
    if not kernels or any(not (t.gen_s > 0 and t.pp_s > 0) for t in kernels.values()):
        raise ValueError("kernel timings must be positive")
    return Calibration(key=_key(data["key"]), kernels=kernels,
                       attn_gen_s=max(float(data["attn_gen_s"]), 0.0),
                       attn_pp_s=max(float(data["attn_pp_s"]), 0.0),
                       n_prompt=int(data["n_prompt"]), created=str(data["created"]),
                       seconds=float(data["seconds"]),
                       gen_overhead_s=max(float(data.get("gen_overhead_s", 0.0)), 0.0))


def _measured(data: Any) -> MeasuredSpeed:
    def rate(value: Any) -> float | None:
        return float(value) if value is not None and float(value) > 0 else None

    return MeasuredSpeed(key=_key(data["key"]), quant=str(data["quant"]), file=str(data["file"]),
                         size_bytes=int(data["size_bytes"]), tg_tps=rate(data["tg_tps"]),
                         pp_tps=rate(data["pp_tps"]), depth=int(data["depth"]),
                         n_ctx=int(data["n_ctx"]), kv_type=str(data["kv_type"]),
                         gpu_layers=int(data["gpu_layers"]), created=str(data["created"]),
                         n_prompt=int(data.get("n_prompt", 512)))


def _entries(data: dict[str, Any], name: str, parse: Any) -> list[Any]:
    found = []
    for item in data.get(name, []) if isinstance(data.get(name), list) else []:
        try:
            found.append(parse(item))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue  # one damaged entry does not spoil the others
    return found


def load_calibration(key: MachineKey, path: Path | None = None) -> Calibration | None:
    """The latest calibration for this key, or None."""
    found = [c for c in _entries(_read(path or cache_file()), "calibrations", _calibration)
             if c.key == key]
    return max(found, key=lambda c: c.created) if found else None


def load_measured(key: MachineKey, path: Path | None = None) -> tuple[MeasuredSpeed, ...]:
    """Every bench result kept for this key."""
    return tuple(m for m in _entries(_read(path or cache_file()), "measured", _measured)
                 if m.key == key)


def _write(path: Path, calibrations: list[Calibration], measured: list[MeasuredSpeed]) -> None:
    data = {"version": VERSION,
            "calibrations": [dataclasses.asdict(c) for c in calibrations[-MAX_CALIBRATIONS:]],
            "measured": [dataclasses.asdict(m) for m in measured[-MAX_MEASURED:]]}
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode("utf-8"))


def save_calibration(calibration: Calibration, path: Path | None = None) -> None:
    """Keep a calibration (replacing an older one for the same key)."""
    path = path or cache_file()
    data = _read(path)
    calibrations = [c for c in _entries(data, "calibrations", _calibration)
                    if c.key != calibration.key] + [calibration]
    _write(path, calibrations, _entries(data, "measured", _measured))


def save_measured(results: list[MeasuredSpeed], path: Path | None = None) -> None:
    """Keep bench results (replacing older ones for the same key, quant, file and
    settings)."""
    if not results:
        return
    path = path or cache_file()
    data = _read(path)

    def same(a: MeasuredSpeed, b: MeasuredSpeed) -> bool:
        return (a.key, a.quant.lower(), a.file, a.kv_type, a.gpu_layers, a.depth) == \
               (b.key, b.quant.lower(), b.file, b.kv_type, b.gpu_layers, b.depth)

    kept = [m for m in _entries(data, "measured", _measured)
            if not any(same(m, r) for r in results)]
    _write(path, _entries(data, "calibrations", _calibration), kept + list(results))
