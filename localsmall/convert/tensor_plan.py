"""Which tensor goes where: checkpoint names to llama.cpp names, the shapes the
hyper-parameters imply, output types, and the rotary permutation.

Names are translated with the `gguf` package's tables (the same ones llama.cpp's own
converter uses), plus the few Mistral-native projector names those tables lack. Every
tensor is checked against the shape the config implies, so a config that does not
match its weights is refused before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

import gguf
import numpy as np

from localsmall.convert.gguf_files import TextHParams, VisionHParams
from localsmall.convert.layouts import Checkpoint
from localsmall.convert.safetensors_files import TensorEntry
from localsmall.errors import ConversionError

Q = gguf.GGMLQuantizationType

# --outtype -> the type of matrices in the text model
OUTTYPES: dict[str, gguf.GGMLQuantizationType] = {
    "bf16": Q.BF16, "f16": Q.F16, "f32": Q.F32, "q8_0": Q.Q8_0,
}
FILE_TYPES: dict[gguf.GGMLQuantizationType, int] = {
    Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
    Q.BF16: gguf.LlamaFileType.MOSTLY_BF16, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}
# Names the gguf tables do not cover (Mistral-native projector, and the second
# projector layer, which the tables only map when the encoder has 3+ layers).
NAME_OVERRIDES = {
    "vision_language_adapter.w_in": "mm.1",
    "vision_language_adapter.w_out": "mm.2",
    "multi_modal_projector.linear_1": "mm.1",
    "multi_modal_projector.linear_2": "mm.2",
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
IMG_BREAK = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_TOK_EMBD_IMG_BREAK]


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of an output file and how to produce it from the checkpoint."""

    name: str                          # llama.cpp's name
    source: TensorEntry
    out_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]             # numpy order (rows first)
    rows: tuple[int, int] | None = None  # take only these source rows
    rope_heads: int = 0                # >0: rows are in rotate-half order, in this many heads

    @property
    def row_range(self) -> tuple[int, int]:
        return self.rows or (0, self.source.n_rows)

    @property
    def head_rows(self) -> int:
        """Rows that must be read together (one attention head when permuting)."""
        n_rows = self.source.n_rows
        return n_rows // self.rope_heads if self.rope_heads else 1

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.out_type]
        return self.n_elements // block * size


def text_shapes(hp: TextHParams) -> dict[str, tuple[int, ...]]:
    """llama.cpp's text tensors and their numpy shapes, in file order."""
    q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (hp.n_vocab, hp.n_embd)}
    for i in range(hp.n_layers):
        p = f"blk.{i}."
        shapes |= {
            p + "attn_norm.weight": (hp.n_embd,), p + "attn_q.weight": (q, hp.n_embd),
            p + "attn_k.weight": (kv, hp.n_embd), p + "attn_v.weight": (kv, hp.n_embd),
            p + "attn_output.weight": (hp.n_embd, q), p + "ffn_norm.weight": (hp.n_embd,),
            p + "ffn_gate.weight": (hp.n_ff, hp.n_embd), p + "ffn_up.weight": (hp.n_ff, hp.n_embd),
            p + "ffn_down.weight": (hp.n_embd, hp.n_ff),
        }
    shapes["output_norm.weight"] = (hp.n_embd,)
    shapes["output.weight"] = (hp.n_vocab, hp.n_embd)
    return shapes


def vision_shapes(vp: VisionHParams) -> dict[str, tuple[int, ...]]:
    """The Pixtral projector's tensors (img_break aside) and their numpy shapes."""
    d, m = vp.n_embd, vp.spatial_merge_size
    shapes: dict[str, tuple[int, ...]] = {
        "v.patch_embd.weight": (d, 3, vp.patch_size, vp.patch_size), "v.pre_ln.weight": (d,)}
    for i in range(vp.n_layers):
        p = f"v.blk.{i}."
        shapes |= {
            p + "ln1.weight": (d,), p + "ln2.weight": (d,), p + "attn_q.weight": (d, d),
            p + "attn_k.weight": (d, d), p + "attn_v.weight": (d, d),
            p + "attn_out.weight": (d, d), p + "ffn_gate.weight": (vp.n_ff, d),
            p + "ffn_up.weight": (vp.n_ff, d), p + "ffn_down.weight": (d, vp.n_ff),
        }
    shapes |= {"mm.input_norm.weight": (d,), "mm.patch_merger.weight": (d, d * m * m),
               "mm.1.weight": (vp.projection_dim, d),
               "mm.2.weight": (vp.projection_dim, vp.projection_dim)}
    return shapes


OPTIONAL = {"output.weight"}  # absent when the output head is tied to the embeddings


