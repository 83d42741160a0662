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

    info = engine.info
    where = (f"GPU ({info.n_gpu_layers} layers offloaded)" if info.n_gpu_layers
             else f"CPU, {engine.n_threads} threads")
    details = [
        f"{info.path.name} · {info.size_bytes / 2**30:.1f} GiB · {where}",
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
    verbose: VerboseOpt = False,
    yes: YesOpt = False,
) -> None:
    """Chat with Mistral Small 3.2 about text and images."""
    from localsmall import paths
    from localsmall.chat.session import ChatSession
    from localsmall.runtime.options import load_engine, prepare, sampling_for, system_prompt_for
    from localsmall.ui.chat_screen import run_chat
    from localsmall.ui.progress import DownloadProgress, WorkProgress
    from localsmall.ui.questions import pull_offer_handler

    options = run_options(model=model, model_path=model_path, mmproj=mmproj, quant=quant,
                          no_vision=no_vision, ctx=ctx, gpu_layers=gpu_layers, threads=threads,
                          kv_type=kv_type, flash_attn=flash_attn, batch=batch, verbose=verbose)
    overrides = sampling_options(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                 max_tokens=max_tokens)
    with DownloadProgress() as download:
        build = prepare(options, offer_pull=pull_offer_handler(yes=yes), on_download=download)
    with WorkProgress() as progress:
        engine = load_engine(build, options, on_progress=progress)
    with engine:
        session = ChatSession(engine, system_prompt=system_prompt_for(build, system,
                                                                      disabled=no_system),
                              sampling=sampling_for(build, overrides), model_label=build.label)
        run_chat(session, header_for(engine, build), history_path=paths.history_file())
