"""Small GGUF files of the real decoder's layer shape, for timing llama.cpp's kernels.

A calibration file holds one or a few decoder layers of the model's real width (n_embd,
n_ff, heads, head_dim), every matrix in ONE ggml type filled with random quantized
blocks (no training, no download), a 259-token byte vocabulary and F32 norms. Timing
it through the engine measures what a real build of that type costs per layer on this
machine, with the engine's real weight placement.

Random blocks are made valid by giving each one a small scale (the f16 `d`, and `dmin`
where the type has one), so the dequantized weights stay finite.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from localsmall.models.shape import DecoderShape

# Byte offset of the f16 scale(s) inside one block of each type (ggml's block layouts).
SCALE_OFFSETS: dict[str, tuple[int, ...]] = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}
SCALE = np.array([0.002], dtype=np.float16).view(np.uint8)
VOCAB_SIZE = 260          # <unk>, <s>, </s>, the 256 byte tokens and one merge


@dataclass(frozen=True)
class LayerShape:
    """The decoder's per-layer dimensions (what kernel timings depend on)."""

    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer's matrices."""
        q, kv = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        return 2 * self.n_embd * q + 2 * self.n_embd * kv + 3 * self.n_embd * self.n_ff

    @classmethod
    def of(cls, shape: DecoderShape) -> LayerShape:
        return cls(shape.n_embd, shape.n_head, shape.n_head_kv, shape.head_dim, shape.n_ff)


def random_blocks(rng: np.random.Generator, n_rows: int, n_cols: int, qtype: str) -> np.ndarray:
    """An n_rows x n_cols matrix of `qtype` as raw bytes: random blocks with small scales."""
    import gguf

    ggml_type = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[ggml_type]
    if qtype in ("F32", "F16"):
        values = (rng.standard_normal((n_rows, n_cols), dtype=np.float32) * 0.02)
        return values.astype(np.float16 if qtype == "F16" else np.float32)
    data = rng.integers(0, 256, size=(n_rows * n_cols // block, size), dtype=np.uint8)
    for offset in SCALE_OFFSETS[qtype]:
        data[:, offset:offset + 2] = SCALE
    return data.reshape(n_rows, n_cols // block * size)


def _tokens() -> tuple[list[str], list[int]]:
    from localsmall.convert.tekken import gpt2_spelling

    space = gpt2_spelling(b" ")
    tokens = ["<unk>", "<s>", "</s>"] + [gpt2_spelling(bytes([b])) for b in range(256)]
    tokens.append(space * 2)   # llama.cpp wants at least one BPE merge
    return tokens, [3, 3, 3] + [1] * 257   # control, then normal (llama.cpp's token types)


def write_calibration_model(path: Path, *, shape: LayerShape, qtype: str, n_layers: int = 1,
                            n_ff: int | None = None, seed: int = 0) -> Path:
    """Write `n_layers` decoder layers of `shape` with every matrix in `qtype`
    (`n_ff` overrides the FFN width: a narrow FFN times attention alone)."""
    import gguf

    rng = np.random.default_rng(seed)
    ff = shape.n_ff if n_ff is None else n_ff
    q, kv = shape.n_head * shape.head_dim, shape.n_head_kv * shape.head_dim
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"localsmall calibration {qtype}")
    for key, value in (("context_length", 131072), ("embedding_length", shape.n_embd),
                       ("block_count", n_layers), ("feed_forward_length", ff),
                       ("attention.head_count", shape.n_head),
                       ("attention.head_count_kv", shape.n_head_kv),
                       ("attention.key_length", shape.head_dim),
                       ("attention.value_length", shape.head_dim),
                       ("rope.dimension_count", shape.head_dim), ("vocab_size", VOCAB_SIZE)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_rope_freq_base(1e9)
    writer.add_layer_norm_rms_eps(1e-5)
    tokens, types = _tokens()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{tokens[-1][0]} {tokens[-1][0]}"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    tensors: list[tuple[str, int, int, str]] = [("token_embd.weight", VOCAB_SIZE,
                                                 shape.n_embd, "F32")]
    for i in range(n_layers):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", 1, shape.n_embd, "norm"),
                    (p + "attn_q.weight", q, shape.n_embd, qtype),
                    (p + "attn_k.weight", kv, shape.n_embd, qtype),
                    (p + "attn_v.weight", kv, shape.n_embd, qtype),
                    (p + "attn_output.weight", shape.n_embd, q, qtype),
                    (p + "ffn_norm.weight", 1, shape.n_embd, "norm"),
                    (p + "ffn_gate.weight", ff, shape.n_embd, qtype),
                    (p + "ffn_up.weight", ff, shape.n_embd, qtype),
                    (p + "ffn_down.weight", shape.n_embd, ff, qtype)]
    tensors += [("output_norm.weight", 1, shape.n_embd, "norm"),
                ("output.weight", VOCAB_SIZE, shape.n_embd, "F32")]
    # Declared first, then generated and written one tensor at a time: a layer of the
    # real width is hundreds of MB, never all in memory at once.
    for name, rows, cols, kind in tensors:
        if kind == "norm":
            writer.add_tensor_info(name, (cols,), np.dtype(np.float32), cols * 4)
        elif kind in ("F32", "F16"):
            dtype = np.dtype(np.float32 if kind == "F32" else np.float16)
            writer.add_tensor_info(name, (rows, cols), dtype, rows * cols * dtype.itemsize)
        else:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
            writer.add_tensor_info(name, (rows, cols // block * size), np.dtype(np.uint8),
                                   rows * cols // block * size,
                                   raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, rows, cols, kind in tensors:
        writer.write_tensor_data(np.ones(cols, dtype=np.float32) if kind == "norm"
                                 else random_blocks(rng, rows, cols, kind))
    writer.close()
    # Flushed before anything is timed: the kernel writing hundreds of MB back to disk
    # in the background halves the speed a timing sees (measured).
    with open(path, "rb") as written:
        os.fsync(written.fileno())
    return path
