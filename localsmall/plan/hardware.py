"""What this machine offers llama.cpp: a frozen snapshot the planner works from.

The GPUs are the ones the *installed* llama.cpp can use (its ggml backend devices), so a
CUDA card next to a CPU-only build of llama-cpp-python is reported as unusable, with the
command that rebuilds it. A snapshot is plain data: tests and "what if" questions load
one from JSON (LOCALSMALL_HARDWARE=machine.json; `localsmall doctor --json` writes one).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localsmall.errors import LocalsmallError

HARDWARE_ENV = "LOCALSMALL_HARDWARE"
LLAMA_CPP_VERSION = "0.3.36"
# llama-cpp-python compiles llama.cpp when installed; these flags pick the GPU backend.
REBUILD_FLAGS = {"nvidia": "-DGGML_CUDA=on", "amd": "-DGGML_HIP=on", "apple": "-DGGML_METAL=on"}
_PCI_VENDORS = {"0x10de": "nvidia", "0x1002": "amd"}
DRM_ROOT = Path("/sys/class/drm")        # display devices (vendor ids, AMD VRAM)
NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")


@dataclass(frozen=True)
class GpuDevice:
    """A GPU llama.cpp can offload to."""

    name: str                # ggml's device name: CUDA0, Metal, Vulkan0, ...
    description: str         # the card: "NVIDIA GeForce RTX 4090", "Apple M2 Max"
    backend: str             # CUDA, Metal, Vulkan, ROCm, SYCL, ...
    memory_total: int        # bytes llama.cpp may use (Metal: the recommended working set)
    memory_free: int
    unified: bool = False    # shares system RAM (Apple silicon, integrated GPUs)


@dataclass(frozen=True)
class CpuInfo:
    """The CPU llama.cpp runs on."""

    model: str
    physical_cores: int
    logical_cores: int
    features: tuple[str, ...] = ()   # what the CPU backend was built to use (AVX2, NEON, ...)


@dataclass(frozen=True)
class UnusableGpu:
    """A GPU that is present but that this llama.cpp build cannot use."""

    vendor: str              # nvidia, amd
    name: str
    memory_total: int        # 0 when unknown
    rebuild: str             # the command that installs a llama.cpp build that can use it


@dataclass(frozen=True)
class Hardware:
    """Everything the planner needs to know about the machine, at one moment."""

    gpus: tuple[GpuDevice, ...]
    gpu_offload: bool        # this llama.cpp build has a GPU backend
    ram_total: int
    ram_available: int
    cpu: CpuInfo
    unusable_gpus: tuple[UnusableGpu, ...] = ()
    system: str = ""         # Linux, Darwin, Windows
    machine: str = ""        # x86_64, arm64
    source: str = "detected"  # or the JSON file it came from

    @property
    def usable_gpus(self) -> tuple[GpuDevice, ...]:
        """GPUs llama.cpp will actually offload to."""
        return self.gpus if self.gpu_offload else ()

    @property
    def unified_memory(self) -> bool:
        """GPU memory and RAM are one pool (Apple silicon)."""
        return any(g.unified for g in self.usable_gpus)


# --- detection ---------------------------------------------------------------------------


def detect() -> Hardware:
    """The machine as llama.cpp sees it now (or the snapshot LOCALSMALL_HARDWARE names)."""
    override = os.environ.get(HARDWARE_ENV)
    if override:
        return load_json(Path(override))
    from localsmall.engine.devices import list_devices, supports_gpu_offload

    devices = list_devices()
    gpu_offload = supports_gpu_offload()
    gpus = tuple(
        GpuDevice(name=d.name, description=d.description or d.name, backend=d.backend,
                  memory_total=d.memory_total, memory_free=d.memory_free,
                  unified=d.kind == "igpu" or d.backend.lower() == "metal")
        for d in devices if d.kind in ("gpu", "igpu"))
    cpu_features = tuple(name for d in devices if d.kind == "cpu"
                         for name, value in d.features if value not in ("0", ""))
    total, available = system_memory()
    hardware = Hardware(
        gpus=gpus, gpu_offload=gpu_offload, ram_total=total, ram_available=available,
        cpu=cpu_info(cpu_features), system=platform.system(), machine=platform.machine())
    if not (gpu_offload and gpus):
        hardware = dataclasses.replace(hardware, unusable_gpus=unusable_gpus())
    return hardware


def system_memory() -> tuple[int, int]:
    """(total, available) bytes of RAM."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        values = {}
        for line in meminfo.read_text(encoding="ascii", errors="ignore").splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[key] = int(parts[0]) * 1024
        total = values.get("MemTotal", 0)
        return total, values.get("MemAvailable", values.get("MemFree", total))
    if platform.system() == "Darwin":
        return _darwin_memory()
    return _windows_memory()


