"""A fast read of a GGUF file's directory: scalar metadata and the tensor table.

gguf.GGUFReader builds a numpy view of every metadata value; for a file carrying a
131k-token vocabulary and its 270k merges that takes many seconds. Checking a file just
written (and the tests) needs only the tensor table, so this walks the header with
`struct` over a memory map and skips array values without decoding them.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from localsmall.errors import ConversionError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorRecord:
    """One tensor of a GGUF file."""

    name: str
    type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]     # numpy order (rows first)
    offset: int                # absolute position of its data in the file
    nbytes: int


@dataclass(frozen=True)
class GgufDirectory:
    """A GGUF file's scalar metadata (arrays are skipped) and tensors."""

    metadata: dict[str, Any]
    tensors: tuple[TensorRecord, ...]
    file_size: int

    def tensor(self, name: str) -> TensorRecord:
        for record in self.tensors:
            if record.name == name:
                return record
        raise KeyError(name)


class _Cursor:
    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.take("<Q")
        raw = self.data[self.pos:self.pos + length]
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype == _STRING:
                for _ in range(count):
                    self.pos += 8 + struct.unpack_from("<Q", self.data, self.pos)[0]
            elif etype in _SCALARS:
                self.pos += count * struct.calcsize(_SCALARS[etype])
            else:
                for _ in range(count):
                    self.value(etype)
            return None  # arrays are not kept
        raise ValueError(f"unknown metadata type {vtype}")


def read_directory(path: Path) -> GgufDirectory:
    """Parse the header of a GGUF file; raises ConversionError when it is damaged."""
    path = Path(path)
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0,
                                                   access=mmap.ACCESS_READ) as data:
            return _parse(data, path.stat().st_size)
    except (OSError, ValueError, struct.error, UnicodeError) as exc:
        raise ConversionError(f"{path} is not a readable GGUF file ({exc})") from None


def _parse(data: mmap.mmap, size: int) -> GgufDirectory:
    cur = _Cursor(data)
    if data[:4] != b"GGUF":
        raise ValueError("bad magic")
    cur.pos = 4
    version, n_tensors, n_kv = cur.take("<I"), cur.take("<Q"), cur.take("<Q")
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        value = cur.value(cur.take("<I"))
        if value is not None:
            metadata[key] = value
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.take("<Q") for _ in range(cur.take("<I"))]
        infos.append((name, gguf.GGMLQuantizationType(cur.take("<I")), dims, cur.take("<Q")))
    alignment = int(metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    start = cur.pos + (-cur.pos % alignment)
    tensors = []
    for name, qtype, dims, offset in infos:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        count = 1
        for d in dims:
            count *= d
        tensors.append(TensorRecord(name, qtype, tuple(reversed(dims)), start + offset,
                                    count // block * type_size))
    return GgufDirectory(metadata, tuple(tensors), size)
