"""Fuzzing the GGUF header reader (localsmall.gguf_header): any bytes give a header or a
ModelLoadError, quickly, without allocating in proportion to a declared length."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from localsmall.errors import ModelLoadError
from localsmall.gguf_header import GgufHeader, parse_header, read_header
from tests.fuzzing import (
    GGUF_ARRAY,
    GGUF_F32,
    GGUF_STRING,
    GGUF_U32,
    GGUF_U64,
    HUGE,
    LENGTHS,
    fuzz_settings,
    gguf_file,
    gguf_kv,
    gguf_model,
    gguf_string,
    gguf_tensor_info,
    only_own_errors,
    typed_values,
)
from tests.hubserver import write_small_gguf

TARGET = "gguf_header"
PEAK = 1 << 20  # allocations beyond the (tiny) files themselves


def _read(tmp_path: Path, data: bytes, *, measure: bool = False,
          on_disk: bool = False) -> GgufHeader | ModelLoadError:
    """Parse `data` (from memory, or written to a file and mapped as in real use)."""
    path = tmp_path / "f.gguf"
    if on_disk:
        path.write_bytes(data)
        result = only_own_errors(TARGET, lambda: read_header(path),
                                 max_peak_bytes=PEAK + len(data) if measure else None)
    else:
        result = only_own_errors(TARGET, lambda: parse_header(data, path),
                                 max_peak_bytes=PEAK if measure else None)
    assert isinstance(result, GgufHeader | ModelLoadError)
    return result


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A valid GGUF with strings, arrays (short and long) and tensors."""
    import gguf
    import numpy as np

    path = tmp_path_factory.mktemp("gguf") / "valid.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("fuzz")
    writer.add_block_count(2)
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(100)])
    writer.add_array("short", [1, 2, 3])
    writer.add_array("long", list(range(100)))
    for i in range(3):
        writer.add_tensor(f"blk.{i}.w", np.zeros((2, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def test_truncation_at_every_byte(tmp_path: Path, valid_file: bytes) -> None:
    """Every prefix is refused, or (once the tensor table is complete) read with its
    data end past the file's size, which is how callers see a cut file."""
    full = _read(tmp_path, valid_file, on_disk=True)
    assert isinstance(full, GgufHeader) and full.data_end == len(valid_file)
    for cut in range(len(valid_file)):
        result = _read(tmp_path, valid_file[:cut], on_disk=cut % 64 == 0)
        assert isinstance(result, ModelLoadError) or result.data_end > result.file_size, cut


@given(data=st.data())
@fuzz_settings(max_examples=1000)
def test_mutated_files(tmp_path: Path, valid_file: bytes, data: st.DataObject) -> None:
    """Random overwrites of bytes and of whole 8-byte fields (lengths, counts, offsets)."""
    raw = bytearray(valid_file[:4096])
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(4, len(raw) - 8))
        if data.draw(st.booleans()):
            raw[pos:pos + 8] = struct.pack("<Q", data.draw(st.one_of(LENGTHS, HUGE)))
        else:
            raw[pos] = data.draw(st.integers(0, 255))
    _read(tmp_path, bytes(raw))


@given(kvs=st.lists(st.tuples(st.binary(max_size=8), typed_values()), max_size=6),
       n_kv=st.one_of(st.none(), LENGTHS), n_tensors=st.one_of(st.just(0), LENGTHS),
       tail=st.binary(max_size=64))
@fuzz_settings(max_examples=1000)
def test_generated_headers(tmp_path: Path, kvs: list[tuple[bytes, tuple[int, bytes]]],
                           n_kv: int | None, n_tensors: int, tail: bytes) -> None:
    """Headers built from random typed values, with lying counts and lengths."""
    entries = [gguf_string(key) + struct.pack("<I", vtype) + value
               for key, (vtype, value) in kvs]
    _read(tmp_path, gguf_file(entries, [], n_kv=n_kv, n_tensors=n_tensors, tail=tail),
          measure=len(kvs) % 4 == 1)  # memory measured on a quarter of the cases


@given(name=st.text(max_size=8), n_dims=st.integers(0, 6),
       dims=st.lists(st.one_of(st.integers(0, 64), HUGE), min_size=6, max_size=6),
       ggml_type=st.integers(0, 60), offset=st.one_of(st.integers(0, 64), HUGE),
       alignment=st.one_of(st.none(), st.tuples(st.sampled_from([GGUF_U32, GGUF_U64]),
                                                 st.integers(0, 2**32 - 1)),
                           st.tuples(st.just(GGUF_STRING), st.text(max_size=4)),
                           st.tuples(st.just(GGUF_F32), st.floats(width=32))))
@fuzz_settings(max_examples=1000)
def test_generated_tensor_tables(tmp_path: Path, name: str, n_dims: int, dims: list[int],
                                 ggml_type: int, offset: int,
                                 alignment: tuple[int, object] | None) -> None:
    kvs = [] if alignment is None else [gguf_kv("general.alignment", *alignment)]
    info = gguf_tensor_info(name, tuple(dims[:n_dims]), ggml_type, offset)
    result = _read(tmp_path, gguf_file(kvs, [info], tail=b"\0" * 64))
    if isinstance(result, GgufHeader):
        align = result.metadata.get("general.alignment", 32)
        assert isinstance(align, int) and align > 0 and align & (align - 1) == 0


@pytest.mark.parametrize("alignment", [(GGUF_U32, 0), (GGUF_U32, 3), (GGUF_STRING, "32"),
                                       (GGUF_F32, 32.0), (GGUF_ARRAY, (GGUF_U32, [32]))])
def test_bad_alignment_is_refused(tmp_path: Path, alignment: tuple[int, object]) -> None:
    data = gguf_file([gguf_kv("general.alignment", *alignment)],
                     [gguf_tensor_info("t", (4,), 0, 0)], tail=b"\0" * 64)
    result = _read(tmp_path, data)
    assert isinstance(result, ModelLoadError) and "alignment" in str(result)


@pytest.mark.parametrize("length", [2**63, 2**64 - 1, 10**9])
def test_huge_string_length_costs_nothing(tmp_path: Path, length: int) -> None:
    # The lie comes first; then 1 MiB of real bytes that a naive reader would copy.
    data = gguf_file([gguf_string("k", length) + b"x" * (1 << 20)], [])
    path = tmp_path / "big.gguf"
    path.write_bytes(data)
    result = only_own_errors(TARGET, lambda: read_header(path), max_peak_bytes=64 * 1024)
    assert isinstance(result, ModelLoadError) and "past the end" in str(result)


@pytest.mark.parametrize("count", [2**63, 2**40])
def test_huge_counts_cost_nothing(tmp_path: Path, count: int) -> None:
    strings = gguf_kv("a", GGUF_ARRAY, (GGUF_STRING, [])).replace(
        struct.pack("<Q", 0), struct.pack("<Q", count))
    for data in (gguf_file([strings], []), gguf_file([], [], n_kv=count),
                 gguf_file([], [], n_tensors=count)):
        assert isinstance(_read(tmp_path, data, measure=True, on_disk=True), ModelLoadError)


def test_arrays_nested_thousands_deep(tmp_path: Path) -> None:
    depth = 5000
    value = struct.pack("<IQ", GGUF_ARRAY, 1) * depth + struct.pack("<IQ", GGUF_U32, 0)
    data = gguf_file([gguf_string("deep") + struct.pack("<I", GGUF_ARRAY) + value], [])
    result = _read(tmp_path, data, measure=True)
    assert isinstance(result, ModelLoadError) and "nested" in str(result)


def test_real_files_still_read(tmp_path: Path) -> None:
    header = read_header(write_small_gguf(tmp_path / "s.gguf", 64 * 1024))
    assert len(header.tensors) == 4 and header.data_end <= header.file_size
    model = _read(tmp_path, gguf_model({"block_count": (GGUF_U32, 1)}, [("blk.0.w", (8, 8))]))
    assert isinstance(model, GgufHeader) and model.arch_value("block_count") == 1
