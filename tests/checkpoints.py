"""Tiny Mistral checkpoints on disk (transformers and Mistral-native layouts), written
with numpy alone, for the converter's tests.

`write_safetensors` writes the format byte for byte as the safetensors library does
(8-byte header length, JSON header padded with spaces to 8 bytes, raw data), so these
checkpoints need neither torch nor the safetensors package.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np

from localsmall.convert.gguf_files import TextHParams

# A small text-only model: fast to write and convert (vocabulary cut to 2048 tokens).
SMALL_TEXT = TextHParams(n_layers=2, n_embd=64, n_head=4, n_head_kv=2, head_dim=32, n_ff=128,
                         n_vocab=2048, context_length=4096, rope_theta=1_000_000_000.0)


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even), as uint16."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + (0x7FFF + ((bits >> 16) & 1))
    return (rounded >> 16).astype(np.uint16)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "BF16") -> Path:
    """Write float32 arrays as a .safetensors file in `dtype` (BF16, F16 or F32)."""
    encoded = {}
    for name, array in tensors.items():
        if dtype == "BF16":
            encoded[name] = to_bf16_bits(array)
        else:
            encoded[name] = np.ascontiguousarray(array, {"F16": "<f2", "F32": "<f4"}[dtype])
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, array in encoded.items():
        header[name] = {"dtype": dtype, "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for array in encoded.values():
            out.write(array.tobytes())
    return path


def text_weights(hp: TextHParams = SMALL_TEXT, seed: int = 0) -> dict[str, np.ndarray]:
    """Random text weights under transformers' MistralForCausalLM names."""
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    weights = {"model.embed_tokens.weight": rand(hp.n_vocab, hp.n_embd)}
    for i in range(hp.n_layers):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": 1 + 0.1 * rand(hp.n_embd),
            p + "self_attn.q_proj.weight": rand(q, hp.n_embd),
            p + "self_attn.k_proj.weight": rand(kv, hp.n_embd),
            p + "self_attn.v_proj.weight": rand(kv, hp.n_embd),
            p + "self_attn.o_proj.weight": rand(hp.n_embd, q),
            p + "post_attention_layernorm.weight": 1 + 0.1 * rand(hp.n_embd),
            p + "mlp.gate_proj.weight": rand(hp.n_ff, hp.n_embd),
            p + "mlp.up_proj.weight": rand(hp.n_ff, hp.n_embd),
            p + "mlp.down_proj.weight": rand(hp.n_embd, hp.n_ff),
        }
    weights["model.norm.weight"] = 1 + 0.1 * rand(hp.n_embd)
    weights["lm_head.weight"] = rand(hp.n_vocab, hp.n_embd)
    return weights


def text_config(hp: TextHParams = SMALL_TEXT) -> dict[str, object]:
    """config.json of a transformers MistralForCausalLM."""
    return {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "hidden_size": hp.n_embd, "num_hidden_layers": hp.n_layers,
        "num_attention_heads": hp.n_head, "num_key_value_heads": hp.n_head_kv,
        "head_dim": hp.head_dim, "intermediate_size": hp.n_ff, "vocab_size": hp.n_vocab,
        "max_position_embeddings": hp.context_length, "rms_norm_eps": hp.rms_eps,
        "rope_theta": hp.rope_theta, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def write_text_checkpoint(directory: Path, tekken: Path, *, hp: TextHParams = SMALL_TEXT,
                          weights: dict[str, np.ndarray] | None = None,
                          dtype: str = "BF16") -> Path:
    """A transformers-layout MistralForCausalLM checkpoint with the given tekken.json."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(text_config(hp)), encoding="utf-8")
    write_safetensors(directory / "model.safetensors", weights or text_weights(hp), dtype)
    shutil.copyfile(tekken, directory / "tekken.json")
    return directory
