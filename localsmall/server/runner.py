"""Running the API under uvicorn until Ctrl-C, SIGTERM or a stop event.

The socket is bound before anything is announced, so a port in use is a clean error.
The server listens at once and the model loads on another thread: meanwhile /health
answers 503 {"status": "loading"} and chat requests 503 (as llama.cpp's server does),
and a load that fails ends serving with its error. Once loaded, the default system
prompt is restored into a slot or read in the background (server.warmup): requests are
accepted from then on; those that start with it wait for that read, others cancel it. On
a signal the scheduler stops first (queued and running requests end with an error
event), then uvicorn closes the connections; nothing waits on a generation.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from localsmall import interrupt
from localsmall.errors import UsageError
from localsmall.server import warmup
from localsmall.server.app import ServerConfig, ServerState, create_app
from localsmall.server.prompting import PromptBuilder
from localsmall.server.scheduler import RequestLog, Scheduler
from localsmall.server.warmup import SystemPrompt

if TYPE_CHECKING:
    from localsmall.engine.model import Engine

GRACEFUL_SHUTDOWN_S = 3
# What loading returns: the engine and the final configuration (which may depend on it,
# as the image budget does).
Load = Callable[[], "tuple[Engine, ServerConfig]"]


@dataclass(frozen=True)
class Listening:
    """Where the server answers, announced once the socket is bound (before loading)."""

    url: str          # the base URL for OpenAI clients (ends in /v1)
    model_id: str
    max_queue: int


@dataclass(frozen=True)
class Ready:
    """The model is loaded and requests are served (while the system prompt is read,
    those that start with it wait for it; others cancel it)."""

    slots: int
    system_prompt: SystemPrompt | None = None  # restored, or being read (server.warmup)


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
    # IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    # connections of a socket that says it is TCP. With it on, a response's second write
    # (the body after the headers, the first token after the role chunk) waited for the
    # client's delayed ACK: ~40 ms added to every answer.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick "
                         "another --port or --host") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(*, config: ServerConfig, load: Load, host: str, port: int, system_prompt: str,
          max_queue: int, on_listening: Callable[[Listening], None] | None = None,
          on_ready: Callable[[Ready], None] | None = None,
          on_log: Callable[[RequestLog], None] | None = None,
          stop: threading.Event | None = None, warm_system: bool = True) -> None:
    """Listen, load the model with `load` on another thread, and serve the OpenAI API
    until interrupted (or until `stop` is set). The engine `load` returns is closed on
    the way out; an exception from `load` ends serving and is raised here.
    `warm_system`: keep the default system prompt's KV state (server.warmup)."""
    import uvicorn

    sock = bind(host, port)
    state = ServerState(config)
    # httptools parses requests in C: a follow-up carrying a 600 KB image reaches the
    # app ~0.4 ms sooner than with h11 (benchmarks/serve_followup.py).
    uv_config = uvicorn.Config(create_app(state), http="httptools", log_level="error",
                               access_log=False, lifespan="off",
                               timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                               timeout_keep_alive=5)
    server = _Server(uv_config, state, stop)
    loader = _Loader(state, load, server, system_prompt=system_prompt, max_queue=max_queue,
                     on_ready=on_ready, on_log=on_log, warm_system=warm_system)
    try:
        if on_listening is not None:
            bound_host, bound_port = sock.getsockname()[:2]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            on_listening(Listening(f"http://{shown}:{bound_port}/v1", config.model_ids[0],
                                   max_queue))
        loader.start()
        server.run(sockets=[sock])
    finally:
        loader.finish()
        sock.close()
    if loader.error is not None and not isinstance(loader.error, KeyboardInterrupt):
        raise loader.error


class _Loader(threading.Thread):
    """Loads the model while the server already answers, then makes it ready."""

    def __init__(self, state: ServerState, load: Load, server: Any, *, system_prompt: str,
                 max_queue: int, on_ready: Callable[[Ready], None] | None,
                 on_log: Callable[[RequestLog], None] | None, warm_system: bool) -> None:
        super().__init__(name="localsmall-load", daemon=True)
        self.state, self.load, self.server = state, load, server
        self.system_prompt, self.max_queue = system_prompt, max_queue
        self.on_ready, self.on_log = on_ready, on_log
        self.warm_system = warm_system
        self.engine: Engine | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.engine, config = self.load()
            state = self.state
            state.config = config
            builder = PromptBuilder(self.engine, system_prompt=self.system_prompt)
            scheduler = Scheduler(self.engine, replies=builder.replies,
                                  max_queue=self.max_queue, on_log=self.on_log)
            warm = (warmup.begin(self.engine, scheduler.pool, builder, scheduler.note)
                    if self.warm_system else None)
            scheduler.start()  # its requests wait for the read, or cancel it (warmup)
            state.builder, state.scheduler = builder, scheduler  # ready from here on
            if self.on_ready is not None:
                self.on_ready(Ready(len(scheduler.pool), warm))
        except BaseException as exc:  # raised by serve() once the server has stopped
            self.error = exc
            self.server.should_exit = True

    def finish(self) -> None:
        """Stop a load still running (as Ctrl-C does: at its next progress report),
        stop the scheduler and free the engine."""
        if self.is_alive():
            interrupt.request()
            self.join()
            interrupt.take()  # the request was ours: leave no flag behind
        if self.state.scheduler is not None:
            self.state.scheduler.stop()
        if self.engine is not None:
            self.engine.close()


class _Server:
    """uvicorn.Server whose signal handling stops the scheduler before the sockets, and
    which also stops when a `stop` event is set."""

    def __new__(cls, config: Any, state: ServerState, stop: threading.Event | None) -> Any:
        import uvicorn

        def stop_scheduler() -> None:
            if state.scheduler is not None:
                state.scheduler.begin_stop()

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                stop_scheduler()
                super().handle_exit(sig, frame)
                # uvicorn raises the signal again once it has shut down, which would
                # kill the process (SIGTERM) or surface as KeyboardInterrupt (SIGINT):
                # the stop is clean, so the command just returns.
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list):
                    captured.clear()

            async def on_tick(self, counter: int) -> bool:
                if stop is not None and stop.is_set():
                    stop_scheduler()
                    return True
                return await super().on_tick(counter)

        return Server(config)
