"""Quantized weights in llama.cpp's CPU_REPACK buffers while the AMX buffer stays unused.

On a CPU with Intel AMX, llama.cpp puts quantized weights in its AMX buffer type, whose
batched matrix multiply crashes (llama.cpp #20824); the engine then loads with
`use_extra_bufts=False`, which also loses the CPU_REPACK layouts (AVX-512 interleaved
Q4_K, Q4_0, IQ4_NL, Q2_K) that make prompt reading faster. This module routes exactly the
matrices CPU_REPACK can multiply to that buffer type through llama.cpp's per-tensor buffer
overrides (`tensor_buft_overrides`), with extra buffer types still off, so AMX is never
used.

Which matrices qualify is asked of ggml itself: a matrix product with the weight in a
(zero-sized) CPU_REPACK buffer is offered to the CPU device's `supports_op`, the test
llama.cpp makes when it picks a buffer type. A tensor the repack code cannot lay out
would otherwise abort the load (its repack step asserts), so only tensors that pass,
and only plain matrix-product weights (never the token embeddings, looked up by row),
are routed.
"""

from __future__ import annotations

import ctypes
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from localsmall.gguf_header import TensorInfo, read_header

REPACK_BUFT = "CPU_REPACK"
# Weights llama.cpp uses only as the left side of a matrix product (llama-style decoders):
# `blk.<layer>.<kind>.weight` and the output head.
_LAYER_MATRIX = re.compile(
    r"blk\.(\d+)\.(attn_q|attn_k|attn_v|attn_qkv|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")
_OUTPUT = "output.weight"
_BATCH = 512  # the activation rows of the probe's matrix product (llama.cpp's own choice)


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p),
                ("no_alloc", ctypes.c_bool)]


class _Override(ctypes.Structure):
    """llama_model_tensor_buft_override: a regex and the buffer type it sends tensors to."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@dataclass(frozen=True)
class RepackOverrides:
    """The tensors routed to CPU_REPACK and llama.cpp's override array for them. The
    ctypes objects must outlive the model (llama.cpp keeps the pointers in its params)."""

    tensors: tuple[str, ...]
    n_bytes: int
    array: Any  # ctypes array of _Override, NULL-terminated
    patterns: tuple[bytes, ...]

    @property
    def address(self) -> int:
        return ctypes.addressof(self.array)


@cache
def _lib() -> Any:
    from localsmall.engine.devices import _ggml

    lib = _ggml()
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    signatures: dict[str, tuple[list[Any], Any]] = {
        "ggml_init": ([_InitParams], vp),
        "ggml_free": ([vp], None),
        "ggml_new_tensor_2d": ([vp, ctypes.c_int, i64, i64], vp),
        "ggml_mul_mat": ([vp, vp, vp], vp),
        "ggml_backend_buft_alloc_buffer": ([vp, ctypes.c_size_t], vp),
        "ggml_backend_buffer_free": ([vp], None),
        "ggml_backend_dev_supports_op": ([vp, vp], ctypes.c_bool),
        "ggml_backend_dev_by_type": ([ctypes.c_int], vp),
    }
    for name, (args, result) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


@cache
def repack_buffer_type() -> int | None:
    """The CPU device's CPU_REPACK buffer type (ggml_backend_buffer_type_t), or None when
    this llama.cpp build or CPU has none."""
    from localsmall.engine.devices import _proc

    lib = _lib()
    dev = lib.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not dev:
        return None
    reg = lib.ggml_backend_dev_backend_reg(dev)
    fn = _proc(lib, reg, "ggml_backend_dev_get_extra_bufts",
               ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p))
    array = fn(dev) if fn is not None else None
    i = 0
    while array and array[i]:
        if lib.ggml_backend_buft_name(array[i]).decode() == REPACK_BUFT:
            return int(array[i])
        i += 1
    return None


@cache
def repack_supports(type_id: int, ne0: int, ne1: int) -> bool:
    """Whether the CPU backend multiplies a (ne0 x ne1) weight of this ggml type from a
    CPU_REPACK buffer: ggml's own answer, as llama.cpp asks it when choosing buffers."""
    buft = repack_buffer_type()
    if buft is None:
        return False
    lib = _lib()
    ctx = lib.ggml_init(_InitParams(1 << 16, None, True))  # metadata only, no data
    if not ctx:
        return False
    try:
        weight = lib.ggml_new_tensor_2d(ctx, type_id, ne0, ne1)
        rows = lib.ggml_new_tensor_2d(ctx, 0, ne0, _BATCH)  # GGML_TYPE_F32
        product = lib.ggml_mul_mat(ctx, weight, rows)
        buffer = lib.ggml_backend_buft_alloc_buffer(buft, 0)  # a dummy buffer of that type
        # struct ggml_tensor starts with `enum ggml_type type; ggml_backend_buffer * buffer;`
        slot = ctypes.c_void_p.from_address(weight + ctypes.sizeof(ctypes.c_void_p))
        slot.value = buffer
        try:
            return bool(lib.ggml_backend_dev_supports_op(
                lib.ggml_backend_dev_by_type(0), product))
        finally:
            slot.value = None
            lib.ggml_backend_buffer_free(buffer)
    finally:
        lib.ggml_free(ctx)


def _routable(tensor: TensorInfo) -> bool:
    if len(tensor.shape) != 2 or not (tensor.name == _OUTPUT
                                      or _LAYER_MATRIX.fullmatch(tensor.name)):
        return False
    import gguf

    try:
        type_id = int(gguf.GGMLQuantizationType[tensor.type])
    except KeyError:
        return False
    return repack_supports(type_id, tensor.shape[0], tensor.shape[1])


def _patterns(names: list[str]) -> list[str]:
    """Anchored regexes matching exactly these tensor names, one per kind of matrix
    (llama.cpp compiles each pattern once per tensor: few patterns load fast)."""
    layers: dict[str, list[str]] = defaultdict(list)
    patterns = []
    for name in names:
        if (match := _LAYER_MATRIX.fullmatch(name)) is not None:
            layers[match.group(2)].append(match.group(1))
        else:
            patterns.append(f"^{re.escape(name)}$")
    for kind, numbers in sorted(layers.items()):
        patterns.append(rf"^blk\.({'|'.join(numbers)})\.{kind}\.weight$")
    return patterns


def repack_overrides(path: Path) -> RepackOverrides | None:
    """Overrides sending this model's repackable matrices to CPU_REPACK (None: the build
    has no CPU_REPACK buffer type or no matrix of the model qualifies)."""
    buft = repack_buffer_type()
    if buft is None:
        return None
    routed = [t for t in read_header(path).tensors if _routable(t)]
    if not routed:
        return None
    patterns = tuple(p.encode() for p in _patterns([t.name for t in routed]))
    array = (_Override * (len(patterns) + 1))()
    for entry, pattern in zip(array, patterns, strict=False):
        entry.pattern, entry.buft = pattern, buft
    array[len(patterns)].pattern, array[len(patterns)].buft = None, None
    return RepackOverrides(tensors=tuple(t.name for t in routed),
                           n_bytes=sum(t.n_bytes for t in routed), array=array,
                           patterns=patterns)