def _run(*command: str) -> str:
    """A command's stdout, or "" when it is missing or fails (detection must not fail)."""
    if shutil.which(command[0]) is None:
        return ""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout if done.returncode == 0 else ""


def _darwin_memory() -> tuple[int, int]:
    total = int(_run("sysctl", "-n", "hw.memsize").strip() or 0)
    stats = _run("vm_stat")
    page = int(m.group(1)) if (m := re.search(r"page size of (\d+)", stats)) else 16384
    pages = {k.strip(): int(v.strip(" .")) for k, _, v in
             (line.partition(":") for line in stats.splitlines()[1:]) if v.strip(" .").isdigit()}
    # Free, inactive and purgeable pages can be handed to a new allocation at once.
    reclaimable = sum(pages.get(k, 0) for k in ("Pages free", "Pages inactive",
                                                "Pages speculative", "Pages purgeable"))
    return total, min(total, reclaimable * page) if reclaimable else total


def _windows_memory() -> tuple[int, int]:
    import ctypes

    class _Status(ctypes.Structure):
        _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong),
                    ("total", ctypes.c_ulonglong), ("available", ctypes.c_ulonglong),
                    ("page_total", ctypes.c_ulonglong), ("page_free", ctypes.c_ulonglong),
                    ("virtual_total", ctypes.c_ulonglong), ("virtual_free", ctypes.c_ulonglong),
                    ("extended", ctypes.c_ulonglong)]

    status = _Status()
    status.length = ctypes.sizeof(_Status)
    try:
        ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return 0, 0
    return int(status.total), int(status.available)


def cpu_info(features: tuple[str, ...] = ()) -> CpuInfo:
    """The CPU's name and core counts."""
    logical = os.cpu_count() or 1
    model, physical = platform.processor() or platform.machine(), 0
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cores: set[tuple[str, str]] = set()
        package = ""
        for line in cpuinfo.read_text(encoding="ascii", errors="ignore").splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and value:
                model = value
            elif key == "physical id":
                package = value
            elif key == "core id":
                cores.add((package, value))
        physical = len(cores)
    elif platform.system() == "Darwin":
        model = _run("sysctl", "-n", "machdep.cpu.brand_string").strip() or model
        physical = int(_run("sysctl", "-n", "hw.physicalcpu").strip() or 0)
    return CpuInfo(model=model, physical_cores=physical or logical, logical_cores=logical,
                   features=features)


def rebuild_command(vendor: str) -> str:
    """The pip command that installs llama-cpp-python with this vendor's GPU backend."""
    return (f'CMAKE_ARGS="{REBUILD_FLAGS[vendor]}" pip install --force-reinstall --no-cache-dir '
            f"llama-cpp-python=={LLAMA_CPP_VERSION}")


def unusable_gpus() -> tuple[UnusableGpu, ...]:
    """NVIDIA and AMD GPUs the system has (for when llama.cpp was built without them)."""
    found = list(_nvidia_smi_gpus())
    if not found:
        found = list(_proc_nvidia_gpus())
    vendors_found = {g.vendor for g in found}
    for vendor, name, memory in _drm_gpus():
        if vendor not in vendors_found:
            found.append(UnusableGpu(vendor, name, memory, rebuild_command(vendor)))
    return tuple(found)


