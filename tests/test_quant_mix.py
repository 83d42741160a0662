"""llama.cpp's quant mixes (plan.quant_mix): checked against llama.cpp's own quantizer
and the catalog's file sizes, and used for the speed of a build not downloaded yet."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from localsmall.gguf_header import read_header, type_bytes
from localsmall.models.catalog import load_catalog
from localsmall.plan import quant_mix
from localsmall.plan.memory import text_weights_from_catalog
from localsmall.plan.speed import weight_mix
from tests import tinymodels as tm

MODEL = load_catalog().default
# 16 layers: llama.cpp's first sixteenth, first eighth and every-third-layer rules all
# pick different layers; one KV head per four query heads (its GQA rule for attn_v);
# every row a multiple of 256 (k-quant blocks); a short embedding and output head (the
# quantizer never reads the vocabulary) keep each quantization under a second.
SHAPE = dataclasses.replace(tm.TINY_TEXT, n_layers=16, n_head=4, n_head_kv=1, head_dim=128,
                            n_embd=256, n_ff=512, n_vocab=1024)
METADATA_BYTES = 16 << 20   # the vocabulary, chat template and norms: about 10 MB
QUANTS = ("Q2_K", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q8_0")


@pytest.fixture(scope="module")
def f16_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("quant-mix")
    return tm.write_text_model(root / "mix-F16.gguf", hp=SHAPE)


@pytest.mark.parametrize("quant", QUANTS)
def test_each_matrix_has_the_type_llama_cpp_gives_it(f16_model: Path, quant: str) -> None:
    quantized = tm.quantize(f16_model, f16_model.with_name(f"mix-{quant}.gguf"), quant)
    types = {t.name: t.type for t in read_header(quantized).tensors}
    quantized.unlink()
    for layer in range(SHAPE.n_layers):
        expected = quant_mix.layer_types(quant, layer=layer, n_layers=SHAPE.n_layers, n_gqa=4)
        assert expected is not None
        found = {name: types[f"blk.{layer}.{name}.weight"] for name in quant_mix.MATRICES}
        assert found == expected, f"{quant} layer {layer}"
    assert types["output.weight"] == quant_mix.output_type(quant)
    assert types["token_embd.weight"] == quant_mix.BASE_TYPE[quant]


def test_mixes_give_the_catalog_file_sizes() -> None:
    """Weights x bytes of each type, plus the embedding and output head, are the size of
    each catalog build llama.cpp's rules describe, but for the file's metadata and norms."""
    checked = []
    s = MODEL.architecture
    for quant in MODEL.quants:
        layers = quant_mix.layer_weights(quant.quant, dataclasses.replace(
            SHAPE, n_layers=s.n_layers, n_embd=s.n_embd, n_head=s.n_head,
            n_head_kv=s.n_head_kv, head_dim=s.head_dim, n_ff=s.n_ff, n_vocab=s.n_vocab))
        if layers is None:
            continue
        assert quant.embd_type == quant_mix.BASE_TYPE[quant.quant]
        assert quant.output_type == quant_mix.output_type(quant.quant)
        vocab = s.n_vocab * s.n_embd
        size = sum(type_bytes(kind, int(n)) for kind, n in layers.items()) + \
            type_bytes(quant.embd_type, vocab) + type_bytes(quant.output_type, vocab)
        assert 0 <= quant.remote.size - size < METADATA_BYTES, quant.quant
        checked.append(quant.quant)
    assert {"Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q8_0"} <= set(checked)


def test_a_build_not_downloaded_is_timed_with_its_real_mix() -> None:
    """Q3_K_M's larger matrices are Q4_K (not Q5_K topped up to the size): the kernels
    the planner times it with are those of the file it will download."""
    quant = MODEL.quant("Q3_K_M")
    text = text_weights_from_catalog(MODEL, quant)
    layers, output = weight_mix(text, quant)
    assert layers == quant_mix.layer_weights("Q3_K_M", text.shape)
    assert set(layers) == {"Q3_K", "Q4_K", "Q5_K"} and layers["Q4_K"] > 10 * layers["Q5_K"]
    assert set(output) == {"Q6_K"}
    # a build whose size llama.cpp's mix does not give ("dynamic" quants): main type
    # topped up with the next larger one to the size
    ud = MODEL.quant("UD-Q4_K_XL")
    layers, _ = weight_mix(text_weights_from_catalog(MODEL, ud), ud)
    assert set(layers) == {"Q4_K", "Q6_K"}
