"""Running the API under uvicorn until Ctrl-C or SIGTERM.

The socket is bound before anything is announced, so a port in use is a clean error.
On a signal the scheduler stops first (queued and running requests end with an error
event), then uvicorn closes the connections; nothing waits on a generation.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from localsmall.errors import UsageError
from localsmall.server.app import ServerConfig, ServerState, create_app
from localsmall.server.prompting import PromptBuilder
from localsmall.server.scheduler import RequestLog, Scheduler

if TYPE_CHECKING:
    from localsmall.engine.model import Engine

GRACEFUL_SHUTDOWN_S = 3


@dataclass(frozen=True)
class Listening:
    """Where the server answers, announced once the socket is bound."""

    url: str          # the base URL for OpenAI clients (ends in /v1)
    model_id: str
    slots: int
    max_queue: int


def is_loopback(host: str) -> bool:
    """Whether `host` keeps the server on this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost, or "" (every interface)


def exposure_warning(host: str, *, api_key: bool) -> str | None:
    """What to tell the user when `host` lets other machines reach the server (None on
    loopback): without an API key anyone on the network can use the model."""
    if is_loopback(host):
        return None
    where = f"--host {host or repr(host)} lets other machines on the network reach this server"
    if not api_key:
        return (f"{where} without an API key: anyone on the network can use it. Pass "
                "--api-key (or set LOCALSMALL_API_KEY), or keep the default --host 127.0.0.1.")
    return (f"{where}; it requires the API key, but the traffic (key included) is plain "
            "HTTP: use it only on a network you trust.")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket, or a UsageError saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick "
                         "another --port or --host") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(engine: Engine, *, config: ServerConfig, host: str, port: int,
          system_prompt: str, max_queue: int,
          on_listening: Callable[[Listening], None] | None = None,
          on_log: Callable[[RequestLog], None] | None = None) -> None:
    """Serve the OpenAI API over a loaded engine until interrupted."""
    import uvicorn

    sock = bind(host, port)
    state = ServerState(config)
    state.builder = PromptBuilder(engine, system_prompt=system_prompt)
    state.scheduler = scheduler = Scheduler(engine, replies=state.builder.replies,
                                            max_queue=max_queue, on_log=on_log)
    uv_config = uvicorn.Config(create_app(state), log_level="error", access_log=False,
                               lifespan="off", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                               timeout_keep_alive=5)
    server = _Server(uv_config, scheduler)
    scheduler.start()
    try:
        if on_listening is not None:
            bound_host, bound_port = sock.getsockname()[:2]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            on_listening(Listening(f"http://{shown}:{bound_port}/v1", config.model_ids[0],
                                   len(scheduler.pool), max_queue))
        server.run(sockets=[sock])
    finally:
        scheduler.stop()
        sock.close()


class _Server:
    """uvicorn.Server whose signal handling stops the scheduler before the sockets."""

    def __new__(cls, config: Any, scheduler: Scheduler) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                scheduler.begin_stop()
                super().handle_exit(sig, frame)
                # uvicorn raises the signal again once it has shut down, which would
                # kill the process (SIGTERM) or surface as KeyboardInterrupt (SIGINT):
                # the stop is clean, so the command just returns.
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list):
                    captured.clear()

        return Server(config)
