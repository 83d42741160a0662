"""Which ggml type each matrix of a decoder layer gets in llama.cpp's quant mixes.

llama.cpp's quantizer (llama_tensor_get_type) does not quantize a "Q3_K_M" build to Q3_K
throughout: attn_v, attn_output and ffn_down take larger types, some only in the first
layers or in every third one. The types cost very different times per weight on a CPU
(on an AVX-512 Xeon a Q3_K weight costs 1.7x a Q4_K weight in generation, 2.6x in
prompt reading), so the planner needs the real mix of a catalog build it has not
downloaded, not just its main type. The rules below are llama.cpp's for dense
llama-style decoders (no experts); they reproduce the catalog's file sizes of Mistral
Small 3.2 to within its metadata (tests/test_speed.py).
"""

from __future__ import annotations

from localsmall.models.shape import DecoderShape

MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# The type most matrices get (llama.cpp's default type of each LLAMA_FTYPE).
BASE_TYPE = {
    "Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K",
    "Q6_K": "Q6_K", "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0",
    "Q5_1": "Q5_1",
}


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth, and every third between."""
    return (layer < n_layers // 8 or layer >= 7 * n_layers // 8
            or (layer - n_layers // 8) % 3 == 2)


def _attn_v(quant: str, base: str, layer: int, n_layers: int, n_gqa: int) -> str:
    if quant == "Q2_K":
        return "Q4_K" if n_gqa >= 4 else "Q3_K"
    if quant == "Q3_K_M":
        return "Q5_K" if layer < 2 else "Q4_K"
    if quant == "Q3_K_L":
        return "Q5_K"
    if quant in ("Q4_K_M", "Q5_K_M") and _more_bits(layer, n_layers):
        return "Q6_K"
    if quant == "Q4_K_S" and layer < 4:
        return "Q5_K"
    return base


def _ffn_down(quant: str, base: str, layer: int, n_layers: int) -> str:
    if quant == "Q2_K":
        return "Q3_K"
    if quant == "Q3_K_M":
        return "Q5_K" if layer < n_layers // 16 else "Q4_K"
    if quant == "Q3_K_L":
        return "Q5_K"
    if quant in ("Q4_K_M", "Q5_K_M") and _more_bits(layer, n_layers):
        return "Q6_K"
    if quant == "Q4_K_S" and layer < n_layers // 8:
        return "Q5_K"
    return base


def _attn_output(quant: str, base: str) -> str:
    return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(quant, base)


def layer_types(quant: str, *, layer: int, n_layers: int, n_gqa: int) -> dict[str, str] | None:
    """The ggml type of each matrix (MATRICES) of decoder layer `layer` in a build of
    `quant` (a LLAMA_FTYPE name such as "Q3_K_M"); None for a mix llama.cpp does not
    define this way (imatrix-only and "dynamic" builds)."""
    quant = quant.upper()
    base = BASE_TYPE.get(quant)
    if base is None:
        return None
    types = dict.fromkeys(MATRICES, base)
    types["attn_v"] = _attn_v(quant, base, layer, n_layers, n_gqa)
    types["attn_output"] = _attn_output(quant, base)
    types["ffn_down"] = _ffn_down(quant, base, layer, n_layers)
    return types


def output_type(quant: str) -> str | None:
    """The output head's type: Q6_K, or Q8_0 in a Q8_0 build (None: unknown mix)."""
    base = BASE_TYPE.get(quant.upper())
    if base is None:
        return None
    return "Q8_0" if base == "Q8_0" else "Q6_K"


def matrix_shapes(shape: DecoderShape) -> dict[str, tuple[int, int]]:
    """(rows, columns) of each matrix of a decoder layer."""
    q, kv = shape.n_head * shape.head_dim, shape.n_head_kv * shape.head_dim
    return {"attn_q": (q, shape.n_embd), "attn_k": (kv, shape.n_embd),
            "attn_v": (kv, shape.n_embd), "attn_output": (shape.n_embd, q),
            "ffn_gate": (shape.n_ff, shape.n_embd), "ffn_up": (shape.n_ff, shape.n_embd),
            "ffn_down": (shape.n_embd, shape.n_ff)}


def layer_weights(quant: str, shape: DecoderShape) -> dict[str, float] | None:
    """Weights per ggml type over all the repeating layers of a `quant` build (None:
    unknown mix)."""
    sizes = {name: rows * cols for name, (rows, cols) in matrix_shapes(shape).items()}
    n_gqa = shape.n_head // max(shape.n_head_kv, 1)
    weights: dict[str, float] = {}
    for layer in range(shape.n_layers):
        types = layer_types(quant, layer=layer, n_layers=shape.n_layers, n_gqa=n_gqa)
        if types is None:
            return None
        for name, kind in types.items():
            weights[kind] = weights.get(kind, 0.0) + sizes[name]
    return weights
