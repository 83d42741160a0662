"""A GGUF file's header: its metadata and tensor table, without reading the tensors.

gguf.GGUFReader parses every element of every metadata array into numpy views, which
takes tens of seconds for a 131K-token vocabulary (400K strings with the merges). The
planner needs only the hyper-parameters and each tensor's type and shape, so this
reader walks the header once and steps over long arrays by their lengths. Type sizes
come from the gguf package (GGML_QUANT_SIZES).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from localsmall.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
SHORT_ARRAY = 64  # arrays up to this length are read; longer ones keep only their length
MAX_NESTING = 8   # arrays of arrays deeper than this are refused (llama.cpp uses one level)
MAX_DIMS = 4      # ggml tensors have at most four dimensions
# Smallest encodings, to refuse counts the file cannot possibly hold before looping:
MIN_KV_BYTES = 8 + 4 + 1          # key length, value type, one byte of value
MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # name length, dimension count, type, offset

# GGUF value type -> struct format of one scalar
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the table: name, ggml type name, shape (ggml order: fastest
    dimension first), size, and where its data starts in the file."""

    name: str
    type: str
    shape: tuple[int, ...]
    n_bytes: int
    offset: int

    @property
    def quant_type(self) -> Any:
        """The type as gguf.GGMLQuantizationType."""
        import gguf

        return gguf.GGMLQuantizationType[self.type]

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        """The shape in numpy order (rows first)."""
        return tuple(reversed(self.shape))


@dataclass(frozen=True)
class GgufHeader:
    """Metadata (long arrays replaced by their length) and the tensor table."""

    path: Path
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    file_size: int

    def tensor(self, name: str) -> TensorInfo:
        for info in self.tensors:
            if info.name == name:
                return info
        raise KeyError(name)

    @property
    def data_end(self) -> int:
        """Where the last tensor's data ends: beyond the file size, the file is cut."""
        return max((t.offset + t.n_bytes for t in self.tensors), default=0)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_value(self, key: str, default: Any = None) -> Any:
        """`<architecture>.<key>` from the metadata."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


@cache
def _type_sizes() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, block size, bytes per block)."""
    import gguf

    return {int(t): (t.name, *gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType
            if t in gguf.GGML_QUANT_SIZES}


# ggml's common types: name -> (weights per block, bytes per block), as gguf's table has
# them (tests/test_speed.py checks), so that planning needs no gguf import (half a
# second of CPU).
COMMON_BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20),
    "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34), "Q2_K": (256, 84),
    "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
    "IQ4_XS": (256, 136), "IQ4_NL": (32, 18),
}


def block_size(type_name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml type by name; KeyError if unknown."""
    name = type_name.upper()
    if name in COMMON_BLOCKS:
        return COMMON_BLOCKS[name]
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]


def type_bytes(type_name: str, n_elements: int) -> int:
    """Bytes of `n_elements` values of a ggml type (by name: Q4_K, F16, ...)."""
    block, size = block_size(type_name)
    return -(-n_elements // block) * size


class _Cursor:
    """Reads values from the header, refusing every length that points past the end of
    the file before acting on it (so a declared length never costs memory or time)."""

    def __init__(self, data: mmap.mmap | bytes, order: str) -> None:
        self.data, self.order, self.pos = data, order, 0
        self.size = len(data)

    def need(self, n_bytes: int, what: str) -> None:
        """Fail unless `n_bytes` more bytes are left in the file."""
        if n_bytes < 0 or self.pos + n_bytes > self.size:
            raise ValueError(f"{what} runs past the end of the file")

    def scalar(self, fmt: str) -> Any:
        self.need(struct.calcsize(fmt), "a value")
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("Q")
        self.need(length, f"a {length}-byte string")
        raw = self.data[self.pos:self.pos + length]
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        self.need(count * 8, f"an array of {count} strings")
        unpack, order, data, size = struct.unpack_from, self.order + "Q", self.data, self.size
        pos = self.pos
        for _ in range(count):
            if pos + 8 > size:
                raise ValueError("an array of strings runs past the end of the file")
            pos += 8 + unpack(order, data, pos)[0]
        if pos > size:
            raise ValueError("an array of strings runs past the end of the file")
        self.pos = pos

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth >= MAX_NESTING:
                raise ValueError(f"arrays nested more than {MAX_NESTING} deep")
            item_type, count = self.scalar("I"), self.scalar("Q")
            if count <= SHORT_ARRAY:
                return [self.value(item_type, depth + 1) for _ in range(count)]
            if item_type == _STRING:
                self.skip_strings(count)
            elif item_type in _SCALARS:
                n_bytes = count * struct.calcsize(_SCALARS[item_type])
                self.need(n_bytes, f"an array of {count} values")
                self.pos += n_bytes
            else:
                raise ValueError(f"unsupported nested array type {item_type}")
            return count
        if vtype not in _SCALARS:
            raise ValueError(f"unknown value type {vtype}")
        return self.scalar(_SCALARS[vtype])


def read_header(path: Path) -> GgufHeader:
    """Parse a GGUF file's metadata and tensor table. Raises ModelLoadError when the
    file is not GGUF or is cut short."""
    path = Path(path)
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0,
                                                   access=mmap.ACCESS_READ) as data:
            return parse_header(data, path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({exc}); it is "
                             "incomplete or damaged") from None


def parse_header(data: mmap.mmap | bytes, path: Path) -> GgufHeader:
    """Parse a GGUF header from the file's bytes (`path` names it in errors). Every
    declared length is checked against the data's size before it is used, so time and
    memory stay proportional to the data. Raises ModelLoadError."""
    try:
        return _parse(path, data)
    except (ValueError, struct.error, KeyError, UnicodeDecodeError, OverflowError) as exc:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({exc}); it is "
                             "incomplete or damaged") from None


def _parse(path: Path, data: mmap.mmap | bytes) -> GgufHeader:
    if data[:4] != GGUF_MAGIC:
        raise ValueError("no GGUF magic")
    # The version is small: if it reads huge, the file is big-endian.
    order = "<" if struct.unpack_from("<I", data, 4)[0] < 0x10000 else ">"
    cursor = _Cursor(data, order)
    cursor.pos = 8
    n_tensors, n_kv = cursor.scalar("Q"), cursor.scalar("Q")
    cursor.need(n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_BYTES,
                f"{n_kv} metadata entries and {n_tensors} tensors")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalar("I"))
    sizes = _type_sizes()
    table = []
    for _ in range(n_tensors):
        name = cursor.string()
        n_dims = cursor.scalar("I")
        if n_dims > MAX_DIMS:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
        shape = tuple(cursor.scalar("Q") for _ in range(n_dims))
        type_id = cursor.scalar("I")
        if type_id not in sizes:
            raise ValueError(f"tensor {name!r} has unknown type {type_id}")
        type_name, block, block_bytes = sizes[type_id]
        offset = cursor.scalar("Q")  # within the data section
        n_elements = 1
        for dim in shape:
            n_elements *= dim
        table.append((name, type_name, shape, -(-n_elements // block) * block_bytes, offset))
    alignment = _alignment(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = cursor.pos + (-cursor.pos % alignment)
    tensors = tuple(TensorInfo(name, type_name, shape, n_bytes, data_start + offset)
                    for name, type_name, shape, n_bytes, offset in table)
    return GgufHeader(path=path, metadata=metadata, tensors=tensors, file_size=len(data))


def _alignment(value: Any) -> int:
    """general.alignment: an integer power of two, as llama.cpp requires."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or \
            value & (value - 1):
        raise ValueError(f"general.alignment {value!r} is not a power of two")
    return value
