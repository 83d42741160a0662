"""Writing a GGUF file one slice of one tensor at a time.

gguf.GGUFWriter writes the header, the metadata and the tensor directory from the
planned shapes and types alone (`add_tensor_info`); the data then streams from the
checkpoint: tensors whose bytes do not change (BF16 kept as BF16) are copied file to
file by the kernel; the others go in slices of at most CHUNK_BYTES of float32 work,
converted on the way, while a helper thread reads the next slice. Peak memory is a few
slices, whatever the size of the model or of its largest tensor. The file is written
under a temporary name, read back to check its directory and size, and only then
renamed.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np

from localsmall.convert.safetensors_files import TensorReader, to_float32
from localsmall.convert.tensor_plan import PlannedTensor
from localsmall.engine.kernels import bf16_to_f16, f32_to_f16
from localsmall.errors import ConversionError, ModelLoadError
from localsmall.fileio import atomic_path
from localsmall.gguf_header import read_header

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


def to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even; NaNs stay NaN. (The
    gguf package's version is several times slower.)"""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = bits + ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded >>= 16
    out = rounded.astype(np.uint16)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def convert_rows(raw: np.ndarray, src_dtype: str, out_type: gguf.GGMLQuantizationType
                 ) -> np.ndarray:
    """Rows in the checkpoint's dtype -> the bytes of `out_type`."""
    if (src_dtype, out_type) in _SAME_TYPE:
        return raw
    if (src_dtype, out_type) == ("BF16", Q.F16):
        return bf16_to_f16(raw)
    values = to_float32(raw, src_dtype)
    if out_type == Q.F32:
        return values
    if out_type == Q.F16:
        return f32_to_f16(values)
    if out_type == Q.BF16:
        return to_bf16(values)
    if out_type == Q.Q8_0:
        return gguf.quants.quantize(values.reshape(-1, values.shape[-1]), out_type)
    raise ConversionError(f"cannot write tensors of type {out_type.name}")


def passes_through(tensor: PlannedTensor) -> bool:
    """Whether the tensor's bytes go to the output unchanged (same type, no permutation):
    those are copied file to file, by the kernel where it can (copy_file_range)."""
    return ((tensor.source.dtype, tensor.out_type) in _SAME_TYPE and not tensor.rope_heads
            and tensor.rows is None)


def _row_ranges(tensor: PlannedTensor) -> list[tuple[int, int]]:
    """Whole-row slices of at most CHUNK_BYTES of float32 (whole heads when permuting)."""
    start, stop = tensor.row_range
    group = tensor.head_rows
    row_bytes = tensor.source.row_elements * 4
    step = max(group, (CHUNK_BYTES // row_bytes) // group * group)
    return [(first, min(stop, first + step)) for first in range(start, stop, step)]


def _read_ahead(reader: TensorReader, tensors: Sequence[PlannedTensor]
                ) -> Iterator[np.ndarray]:
    """The raw rows of every slice of every converted tensor, in order; a helper thread
    reads the next slice while the caller converts and writes the current one (file
    reads release the GIL)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="localsmall-read") as pool:
        pending: Future[np.ndarray] | None = None
        for tensor in tensors:
            if passes_through(tensor):
                continue
            for first, stop in _row_ranges(tensor):
                future = pool.submit(reader.rows, tensor.source, first, stop)
                if pending is not None:
                    yield pending.result()
                pending = future
        if pending is not None:
            yield pending.result()


class _DataSection:
    """The tensor data of the file being written, at the file-descriptor level (so the
    kernel can copy pass-through tensors straight from the checkpoint)."""

    def __init__(self, fd: int, alignment: int) -> None:
        self.fd, self.alignment = fd, alignment
        self.pos = os.lseek(fd, 0, os.SEEK_CUR)

    def write(self, data: np.ndarray | bytes) -> None:
        view = (data.data if isinstance(data, np.ndarray) else memoryview(data)).cast("B")
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.pos += n

    def align(self) -> None:
        self.write(bytes(-self.pos % self.alignment))

    def copy(self, source: Path, offset: int, count: int, tick: Callable[[int], None]) -> None:
        """Copy `count` bytes of `source` from `offset`."""
        with open(source, "rb") as src:
            kernel = hasattr(os, "copy_file_range")
            while count:
                size = min(count, CHUNK_BYTES)
                try:
                    n = (os.copy_file_range(src.fileno(), self.fd, size, offset) if kernel
                         else 0)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL,
                                         errno.EOPNOTSUPP):
                        raise
                    kernel, n = False, 0
                if not kernel:  # plain read + write (other systems, other filesystems)
                    src.seek(offset)
                    data = src.read(size)
                    self.write(data)
                    n = len(data)
                else:
                    self.pos += n
                if n == 0:
                    raise ConversionError(f"{source} ended early; it is truncated")
                offset, count = offset + n, count - n
                tick(n)


def _write_data(writer: gguf.GGUFWriter, reader: TensorReader,
                tensors: Sequence[PlannedTensor], on_progress: StreamCallback) -> None:
    assert writer.fout is not None
    out = writer.fout[0]
    out.flush()
    section = _DataSection(out.fileno(), writer.data_alignment)
    slices = _read_ahead(reader, tensors)
    total = 0

    def tick(n: int) -> None:
        nonlocal total
        total += n
        on_progress(index, total)

    for index, tensor in enumerate(tensors):
        section.align()
        start = section.pos
        if passes_through(tensor):
            section.copy(tensor.source.file, tensor.source.offset, tensor.nbytes, tick)
        else:
            for _ in _row_ranges(tensor):
                data = _slice_bytes(tensor, next(slices))
                section.write(data)
                tick(data.nbytes)
        if section.pos - start != tensor.nbytes:
            raise ConversionError(f"{tensor.name}: wrote {section.pos - start} bytes, "
                                  f"expected {tensor.nbytes}")
        on_progress(index + 1, total)
    section.align()


def _slice_bytes(tensor: PlannedTensor, raw: np.ndarray) -> np.ndarray:
    if tensor.rope_heads:
        raw = interleave_rotary(raw, tensor.head_rows)
    return np.ascontiguousarray(convert_rows(raw, tensor.source.dtype, tensor.out_type))


def verify_gguf(path: Path, tensors: Sequence[PlannedTensor]) -> None:
    """Read the written file back: every planned tensor, in order, with its type, shape
    and size, and data that ends inside the file."""
    try:
        header = read_header(path)
    except ModelLoadError as exc:
        raise ConversionError(str(exc)) from None
    found = [(t.name, t.quant_type, t.numpy_shape, t.n_bytes) for t in header.tensors]
    planned = [(t.name, t.out_type, tuple(t.shape), t.nbytes) for t in tensors]
    if found != planned:
        raise ConversionError(f"{path}: the written tensor directory differs from the plan")
    if header.data_end > header.file_size:
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
