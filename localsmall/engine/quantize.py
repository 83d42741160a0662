"""llama.cpp's own quantizer (llama_model_quantize), for converted and test models.

An importance matrix goes to llama.cpp through the public C API: `params.imatrix` points
at a NULL-terminated array of {tensor name, float data, count}; llama.cpp copies it at
the start of the call. Metadata about it (`quantize.imatrix.*`, as llama.cpp's quantize
tool records) goes in as key/value overrides, also a terminated array.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from localsmall.engine import native
from localsmall.errors import ConversionError

MetadataValue = str | int


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


def _imatrix_array(llama: Any, imatrix: Mapping[str, np.ndarray]) -> tuple[Any, list[Any]]:
    """The C array for params.imatrix, and the Python objects that must outlive the call."""
    keep: list[Any] = []
    array = (llama.llama_model_imatrix_data * (len(imatrix) + 1))()
    for i, (name, values) in enumerate(imatrix.items()):
        data = np.ascontiguousarray(values, dtype=np.float32)
        encoded = name.encode()
        keep += [data, encoded]
        array[i].name = encoded
        array[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        array[i].size = data.size
    array[len(imatrix)].name = None  # terminator
    keep.append(array)
    return array, keep


def _overrides_array(llama: Any, metadata: Mapping[str, MetadataValue]) -> Any:
    array = (llama.llama_model_kv_override * (len(metadata) + 1))()
    for i, (key, value) in enumerate(metadata.items()):
        array[i].key = key.encode()[:127]
        if isinstance(value, int):
            array[i].tag = llama.LLAMA_KV_OVERRIDE_TYPE_INT
            array[i].value.val_i64 = value
        else:
            array[i].tag = llama.LLAMA_KV_OVERRIDE_TYPE_STR
            array[i].value.val_str = value.encode()[:127]
    array[len(metadata)].key = b""  # terminator
    return array


def quantize_gguf(source: Path, dest: Path, quant: str, *, threads: int | None = None,
                  imatrix: Mapping[str, np.ndarray] | None = None,
                  metadata: Mapping[str, MetadataValue] | None = None,
                  max_buffer_bytes: int = 0) -> None:
    """Quantize `source` (an F32/F16/BF16 GGUF) into `dest`.

    `imatrix` maps tensor names to importance weights; `metadata` adds string/int keys
    to the output; `max_buffer_bytes` caps the rows llama.cpp holds at once (0: its
    default of 8 GiB)."""
    llama = native.llama()
    params = llama.llama_model_quantize_default_params()
    params.ftype = ftype_for(quant)
    params.nthread = threads or os.cpu_count() or 1
    if max_buffer_bytes:
        params.max_buf_size = max_buffer_bytes
    keep: list[Any] = []
    if imatrix:
        array, keep = _imatrix_array(llama, imatrix)
        params.imatrix = ctypes.cast(array, ctypes.POINTER(llama.llama_model_imatrix_data))
    if metadata:
        overrides = _overrides_array(llama, metadata)
        keep.append(overrides)
        params.kv_overrides = ctypes.cast(overrides,
                                          ctypes.POINTER(llama.llama_model_kv_override))
    status = llama.llama_model_quantize(str(source).encode(), str(dest).encode(),
                                        ctypes.byref(params))
    del keep
    if status != 0:
        reason = native.last_error_suffix()
        if "imatrix" in reason or "importance matrix" in reason:
            raise ConversionError(f"{quant} needs an importance matrix: pass --imatrix FILE "
                                  "(llama.cpp's imatrix format, as published next to GGUF "
                                  "builds)")
        raise ConversionError(f"llama.cpp failed to quantize {source} to {quant}{reason}")
