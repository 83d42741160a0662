"""Option types shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from localsmall.engine.types import KV_TYPES
from localsmall.errors import UsageError
from localsmall.runtime.options import RunOptions, SamplingOptions

ModelArg = Annotated[str | None, typer.Argument(
    metavar="[MODEL[:QUANT]]", help="Catalog model (default mistral-small-3.2), optionally "
    "with a quant, e.g. mistral-small-3.2:Q5_K_M.", show_default=False)]
ModelPathOpt = Annotated[Path | None, typer.Option(
    "--model", "-m", help="Run this GGUF file instead of a catalog build.",
    rich_help_panel="Model")]
MmprojOpt = Annotated[Path | None, typer.Option(
    "--mmproj", help="Vision projector GGUF to use with --model.", rich_help_panel="Model")]
QuantOpt = Annotated[str | None, typer.Option(
    "--quant", "-q", help="Quant to run (e.g. Q4_K_M).", rich_help_panel="Model")]
NoVisionOpt = Annotated[bool, typer.Option(
    "--no-vision", help="Do not load the vision projector.", rich_help_panel="Model")]
CtxOpt = Annotated[int | None, typer.Option(
    "--ctx", "-c", help="Context length in tokens (default: the model's default, 32768).",
    rich_help_panel="Engine")]
GpuLayersOpt = Annotated[int | None, typer.Option(
    "--gpu-layers", "-ngl", help="Layers to offload to the GPU (-1: all).",
    rich_help_panel="Engine")]
ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", "-t", help="CPU threads (default: physical cores).", rich_help_panel="Engine")]
KvTypeOpt = Annotated[str, typer.Option(
    "--kv-type", help=f"KV cache type: {', '.join(KV_TYPES)}.", rich_help_panel="Engine")]
FlashAttnOpt = Annotated[bool | None, typer.Option(
    "--flash-attn/--no-flash-attn", help="Force flash attention on or off (default: auto).",
    rich_help_panel="Engine", show_default=False)]
BatchOpt = Annotated[int, typer.Option(
    "--batch", help="Prompt tokens evaluated per llama.cpp call.", rich_help_panel="Engine")]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Show llama.cpp's own logs.", rich_help_panel="Engine")]
TemperatureOpt = Annotated[float | None, typer.Option(
    "--temperature", "--temp", help="Sampling temperature (default 0.15, as Mistral "
    "recommends; 0 = greedy).", rich_help_panel="Sampling")]
TopPOpt = Annotated[float | None, typer.Option(
    "--top-p", help="Nucleus sampling threshold.", rich_help_panel="Sampling")]
TopKOpt = Annotated[int | None, typer.Option(
    "--top-k", help="Keep only the K most likely tokens (0 = off).", rich_help_panel="Sampling")]
SeedOpt = Annotated[int | None, typer.Option(
    "--seed", help="Random seed, for reproducible sampling.", rich_help_panel="Sampling")]
MaxTokensOpt = Annotated[int | None, typer.Option(
    "--max-tokens", "-n", help="Stop a reply after this many tokens.",
    rich_help_panel="Sampling")]
SystemOpt = Annotated[str | None, typer.Option(
    "--system", help="System prompt (default: Mistral's, with today's date).",
    rich_help_panel="Sampling")]
NoSystemOpt = Annotated[bool, typer.Option(
    "--no-system", help="Send no system prompt.", rich_help_panel="Sampling")]


def run_options(*, model: str | None, model_path: Path | None, mmproj: Path | None,
                quant: str | None, no_vision: bool, ctx: int | None, gpu_layers: int | None,
                threads: int | None, kv_type: str, flash_attn: bool | None, batch: int,
                verbose: bool) -> RunOptions:
    """RunOptions from the shared flags, with the checks that need no model."""
    if kv_type not in KV_TYPES:
        raise UsageError(f"--kv-type must be one of {', '.join(KV_TYPES)}")
    return RunOptions(ref=model, quant=quant, model_path=model_path, mmproj_path=mmproj,
                      vision=not no_vision, n_ctx=ctx, n_gpu_layers=gpu_layers,
                      n_threads=threads, kv_type=kv_type, flash_attn=flash_attn,
                      n_batch=batch, verbose=verbose)


def sampling_options(*, temperature: float | None, top_p: float | None, top_k: int | None,
                     seed: int | None, max_tokens: int | None) -> SamplingOptions:
    return SamplingOptions(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                           max_tokens=max_tokens)
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print the result as JSON (for scripts).")]
YesOpt = Annotated[bool, typer.Option(
    "--yes", "-y", help="Download what is missing without asking (for scripts).")]
