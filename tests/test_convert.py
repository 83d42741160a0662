"""`localsmall convert` on small numpy-built checkpoints: bad input is refused with a
clear message and leaves no output behind; imatrix files reach llama.cpp's quantizer;
interrupted work leaves nothing under a final name."""

from __future__ import annotations

import errno
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from localsmall.cli import app
from localsmall.convert import gguf_stream, pipeline
from localsmall.convert.gguf_files import TextHParams
from localsmall.convert.imatrix import read_imatrix
from localsmall.convert.quant_types import parse_quants
from localsmall.convert.quantize_job import run_quantize
from localsmall.convert.source import download_patterns, readme_license
from localsmall.errors import ConversionError, UsageError
from localsmall.gguf_header import read_header
from tests.checkpoints import SMALL_TEXT, text_config, text_weights, write_text_checkpoint
from tests.tinymodels import write_v11_tekken

# Rows of 256 columns: what llama.cpp's i-quants need.
IQUANT_TEXT = TextHParams(n_layers=1, n_embd=256, n_head=2, n_head_kv=1, head_dim=128,
                          n_ff=256, n_vocab=2048, context_length=4096)


@pytest.fixture(scope="module")
def tekken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_v11_tekken(tmp_path_factory.mktemp("tekken") / "tekken.json")


@pytest.fixture
def checkpoint(tmp_path: Path, tekken: Path) -> Path:
    return write_text_checkpoint(tmp_path / "small-mistral", tekken)


def _convert(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["convert", *args])
    return result.exit_code, result.stderr + result.stdout


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*")) if directory.exists() else []


def _refused(source: Path, out: Path, message: str, *extra: str) -> None:
    code, output = _convert(str(source), "--out", str(out), *extra)
    assert code != 0, output
    assert "error:" in output and message in " ".join(output.split()), output
    assert "Traceback" not in output
    assert _leftovers(out) == [], "partial output left behind"


# --- conversion works ------------------------------------------------------------------


def test_text_only_checkpoint_converts_and_runs(checkpoint: Path, tmp_path: Path) -> None:
    from localsmall.engine.model import Engine
    from localsmall.engine.types import EngineSettings

    out = tmp_path / "out"
    code, output = _convert(str(checkpoint), "--out", str(out), "--outtype", "f16")
    assert code == 0, output
    assert _leftovers(out) == ["small-mistral-F16.gguf"]  # no projector, no temp files
    assert "not registered" in output
    with Engine(EngineSettings(model_path=out / "small-mistral-F16.gguf", n_ctx=256,
                               n_threads=2)) as engine:
        assert engine.info.n_vocab == SMALL_TEXT.n_vocab
        assert engine.tokenize("[INST]", special=True) == [3]
        assert engine.logits_for([1, 3, 1500]).shape == (SMALL_TEXT.n_vocab,)


def test_native_text_only_checkpoint_converts(tmp_path: Path, tekken: Path) -> None:
    from tests.checkpoints import write_safetensors
    from tests.reference_model import native_name

    native = tmp_path / "native"
    native.mkdir()
    hp = SMALL_TEXT
    params = {"dim": hp.n_embd, "n_layers": hp.n_layers, "head_dim": hp.head_dim,
              "hidden_dim": hp.n_ff, "n_heads": hp.n_head, "n_kv_heads": hp.n_head_kv,
              "rope_theta": hp.rope_theta, "norm_eps": hp.rms_eps, "vocab_size": hp.n_vocab}
    (native / "params.json").write_text(json.dumps(params))
    weights = {native_name("language_model." + name): array
               for name, array in text_weights(hp).items()}
    write_safetensors(native / "consolidated.safetensors", weights)
    shutil.copyfile(tekken, native / "tekken.json")
    code, output = _convert(str(native), "--out", str(tmp_path / "out"), "--json")
    assert code == 0, output
    assert json.loads(output[output.index("{"):])["layout"] == "mistral"


