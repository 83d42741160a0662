"""Writing a GGUF file one slice of one tensor at a time.

gguf.GGUFWriter writes the header, the metadata and the tensor directory from the
planned shapes and types alone (`add_tensor_info`); the data then streams from the
checkpoint in slices of at most CHUNK_BYTES of float32 work, converted on the way. Peak
memory is a few slices, whatever the size of the model or of its largest tensor. The
file is written under a temporary name, read back to check its directory and size, and
only then renamed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import gguf
import numpy as np

from localsmall.convert.gguf_directory import read_directory
from localsmall.convert.safetensors_files import TensorReader, to_float32
from localsmall.convert.tensor_plan import PlannedTensor
from localsmall.errors import ConversionError
from localsmall.fileio import atomic_path

Q = gguf.GGMLQuantizationType
CHUNK_BYTES = 64 * 1024 * 1024          # float32 working set of one slice
_SAME_TYPE = {("F32", Q.F32), ("F16", Q.F16), ("BF16", Q.BF16)}

WriterFactory = Callable[[str], gguf.GGUFWriter]
# (tensors finished, bytes written so far)
StreamCallback = Callable[[int, int], None]


def interleave_rotary(rows: np.ndarray, head_rows: int) -> np.ndarray:
    """Undo transformers' rotate-half order of Q/K rows: within each head, transformers
    stores the first halves of all rotary pairs, then the second halves; llama.cpp (and
    Mistral's own format) keep each pair adjacent."""
    heads = rows.shape[0] // head_rows
    tail = rows.shape[1:]
    split = rows.reshape(heads, 2, head_rows // 2, *tail)
    return np.ascontiguousarray(split.swapaxes(1, 2)).reshape(rows.shape)


def convert_rows(raw: np.ndarray, src_dtype: str, out_type: gguf.GGMLQuantizationType
                 ) -> np.ndarray:
    """Rows in the checkpoint's dtype -> the bytes of `out_type`."""
    if (src_dtype, out_type) in _SAME_TYPE:
        return raw
    values = to_float32(raw, src_dtype)
    if out_type == Q.F32:
        return values
    if out_type == Q.F16:
        return values.astype(np.float16)
    if out_type in (Q.BF16, Q.Q8_0):
        flat = values.reshape(-1, values.shape[-1]) if values.ndim > 1 else values
        return gguf.quants.quantize(flat, out_type)
    raise ConversionError(f"cannot write tensors of type {out_type.name}")


def tensor_chunks(reader: TensorReader, tensor: PlannedTensor) -> Iterator[np.ndarray]:
    """The tensor's output bytes, in slices of whole rows (whole heads when permuting)."""
    start, stop = tensor.row_range
    group = tensor.head_rows
    row_bytes = tensor.source.row_elements * 4
    step = max(group, (CHUNK_BYTES // row_bytes) // group * group)
    for first in range(start, stop, step):
        raw = reader.rows(tensor.source, first, min(stop, first + step))
        if tensor.rope_heads:
            raw = interleave_rotary(raw, group)
        yield convert_rows(raw, tensor.source.dtype, tensor.out_type)


def _write_data(writer: gguf.GGUFWriter, reader: TensorReader,
                tensors: Sequence[PlannedTensor], on_progress: StreamCallback) -> None:
    assert writer.fout is not None
    out = writer.fout[0]
    total = 0
    for index, tensor in enumerate(tensors):
        writer.write_padding(out, out.tell())
        written = 0
        for chunk in tensor_chunks(reader, tensor):
            data = np.ascontiguousarray(chunk)
            out.write(data.data.cast("B"))
            written += data.nbytes
            on_progress(index, total + written)
        if written != tensor.nbytes:
            raise ConversionError(f"{tensor.name}: wrote {written} bytes, expected "
                                  f"{tensor.nbytes}")
        total += written
        writer.write_padding(out, written)
        on_progress(index + 1, total)


def verify_gguf(path: Path, tensors: Sequence[PlannedTensor]) -> None:
    """Read the written file back: every planned tensor, in order, with its type, shape
    and size, and data that ends inside the file."""
    directory = read_directory(path)
    found = [(t.name, t.type, t.shape, t.nbytes) for t in directory.tensors]
    planned = [(t.name, t.out_type, t.shape, t.nbytes) for t in tensors]
    if found != planned:
        raise ConversionError(f"{path}: the written tensor directory differs from the plan")
    end = max((t.offset + t.nbytes for t in directory.tensors), default=0)
    if end > directory.file_size:
        raise ConversionError(f"{path} is shorter than its tensor directory says")


def write_gguf(dest: Path, new_writer: WriterFactory, tensors: Sequence[PlannedTensor],
               reader: TensorReader, on_progress: StreamCallback) -> Path:
    """Write `tensors` under the metadata `new_writer(path)` sets up; atomic."""
    with atomic_path(dest) as tmp:
        writer = new_writer(str(tmp))
        try:
            for tensor in tensors:
                writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32),
                                       tensor.nbytes, raw_dtype=tensor.out_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            _write_data(writer, reader, tensors, on_progress)
        finally:
            writer.close()
        verify_gguf(tmp, tensors)
    return dest
