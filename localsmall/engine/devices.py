"""What the installed llama.cpp can run on: ggml's backend devices, asked through ctypes.

llama-cpp-python ships libggml but binds only part of its device API, so the few calls
needed are declared here: every device with its type and memory, the CPU's extra
buffer types (weight repacking, AMX) and the features the CPU backend was built with.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from functools import cache
from typing import Any

from localsmall.engine import native

_DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


@dataclass(frozen=True)
class BackendDevice:
    """One ggml backend device."""

    index: int
    name: str
    description: str
    kind: str              # cpu, gpu, igpu, accel
    backend: str           # the backend registry's name: CPU, CUDA, Metal, Vulkan, ...
    memory_free: int
    memory_total: int
    extra_buffer_types: tuple[str, ...]
    features: tuple[tuple[str, str], ...]


class _Feature(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


@cache
def _ggml() -> Any:
    native.llama()  # loads and initialises the backends first
    lib = native.load_ggml("ggml")  # the copy libllama uses: same device registry
    vp, size_t, cstr = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
    signatures: dict[str, tuple[list[Any], Any]] = {
        "ggml_backend_dev_count": ([], size_t),
        "ggml_backend_dev_get": ([size_t], vp),
        "ggml_backend_dev_name": ([vp], cstr),
        "ggml_backend_dev_description": ([vp], cstr),
        "ggml_backend_dev_type": ([vp], ctypes.c_int),
        "ggml_backend_dev_memory": ([vp, ctypes.POINTER(size_t), ctypes.POINTER(size_t)], None),
        "ggml_backend_dev_backend_reg": ([vp], vp),
        "ggml_backend_reg_name": ([vp], cstr),
        "ggml_backend_reg_count": ([], size_t),
        "ggml_backend_reg_get": ([size_t], vp),
        "ggml_backend_reg_get_proc_address": ([vp, cstr], vp),
        "ggml_backend_buft_name": ([vp], cstr),
    }
    for name, (args, result) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


def _proc(lib: Any, reg: int, name: str, prototype: Any) -> Any:
    address = lib.ggml_backend_reg_get_proc_address(reg, name.encode())
    return prototype(address) if address else None


def _extra_bufts(lib: Any, reg: int, dev: int) -> tuple[str, ...]:
    fn = _proc(lib, reg, "ggml_backend_dev_get_extra_bufts",
               ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p))
    if fn is None:
        return ()
    array, names, i = fn(dev), [], 0
    while array and array[i]:
        names.append(lib.ggml_backend_buft_name(array[i]).decode())
        i += 1
    return tuple(names)


def _features(lib: Any, reg: int) -> tuple[tuple[str, str], ...]:
    fn = _proc(lib, reg, "ggml_backend_get_features",
               ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), ctypes.c_void_p))
    if fn is None:
        return ()
    array, found, i = fn(reg), [], 0
    while array and array[i].name:
        found.append((array[i].name.decode(), (array[i].value or b"").decode()))
        i += 1
    return tuple(found)


def list_devices() -> list[BackendDevice]:
    """Every device the installed llama.cpp build can use, with its memory now."""
    lib = _ggml()
    devices = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        reg = lib.ggml_backend_dev_backend_reg(dev)
        devices.append(BackendDevice(
            index=i,
            name=lib.ggml_backend_dev_name(dev).decode(),
            description=(lib.ggml_backend_dev_description(dev) or b"").decode(),
            kind=_DEVICE_TYPES.get(lib.ggml_backend_dev_type(dev), "unknown"),
            backend=lib.ggml_backend_reg_name(reg).decode(),
            memory_free=free.value,
            memory_total=total.value,
            extra_buffer_types=_extra_bufts(lib, reg, dev),
            features=_features(lib, reg),
        ))
    return devices


def supports_gpu_offload() -> bool:
    """Whether this llama.cpp build was compiled with a GPU backend. (llama.cpp's own
    llama_supports_gpu_offload also says yes for the RPC backend alone.)"""
    lib = _ggml()
    return any(lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)).decode().upper()
               not in _NOT_GPU_BACKENDS for i in range(lib.ggml_backend_reg_count()))


_NOT_GPU_BACKENDS = {"CPU", "RPC", "BLAS"}


def system_info() -> str:
    """llama.cpp's own one-line summary of the CPU features it was built for."""
    return native.llama().llama_print_system_info().decode(errors="replace").strip()


@dataclass(frozen=True)
class LlamaCppBuild:
    """Which llama.cpp this is: the Python binding's version and ggml's own version and
    commit (the llama.cpp commit the binding vendors)."""

    binding_version: str
    ggml_version: str
    ggml_commit: str


def _ggml_base_string(name: str) -> str:
    lib_name = {"nt": "ggml-base.dll"}.get(
        os.name, "libggml-base.dylib" if sys.platform == "darwin" else "libggml-base.so")
    try:
        lib = ctypes.CDLL(os.path.join(native.lib_dir(), lib_name))
        fn = getattr(lib, name)
    except (OSError, AttributeError):  # older builds lack ggml_version/ggml_commit
        return "unknown"
    fn.argtypes, fn.restype = [], ctypes.c_char_p
    return (fn() or b"unknown").decode(errors="replace")


@cache
def build_info() -> LlamaCppBuild:
    """The llama.cpp build localsmall runs on."""
    binding = native.llama()
    return LlamaCppBuild(binding_version=str(getattr(binding, "__version__", "unknown")),
                     ggml_version=_ggml_base_string("ggml_version"),
                     ggml_commit=_ggml_base_string("ggml_commit"))


def cpu_has_amx_repack() -> bool:
    """True when quantized weights would go to the AMX buffer type, whose batched matrix
    multiply crashes (llama.cpp issue #20824). See Engine's weight placement."""
    return any(
        "AMX" in buft.upper()
        for dev in list_devices() if dev.kind == "cpu"
        for buft in dev.extra_buffer_types
    )


def default_threads() -> int:
    """Physical cores available to this process (llama.cpp gains nothing from SMT); see
    localsmall.engine.threads for why."""
    from localsmall.engine.threads import detect_threads

    return detect_threads().generation