def test_existing_output_needs_force(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _convert(str(checkpoint), "--out", str(out))[0] == 0
    before = (out / "small-mistral-BF16.gguf").stat().st_mtime_ns
    code, output = _convert(str(checkpoint), "--out", str(out))
    assert code == 1 and "already exists; pass --force" in output
    assert (out / "small-mistral-BF16.gguf").stat().st_mtime_ns == before
    assert _convert(str(checkpoint), "--out", str(out), "--force")[0] == 0
    assert _leftovers(out) == ["small-mistral-BF16.gguf"]


# --- bad input ---------------------------------------------------------------------------


def test_missing_weights(checkpoint: Path, tmp_path: Path) -> None:
    (checkpoint / "model.safetensors").unlink()
    _refused(checkpoint, tmp_path / "out", "no model*.safetensors weights")


def test_missing_shard_listed_in_the_index(checkpoint: Path, tmp_path: Path) -> None:
    names = list(text_weights())
    index = {"weight_map": {n: "model-00001-of-00002.safetensors" for n in names[:5]}
             | {n: "model-00002-of-00002.safetensors" for n in names[5:]}}
    (checkpoint / "model.safetensors").rename(checkpoint / "model-00001-of-00002.safetensors")
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(checkpoint, tmp_path / "out", "model-00002-of-00002.safetensors")


def test_truncated_weights(checkpoint: Path, tmp_path: Path) -> None:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    _refused(checkpoint, tmp_path / "out", "is truncated")


def test_damaged_safetensors_header(checkpoint: Path, tmp_path: Path) -> None:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 100)
    _refused(checkpoint, tmp_path / "out", "not a readable safetensors file")


