"""Whole-array float conversions with ggml's vectorised CPU kernels (F16C/AVX2/NEON).

numpy widens BF16 and narrows to F16 one element at a time, about 1 GB/s here; ggml's
kernels do the same conversions, bit for bit, ten times faster. `localsmall convert`
spends most of its time in these two conversions when it writes F16 from BF16 weights.
Without the kernels (an unusual build) numpy is used.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from typing import Any

import numpy as np

from localsmall.engine import native


@cache
def _kernel(name: str) -> Any:
    try:
        lib = ctypes.CDLL(os.path.join(native.lib_dir(), "libggml-cpu.so"))
        fn = getattr(lib, name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    return fn


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """BF16 values (as uint16) widened to float32, exactly."""
    source = np.ascontiguousarray(raw, dtype=np.uint16)
    kernel = _kernel("ggml_cpu_bf16_to_fp32")
    if kernel is None:
        return (source.astype(np.uint32) << 16).view(np.float32)
    out = np.empty(source.shape, dtype=np.float32)
    kernel(source.ctypes.data, out.ctypes.data, source.size)
    return out


def f32_to_f16(values: np.ndarray) -> np.ndarray:
    """float32 narrowed to float16, rounding to nearest even (as numpy does)."""
    source = np.ascontiguousarray(values, dtype=np.float32)
    kernel = _kernel("ggml_cpu_fp32_to_fp16")
    if kernel is None:
        return source.astype(np.float16)
    out = np.empty(source.shape, dtype=np.float16)
    kernel(source.ctypes.data, out.ctypes.data, source.size)
    return out


BLOCK = 1 << 18  # values per step of a fused conversion: the float32 scratch stays in cache


def bf16_to_f16(raw: np.ndarray) -> np.ndarray:
    """BF16 values (as uint16) to float16 in one pass over cache-sized blocks, without a
    full-size float32 intermediate (the same result as widening, then narrowing)."""
    source = np.ascontiguousarray(raw, dtype=np.uint16).reshape(-1)
    widen, narrow = _kernel("ggml_cpu_bf16_to_fp32"), _kernel("ggml_cpu_fp32_to_fp16")
    if widen is None or narrow is None:
        return f32_to_f16(bf16_to_f32(source)).reshape(raw.shape)
    out = np.empty(source.shape, dtype=np.float16)
    scratch = np.empty(min(BLOCK, source.size), dtype=np.float32)
    for start in range(0, source.size, BLOCK):
        n = min(BLOCK, source.size - start)
        widen(source.ctypes.data + 2 * start, scratch.ctypes.data, n)
        narrow(scratch.ctypes.data, out.ctypes.data + 2 * start, n)
    return out.reshape(raw.shape)
