"""`localsmall convert`: official Mistral weights -> GGUF files and quantized builds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer


def convert(
    source: Annotated[str, typer.Argument(
        help="Checkpoint directory, or a Hugging Face repo id such as "
        "mistralai/Mistral-Small-3.2-24B-Instruct-2506.", show_default=False)],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Output directory (default: localsmall's data directory).",
        show_default=False)] = None,
    outtype: Annotated[str | None, typer.Option(
        "--outtype", help="Precision of the GGUF written from the weights: bf16, f16, f32 or "
        "q8_0 (default: bf16 for BF16 weights, f16 otherwise).", show_default=False)] = None,
    quant: Annotated[str | None, typer.Option(
        "--quant", "-q", help="Also quantize to these types with llama.cpp, e.g. "
        "Q4_K_M,Q5_K_M,IQ4_XS.", show_default=False)] = None,
    imatrix: Annotated[Path | None, typer.Option(
        "--imatrix", help="Importance matrix for --quant (llama.cpp's GGUF or .dat format); "
        "required by the low-bit i-quants.", show_default=False)] = None,
    no_mmproj: Annotated[bool, typer.Option(
        "--no-mmproj", help="Skip the vision projector.")] = False,
    threads: Annotated[int | None, typer.Option(
        "--threads", "-t", help="Threads for llama.cpp's quantizer (default: all CPUs).",
        show_default=False)] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Overwrite output files that already exist.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Convert Mistral Small 3.2 weights (transformers or Mistral layout) to GGUF."""
    from localsmall.convert.pipeline import convert_checkpoint
    from localsmall.convert.quant_types import parse_quants
    from localsmall.convert.types import ConvertRequest
    from localsmall.ui.console import stdout_write
    from localsmall.ui.convert_view import ConvertProgressView, render_result

    request = ConvertRequest(
        source=source, out_dir=out, outtype=outtype.lower() if outtype else None,
        quants=parse_quants(quant), imatrix=imatrix, mmproj=not no_mmproj, threads=threads,
        force=force)
    with ConvertProgressView() as progress:
        result = convert_checkpoint(request, on_progress=progress, on_download=progress.download)
    if as_json:
        data = dataclasses.asdict(result)
        stdout_write(json.dumps(data, default=str) + "\n")
    else:
        render_result(result)
