"""`localsmall worker`'s banner: what it exposes and how to use it."""

from __future__ import annotations

import socket

from rich.markup import escape

from localsmall.engine.rpc import PROTOCOL
from localsmall.engine.rpc_worker import WorkerSpec
from localsmall.ui.console import err, out
from localsmall.units import gib


def show_worker(worker: WorkerSpec, *, host: str, port: int, loopback: bool) -> None:
    """What the worker serves (stdout) and, for a non-loopback address, the warning that
    llama.cpp's RPC is neither authenticated nor encrypted (stderr)."""
    version = ".".join(map(str, PROTOCOL))
    out().print(f"Worker listening on [bold]{escape(worker.endpoint)}[/] "
                f"(llama.cpp RPC protocol {version})")
    for dev in worker.devices:
        out().print(f"  {escape(dev.name)}  {escape(dev.description)}  "
                    f"{gib(dev.memory_free)} free of {gib(dev.memory_total)}")
    out().print("  tensor cache: " + (escape(str(worker.cache_dir)) if worker.cache_dir
                                      else "off"))
    if loopback:
        out().print(f"Use it from this machine:   localsmall chat --rpc {host}:{port}")
        out().print(f"From another machine, through an SSH tunnel:\n"
                    f"  ssh -N -L {port}:127.0.0.1:{port} {socket.gethostname()}\n"
                    f"  localsmall chat --rpc 127.0.0.1:{port}")
    else:
        shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
        out().print(f"Use it from another machine:   localsmall chat --rpc {shown}:{port}")
        err().print(
            f"[warn]warning: llama.cpp's RPC has no authentication and no encryption: "
            f"anyone who can reach {escape(host)}:{port} can use this machine's devices "
            f"and read or write their memory, and the traffic can be read on the way. Only "
            f"use it on a network you trust; better, bind to 127.0.0.1 (the default) and "
            f"reach it through an SSH tunnel: ssh -N -L {port}:127.0.0.1:{port} "
            f"{escape(socket.gethostname())}[/]")
    out().print("Ctrl-C stops the worker.", style="muted")
    out().file.flush()
