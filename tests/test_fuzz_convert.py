"""Fuzzing convert's inputs (localsmall.convert): tekken.json, config.json/params.json,
safetensors headers and imatrix files give their result or a ConversionError, with
odd values refused before any shape is computed from them."""

from __future__ import annotations

import base64
import json
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from localsmall.convert.imatrix import ImportanceMatrix, read_imatrix
from localsmall.convert.layouts import Checkpoint, detect
from localsmall.convert.safetensors_files import TensorEntry, read_header
from localsmall.convert.tekken import (
    MAX_TOKEN_BYTES,
    TekkenVocab,
    derive_merges,
    read_tekken,
    to_gguf_vocab,
)
from localsmall.errors import ConversionError
from tests.fuzzing import GGUF_STRING, GGUF_U32, fuzz_settings, gguf_file, gguf_kv, only_own_errors

ODD = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                st.sampled_from([0, 1, 2, -1, 4_000_000_000, 2**63, 10**30]),
                st.floats(), st.text(max_size=6), st.lists(st.integers(), max_size=2),
                st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


# --- tekken.json -----------------------------------------------------------------------------

TEKKEN_TARGET = "tekken.json"


def _b64(token: bytes) -> str:
    return base64.b64encode(token).decode()


@st.composite
def tekken_documents(draw: st.DrawFn) -> Any:
    def maybe(valid: Any) -> Any:
        return draw(ODD) if draw(st.integers(0, 5)) == 0 else valid

    tokens = draw(st.lists(st.binary(min_size=1, max_size=6), min_size=0, max_size=12,
                           unique=True))
    vocab = [maybe({"rank": i, "token_bytes": maybe(_b64(t))}) for i, t in enumerate(tokens)]
    if draw(st.booleans()):
        vocab.append({"token_bytes": draw(st.sampled_from(["!!", "YQ", "====", "YWJj\n"]))})
    n_special = maybe(draw(st.integers(0, 4)))
    special = maybe([maybe({"rank": maybe(i), "token_str": maybe(f"<{i}>")})
                     for i in range(draw(st.integers(0, 4)))])
    config = {"pattern": maybe(".+"), "default_vocab_size": maybe(draw(st.integers(0, 20))),
              "default_num_special_tokens": n_special, "version": maybe("v11")}
    doc = {"config": maybe(config), "vocab": maybe(vocab), "special_tokens": special}
    if draw(st.integers(0, 6)) == 0:
        del doc[draw(st.sampled_from(sorted(doc)))]
    return doc


@given(document=tekken_documents())
@fuzz_settings(max_examples=1500)
def test_tekken_documents(tmp_path: Path, document: Any) -> None:
    path = _write(tmp_path / "tekken.json", json.dumps(document))
    result = only_own_errors(TEKKEN_TARGET, lambda: read_tekken(path))
    assert isinstance(result, TekkenVocab | ConversionError)
    if isinstance(result, TekkenVocab):
        vocab = to_gguf_vocab(result)
        assert len(vocab.tokens) == result.size


@given(data=st.binary(max_size=64))
@fuzz_settings(max_examples=500)
def test_tekken_bytes(tmp_path: Path, data: bytes) -> None:
    path = _write(tmp_path / "tekken.json", data)
    assert isinstance(only_own_errors(TEKKEN_TARGET, lambda: read_tekken(path)),
                      TekkenVocab | ConversionError)


def test_tekken_with_an_enormous_token_is_refused(tmp_path: Path) -> None:
    doc = {"config": {"pattern": ".", "default_vocab_size": 2, "default_num_special_tokens": 0},
           "vocab": [{"token_bytes": _b64(b"a")}, {"token_bytes": _b64(b"a" * 200_000)}]}
    path = _write(tmp_path / "tekken.json", json.dumps(doc))
    result = only_own_errors(TEKKEN_TARGET, lambda: read_tekken(path))
    assert isinstance(result, ConversionError) and "bytes" in str(result)


