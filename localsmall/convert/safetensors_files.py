"""Reading safetensors checkpoints lazily, a slice of rows at a time, as numpy arrays.

The `safetensors` package cannot hand BF16 tensors to numpy (numpy has no bfloat16),
and the official Mistral weights are BF16, so this module reads the format itself: an
8-byte header length, a JSON header (dtype, shape, byte range of every tensor), then the
raw little-endian data. Only the header is read up front; tensor data is read with plain
file reads in bounded slices, so memory stays small whatever the checkpoint size (a
memory map would count every page it touched as resident).
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from localsmall.engine.kernels import bf16_to_f32
from localsmall.errors import ConversionError

# safetensors dtype -> (numpy dtype used to hold the raw values, bytes per element).
# BF16 is held as uint16 and widened to float32 by `to_float32`.
DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, dtype, shape and absolute byte range."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int        # absolute position of the first byte in the file
    nbytes: int

    @property
    def n_rows(self) -> int:
        """Rows along the first axis (a 1-D tensor counts each element as a row)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_elements(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one .safetensors file, validated against the file's size (a
    truncated or damaged file is refused here, before any conversion starts)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw_len = handle.read(8)
            if len(raw_len) != 8:
                raise ConversionError(f"{path} is empty or truncated; download it again")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise ConversionError(f"{path} is not a safetensors file, or it is truncated")
            header = json.loads(handle.read(header_len))
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing; download the checkpoint again") from None
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path} is not a readable safetensors file ({exc})") from None
    except RecursionError:
        raise ConversionError(f"{path} is not a safetensors file (its header is nested too "
                              "deep)") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path} has a malformed safetensors header")

    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info, data_start, size)
    return entries


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(path: Path, name: str, info: object, data_start: int, size: int) -> TensorEntry:
    """One header entry, checked: a known dtype, whole non-negative dimensions whose
    product (in Python integers: no int64 overflow) matches its byte range, inside the
    file."""
    ok = isinstance(info, dict)
    shape_raw = info.get("shape") if isinstance(info, dict) else None
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    ok = ok and isinstance(shape_raw, list) and all(_whole(d) and d >= 0 for d in shape_raw) \
        and isinstance(offsets, list) and len(offsets) == 2 and all(_whole(x) for x in offsets)
    if not ok or not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        raise ConversionError(f"{path}: malformed header entry for {name!r:.100}")
    dtype = str(info["dtype"])
    shape = tuple(shape_raw)  # type: ignore[arg-type]
    begin, end = offsets  # type: ignore[misc]
    if dtype not in DTYPES:
        raise ConversionError(
            f"{path}: tensor {name!r:.100} has dtype {dtype!r:.20}; only F32, F16 and BF16 "
            "checkpoints can be converted (quantized checkpoints such as FP8 cannot)")
    expected = math.prod(shape) * DTYPES[dtype][1]
    if begin < 0 or end - begin != expected:
        raise ConversionError(f"{path}: tensor {name!r:.100} has {end - begin} bytes for shape "
                              f"{list(shape)} ({dtype}); the file is damaged")
    if data_start + end > size:
        raise ConversionError(f"{path} is truncated (tensor {name!r:.100} ends past the end of "
                              "the file); download it again")
    return TensorEntry(name=name, file=path, dtype=dtype, shape=shape,
                       offset=data_start + begin, nbytes=end - begin)


def read_headers(paths: Iterable[Path]) -> dict[str, TensorEntry]:
    """The tensors of several files (a sharded checkpoint); a name twice is an error."""
    entries: dict[str, TensorEntry] = {}
    for path in paths:
        for name, entry in read_header(path).items():
            if name in entries:
                raise ConversionError(f"tensor {name!r:.100} appears in both "
                                      f"{entries[name].file.name} and {path.name}")
            entries[name] = entry
    return entries


class TensorReader:
    """Reads row ranges of tensors, keeping one open handle per file."""

    def __init__(self) -> None:
        self._handles: dict[Path, io.BufferedReader] = {}

    def _handle(self, path: Path) -> io.BufferedReader:
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = open(path, "rb")  # noqa: SIM115 - closed in close()
            except OSError as exc:
                raise ConversionError(f"cannot read {path}: {exc.strerror or exc}") from None
            if hasattr(os, "posix_fadvise"):  # reads go front to back: larger read-ahead
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._handles[path] = handle
        return handle

    def rows(self, entry: TensorEntry, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) in the file's own dtype (BF16 as uint16), shaped
        (stop - start, *shape[1:]) — or a flat slice for 1-D tensors."""
        dtype, itemsize = DTYPES[entry.dtype]
        row_bytes = entry.row_elements * itemsize
        count = (stop - start) * row_bytes
        out = np.empty(count // itemsize, dtype=dtype)
        handle = self._handle(entry.file)
        handle.seek(entry.offset + start * row_bytes)
        got = handle.readinto(out.data.cast("B"))
        if got != count:
            raise ConversionError(f"{entry.file} ended early while reading {entry.name}; "
                                  "the file is truncated, download it again")
        tail = entry.shape[1:] if len(entry.shape) > 1 else ()
        return out.reshape((stop - start, *tail))

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Widen raw values read by `TensorReader.rows` to float32 (exact for all three)."""
    if dtype == "BF16":
        return bf16_to_f32(raw)
    if dtype == "F32":
        return raw
    return raw.astype(np.float32)