def _nvidia_smi_gpus() -> list[UnusableGpu]:
    text = _run("nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits")
    gpus = []
    for line in text.strip().splitlines():
        name, _, mib = line.rpartition(",")
        if name:
            memory = int(mib.strip()) * 1024 * 1024 if mib.strip().isdigit() else 0
            gpus.append(UnusableGpu("nvidia", name.strip(), memory, rebuild_command("nvidia")))
    return gpus


def _proc_nvidia_gpus() -> list[UnusableGpu]:
    gpus = []
    for info in sorted(NVIDIA_PROC.glob("*/information")):
        text = info.read_text(encoding="utf-8", errors="ignore")
        name = m.group(1).strip() if (m := re.search(r"Model:\s*(.+)", text)) else "NVIDIA GPU"
        gpus.append(UnusableGpu("nvidia", name, 0, rebuild_command("nvidia")))
    return gpus


def _drm_gpus() -> list[tuple[str, str, int]]:
    """(vendor, name, VRAM bytes) of display devices in sysfs, NVIDIA and AMD only."""
    found = []
    for card in sorted(DRM_ROOT.glob("card[0-9]*")):
        vendor_file = card / "device" / "vendor"
        if "-" in card.name or not vendor_file.is_file():
            continue  # card0-HDMI-A-1 and friends are connectors of the same card
        vendor = _PCI_VENDORS.get(vendor_file.read_text().strip().lower())
        if vendor is None:
            continue
        vram_file = card / "device" / "mem_info_vram_total"
        vram = int(vram_file.read_text().strip()) if vram_file.is_file() else 0
        name = "AMD GPU" if vendor == "amd" else "NVIDIA GPU"
        if vendor == "amd" and (names := _run("rocm-smi", "--showproductname")):
            name = m.group(1).strip() if (m := re.search(r"Card series:\s*(.+)", names)) else name
        found.append((vendor, name, vram))
    return found


# --- snapshots as JSON --------------------------------------------------------------------


def to_json(hardware: Hardware) -> dict[str, Any]:
    """A JSON-ready dict (the inverse of `from_json`)."""
    return dataclasses.asdict(hardware) | {"unified_memory": hardware.unified_memory}


def from_json(data: dict[str, Any], source: str = "json") -> Hardware:
    """A snapshot from `to_json`'s dict (unknown keys are ignored)."""
    try:
        cpu = data["cpu"]
        return Hardware(
            gpus=tuple(GpuDevice(**_known(GpuDevice, g)) for g in data.get("gpus", [])),
            gpu_offload=bool(data.get("gpu_offload", bool(data.get("gpus")))),
            ram_total=int(data["ram_total"]),
            ram_available=int(data.get("ram_available", data["ram_total"])),
            cpu=CpuInfo(**(_known(CpuInfo, cpu) | {"features": tuple(cpu.get("features", ()))})),
            unusable_gpus=tuple(UnusableGpu(**_known(UnusableGpu, g))
                                for g in data.get("unusable_gpus", [])),
            system=str(data.get("system", "")), machine=str(data.get("machine", "")),
            source=source)
    except (KeyError, TypeError, ValueError) as exc:
        raise LocalsmallError(f"{source} is not a hardware description ({exc}); write one "
                              "with `localsmall doctor --json`") from None


def _known(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def load_json(path: Path) -> Hardware:
    """A snapshot from a JSON file (`localsmall doctor --json` output works)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LocalsmallError(f"cannot read the hardware description {path}: {exc}") from None
    if isinstance(data, dict) and "hardware" in data:
        data = data["hardware"]  # a whole `doctor --json` report
    if not isinstance(data, dict):
        raise LocalsmallError(f"{path} is not a hardware description")
    return from_json(data, source=str(path))
