"""`localsmall bench`: speed (llama-bench's method) and the quality cost of each quant."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from localsmall.commands.options import (
    BatchOpt,
    FlashAttnOpt,
    MmprojOpt,
    ModelArg,
    NoVisionOpt,
    RpcOpt,
    VerboseOpt,
    rpc_endpoints,
)
from localsmall.errors import UsageError

T = TypeVar("T")

OUTPUT_SUFFIXES = {".json": "json", ".csv": "csv", ".md": "md", ".markdown": "md"}
DEFAULTS = {"n_prompt": 512, "n_gen": 128, "repetitions": 5}
QUICK = {"n_prompt": 128, "n_gen": 32, "repetitions": 2}

SWEEP = "Sweep"
OUTPUT = "Output"
QUALITY = "Quality"


def _split(text: str | None, flag: str, parse: Callable[[str], T]) -> tuple[T, ...] | None:
    """Comma-separated values of a sweep flag, or None when the flag was not given."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise UsageError(f"{flag}: give comma-separated values, e.g. {flag} 4,8")
    try:
        return tuple(dict.fromkeys(parse(p) for p in parts))
    except ValueError:
        raise UsageError(f"{flag}: {text!r} is not a comma-separated list of numbers") from None


def _output_format(as_json: bool, as_csv: bool, as_md: bool, out: Path | None) -> str | None:
    chosen = [name for name, on in (("json", as_json), ("csv", as_csv), ("md", as_md)) if on]
    if len(chosen) > 1:
        raise UsageError("--json, --csv and --md are exclusive: choose one")
    if chosen:
        return chosen[0]
    if out is None:
        return None
    fmt = OUTPUT_SUFFIXES.get(out.suffix.lower())
    if fmt is None:
        raise UsageError(f"--out {out.name}: cannot tell the format from the name; "
                         "use .json, .csv or .md, or add --json, --csv or --md")
    return fmt


