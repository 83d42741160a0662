"""A worker: llama.cpp's RPC server (`ggml_backend_rpc_start_server`) in this process,
exposing local devices to `localsmall ... --rpc HOST:PORT` on other machines."""

from __future__ import annotations

import ctypes
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localsmall.engine.rpc import WorkerError, library
from localsmall.errors import UsageError


@dataclass(frozen=True)
class WorkerDevice:
    """A local device a worker exposes."""

    name: str
    description: str
    kind: str
    memory_free: int
    memory_total: int


def choose_devices(names: Sequence[str] | None) -> list[Any]:
    """Local backend devices to expose: those named, else every GPU, else the CPU."""
    from localsmall.engine.devices import list_devices

    devices = list_devices()
    if names:
        by_name = {d.name.lower(): d for d in devices}
        missing = [n for n in names if n.lower() not in by_name]
        if missing:
            raise UsageError(f"no device {', '.join(missing)} here; this machine has "
                             f"{', '.join(d.name for d in devices)}")
        return [by_name[n.lower()] for n in names]
    gpus = [d for d in devices if d.kind in ("gpu", "igpu")]
    return gpus or [d for d in devices if d.kind == "cpu"][:1]


def check_port_free(host: str, port: int) -> None:
    """Fail early, in words, when the port cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise WorkerError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): "
                              "pick another --port or --host") from None


@dataclass(frozen=True)
class WorkerSpec:
    """A worker about to serve: where, which devices, which cache."""

    endpoint: str
    devices: tuple[WorkerDevice, ...]
    cache_dir: Path | None
    n_threads: int
    handles: tuple[int, ...] = field(default=(), repr=False)


@dataclass
class RunningWorker:
    """A worker serving in a background thread of this process (it serves until the
    process ends: llama.cpp's server has no stop call)."""

    spec: WorkerSpec
    thread: threading.Thread

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the server thread; True when it has ended (it failed to start)."""
        self.thread.join(timeout)
        return not self.thread.is_alive()


def worker_spec(*, host: str, port: int, devices: Sequence[str] | None = None,
                cache_dir: Path | None = None, n_threads: int | None = None) -> WorkerSpec:
    """Check the address is free and pick the devices to expose."""
    from localsmall.engine.devices import _ggml, default_threads

    check_port_free(host, port)
    chosen = choose_devices(devices)
    ggml = _ggml()
    handles = tuple(int(ggml.ggml_backend_dev_get(d.index)) for d in chosen)
    exposed = tuple(WorkerDevice(d.name, d.description, d.kind, d.memory_free, d.memory_total)
                    for d in chosen)
    ep = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return WorkerSpec(ep, exposed, cache_dir, n_threads or default_threads(), handles)


def serve(spec: WorkerSpec) -> RunningWorker:
    """Start llama.cpp's RPC server in a daemon thread
    (ggml_backend_rpc_start_server never returns while it serves)."""
    if spec.cache_dir is not None:
        spec.cache_dir.mkdir(parents=True, exist_ok=True)
    array = (ctypes.c_void_p * len(spec.handles))(*spec.handles)
    lib = library()
    args = (spec.endpoint.encode(), str(spec.cache_dir).encode() if spec.cache_dir else None,
            spec.n_threads, len(spec.handles), array)

    def run() -> None:
        lib.ggml_backend_rpc_start_server(*args)

    thread = threading.Thread(target=run, name="rpc-server", daemon=True)
    thread.start()
    return RunningWorker(spec, thread)
