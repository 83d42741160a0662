"""What `localsmall convert` takes, reports while it works, and returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from localsmall.convert.quant_types import QuantType

Stage = Literal["model", "mmproj", "quantize"]


@dataclass(frozen=True)
class ConvertRequest:
    """A conversion as the user asked for it."""

    source: str                          # directory or Hugging Face repo id
    out_dir: Path | None = None          # default: <data dir>/models/<base name>
    # bf16 | f16 | f32 | q8_0; None: bf16 for BF16 checkpoints, f16 otherwise
    outtype: str | None = None
    quants: tuple[QuantType, ...] = ()
    imatrix: Path | None = None
    mmproj: bool = True
    threads: int | None = None           # for the quantizer
    force: bool = False


@dataclass(frozen=True)
class ConvertProgress:
    """Progress of one output file: tensors and bytes written."""

    stage: Stage
    label: str            # "model BF16", "projector F16", "model Q4_K_M"
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int


ConvertProgressCallback = Callable[[ConvertProgress], None]


@dataclass(frozen=True)
class OutputFile:
    """One file written."""

    kind: Literal["model", "mmproj"]
    quant: str            # BF16, F16, Q4_K_M, ...
    path: Path
    size: int


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion produced."""

    source: str
    directory: Path
    layout: str
    architecture: str
    base_name: str
    model_id: str | None         # catalog model the builds are registered under
    files: tuple[OutputFile, ...]
    notes: tuple[str, ...]
    seconds: float