@cache
def _name_table(arch: gguf.MODEL_ARCH, n_blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(arch, n_blocks)


def _gguf_name(part: str, canonical: str, checkpoint: Checkpoint) -> str | None:
    stem, _, suffix = canonical.rpartition(".")
    if stem in NAME_OVERRIDES:
        return f"{NAME_OVERRIDES[stem]}.{suffix}"
    if part == "text":
        table = _name_table(gguf.MODEL_ARCH.LLAMA, checkpoint.text.n_layers)
    else:
        n_layers = checkpoint.vision.n_layers if checkpoint.vision else 0
        table = _name_table(gguf.MODEL_ARCH.MMPROJ, n_layers)
    return table.get_name(canonical, try_suffixes=(".weight", ".bias"))


def map_names(checkpoint: Checkpoint) -> dict[str, dict[str, TensorEntry]]:
    """{"text": {gguf name: source}, "vision": {...}} for every checkpoint tensor."""
    mapped: dict[str, dict[str, TensorEntry]] = {"text": {}, "vision": {}}
    for src, entry in checkpoint.tensors.items():
        if src.endswith(IGNORED_SUFFIXES):
            continue
        part, canonical = checkpoint.part_of(src)
        if part == "vision" and checkpoint.vision is None:
            raise ConversionError(f"tensor {src} belongs to a vision encoder, but the config "
                                  "describes a text-only model; the config and weights differ")
        name = _gguf_name(part, canonical, checkpoint)
        if name is None:
            raise ConversionError(f"tensor {src} has no llama.cpp counterpart; is this a "
                                  "Mistral Small checkpoint?")
        if name in mapped[part]:
            raise ConversionError(f"tensors {mapped[part][name].name} and {src} both map to "
                                  f"{name}")
        mapped[part][name] = entry
    return mapped


def _check(sources: dict[str, TensorEntry], expected: dict[str, tuple[int, ...]],
           what: str) -> None:
    missing = [n for n in expected if n not in sources and n not in OPTIONAL]
    if missing:
        raise ConversionError(f"the checkpoint lacks {len(missing)} {what} tensor(s) "
                              f"({', '.join(missing[:3])}); the download is incomplete or "
                              "this is not a Mistral Small checkpoint")
    for name, entry in sources.items():
        stem = name.removesuffix(".bias") + ".weight" if name.endswith(".bias") else name
        if stem not in expected:
            raise ConversionError(f"unexpected {what} tensor {entry.name} ({name})")
        want = expected[stem][:1] if name.endswith(".bias") else expected[stem]
        if entry.shape != want:
            raise ConversionError(
                f"tensor {entry.name} has shape {list(entry.shape)} but the config implies "
                f"{list(want)}; the config and the weights do not match")


def _matrix_type(out_type: gguf.GGMLQuantizationType,
                 shape: tuple[int, ...]) -> gguf.GGMLQuantizationType:
    """The type of one tensor: vectors stay F32; a row that does not fill whole blocks of
    the requested type falls back to F16."""
    if len(shape) < 2:
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[out_type][0]
    return out_type if shape[-1] % block == 0 else Q.F16


def _ordered(sources: dict[str, TensorEntry],
             expected: dict[str, tuple[int, ...]]) -> Iterable[tuple[str, TensorEntry]]:
    order = {name: i for i, name in enumerate(expected)}

    def key(name: str) -> tuple[int, str]:
        stem = name.removesuffix(".bias") + ".weight"
        return order.get(name, order.get(stem, len(order))), name

    for name in sorted(sources, key=key):
        yield name, sources[name]


def _rope_heads(name: str, checkpoint: Checkpoint) -> int:
    if not checkpoint.rotate_half:
        return 0
    if name.startswith(("blk.", "v.blk.")):
        kind = name.split(".")[-2]
        if name.startswith("v.blk.") and kind in ("attn_q", "attn_k"):
            return checkpoint.vision.n_head if checkpoint.vision else 0
        if kind == "attn_q":
            return checkpoint.text.n_head
        if kind == "attn_k":
            return checkpoint.text.n_head_kv
    return 0


def plan_text(checkpoint: Checkpoint, mapped: dict[str, dict[str, TensorEntry]],
              out_type: gguf.GGMLQuantizationType) -> list[PlannedTensor]:
    """The text model's tensors, checked against the config."""
    expected = text_shapes(checkpoint.text)
    _check(mapped["text"], expected, "text")
    return [PlannedTensor(name, entry, _matrix_type(out_type, entry.shape), entry.shape,
                          rope_heads=_rope_heads(name, checkpoint))
            for name, entry in _ordered(mapped["text"], expected)]


def plan_vision(checkpoint: Checkpoint, mapped: dict[str, dict[str, TensorEntry]],
                out_type: gguf.GGMLQuantizationType, img_break_id: int) -> list[PlannedTensor]:
    """The projector's tensors, plus the [IMG_BREAK] row of the text embeddings (llama.cpp
    inserts it between image rows itself and refuses a Pixtral projector without it)."""
    assert checkpoint.vision is not None
    expected = vision_shapes(checkpoint.vision)
    _check(mapped["vision"], expected, "vision")
    planned = [PlannedTensor(name, entry, _matrix_type(out_type, entry.shape), entry.shape,
                             rope_heads=_rope_heads(name, checkpoint))
               for name, entry in _ordered(mapped["vision"], expected)]
    embd = mapped["text"]["token_embd.weight"]
    if not 0 <= img_break_id < embd.n_rows:
        raise ConversionError(f"[IMG_BREAK] id {img_break_id} is outside the vocabulary")
    planned.append(PlannedTensor(IMG_BREAK, embd, Q.F32, (embd.shape[1],),
                                 rows=(img_break_id, img_break_id + 1)))
    return planned
