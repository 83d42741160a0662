"""`localsmall serve`: an OpenAI-compatible API (chat completions, models, health)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from localsmall.commands.options import ModelArg, RunFlags, with_run_flags
from localsmall.errors import UsageError

if TYPE_CHECKING:
    from localsmall.engine.model import Engine
    from localsmall.models.resolve import LocalBuild
    from localsmall.server.app import ServerConfig


@with_run_flags
def serve(
    model: ModelArg = None,
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on (another than 127.0.0.1 lets the network in).",
        rich_help_panel="Server")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="TCP port.",
                                      rich_help_panel="Server")] = 8080,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="LOCALSMALL_API_KEY", show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on every API call.",
        rich_help_panel="Server")] = None,
    slots: Annotated[int | None, typer.Option(
        "--slots", help="Conversations kept warm in the KV cache (default: one per 4096 "
        "tokens of context, up to 8).", rich_help_panel="Server")] = None,
    queue: Annotated[int, typer.Option(
        "--queue", help="Requests that may wait; more get 429.",
        rich_help_panel="Server")] = 16,
    max_body_mb: Annotated[int, typer.Option(
        "--max-body-mb", help="Largest request body accepted (MiB); larger ones get 413.",
        rich_help_panel="Server")] = 32,
    max_image_mb: Annotated[int, typer.Option(
        "--max-image-mb", help="Largest image accepted, decoded or downloaded (MiB).",
        rich_help_panel="Server")] = 20,
    image_timeout: Annotated[float, typer.Option(
        "--image-timeout", help="Seconds an http(s) image_url may take to download.",
        rich_help_panel="Server")] = 10.0,
    cors: Annotated[list[str] | None, typer.Option(
        "--cors", help="Allow browser pages from this origin (repeatable; '*' for any).",
        rich_help_panel="Server")] = None,
    *,
    flags: RunFlags,
) -> None:
    """Serve an OpenAI-compatible API (for editors, Open WebUI, the openai client...)."""
    import dataclasses

    from localsmall.chat.cost import fixed_budget
    from localsmall.runtime.options import sampling_for, system_prompt_for
    from localsmall.runtime.start import image_policy, load_engine, prepare
    from localsmall.server.app import ServerConfig
    from localsmall.server.image_urls import ImageLimits
    from localsmall.server.runner import bind, exposure_warning, serve
    from localsmall.server.slots import default_slots
    from localsmall.ui.progress import CalibrationLine, DownloadProgress, WorkProgress
    from localsmall.ui.questions import pull_offer_handler
    from localsmall.ui.serve_view import show_exposure, show_listening, show_ready, show_request

    if not 0 <= port <= 65535:
        raise UsageError("--port must be between 0 and 65535")
    if slots is not None and not 1 <= slots <= 64:
        raise UsageError("--slots must be between 1 and 64")
    if queue < 1:
        raise UsageError("--queue must be at least 1")
    if max_body_mb < 1 or max_image_mb < 1:
        raise UsageError("--max-body-mb and --max-image-mb must be at least 1")
    if not 0 < image_timeout <= 600:
        raise UsageError("--image-timeout must be more than 0 and at most 600 seconds")
    api_key = api_key or os.environ.get("LOCALSMALL_API_KEY") or None
    show_exposure(exposure_warning(host, api_key=bool(api_key)))  # before the long load
    bind(host, port).close()  # a port in use fails now, not after loading the model
    options = flags.run_options(model)
    session = flags.session_options()
    with DownloadProgress() as download, CalibrationLine() as calibrating:
        build = prepare(options, offer_pull=pull_offer_handler(yes=flags.yes),
                        on_download=download, on_calibrate=calibrating)
    sampling = sampling_for(build, session.sampling)
    n_ctx = options.n_ctx or build.n_ctx or 32768
    n_slots = slots or default_slots(n_ctx)
    config = ServerConfig(model_ids=model_ids(build), api_key=api_key,
                          cors_origins=tuple(cors or ()), max_body_bytes=max_body_mb * 2**20,
                          image_limits=ImageLimits(max_bytes=max_image_mb * 2**20,
                                                   fetch_timeout_s=image_timeout),
                          sampling=sampling)

    def load() -> tuple[Engine, ServerConfig]:
        # Runs while the server already answers /health with "loading".
        with WorkProgress() as progress:
            engine = load_engine(build, dataclasses.replace(options, n_seq=n_slots),
                                 on_progress=progress)
        try:
            image_tokens = fixed_budget(image_policy(engine, build,
                                                     max_tokens=session.image_tokens))
        except BaseException:
            engine.close()
            raise
        limits = dataclasses.replace(config.image_limits, max_tokens=image_tokens)
        return engine, dataclasses.replace(config, image_limits=limits)

    serve(config=config, load=load, host=host, port=port, max_queue=queue,
          system_prompt=system_prompt_for(build, session.system, disabled=session.no_system),
          on_listening=lambda listening: show_listening(listening, api_key=bool(api_key)),
          on_ready=show_ready, on_log=show_request)


def model_ids(build: LocalBuild) -> tuple[str, ...]:
    """The ids clients may send: `model:QUANT` for a catalog build (the model alone as an
    alias), else the GGUF file's name."""
    if build.model is None:
        return (Path(build.model_path).name,)
    if build.quant:
        return (f"{build.model.id}:{build.quant}", build.model.id)
    return (build.model.id,)
