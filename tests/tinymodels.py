"""Tiny random-weight models shaped like Mistral Small 3.2, built at test time.

The text model has the real tekken vocabulary (from mistral-common's wheel), a
decoupled head_dim (n_embd / n_head != head_dim) and grouped-query attention; the
projector is a Pixtral vision tower with the Mistral 3 patch merger and the
[IMG_BREAK] embedding. Both are written through localsmall's own GGUF writers, so
the fixtures exercise the same metadata code the converter uses.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import gguf
import numpy as np
from PIL import Image

from localsmall.convert.gguf_files import (
    FileInfo,
    TextHParams,
    VisionHParams,
    mmproj_writer,
    text_writer,
)
from localsmall.convert.tekken import GgufVocab, TekkenVocab, read_tekken, to_gguf_vocab

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "localsmall" / "templates"

# Mistral Small 3.2's control tokens beyond the legacy layout (tokenizer v11).
V11_EXTRA_SPECIAL = {32: "[ARGS]", 33: "[CALL_ID]"}

TINY_TEXT = TextHParams(
    n_layers=2, n_embd=256, n_head=4, n_head_kv=2, head_dim=128, n_ff=512,
    n_vocab=131072, context_length=131072, rope_theta=1_000_000_000.0, rms_eps=1e-5,
)
TINY_VISION = VisionHParams(
    n_layers=2, n_embd=64, n_head=2, n_ff=128, projection_dim=TINY_TEXT.n_embd,
    patch_size=14, image_size=1540, spatial_merge_size=2, rms_eps=1e-5,
)


def mistral_common_tekken() -> Path:
    """The real tekken vocabulary shipped in mistral-common's wheel."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"


