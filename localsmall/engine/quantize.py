"""llama.cpp's own quantizer (llama_model_quantize), for converted and test models."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from localsmall.engine import native
from localsmall.errors import ConversionError


def ftype_for(quant: str) -> int:
    """llama.cpp's LLAMA_FTYPE_MOSTLY_* value for a quant name such as "Q4_K_M"."""
    llama = native.llama()
    name = "LLAMA_FTYPE_MOSTLY_" + quant.upper().replace("-", "_")
    if quant.upper() in ("F32", "ALL_F32"):
        name = "LLAMA_FTYPE_ALL_F32"
    value = getattr(llama, name, None)
    if value is None:
        raise ConversionError(f"llama.cpp has no quant type {quant!r}")
    return int(value)


def quantize_gguf(source: Path, dest: Path, quant: str, *, threads: int | None = None) -> None:
    """Quantize `source` (an F32/F16/BF16 GGUF) into `dest`."""
    llama = native.llama()
    params = llama.llama_model_quantize_default_params()
    params.ftype = ftype_for(quant)
    params.nthread = threads or os.cpu_count() or 1
    status = llama.llama_model_quantize(str(source).encode(), str(dest).encode(),
                                        ctypes.byref(params))
    if status != 0:
        raise ConversionError(f"llama.cpp failed to quantize {source} to {quant}"
                              f"{native.last_error_suffix()}")