@pytest.mark.parametrize(("change", "message"), [
    ({"architectures": ["LlamaForCausalLM"]}, "LlamaForCausalLM model; localsmall converts"),
    ({"hidden_size": 128}, "the config and the weights do not match"),
    ({"num_hidden_layers": 3}, "lacks 9 text tensor(s)"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn'"),
])
def test_config_that_does_not_fit(checkpoint: Path, tmp_path: Path, change: dict,
                                  message: str) -> None:
    (checkpoint / "config.json").write_text(json.dumps(text_config() | change))
    _refused(checkpoint, tmp_path / "out", message)


def test_weights_of_another_model(checkpoint: Path, tmp_path: Path) -> None:
    from tests.checkpoints import write_safetensors

    weights = text_weights() | {"model.layers.0.self_attn.rotary_gate.weight": np.ones(4)}
    write_safetensors(checkpoint / "model.safetensors", weights)
    _refused(checkpoint, tmp_path / "out", "has no llama.cpp counterpart")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(empty, tmp_path / "out", "no checkpoint found")
    _refused(tmp_path / "nowhere" / "x", tmp_path / "out", "neither a directory nor")


def test_missing_tokenizer(checkpoint: Path, tmp_path: Path) -> None:
    (checkpoint / "tekken.json").unlink()
    (checkpoint / "tokenizer.model").write_bytes(b"spm")
    _refused(checkpoint, tmp_path / "out", "no tekken.json")


def test_bad_flags_are_usage_errors(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for args, message in ((["--outtype", "q4"], "--outtype must be one of"),
                          (["--quant", "Q4_K_M,Q9"], "unknown quant type 'Q9'"),
                          (["--quant", "IQ2_XXS"], "IQ2_XXS need an importance matrix"),
                          (["--outtype", "q8_0", "--quant", "Q4_K_M"], "full-precision")):
        code, output = _convert(str(checkpoint), "--out", str(out), *args)
        assert code == 2 and message in output, output
    assert _leftovers(out) == []


def test_not_enough_disk_space(checkpoint: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "free_disk_bytes", lambda directory: 1_000_000)
    _refused(checkpoint, tmp_path / "out", "needs about")


def _fail_on_second_slice(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    real: Callable = gguf_stream.convert_rows
    calls = []

    def failing(*args: object) -> np.ndarray:
        calls.append(1)
        if len(calls) == 2:
            raise exc
        return real(*args)

    monkeypatch.setattr(gguf_stream, "convert_rows", failing)


def test_disk_full_while_writing(checkpoint: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_on_second_slice(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    _refused(checkpoint, tmp_path / "out", "no space left on the disk")


def test_interrupted_conversion_leaves_nothing(checkpoint: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_on_second_slice(monkeypatch, KeyboardInterrupt())
    code, output = _convert(str(checkpoint), "--out", str(tmp_path / "out"))
    assert code == 130 and "interrupted" in output
    assert _leftovers(tmp_path / "out") == []


# --- quantizing ----------------------------------------------------------------------------


def _gguf_imatrix(path: Path, columns: dict[str, int], calls: int = 10) -> Path:
    writer = gguf.GGUFWriter(str(path), "imatrix")
    writer.add_array("imatrix.datasets", ["calibration.txt"])
    writer.add_uint32("imatrix.chunk_count", 4)
    writer.add_uint32("imatrix.chunk_size", 512)
    rng = np.random.default_rng(0)
    for name, n in columns.items():
        writer.add_tensor(f"{name}.in_sum2", (rng.random((1, n)) * calls).astype(np.float32))
        writer.add_tensor(f"{name}.counts", np.full((1, 1), calls, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _legacy_imatrix(path: Path, entries: dict[str, np.ndarray], ncall: int) -> Path:
    data = struct.pack("<i", len(entries))
    for name, values in entries.items():
        data += struct.pack("<i", len(name)) + name.encode()
        data += struct.pack("<ii", ncall, values.size) + values.astype("<f4").tobytes()
    data += struct.pack("<i", 7) + struct.pack("<i", 8) + b"wiki.txt"
    path.write_bytes(data)
    return path


def test_imatrix_files_in_both_formats(tmp_path: Path) -> None:
    values = np.arange(1, 9, dtype=np.float32)
    legacy = read_imatrix(_legacy_imatrix(tmp_path / "m.dat", {"blk.0.ffn_up.weight": values},
                                          ncall=4))
    assert np.allclose(legacy.entries["blk.0.ffn_up.weight"], values / 4)
    assert (legacy.datasets, legacy.chunk_count) == (("wiki.txt",), 7)
    modern = read_imatrix(_gguf_imatrix(tmp_path / "m.gguf", {"blk.0.ffn_up.weight": 8}))
    assert modern.entries["blk.0.ffn_up.weight"].shape == (8,)
    assert modern.datasets == ("calibration.txt",)
    (tmp_path / "junk.dat").write_bytes(b"\x05\0\0\0garbage")
    with pytest.raises(ConversionError, match="is damaged"):
        read_imatrix(tmp_path / "junk.dat")


def _tensor_bytes(path: Path, name: str) -> bytes:
    record = read_header(path).tensor(name)
    with open(path, "rb") as f:
        f.seek(record.offset)
        return f.read(record.n_bytes)


def _iquant_checkpoint(tmp_path: Path, tekken: Path) -> Path:
    return write_text_checkpoint(tmp_path / "iq-mistral", tekken, hp=IQUANT_TEXT,
                                 weights=text_weights(IQUANT_TEXT))


def test_iquant_with_an_imatrix(tmp_path: Path, tekken: Path) -> None:
    source = _iquant_checkpoint(tmp_path, tekken)
    names = [f"blk.0.{n}.weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output",
                                           "ffn_gate", "ffn_up", "ffn_down")]
    imatrix = _gguf_imatrix(tmp_path / "imatrix.gguf", dict.fromkeys(names, 256))
    out = tmp_path / "out"
    code, output = _convert(str(source), "--out", str(out), "--outtype", "f16", "--quant",
                            "IQ2_XXS,Q4_K_M", "--imatrix", str(imatrix), "--threads", "2")
    assert code == 0, output
    directory = read_header(out / "iq-mistral-IQ2_XXS.gguf")
    assert directory.tensor("blk.0.ffn_up.weight").quant_type == gguf.GGMLQuantizationType.IQ2_XXS
    assert directory.metadata["quantize.imatrix.file"] == "imatrix.gguf"
    assert directory.metadata["quantize.imatrix.entries_count"] == len(names)

    # The importance values steer llama.cpp's quantizer: the same weights quantized to
    # Q4_K_M without them, or with other values, give other blocks where the matrix has
    # entries, and the very same blocks where it has none.
    from localsmall.engine.quantize import quantize_gguf

    f16 = out / "iq-mistral-F16.gguf"
    plain, other = tmp_path / "plain-Q4_K_M.gguf", tmp_path / "other-Q4_K_M.gguf"
    quantize_gguf(f16, plain, "Q4_K_M", threads=2)
    values = read_imatrix(imatrix).entries
    flipped = {name: np.ascontiguousarray(v[::-1]) for name, v in values.items()}
    quantize_gguf(f16, other, "Q4_K_M", threads=2, imatrix=flipped)
    steered = out / "iq-mistral-Q4_K_M.gguf"
    for name in names:
        with_values = _tensor_bytes(steered, name)
        assert with_values != _tensor_bytes(plain, name), name
        assert with_values != _tensor_bytes(other, name), name
    for name in ("token_embd.weight", "output.weight"):  # no importance values for these
        assert _tensor_bytes(steered, name) == _tensor_bytes(plain, name)

    wrong = _gguf_imatrix(tmp_path / "other.gguf", {"blk.0.ffn_up.weight": 512})
    code, output = _convert(str(source), "--out", str(tmp_path / "out2"), "--quant", "IQ2_XS",
                            "--imatrix", str(wrong))
    assert code == 1 and "made for another model" in " ".join(output.split())


def test_llama_cpp_refuses_iquants_without_imatrix(tmp_path: Path, tekken: Path) -> None:
    from localsmall.engine.quantize import quantize_gguf

    source = _iquant_checkpoint(tmp_path, tekken)
    assert _convert(str(source), "--out", str(tmp_path), "--outtype", "f16")[0] == 0
    with pytest.raises(ConversionError, match="needs an importance matrix"):
        quantize_gguf(tmp_path / "iq-mistral-F16.gguf", tmp_path / "x.gguf", "IQ2_XXS")


def test_interrupted_quantization_leaves_nothing(checkpoint: Path, tmp_path: Path) -> None:
    assert _convert(str(checkpoint), "--out", str(tmp_path / "out"))[0] == 0
    source = tmp_path / "out" / "small-mistral-BF16.gguf"

    def interrupt(size: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_quantize(source, tmp_path / "out" / "q.gguf", "Q4_K_M", threads=1, imatrix=None,
                     on_size=interrupt)
    assert _leftovers(tmp_path / "out") == ["small-mistral-BF16.gguf"]


# --- small pieces ---------------------------------------------------------------------------


def test_bf16_rounding_matches_the_gguf_package() -> None:
    from localsmall.convert.gguf_stream import to_bf16

    values = np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * 1e3
    values[:8] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.00390625, 3.4e38, 1e-40]
    expected = gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16).view(np.uint16)
    assert np.array_equal(to_bf16(values), expected)


def test_quant_names() -> None:
    from localsmall.convert.quant_types import QUANT_TYPES
    from localsmall.engine.quantize import ftype_for

    assert all(ftype_for(name) > 0 for name in QUANT_TYPES)  # each is a llama.cpp type
    assert [q.name for q in parse_quants("q4_k_m, Q5_K ,q4_k_m")] == ["Q4_K_M", "Q5_K_M"]
    assert parse_quants("IQ1_S")[0].needs_imatrix
    with pytest.raises(UsageError, match="unknown quant type"):
        parse_quants("Q4_K_X")


def test_hub_download_takes_one_layout() -> None:
    both = ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
            "params.json", "consolidated.safetensors", "tekken.json", "README.md"]
    assert "consolidated*.safetensors" in download_patterns(both)
    assert "model*.safetensors" not in download_patterns(both)
    hf_only = [f for f in both if f not in ("params.json", "consolidated.safetensors")]
    assert "model*.safetensors" in download_patterns(hf_only)
    with pytest.raises(ConversionError):
        download_patterns(["README.md"])


def test_hub_source_offline_is_a_clear_error(tmp_path: Path) -> None:
    # conftest sets HF_HUB_OFFLINE=1: only the local cache may be used
    code, output = _convert("mistralai/Not-Here-2506", "--out", str(tmp_path / "out"))
    assert code == 1 and "not in the local Hugging Face cache" in " ".join(output.split())
    assert "Traceback" not in output


def test_license_from_the_model_card(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("---\nlibrary_name: vllm\nlicense: apache-2.0\n---\n")
    assert readme_license(tmp_path) == "apache-2.0"


def test_convert_a_hub_repository(checkpoint: Path, tmp_path: Path, hub) -> None:
    # Both layouts are on the Hub; only the transformers one is downloaded (verified,
    # through localsmall's hub code), then converted.
    repo = "someone/Small-Mistral-2506"
    for file in sorted(checkpoint.iterdir()):
        hub.state.add(repo, file.name, file.read_bytes())
    hub.state.add(repo, "consolidated.safetensors.unused", b"never fetched")
    out = tmp_path / "out"
    code, output = _convert(repo, "--out", str(out), "--outtype", "f16")
    assert code == 0, output
    assert _leftovers(out) == ["Small-Mistral-2506-F16.gguf"]
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.state.requests if "/resolve/" in r.path}
    assert "config.json" in fetched and "consolidated.safetensors.unused" not in fetched
