"""`localsmall chat`: the interactive chat."""

from __future__ import annotations

from typing import TYPE_CHECKING

from localsmall.commands.options import (
    BatchOpt,
    CtxOpt,
    FlashAttnOpt,
    GpuLayersOpt,
    KvTypeOpt,
    MaxTokensOpt,
    MmprojOpt,
    ModelArg,
    ModelPathOpt,
    NoSystemOpt,
    NoVisionOpt,
    QuantOpt,
    RpcOpt,
    SeedOpt,
    SystemOpt,
    TemperatureOpt,
    ThreadsOpt,
    TopKOpt,
    TopPOpt,
    VerboseOpt,
    YesOpt,
    run_options,
    sampling_options,
)

if TYPE_CHECKING:
    from localsmall.engine.model import Engine
    from localsmall.models.resolve import LocalBuild
    from localsmall.ui.chat_screen import ChatHeader


def header_for(engine: Engine, build: LocalBuild) -> ChatHeader:
    """The banner: what runs, where, with how much context."""
    from localsmall.ui.chat_screen import ChatHeader
    from localsmall.units import gib_fixed

    info = engine.info
    where = (f"GPU ({info.n_gpu_layers} layers offloaded)" if info.n_gpu_layers
             else f"CPU, {engine.n_threads} threads")
    if engine.remote_devices:
        workers = ", ".join(dict.fromkeys(d.endpoint for d in engine.remote_devices))
        where = f"CPU + workers {workers} ({info.n_gpu_layers} of {info.n_layers + 1} layers)"
    details = [
        f"{info.path.name} · {gib_fixed(info.size_bytes)} · {where}",
        f"context {engine.n_ctx:,} tokens · vision {'on' if info.has_vision else 'off'}",
        "Type a message, /help for commands, Ctrl-D to leave.",
    ]
    notices = [build.notice] if build.notice else []
    return ChatHeader(title=build.label, details=details, notices=notices)


def chat(
    model: ModelArg = None,
    model_path: ModelPathOpt = None,
    mmproj: MmprojOpt = None,
    quant: QuantOpt = None,
    no_vision: NoVisionOpt = False,
    ctx: CtxOpt = None,
    gpu_layers: GpuLayersOpt = None,
    threads: ThreadsOpt = None,
    kv_type: KvTypeOpt = "f16",
    flash_attn: FlashAttnOpt = None,
    batch: BatchOpt = 512,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    seed: SeedOpt = None,
    max_tokens: MaxTokensOpt = None,
    system: SystemOpt = None,
    no_system: NoSystemOpt = False,
    rpc: RpcOpt = None,
    verbose: VerboseOpt = False,
    yes: YesOpt = False,
) -> None:
    """Chat with Mistral Small 3.2 about text and images."""
    from localsmall import paths
    from localsmall.commands.starting import started_session
    from localsmall.runtime.start import SessionOptions
    from localsmall.ui.chat_screen import run_chat

    options = run_options(model=model, model_path=model_path, mmproj=mmproj, quant=quant,
                          no_vision=no_vision, ctx=ctx, gpu_layers=gpu_layers, threads=threads,
                          kv_type=kv_type, flash_attn=flash_attn, batch=batch, verbose=verbose,
                          rpc=rpc)
    overrides = sampling_options(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                 max_tokens=max_tokens)
    talk = SessionOptions(sampling=overrides, system=system, no_system=no_system)
    with started_session(options, talk, yes=yes) as (session, build, _):
        if options.rpc:
            from localsmall.chat.rescue import rescue_conversation
            from localsmall.engine.rpc import add_rescue

            add_rescue(lambda: rescue_conversation(session))
        run_chat(session, header_for(session.engine, build), history_path=paths.history_file())
