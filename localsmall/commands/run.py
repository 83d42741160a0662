"""`localsmall run`: answer one prompt, streaming plain text to stdout (for scripts)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from localsmall.commands.options import (
    BatchOpt,
    CtxOpt,
    FlashAttnOpt,
    GpuLayersOpt,
    KvTypeOpt,
    MaxTokensOpt,
    MmprojOpt,
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
from localsmall.errors import UsageError


def _read_prompt(prompt: str | None) -> str:
    if prompt is not None and prompt != "-":
        return prompt
    if prompt is None and sys.stdin.isatty():
        raise UsageError('give a prompt (localsmall run "...") or pipe one on stdin')
    return sys.stdin.read()


def run(
    prompt: Annotated[str | None, typer.Argument(
        help="The prompt; '-' or none reads stdin.", show_default=False)] = None,
    image: Annotated[list[Path] | None, typer.Option(
        "--image", "-i", help="Image to send with the prompt (repeatable).")] = None,
    model: Annotated[str | None, typer.Option(
        "--model-name", help="Catalog model, optionally with a quant (MODEL[:QUANT]).",
        rich_help_panel="Model")] = None,
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
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object (text and stats) instead of streaming.")] = False,
    verbose: VerboseOpt = False,
    yes: YesOpt = False,
) -> None:
    """Answer one prompt (with optional images) and exit."""
    from localsmall.chat.session import ChatSession
    from localsmall.runtime.options import load_engine, prepare, sampling_for, system_prompt_for
    from localsmall.ui.console import stdout_write
    from localsmall.ui.progress import DownloadProgress, WorkProgress
    from localsmall.ui.questions import pull_offer_handler

    images = image or []
    if images and no_vision:
        raise UsageError("--image needs vision; drop --no-vision")
    text = _read_prompt(prompt)
    if not text.strip() and not images:
        raise UsageError("the prompt is empty")
    options = run_options(model=model, model_path=model_path, mmproj=mmproj, quant=quant,
                          # The projector is loaded only when there are images to read.
                          no_vision=no_vision or not images, ctx=ctx, gpu_layers=gpu_layers,
                          threads=threads,
                          kv_type=kv_type, flash_attn=flash_attn, batch=batch, verbose=verbose)
    overrides = sampling_options(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                 max_tokens=max_tokens)
    with DownloadProgress() as download:
        build = prepare(options, offer_pull=pull_offer_handler(yes=yes), on_download=download)
    if images and build.mmproj_path is None:
        raise UsageError(f"--image needs a vision projector. {build.notice}")
    with WorkProgress() as progress:
        engine = load_engine(build, options, on_progress=progress)
    with engine:
        session = ChatSession(engine, system_prompt=system_prompt_for(build, system,
                                                                      disabled=no_system),
                              sampling=sampling_for(build, overrides), model_label=build.label)
        for path in images:
            session.attach(str(path))
        session.on_progress = progress
        reply = session.ask(text)
        streamed = False
        for piece in reply:
            if not streamed:
                progress.stop()
                streamed = True
            if not as_json:
                stdout_write(piece)
        progress.stop()
        if as_json:
            stats = dataclasses.asdict(reply.stats) | {
                "prompt_tps": reply.stats.prompt_tps,
                "generation_tps": reply.stats.generation_tps}
            stdout_write(json.dumps({"model": build.label, "text": reply.text, "stats": stats},
                                    ensure_ascii=False) + "\n")
        else:
            stdout_write("\n")
