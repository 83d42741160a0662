"""The machine a benchmark ran on, recorded in every result file so numbers from
different computers can be compared.

Kept in one small module on purpose: when localsmall grows a hardware survey shared by
`plan` and `doctor`, `snapshot()` becomes a thin adapter over it.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass

from localsmall import __version__
from localsmall.units import gib_fixed

GPU_KINDS = ("gpu", "igpu")


@dataclass(frozen=True)
class SystemSnapshot:
    """CPU, memory, accelerators and software versions."""

    os: str
    cpu_model: str
    cpu_features: str          # what llama.cpp's CPU backend was built to use
    physical_cores: int        # available to this process
    logical_cpus: int
    ram_bytes: int
    gpus: tuple[str, ...]      # "name: description (N GiB)"
    backends: tuple[str, ...]  # ggml backends present: CPU, CUDA, Metal, ...
    llama_cpp: str             # binding version, ggml version and commit
    localsmall_version: str
    python: str


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "Hardware", "Processor")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, check=True,
                                  timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def _ram_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def _feature_list(features: tuple[tuple[str, str], ...]) -> str:
    return " ".join(name if value == "1" else f"{name}={value}" for name, value in features)


def snapshot() -> SystemSnapshot:
    """Describe this machine and the llama.cpp build (loads llama.cpp)."""
    from localsmall.engine.devices import build_info, default_threads, list_devices

    devices = list_devices()
    cpu = next((d for d in devices if d.kind == "cpu"), None)
    gpus = tuple(f"{d.name}: {d.description} ({gib_fixed(d.memory_total)})"
                 for d in devices if d.kind in GPU_KINDS)
    backends = tuple(dict.fromkeys(d.backend for d in devices))
    build = build_info()
    return SystemSnapshot(
        os=platform.platform(),
        cpu_model=_cpu_model(),
        cpu_features=_feature_list(cpu.features) if cpu else "",
        physical_cores=default_threads(),
        logical_cpus=os.cpu_count() or 1,
        ram_bytes=_ram_bytes(),
        gpus=gpus,
        backends=backends,
        llama_cpp=f"llama-cpp-python {build.binding_version}, ggml {build.ggml_version} "
                  f"({build.ggml_commit})",
        localsmall_version=__version__,
        python=platform.python_version(),
    )