def write_v11_tekken(dest: Path) -> Path:
    """A tekken.json laid out like Mistral Small 3.2's (v11, special tokens listed,
    image settings), built from the real vocabulary in mistral-common."""
    source = json.loads(mistral_common_tekken().read_text(encoding="utf-8"))
    vocab = read_tekken(mistral_common_tekken())
    special = list(vocab.special)
    for rank, name in V11_EXTRA_SPECIAL.items():
        special[rank] = name
    source["config"]["version"] = "v11"
    source["special_tokens"] = [
        {"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(special)
    ]
    source["image"] = {"image_patch_size": 14, "max_image_size": 1540,
                       "spatial_merge_size": 2}
    dest.write_text(json.dumps(source), encoding="utf-8")
    return dest


@cache
def tiny_vocab() -> TekkenVocab:
    vocab = read_tekken(mistral_common_tekken())
    special = list(vocab.special)
    for rank, name in V11_EXTRA_SPECIAL.items():
        special[rank] = name
    return TekkenVocab(special=tuple(special), ranks=vocab.ranks, pattern=vocab.pattern,
                       version="v11")


@cache
def tiny_gguf_vocab() -> GgufVocab:
    return to_gguf_vocab(tiny_vocab())


def builtin_template() -> str:
    return (TEMPLATE_PATH / "mistral-small-3.2.jinja").read_text(encoding="utf-8")


def _rand(rng: np.random.Generator, *shape: int, scale: float | None = None) -> np.ndarray:
    std = scale if scale is not None else 1.0 / np.sqrt(shape[-1])
    return (rng.standard_normal(shape) * std).astype(np.float32)


def text_tensors(hp: TextHParams, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights under llama.cpp's tensor names, numpy shape [out, in]."""
    rng = np.random.default_rng(seed)
    q_dim, kv_dim = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    tensors = {"token_embd.weight": _rand(rng, hp.n_vocab, hp.n_embd, scale=1.0)}
    for i in range(hp.n_layers):
        p = f"blk.{i}."
        tensors |= {
            p + "attn_norm.weight": 1 + _rand(rng, hp.n_embd, scale=0.1),
            p + "attn_q.weight": _rand(rng, q_dim, hp.n_embd),
            p + "attn_k.weight": _rand(rng, kv_dim, hp.n_embd),
            p + "attn_v.weight": _rand(rng, kv_dim, hp.n_embd),
            p + "attn_output.weight": _rand(rng, hp.n_embd, q_dim),
            p + "ffn_norm.weight": 1 + _rand(rng, hp.n_embd, scale=0.1),
            p + "ffn_gate.weight": _rand(rng, hp.n_ff, hp.n_embd),
            p + "ffn_up.weight": _rand(rng, hp.n_ff, hp.n_embd),
            p + "ffn_down.weight": _rand(rng, hp.n_embd, hp.n_ff),
        }
    tensors["output_norm.weight"] = 1 + _rand(rng, hp.n_embd, scale=0.1)
    # A larger output scale gives peaked next-token distributions, like a real model.
    tensors["output.weight"] = _rand(rng, hp.n_vocab, hp.n_embd, scale=0.5)
    return tensors


def vision_tensors(vp: VisionHParams, img_break_row: np.ndarray,
                   seed: int = 1) -> dict[str, np.ndarray]:
    """Random Pixtral + Mistral 3 projector weights under clip.cpp's tensor names."""
    rng = np.random.default_rng(seed)
    d, merge = vp.n_embd, vp.spatial_merge_size
    tensors = {
        "v.patch_embd.weight": _rand(rng, d, 3, vp.patch_size, vp.patch_size,
                                     scale=1.0 / np.sqrt(3 * vp.patch_size**2)),
        "v.pre_ln.weight": 1 + _rand(rng, d, scale=0.1),
    }
    for i in range(vp.n_layers):
        p = f"v.blk.{i}."
        tensors |= {
            p + "ln1.weight": 1 + _rand(rng, d, scale=0.1),
            p + "ln2.weight": 1 + _rand(rng, d, scale=0.1),
            p + "attn_q.weight": _rand(rng, d, d),
            p + "attn_k.weight": _rand(rng, d, d),
            p + "attn_v.weight": _rand(rng, d, d),
            p + "attn_out.weight": _rand(rng, d, d),
            p + "ffn_gate.weight": _rand(rng, vp.n_ff, d),
            p + "ffn_up.weight": _rand(rng, vp.n_ff, d),
            p + "ffn_down.weight": _rand(rng, d, vp.n_ff),
        }
    tensors |= {
        "mm.input_norm.weight": 1 + _rand(rng, d, scale=0.1),
        "mm.patch_merger.weight": _rand(rng, d, d * merge * merge),
        "mm.1.weight": _rand(rng, vp.projection_dim, d),
        "mm.2.weight": _rand(rng, vp.projection_dim, vp.projection_dim),
        "v.token_embd.img_break": img_break_row.astype(np.float32),
    }
    return tensors


@dataclass(frozen=True)
class TinyBuild:
    """Paths of one built tiny model."""

    model: Path
    mmproj: Path


def write_text_model(path: Path, *, hp: TextHParams = TINY_TEXT, seed: int = 0,
                     chat_template: str | None = None, dtype: str = "f16",
                     tensors: dict[str, np.ndarray] | None = None) -> Path:
    """Write a tiny text GGUF (f16 or f32 matrices, f32 norms)."""
    vocab = tiny_gguf_vocab()
    file_type = gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32
    writer = text_writer(str(path), hp, vocab, info=FileInfo(name="Tiny Mistral Small 3.2"),
                         chat_template=chat_template, file_type=file_type)
    for name, array in (tensors or text_tensors(hp, seed)).items():
        keep_f32 = dtype == "f32" or array.ndim == 1
        writer.add_tensor(name, array if keep_f32 else array.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_mmproj(path: Path, text_model_tensors: dict[str, np.ndarray] | None = None, *,
                 vp: VisionHParams = TINY_VISION, seed: int = 1, dtype: str = "f32") -> Path:
    """Write a tiny Pixtral projector GGUF matched to a tiny text model."""
    img_break_id = tiny_vocab().token_id("[IMG_BREAK]")
    embd = (text_model_tensors or text_tensors(TINY_TEXT))["token_embd.weight"]
    file_type = gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32
    writer = mmproj_writer(str(path), vp, info=FileInfo(name="Tiny Pixtral projector"),
                           file_type=file_type)
    for name, array in vision_tensors(vp, embd[img_break_id], seed).items():
        keep_f32 = dtype == "f32" or array.ndim == 1 or name.endswith("img_break")
        writer.add_tensor(name, array if keep_f32 else array.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantize(source: Path, dest: Path, quant: str) -> Path:
    """Quantize with llama.cpp's own quantizer (through localsmall's engine)."""
    from localsmall.engine.quantize import quantize_gguf

    quantize_gguf(source, dest, quant)
    return dest


def image_bytes(width: int, height: int, *, fmt: str = "PNG", seed: int = 0,
                mode: str = "RGB") -> bytes:
    """A random-noise image file in memory."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    shape = (height, width, channels) if channels > 1 else (height, width)
    pixels = np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buffer, fmt)
    return buffer.getvalue()
