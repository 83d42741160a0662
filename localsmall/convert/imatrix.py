"""Importance matrices (imatrix files) for llama.cpp's quantizer.

Two formats are in use: the GGUF one llama.cpp's `llama-imatrix` writes today (tensors
`<name>.in_sum2` and `<name>.counts`, keys `imatrix.datasets`, `imatrix.chunk_count`,
`imatrix.chunk_size`), and the legacy binary `.dat` (a count, then for each entry its
name, call count and values). Both become one float32 vector per weight tensor,
normalised the way llama.cpp's quantize tool does before it hands them to
`llama_model_quantize` (sums divided by counts; experts without data get ones).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from localsmall.errors import ConversionError, ModelLoadError
from localsmall.fileio import read_regular_file
from localsmall.gguf_header import read_header

GGUF_MAGIC = b"GGUF"
MAX_FILE_BYTES = 1 << 30  # a 24B model's imatrix is ~10 MB


@dataclass(frozen=True)
class ImportanceMatrix:
    """Per-tensor importance weights, keyed by llama.cpp tensor name."""

    entries: dict[str, np.ndarray]
    datasets: tuple[str, ...]
    chunk_count: int
    path: Path


def read_imatrix(path: Path) -> ImportanceMatrix:
    """Read an imatrix file in either format; raises ConversionError with the reason."""
    path = Path(path)
    try:
        data = read_regular_file(path, MAX_FILE_BYTES)
    except OSError as exc:
        raise ConversionError(f"cannot read the imatrix {path}: {exc.strerror or exc}") from None
    try:
        matrix = _read_gguf(path) if data[:4] == GGUF_MAGIC else _read_legacy(path, data)
    except (ValueError, TypeError, IndexError, KeyError, OverflowError) as exc:
        raise ConversionError(f"{path} is not a usable imatrix file ({exc!s:.200})") from None
    if not matrix.entries:
        raise ConversionError(f"{path} holds no importance data")
    for name, values in matrix.entries.items():
        if not np.isfinite(values).all():
            raise ConversionError(f"{path}: the importance data of {name!r:.100} is not finite; "
                                  "the imatrix is damaged")
    return matrix


def _read_gguf(path: Path) -> ImportanceMatrix:
    import gguf

    try:
        read_header(path)  # bounded checks first: gguf's reader trusts declared lengths
    except ModelLoadError as exc:
        raise ConversionError(str(exc)) from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError and friends on damaged files
        raise ConversionError(f"{path} is not a readable GGUF imatrix ({exc})") from None

    def field(key: str) -> Any:
        found = reader.get_field(key)
        return found.contents() if found is not None else None

    datasets, chunks, chunk_size = (field("imatrix.datasets"), field("imatrix.chunk_count"),
                                    field("imatrix.chunk_size"))
    if datasets is None or chunks is None or chunk_size is None:
        raise ConversionError(f"{path} is a GGUF file but not an imatrix (no imatrix.* "
                              "metadata)")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        if tensor.name.endswith(".in_sum2"):
            sums[tensor.name.removesuffix(".in_sum2")] = np.asarray(tensor.data, np.float32)
        elif tensor.name.endswith(".counts"):
            counts[tensor.name.removesuffix(".counts")] = np.asarray(tensor.data, np.float32)
    if sums.keys() != counts.keys():
        odd = ", ".join(repr(n) for n in sorted(sums.keys() ^ counts.keys())[:3])
        raise ConversionError(f"{path}: sums and counts do not pair up ({odd})")
    entries = {name: _normalise(sums[name].ravel(), np.rint(counts[name].ravel()))
               for name in sums}
    names = tuple(str(d) for d in datasets) if isinstance(datasets, list) else (str(datasets),)
    return ImportanceMatrix(entries, names, int(chunks), path)


def _normalise(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean squared activations per column, one block of columns per expert."""
    if not len(counts) or sums.size % len(counts):
        raise ValueError(f"{sums.size} sums do not split into {len(counts)} experts")
    per_expert = sums.reshape(len(counts), -1)
    out = np.ones_like(per_expert)
    seen = counts > 0
    out[seen] = per_expert[seen] / counts[seen, None]
    return out.ravel()


def _read_legacy(path: Path, data: bytes) -> ImportanceMatrix:
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ConversionError(f"{path} is truncated or not an imatrix file")
        values = struct.unpack_from(fmt, data, pos)
        pos += size
        return values

    (n_entries,) = take("<i")
    if not 0 < n_entries < 1_000_000:
        raise ConversionError(f"{path} is not an imatrix file (GGUF or legacy .dat)")
    entries: dict[str, np.ndarray] = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length < 4096:
            raise ConversionError(f"{path} is damaged (bad entry name length)")
        name = take(f"<{length}s")[0].decode("utf-8", errors="replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise ConversionError(f"{path} is damaged (entry {name!r:.100} has no values)")
        if pos + 4 * nval > len(data):
            raise ConversionError(f"{path} is truncated")
        values = np.frombuffer(data, np.float32, nval, pos).copy()
        pos += 4 * nval
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite: refused by load()
            entries[name] = values / ncall if ncall > 0 else values
    chunks = 0
    datasets: tuple[str, ...] = ()
    if pos + 4 <= len(data):
        (chunks,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if 0 < length <= len(data) - pos:
                datasets = (take(f"<{length}s")[0].decode("utf-8", errors="replace"),)
    return ImportanceMatrix(entries, datasets, chunks, path)