def bench(
    model: ModelArg = None,
    model_path: Annotated[list[Path] | None, typer.Option(
        "--model", "-m", help="GGUF file to benchmark; repeat to compare files.",
        rich_help_panel="Model")] = None,
    mmproj: MmprojOpt = None,
    quant: Annotated[str | None, typer.Option(
        "--quant", "-q", help="Catalog quants to benchmark, comma-separated "
        "(e.g. Q4_K_M,Q8_0).", rich_help_panel="Model")] = None,
    no_vision: NoVisionOpt = False,
    n_prompt: Annotated[int | None, typer.Option(
        "--n-prompt", "-p", help="Prompt tokens per prompt-processing run (default 512; "
        "0 skips the test).", show_default=False)] = None,
    n_gen: Annotated[int | None, typer.Option(
        "--n-gen", "-n", help="Tokens per generation run (default 128; 0 skips the test).",
        show_default=False)] = None,
    repetitions: Annotated[int | None, typer.Option(
        "--repetitions", "-r", help="Runs of each test (default 5).", show_default=False)
    ] = None,
    depth: Annotated[int, typer.Option(
        "--depth", "-d", help="Measure with this many tokens already in the context.")] = 0,
    threads: Annotated[str | None, typer.Option(
        "--threads", "-t", help="CPU threads; comma-separated values are swept "
        "(default: as chat).", rich_help_panel=SWEEP)] = None,
    gpu_layers: Annotated[str | None, typer.Option(
        "--gpu-layers", "-ngl", help="Layers on the GPU (-1: all); comma-separated values "
        "are swept (default: as chat).", rich_help_panel=SWEEP)] = None,
    kv_type: Annotated[str, typer.Option(
        "--kv-type", help="KV cache types, comma-separated to sweep (f16, q8_0, q4_0, "
        "f32, bf16).", rich_help_panel=SWEEP)] = "f16",
    flash_attn: FlashAttnOpt = None,
    batch: BatchOpt = 512,
    ctx: Annotated[int | None, typer.Option(
        "--ctx", "-c", help="Context size (default: what the tests need).",
        rich_help_panel="Engine")] = None,
    image: Annotated[Path | None, typer.Option(
        "--image", help="Image for the encode timing (default: a generated 512x512 one).")
    ] = None,
    quick: Annotated[bool, typer.Option(
        "--quick", help="A short run: -p 128 -n 32 -r 2, 2 quality chunks.")] = False,
    compare: Annotated[bool, typer.Option(
        "--compare", help="Show quants side by side: file size and speed relative to the "
        "largest.")] = False,
    quality: Annotated[bool, typer.Option(
        "--quality", help="Also measure perplexity and KL divergence against the "
        "highest-precision build available (with -p 0 -n 0: only that).",
        rich_help_panel=QUALITY)] = False,
    text: Annotated[Path | None, typer.Option(
        "--text", help="Evaluation text for --quality (default: localsmall's own).",
        rich_help_panel=QUALITY)] = None,
    reference: Annotated[Path | None, typer.Option(
        "--reference", help="Reference GGUF for --quality (default: the largest build "
        "available).", rich_help_panel=QUALITY)] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the results as JSON.", rich_help_panel=OUTPUT)] = False,
    as_csv: Annotated[bool, typer.Option(
        "--csv", help="Print the results as CSV.", rich_help_panel=OUTPUT)] = False,
    as_md: Annotated[bool, typer.Option(
        "--md", help="Print the results as a Markdown table.", rich_help_panel=OUTPUT)
    ] = False,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Write the results to this file (.json, .csv or .md).",
        rich_help_panel=OUTPUT)] = None,
    rpc: RpcOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Measure speed like llama-bench (and, with --quality, the quality cost of each quant)."""
    from localsmall.bench.export import render
    from localsmall.bench.runner import run_bench
    from localsmall.bench.types import QUICK_QUALITY_CHUNKS, BenchRequest, QualityRequest
    from localsmall.fileio import atomic_write_bytes
    from localsmall.runtime.options import RunOptions
    from localsmall.ui.bench_view import BenchProgress, show_report
    from localsmall.ui.console import notice, stdout_write

    fmt = _output_format(as_json, as_csv, as_md, out)
    if model_path and quant:
        raise UsageError("--quant picks catalog builds; with --model give the files to compare")
    if image is not None and no_vision:
        raise UsageError("--image needs vision; drop --no-vision")
    if not quality and (text is not None or reference is not None):
        raise UsageError("--text and --reference go with --quality")
    common = RunOptions(mmproj_path=mmproj, vision=not no_vision, n_ctx=ctx,
                        flash_attn=flash_attn, n_batch=batch, verbose=verbose,
                        rpc=rpc_endpoints(rpc))
    if model_path:
        targets = tuple(replace(common, model_path=p) for p in model_path)
    else:
        quants = _split(quant, "--quant", str) or (None,)
        targets = tuple(replace(common, ref=model, quant=q) for q in quants)
    if compare and len(targets) < 2:
        raise UsageError("--compare needs two or more builds: --quant Q4_K_M,Q8_0 or "
                         "--model a.gguf --model b.gguf")
    sizes = QUICK if quick else DEFAULTS
    request = BenchRequest(
        targets=targets,
        threads=_split(threads, "--threads", int) or (None,),
        gpu_layers=_split(gpu_layers, "--gpu-layers", int) or (None,),
        kv_types=_split(kv_type, "--kv-type", str.lower) or ("f16",),
        n_prompt=sizes["n_prompt"] if n_prompt is None else n_prompt,
        n_gen=sizes["n_gen"] if n_gen is None else n_gen,
        repetitions=sizes["repetitions"] if repetitions is None else repetitions,
        depth=depth, image=image,
        quality=QualityRequest(
            text_path=text, max_chunks=QUICK_QUALITY_CHUNKS if quick else None,
            reference=RunOptions(model_path=reference, vision=False, n_batch=batch,
                                 verbose=verbose) if reference else None,
        ) if quality else None)
    with BenchProgress() as progress:
        report = run_bench(request, on_event=progress)
    if out is not None:
        assert fmt is not None
        atomic_write_bytes(out, render(report, fmt, compare=compare).encode("utf-8"))
        show_report(report, compare=compare)
        notice(f"results written to {out}")
    elif fmt is not None:
        stdout_write(render(report, fmt, compare=compare))
    else:
        show_report(report, compare=compare)
