"""Fuzzing the memory model on odd hyper-parameters (localsmall.plan.memory): a local
GGUF with missing, zero, negative, huge or mistyped values gives a ModelLoadError (or
sane weights), and one bad local file never breaks `plan`, `pull` or a run of the
model through the CLI: the catalog's estimate stands in for it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from localsmall.cli import app
from localsmall.errors import ModelLoadError
from localsmall.gguf_header import parse_header
from localsmall.models.catalog import load_catalog
from localsmall.models.registry import RegisteredBuild, register_build
from localsmall.plan.memory import (
    RunShape,
    TextWeights,
    VisionWeights,
    estimate,
    text_weights_from_file,
    text_weights_from_header,
    vision_weights_from_file,
)
from tests.conftest import LocalHub
from tests.fuzzing import (
    GGUF_ARRAY,
    GGUF_F32,
    GGUF_I32,
    GGUF_STRING,
    GGUF_U32,
    GGUF_U64,
    fuzz_settings,
    gguf_file,
    gguf_kv,
    gguf_model,
    gguf_tensor_info,
    only_own_errors,
)

TARGET = "memory model"
KEYS = ("block_count", "embedding_length", "attention.head_count",
        "attention.head_count_kv", "attention.key_length", "feed_forward_length",
        "vocab_size", "context_length")
GOOD = {"block_count": 2, "embedding_length": 64, "attention.head_count": 4,
        "attention.head_count_kv": 2, "attention.key_length": 16, "feed_forward_length": 128,
        "vocab_size": 1000, "context_length": 4096}

# One hyper-parameter: absent, or typed oddly.
ODD_VALUE = st.one_of(
    st.none(),
    st.tuples(st.just(GGUF_U32), st.sampled_from([0, 1, 2, 7, 4_000_000_000, 2**32 - 1])),
    st.tuples(st.just(GGUF_U64), st.sampled_from([0, 3, 2**40, 2**63, 2**64 - 1])),
    st.tuples(st.just(GGUF_I32), st.integers(-(2**31), 2**31 - 1)),
    st.tuples(st.just(GGUF_F32), st.sampled_from([0.0, 2.5, float("nan"), float("inf")])),
    st.tuples(st.just(GGUF_STRING), st.sampled_from(["", "12", "x"])),
    st.tuples(st.just(GGUF_ARRAY), st.just((GGUF_U32, [1, 2]))),
)
TENSOR_NAMES = st.one_of(st.sampled_from(["token_embd.weight", "output.weight", "blk.",
                                          "blk.x.w", "blk..w", "blk.-1.w", "blk.1e3.w"]),
                         st.integers(0, 2**40).map(lambda n: f"blk.{n}.attn_q.weight"))


def _weights(tmp_path: Path, data: bytes, *, on_disk: bool = False
             ) -> TextWeights | ModelLoadError:
    path = tmp_path / "model.gguf"
    if on_disk:
        path.write_bytes(data)
        result = only_own_errors(TARGET, lambda: text_weights_from_file(path),
                                 max_peak_bytes=8 << 20)
    else:
        result = only_own_errors(
            TARGET, lambda: text_weights_from_header(parse_header(data, path)))
    assert isinstance(result, TextWeights | ModelLoadError)
    if isinstance(result, TextWeights):
        # Whatever was accepted is sane enough to plan with.
        shape = result.shape
        assert 1 <= shape.n_layers <= 4096 and min(shape.n_head, shape.n_head_kv,
                                                   shape.head_dim, shape.n_vocab) >= 1
        estimate(result, RunShape(n_ctx=4096), n_gpu_layers=-1, gpus=("GPU0",))
    return result


@given(values=st.fixed_dictionaries({k: ODD_VALUE for k in KEYS}),
       tensors=st.lists(st.tuples(TENSOR_NAMES, st.lists(st.integers(0, 64), max_size=3)),
                        max_size=4),
       arch=st.sampled_from(["llama", "", "ll\nama\x1b[2J"]))
@fuzz_settings(max_examples=1500)
def test_odd_hyper_parameters(tmp_path: Path, values: dict[str, Any],
                              tensors: list[tuple[str, list[int]]], arch: str) -> None:
    present = {k: v for k, v in values.items() if v is not None}
    _weights(tmp_path, gguf_model(present, [(n, tuple(s)) for n, s in tensors], arch))


@given(key=st.sampled_from(KEYS), value=ODD_VALUE)
@fuzz_settings(max_examples=500)
def test_one_odd_value_among_good_ones(tmp_path: Path, key: str, value: Any) -> None:
    values = {k: (GGUF_U32, v) for k, v in GOOD.items()}
    if value is None:
        del values[key]
    else:
        values[key] = value
    _weights(tmp_path, gguf_model(values, [("blk.0.attn_q.weight", (64, 64)),
                                           ("output.weight", (64, 1000))]))


def test_block_count_4e9_in_a_tiny_file(tmp_path: Path) -> None:
    values = {k: (GGUF_U32, v) for k, v in GOOD.items()} | {"block_count": (GGUF_U32, 4 * 10**9)}
    data = gguf_model(values, [("blk.0.w", (8, 8))])
    assert len(data) < 1000
    result = _weights(tmp_path, data, on_disk=True)
    assert isinstance(result, ModelLoadError) and "block_count" in str(result)


def test_head_count_zero_or_missing(tmp_path: Path) -> None:
    for head_count in (0, None):
        values = {k: (GGUF_U32, v) for k, v in GOOD.items() if k != "attention.key_length"}
        if head_count is None:
            del values["attention.head_count"]
        else:
            values["attention.head_count"] = (GGUF_U32, head_count)
        result = _weights(tmp_path, gguf_model(values, []))
        assert isinstance(result, ModelLoadError) and "head_count" in str(result)


def test_tensor_of_a_layer_the_model_does_not_have(tmp_path: Path) -> None:
    values = {k: (GGUF_U32, v) for k, v in GOOD.items()}
    result = _weights(tmp_path, gguf_model(values, [("blk.7.w", (8, 8))]))
    assert isinstance(result, ModelLoadError) and "blk.7.w" in str(result)


@given(values=st.dictionaries(st.sampled_from([
    "clip.vision.embedding_length", "clip.vision.feed_forward_length",
    "clip.vision.attention.head_count", "clip.vision.patch_size",
    "clip.vision.spatial_merge_size", "clip.vision.projection_dim"]), ODD_VALUE))
@fuzz_settings(max_examples=500)
def test_odd_projector_values(tmp_path: Path, values: dict[str, Any]) -> None:
    kvs = [gguf_kv(k, *v) for k, v in values.items() if v is not None]
    path = tmp_path / "mmproj.gguf"
    path.write_bytes(gguf_file(kvs, [gguf_tensor_info("v.w", (8, 8), 0, 0)]))
    result = only_own_errors(TARGET, lambda: vision_weights_from_file(path))
    assert isinstance(result, VisionWeights | ModelLoadError)


def _bad_model(path: Path) -> Path:
    values = {k: (GGUF_U32, v) for k, v in GOOD.items()}
    values |= {"attention.head_count": (GGUF_U32, 0), "block_count": (GGUF_U32, 4 * 10**9)}
    path.write_bytes(gguf_model(values, [("blk.0.w", (8, 8))]))
    return path


def test_one_bad_local_file_breaks_nothing_through_the_cli(hub: LocalHub, tiny,
                                                           tmp_path: Path) -> None:
    """A damaged build registered for the model: plan, pull and run still work."""
    model = load_catalog().default
    q4, projector = model.quant("Q4_K_M").remote, model.projector.remote
    register_build(RegisteredBuild(model.id, "Q2_K", str(_bad_model(tmp_path / "bad.gguf"))))
    runner = CliRunner()
    planned = runner.invoke(app, ["plan", "--json"])
    assert planned.exit_code == 0, planned.output
    assert json.loads(planned.stdout)["choice"]["quant"] == "Q4_K_M"

    hub.state.add(q4.repo, q4.file, Path(tiny.q4_k_m).read_bytes())
    hub.state.add(q4.repo, projector.file, Path(tiny.mmproj).read_bytes())
    pulled = runner.invoke(app, ["pull"])
    assert pulled.exit_code == 0, pulled.output
    ran = runner.invoke(app, ["run", "Hello", "--max-tokens", "2", "--temperature", "0",
                              "--threads", "2", "--ctx", "1024", "--json"])
    assert ran.exit_code == 0, ran.output
    assert json.loads(ran.stdout)["stats"]["generated_tokens"] == 2
    # The bad build itself fails with one clean line, not a traceback.
    bad = runner.invoke(app, ["plan", f"{model.id}:Q2_K", "--json"])
    assert "Traceback" not in bad.output
