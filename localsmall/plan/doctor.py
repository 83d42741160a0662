"""`localsmall doctor`'s findings: the machine, the software and where files go."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localsmall import __version__, paths
from localsmall.hub import cache as hubcache
from localsmall.plan.hardware import Hardware, detect, to_json
from localsmall.units import GIB, gib_fixed

if TYPE_CHECKING:
    from localsmall.engine.devices import LlamaCppBuild
    from localsmall.engine.rpc import RemoteDevice
    from localsmall.engine.threads import ThreadChoice

LOW_DISK = 30 * GIB  # below this, a pull of the larger quants will not fit
_PACKAGES = ("llama-cpp-python", "huggingface-hub", "gguf", "typer", "rich")


@dataclass(frozen=True)
class DoctorReport:
    hardware: Hardware
    versions: dict[str, str]
    llama_system_info: str
    cache_dir: Path
    cache_free: int
    data_dir: Path
    endpoint: str
    offline: bool
    token_set: bool
    warnings: tuple[str, ...]
    rpc_available: bool = False                 # llama.cpp built with its RPC backend
    workers: tuple[RemoteDevice, ...] = ()      # devices of the workers asked about
    threads: ThreadChoice | None = None         # the default thread counts, and why
    weights: str = ""                           # where quantized weights go on this CPU

    def to_json(self) -> dict[str, Any]:
        """JSON-ready findings (`localsmall doctor --json`)."""
        return {"hardware": to_json(self.hardware), "versions": self.versions,
                "llama_system_info": self.llama_system_info,
                "cache_dir": str(self.cache_dir), "cache_free": self.cache_free,
                "data_dir": str(self.data_dir), "endpoint": self.endpoint,
                "offline": self.offline, "token_set": self.token_set,
                "warnings": list(self.warnings),
                "threads": self.threads.to_json() if self.threads else None,
                "weight_placement": self.weights,
                "rpc": {"available": self.rpc_available,
                        "protocol": _rpc_protocol(),
                        "workers": [{"endpoint": d.endpoint, "device": d.index,
                                     "name": d.name, "memory_free": d.memory_free,
                                     "memory_total": d.memory_total}
                                    for d in self.workers]}}


def _rpc_protocol() -> str:
    from localsmall.engine.rpc import PROTOCOL  # plain data: llama.cpp is not loaded

    return ".".join(map(str, PROTOCOL))


def _versions() -> dict[str, str]:
    versions = {"localsmall": __version__, "python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _ggml_version(build: LlamaCppBuild) -> str:
    version = build.ggml_version or "unknown"
    return f"{version} ({build.ggml_commit})" if build.ggml_commit else version


def _warnings(hardware: Hardware, cache_free: int) -> list[str]:
    found = []
    for gpu in hardware.unusable_gpus:
        found.append(f"{gpu.name} is present, but this llama-cpp-python was built for the "
                     f"CPU only, so it is not used; to use it, rebuild: {gpu.rebuild}")
    if cache_free < LOW_DISK:
        found.append(f"only {gib_fixed(cache_free)} free for downloads in "
                     f"{hubcache.cache_dir()}; the larger builds need up to 25 GiB")
    if hardware.ram_available < 8 * GIB and not hardware.usable_gpus:
        found.append("less than 8 GiB of RAM is available: close other programs before "
                     "running the model")
    return found


def thread_choice(hardware: Hardware) -> ThreadChoice:
    """The engine's default threads on this machine, with the load now; on a described
    machine (LOCALSMALL_HARDWARE), for its CPU, with its load unknown."""
    from localsmall.engine.threads import choose_threads, detect_threads, wait_policy

    if hardware.source == "detected":
        return detect_threads(with_load=True)
    return choose_threads(physical_cores=hardware.cpu.physical_cores,
                          logical_cpus=hardware.cpu.logical_cores, policy=wait_policy())


def weight_placement(hardware: Hardware) -> str:
    """Where the engine puts quantized weights on this CPU (a described machine: AMX
    when its features list AMX_INT8)."""
    from localsmall.engine.devices import cpu_has_amx_repack
    from localsmall.engine.loading import placement_summary

    amx = (cpu_has_amx_repack() if hardware.source == "detected"
           else "AMX_INT8" in hardware.cpu.features)
    return placement_summary(amx=amx)


def diagnose(*, rpc: Sequence[str] = ()) -> DoctorReport:
    """Look at everything `doctor` reports (loads llama.cpp to ask it about devices),
    and the devices of the RPC workers named (HOST:PORT)."""
    from localsmall.engine import rpc as rpc_backend
    from localsmall.engine.devices import build_info, system_info

    hardware = detect()
    cache = hubcache.cache_dir()
    free = hubcache.free_disk(cache)
    threads = thread_choice(hardware)
    return DoctorReport(
        hardware=hardware, versions=_versions() | {"ggml": _ggml_version(build_info())},
        llama_system_info=system_info(),
        cache_dir=cache, cache_free=free, data_dir=paths.data_dir(),
        endpoint=hubcache.endpoint(), offline=hubcache.offline(),
        token_set=bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")),
        warnings=tuple(_warnings(hardware, free) + ([threads.advice] if threads.advice else [])),
        rpc_available=rpc_backend.available(),
        workers=tuple(rpc_backend.connect(rpc)) if rpc else (), threads=threads,
        weights=weight_placement(hardware))