def test_merge_derivation_is_bounded() -> None:
    """The worst vocabulary the bounds allow (every run of one byte up to the longest
    token) derives its merges quickly: the quadratic cost is capped by MAX_TOKEN_BYTES."""
    ranks = tuple(b"a" * n for n in range(1, MAX_TOKEN_BYTES + 1))
    start = time.perf_counter()
    merges = derive_merges(ranks)
    assert time.perf_counter() - start < 30
    assert len(merges) == MAX_TOKEN_BYTES * (MAX_TOKEN_BYTES - 1) // 2
    # Same merges as the plain definition on a small random vocabulary.
    rng = np.random.default_rng(0)
    small = tuple(dict.fromkeys(bytes(rng.integers(97, 100, rng.integers(1, 6)))
                                for _ in range(300)))
    known = set(small)
    plain = [(t[:c], t[c:]) for t in small for c in range(1, len(t))
             if t[:c] in known and t[c:] in known]
    assert derive_merges(small) == plain


# --- config.json / params.json -------------------------------------------------------------

CONFIG_TARGET = "config.json/params.json"
TRANSFORMERS = {"architectures": ["MistralForCausalLM"], "hidden_size": 64,
                "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 128,
                "vocab_size": 1000, "num_key_value_heads": 2, "head_dim": 16,
                "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 4096}
NATIVE = {"dim": 64, "n_heads": 4, "n_layers": 2, "hidden_dim": 128, "vocab_size": 1000,
          "n_kv_heads": 2, "head_dim": 16, "norm_eps": 1e-5, "rope_theta": 1e6,
          "vision_encoder": {"num_hidden_layers": 1, "hidden_size": 32,
                             "num_attention_heads": 2, "intermediate_size": 64}}


@pytest.fixture(scope="module")
def checkpoint_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights and tokenizer shared by the config cases (the headers are read too)."""
    root = tmp_path_factory.mktemp("ckpt")
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    weights = struct.pack("<Q", len(header)) + header + b"\0" * 8
    for name in ("model.safetensors", "consolidated.safetensors"):
        _write(root / name, weights)
    _write(root / "tekken.json", "{}")
    return root


def _checkpoint(directory: Path, name: str, config: Any) -> Checkpoint | ConversionError:
    for other in ("config.json", "params.json"):
        (directory / other).unlink(missing_ok=True)
    _write(directory / name, json.dumps(config))
    result = only_own_errors(CONFIG_TARGET, lambda: detect(directory))
    assert isinstance(result, Checkpoint | ConversionError)
    if isinstance(result, Checkpoint):
        text = result.text
        assert 1 <= text.n_layers <= 1024 and min(text.n_head, text.head_dim, text.n_vocab) >= 1
    return result


@given(layout=st.sampled_from(["config.json", "params.json"]),
       changes=st.dictionaries(st.sampled_from(sorted({*TRANSFORMERS, *NATIVE,
                                                       "text_config", "vision_config",
                                                       "rope_scaling", "rope_parameters"})),
                               ODD, max_size=4),
       nested=st.dictionaries(st.sampled_from(["num_hidden_layers", "hidden_size",
                                               "patch_size", "image_size", "rope_theta"]),
                              ODD, max_size=2))
@fuzz_settings(max_examples=1500)
def test_odd_config_values(checkpoint_files: Path, layout: str, changes: dict[str, Any],
                           nested: dict[str, Any]) -> None:
    config = json.loads(json.dumps(TRANSFORMERS if layout == "config.json" else NATIVE))
    config.update(changes)
    if isinstance(config.get("vision_encoder"), dict):
        config["vision_encoder"].update(nested)
    _checkpoint(checkpoint_files, layout, config)


@pytest.mark.parametrize("value", [4_000_000_000, 0, -3, "32", 2.5, float("inf"), None, [2]])
def test_layer_counts_are_checked_first(checkpoint_files: Path, value: Any) -> None:
    result = _checkpoint(checkpoint_files, "config.json", TRANSFORMERS | {
        "num_hidden_layers": value})
    assert isinstance(result, ConversionError) and "num_hidden_layers" in str(result)


def test_config_nested_deep(checkpoint_files: Path) -> None:
    for other in ("config.json", "params.json"):
        (checkpoint_files / other).unlink(missing_ok=True)
    _write(checkpoint_files / "config.json", "[" * 100_000 + "]" * 100_000)
    result = only_own_errors(CONFIG_TARGET, lambda: detect(checkpoint_files))
    assert isinstance(result, ConversionError)


# --- safetensors headers ---------------------------------------------------------------------

SAFETENSORS_TARGET = "safetensors headers"


def _safetensors(path: Path, header: Any, data: bytes = b"\0" * 64) -> Path:
    raw = json.dumps(header).encode()
    return _write(path, struct.pack("<Q", len(raw)) + raw + data)


DIMS = st.one_of(st.integers(0, 16), st.sampled_from([2**31, 2**32, 2**62, 2**63, 2**64,
                                                      -1, -(2**63)]), ODD)


@given(entries=st.dictionaries(st.text(max_size=4), st.one_of(
    st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "BF16", "F8_E4M3", 3]),
                           "shape": st.one_of(st.lists(DIMS, max_size=4), ODD),
                           "data_offsets": st.one_of(st.lists(DIMS, min_size=2, max_size=2),
                                                     ODD)}), ODD), max_size=3))
@fuzz_settings(max_examples=1500)
def test_safetensors_headers(tmp_path: Path, entries: dict[str, Any]) -> None:
    path = _safetensors(tmp_path / "m.safetensors", entries)
    result = only_own_errors(SAFETENSORS_TARGET, lambda: read_header(path))
    assert isinstance(result, dict | ConversionError)
    if isinstance(result, dict):
        for entry in result.values():
            assert isinstance(entry, TensorEntry)
            assert entry.offset + entry.nbytes <= path.stat().st_size
            assert entry.n_elements * (4 if entry.dtype == "F32" else 2) == entry.nbytes


def test_element_counts_that_overflow_int64(tmp_path: Path) -> None:
    # 2^32 x 2^32 x 4 bytes wraps to 0 in int64: it must not match an empty range.
    for shape in ([2**32, 2**32], [2**62, 4], [2**63, 2], [2**64, 1]):
        path = _safetensors(tmp_path / "o.safetensors",
                            {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
        result = only_own_errors(SAFETENSORS_TARGET, lambda p=path: read_header(p))
        assert isinstance(result, ConversionError), shape


# --- imatrix files ---------------------------------------------------------------------------

IMATRIX_TARGET = "imatrix files"


@given(n_entries=st.one_of(st.integers(-2, 3), st.sampled_from([2**31 - 1, 999_999])),
       entries=st.lists(st.tuples(st.integers(-5, 40), st.binary(max_size=8),
                                  st.integers(-3, 3), st.integers(-(2**31), 2**31 - 1),
                                  st.binary(max_size=32)), max_size=3),
       tail=st.binary(max_size=16))
@fuzz_settings(max_examples=1000)
def test_legacy_imatrix_files(tmp_path: Path, n_entries: int,
                              entries: list[tuple[int, bytes, int, int, bytes]],
                              tail: bytes) -> None:
    data = struct.pack("<i", n_entries)
    for name_len, name, ncall, nval, values in entries:
        data += struct.pack("<i", name_len) + name + struct.pack("<ii", ncall, nval) + values
    path = _write(tmp_path / "m.dat", data + tail)
    result = only_own_errors(IMATRIX_TARGET, lambda: read_imatrix(path))
    assert isinstance(result, ImportanceMatrix | ConversionError)


@given(kvs=st.lists(st.sampled_from([
    gguf_kv("imatrix.datasets", GGUF_STRING, "d"), gguf_kv("imatrix.chunk_count", GGUF_U32, 4),
    gguf_kv("imatrix.chunk_size", GGUF_U32, 512),
    gguf_kv("imatrix.chunk_count", GGUF_STRING, "x"),
    gguf_kv("imatrix.datasets", 9, (GGUF_STRING, ["a", "b"]))]), max_size=4),
    tensors=st.lists(st.tuples(st.sampled_from(["a.in_sum2", "a.counts", "b.in_sum2", "c"]),
                               st.lists(st.integers(0, 5), min_size=1, max_size=2),
                               st.sampled_from([0, 1, 12])), max_size=3),
    values=st.binary(max_size=256))
@fuzz_settings(max_examples=1000)
def test_gguf_imatrix_files(tmp_path: Path, kvs: list[bytes],
                            tensors: list[tuple[str, list[int], int]], values: bytes) -> None:
    from tests.fuzzing import gguf_tensor_info

    infos = [gguf_tensor_info(name, tuple(shape), ggml_type, 32 * i)
             for i, (name, shape, ggml_type) in enumerate(tensors)]
    body = gguf_file(kvs, infos)
    body += b"\0" * (-len(body) % 32) + values
    path = _write(tmp_path / "m.gguf", body)
    result = only_own_errors(IMATRIX_TARGET, lambda: read_imatrix(path))
    assert isinstance(result, ImportanceMatrix | ConversionError)
