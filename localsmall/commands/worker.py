"""`localsmall worker`: lend this machine's devices to another localsmall over the
network (llama.cpp's RPC server, in this process)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from localsmall.commands.options import ThreadsOpt, VerboseOpt


def worker(
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on. The default keeps the worker to this machine "
        "(reach it through an SSH tunnel); anything else is open to the network, "
        "unauthenticated.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="TCP port.")] = 50052,
    device: Annotated[list[str] | None, typer.Option(
        "--device", "-d", help="Device to expose, by llama.cpp's name (CPU, CUDA0, Metal, "
        "...; repeatable). Default: every GPU, else the CPU.")] = None,
    cache: Annotated[Path | None, typer.Option(
        "--cache", help="Tensor cache folder: weights received once are kept here so a "
        "restarted client does not send them again (default: localsmall's cache).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="No tensor cache.")] = False,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve this machine's devices to `localsmall chat/run/bench --rpc HOST:PORT`."""
    # A worker waits most of the time: its OpenMP threads must sleep, not spin, or they
    # steal the cores of the client and other workers on the same machine (measured: 35x
    # slower generation over two loopback workers). Read when llama.cpp loads, below.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from localsmall import paths
    from localsmall.engine import native, rpc, rpc_worker
    from localsmall.errors import UsageError
    from localsmall.ui.console import notice
    from localsmall.ui.worker_view import show_worker

    if not 0 < port < 65536:
        raise UsageError("--port must be between 1 and 65535")
    if not rpc.available():
        raise rpc.WorkerError("this llama.cpp build has no RPC backend; reinstall with "
                              "`make install` (RPC is on by default)")
    native.set_verbose(verbose)
    cache_dir = None if no_cache else (cache or paths.cache_dir() / "rpc")
    spec = rpc_worker.worker_spec(host=host, port=port, devices=device, cache_dir=cache_dir,
                           n_threads=threads)
    show_worker(spec, host=host, port=port, loopback=rpc.is_loopback(host))
    # llama.cpp's server prints its own banner and each connection on stdout: keep
    # stdout for ours, send its lines to stderr with --verbose, else drop them.
    target = 2 if verbose else os.open(os.devnull, os.O_WRONLY)
    os.dup2(target, 1)
    running = rpc_worker.serve(spec)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while not running.wait(0.5):
            pass
    except KeyboardInterrupt:
        notice("worker stopped")
        sys.stderr.flush()
        # The server thread is blocked inside llama.cpp (accept or a client's request),
        # which has no stop call: end the process without running its destructors.
        os._exit(0)
    raise rpc.WorkerError(f"llama.cpp's RPC server on {spec.endpoint} stopped on its own; "
                          "run with --verbose to see why")
