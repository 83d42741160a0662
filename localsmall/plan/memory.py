"""What llama.cpp will allocate for a build, per device, before anything is loaded.

The model follows how llama.cpp (as vendored in llama-cpp-python 0.3.36) places and sizes
its buffers, checked against its own reports (tests/test_memory_prediction.py,
benchmarks/plan_memory.py):

- Weights: each repeating layer goes where its `n_gpu_layers` slot says (the last layers
  first), the output head counts as one more layer, the token embedding always stays in
  RAM. Sizes come from the GGUF tensor table when the file is on disk, otherwise from the
  catalog's file size split by the model's shape.
- KV cache: 2 x n_head_kv x head_dim x n_ctx (padded to 256) per layer, on the layer's
  device, at the cache type's size (f16 2 bytes; q8_0 34 and q4_0 18 bytes per 32).
- Compute buffers: ggml reserves the peak of one micro-batch (n_ubatch = min(n_batch,
  512) tokens). With a 131K vocabulary the peak is usually the logits, n_vocab x n_ubatch
  x 4 bytes (256 MiB); at long contexts the attention mask (n_kv x n_ubatch, f16 with
  flash attention) or, without flash attention, the n_head x n_kv x n_ubatch scores win.
- Vision: the projector's weights plus its compute buffer for the largest image llama.cpp
  accepts (1024 merged tokens = 4096 patches). llama.cpp warms up with a 256-token image
  only and grows the buffer on the first large image, so it is budgeted here up front.
- Outside any buffer: the vocabulary's tables in RAM, and an image encode's work memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localsmall.engine.types import KV_CACHE_TYPES
from localsmall.errors import ModelLoadError
from localsmall.gguf_header import GgufHeader, read_header, type_bytes
from localsmall.models.catalog import Model, Quant
from localsmall.models.shape import DecoderShape

MIB = 1024 * 1024
KV_PAD = 256                   # llama.cpp pads n_ctx to a multiple of this
MAX_UBATCH = 512               # the engine's n_ubatch = min(n_batch, 512)
METADATA_BYTES_PER_TOKEN = 60  # GGUF header per vocabulary entry (token, type, merges)
# llama.cpp's vocabulary in memory (token texts, lookup maps, BPE merge ranks): 51-52 MiB
# measured for the 131K tekken vocabulary, in no buffer it reports.
VOCAB_HOST_BYTES_PER_TOKEN = 400


@dataclass(frozen=True)
class TextShape(DecoderShape):
    """The decoder's dimensions and the context it was trained for."""

    n_ctx_train: int = 131072


@dataclass(frozen=True)
class TextWeights:
    """The text model's weight bytes, grouped the way llama.cpp places them."""

    shape: TextShape
    layers: tuple[int, ...]   # bytes of each repeating layer
    token_embd: int           # input embedding: always in RAM
    output: int               # output head and final norm: travels as one more "layer"
    exact: bool               # from the file's tensor table, not estimated
    # ggml type -> bytes of the matrices llama.cpp may repack for the CPU, per layer and
    # for the output head (known only from a file's tensor table)
    layer_matrix_types: tuple[dict[str, int], ...] = ()
    output_matrix_types: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.layers) + self.token_embd + self.output


@dataclass(frozen=True)
class VisionWeights:
    """The vision projector: weight bytes and the shape its compute buffer depends on."""

    weights: int
    n_embd: int
    n_ff: int
    n_head: int
    patch_size: int
    merge: int
    max_tokens: int           # merged image tokens llama.cpp allows for one image
    text_n_embd: int
    exact: bool


@dataclass(frozen=True)
class RunShape:
    """The context settings memory depends on."""

    n_ctx: int
    kv_type: str = "f16"
    n_batch: int = 512
    flash_attn: bool = True   # llama.cpp's "auto" turns it on where the backend has it

    @property
    def n_ubatch(self) -> int:
        return min(self.n_batch, MAX_UBATCH)

    @property
    def n_kv(self) -> int:
        return -(-self.n_ctx // KV_PAD) * KV_PAD


@dataclass(frozen=True)
class DeviceUse:
    """Predicted bytes on one device ("CPU" is system RAM)."""

    device: str
    weights: int = 0
    kv: int = 0
    compute: int = 0
    projector: int = 0        # projector weights, compute buffer and encoding work memory
    repacked: int = 0         # CPU weights llama.cpp copies into repacked buffers (below)
    tables: int = 0           # llama.cpp's in-memory vocabulary (tokens, merge ranks)

    @property
    def total(self) -> int:
        """Memory needed. Repacked weights are not counted twice: their file pages are
        read once at load and the kernel may drop them afterwards."""
        return self.weights + self.kv + self.compute + self.projector + self.tables


@dataclass(frozen=True)
class MemoryEstimate:
    """Where a build's memory goes, CPU first, then each GPU used."""

    devices: tuple[DeviceUse, ...]
    n_gpu_layers: int         # llama.cpp's count (the output head is one of them)
    gpu_layer_count: int      # repeating layers on GPUs

    @property
    def ram(self) -> int:
        return self.devices[0].total

    @property
    def gpu(self) -> int:
        return sum(d.total for d in self.devices[1:])

    @property
    def total(self) -> int:
        return sum(d.total for d in self.devices)

    def on(self, device: str) -> DeviceUse:
        """The use of one device (zero if unused)."""
        return next((d for d in self.devices if d.device == device), DeviceUse(device))


# --- weights ----------------------------------------------------------------------------


MAX_LAYERS = 4096            # far beyond any real model; bounds per-layer lists
MAX_DIMENSION = 1 << 32      # any width, head count or vocabulary size beyond is damage


def _hparam(header: GgufHeader, key: str, default: int | None = None, *,
            minimum: int = 1, maximum: int = MAX_DIMENSION) -> int:
    """An integer hyper-parameter of the file's architecture, checked to be sane."""
    value = header.arch_value(key, default)
    name = f"{' '.join(header.architecture.split())[:40]}.{key}"  # the file names it
    if value is None:
        raise ModelLoadError(f"{header.path} has no {name}; the file is "
                             "damaged or not a model localsmall can run")
    if isinstance(value, bool) or not isinstance(value, int) or \
            not minimum <= value <= maximum:
        raise ModelLoadError(f"{header.path} has {name} = {value!r:.60}, "
                             f"expected a whole number from {minimum} to {maximum}; the file "
                             "is damaged")
    return value


def text_shape_from_header(header: GgufHeader) -> TextShape:
    """The decoder's dimensions from a GGUF header, each checked (ModelLoadError)."""
    n_embd = _hparam(header, "embedding_length")
    n_head = _hparam(header, "attention.head_count")
    vocab = header.arch_value("vocab_size") or header.metadata.get("tokenizer.ggml.tokens")
    if isinstance(vocab, list):  # a short vocabulary is read in full
        vocab = len(vocab)
    if isinstance(vocab, bool) or not isinstance(vocab, int) or not 0 < vocab <= MAX_DIMENSION:
        raise ModelLoadError(f"{header.path} has no usable vocabulary size ({vocab!r}); the "
                             "file is damaged")
    return TextShape(
        n_layers=_hparam(header, "block_count", maximum=MAX_LAYERS),
        n_embd=n_embd, n_head=n_head,
        n_head_kv=_hparam(header, "attention.head_count_kv", n_head),
        head_dim=_hparam(header, "attention.key_length", max(n_embd // n_head, 1)),
        n_ff=_hparam(header, "feed_forward_length"),
        n_vocab=vocab,
        n_ctx_train=_hparam(header, "context_length", 131072))


def _layer_index(name: str, n_layers: int, path: Path) -> int:
    """N of a tensor named blk.N.*, checked against the layer count."""
    index = name.split(".")[1] if name.count(".") >= 1 else ""
    if not index.isdigit() or int(index) >= n_layers:
        raise ModelLoadError(f"{path}: tensor {name!r} names no layer of the model's "
                             f"{n_layers}; the file is damaged")
    return int(index)


def text_weights_from_file(path: Path) -> TextWeights:
    """Exact weight bytes from a local GGUF's tensor table. Raises ModelLoadError for a
    file that is not a readable model (odd or missing hyper-parameters included)."""
    return text_weights_from_header(read_header(path))


def text_weights_from_header(header: GgufHeader) -> TextWeights:
    """`text_weights_from_file` for a header already read."""
    shape = text_shape_from_header(header)
    layers = [0] * shape.n_layers
    matrices: list[dict[str, int]] = [{} for _ in range(shape.n_layers)]
    output_matrices: dict[str, int] = {}
    token_embd = output = 0
    for tensor in header.tensors:
        # ggml repacks matrices whose row count is a multiple of 8 (repack.cpp)
        repackable = len(tensor.shape) == 2 and tensor.shape[1] % 8 == 0
        if tensor.name.startswith("blk."):
            layer = _layer_index(tensor.name, shape.n_layers, header.path)
            layers[layer] += tensor.n_bytes
            if repackable:
                kinds = matrices[layer]
                kinds[tensor.type] = kinds.get(tensor.type, 0) + tensor.n_bytes
        elif tensor.name.startswith("token_embd"):
            token_embd += tensor.n_bytes  # looked up by row, never repacked
        else:
            output += tensor.n_bytes
            if repackable:
                output_matrices[tensor.type] = output_matrices.get(tensor.type, 0) + \
                    tensor.n_bytes
    return TextWeights(shape, tuple(layers), token_embd, output, exact=True,
                       layer_matrix_types=tuple(matrices), output_matrix_types=output_matrices)


def shape_from_catalog(model: Model) -> TextShape:
    a = model.architecture
    return TextShape(a.n_layers, a.n_embd, a.n_head, a.n_head_kv, a.head_dim, a.n_ff,
                     a.n_vocab, model.context_length)


def text_weights_from_catalog(model: Model, quant: Quant) -> TextWeights:
    """Weight bytes estimated from the catalog's file size and the model's shape: the
    embedding and output head at their known types, the rest split evenly by layer."""
    s = shape_from_catalog(model)
    q_dim, kv_dim = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    layer_params = 2 * s.n_embd * q_dim + 2 * s.n_embd * kv_dim + 3 * s.n_embd * s.n_ff
    vocab_params = s.n_vocab * s.n_embd
    tensor_bytes = quant.remote.size - s.n_vocab * METADATA_BYTES_PER_TOKEN
    per_param = tensor_bytes / (s.n_layers * layer_params + 2 * vocab_params)
    embd = (type_bytes(quant.embd_type, vocab_params) if quant.embd_type
            else round(per_param * vocab_params))
    output = (type_bytes(quant.output_type, vocab_params) if quant.output_type
              else round(per_param * vocab_params)) + s.n_embd * 4
    per_layer = max((tensor_bytes - embd - output) // s.n_layers, 0)
    return TextWeights(s, (per_layer,) * s.n_layers, embd, output, exact=False)


def _clip_value(meta: dict[str, Any], key: str, default: int, path: Path,
                minimum: int = 1) -> int:
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or \
            not minimum <= value <= MAX_DIMENSION:
        raise ModelLoadError(f"{path} has {key} = {value!r}, expected a whole number from "
                             f"{minimum} to {MAX_DIMENSION}; the projector file is damaged")
    return value


def vision_weights_from_file(path: Path, *, max_tokens: int = 1024) -> VisionWeights:
    """The projector's exact weight bytes and shape from its GGUF (ModelLoadError for a
    damaged one)."""
    header = read_header(path)
    meta = header.metadata
    n_embd = _clip_value(meta, "clip.vision.embedding_length", 0, path, minimum=0)
    return VisionWeights(
        weights=sum(t.n_bytes for t in header.tensors), n_embd=n_embd,
        n_ff=_clip_value(meta, "clip.vision.feed_forward_length", 4 * n_embd, path, 0),
        n_head=_clip_value(meta, "clip.vision.attention.head_count", max(n_embd // 64, 1),
                           path),
        patch_size=_clip_value(meta, "clip.vision.patch_size", 14, path),
        merge=_clip_value(meta, "clip.vision.spatial_merge_size", 1, path),
        max_tokens=max_tokens,
        text_n_embd=_clip_value(meta, "clip.vision.projection_dim", 0, path, 0), exact=True)


def vision_weights_from_catalog(model: Model) -> VisionWeights:
    """The projector's size from the catalog (approximate until downloaded)."""
    a = model.architecture
    return VisionWeights(
        weights=model.projector.remote.size, n_embd=a.vision_n_embd,
        n_ff=a.vision_n_ff or 4 * a.vision_n_embd,
        n_head=a.vision_n_head or max(a.vision_n_embd // 64, 1),
        patch_size=a.vision_patch_size, merge=a.vision_merge,
        max_tokens=a.vision_max_image_tokens, text_n_embd=a.n_embd, exact=False)


# --- context buffers --------------------------------------------------------------------


def kv_layer_bytes(shape: TextShape, run: RunShape) -> int:
    """K and V cache of one layer."""
    kv_type = KV_CACHE_TYPES[run.kv_type]
    block, block_bytes = kv_type.block, kv_type.block_bytes
    per_cell = 2 * shape.n_head_kv * shape.head_dim
    return -(-per_cell * run.n_kv // block) * block_bytes


def logits_bytes(shape: TextShape, run: RunShape) -> int:
    """The logits tensor of a full micro-batch (the usual compute-buffer peak)."""
    return shape.n_vocab * run.n_ubatch * 4


def compute_bytes(shape: TextShape, run: RunShape, *, layers: bool, output: bool) -> int:
    """One backend's compute buffer: the peak of the graph part it runs (repeating
    layers and/or the output head). A backend with neither holds only the inputs."""
    ub, f32 = run.n_ubatch, 4
    residual = 2 * shape.n_embd * ub * f32
    mask = run.n_kv * ub * (2 if run.flash_attn else 4)
    q_dim = shape.n_head * shape.head_dim
    if run.flash_attn:
        attention = 2 * q_dim * ub * f32
    else:
        attention = shape.n_head * run.n_kv * ub * f32 + q_dim * ub * f32
    ffn = 3 * shape.n_ff * ub * f32
    peaks = [residual + mask]  # inputs alone: embeddings and the mask
    if layers:
        peaks.append(mask + max(attention, ffn) + residual)
    if output:
        peaks.append(logits_bytes(shape, run) + residual)
    return max(peaks)


def _image_patches(vision: VisionWeights) -> tuple[int, int]:
    """(patches, bytes of the f32 pixels) of the largest image."""
    patches = vision.max_tokens * vision.merge ** 2
    side = math.isqrt(patches) * vision.patch_size
    return patches, side * side * 3 * 4


def vision_compute_bytes(vision: VisionWeights, *, flash_attn: bool = True) -> int:
    """The projector's ggml compute buffer for the largest image: the raw pixels, the
    ViT's activations over every patch (SwiGLU FFN and attention) and the patch merger."""
    patches, raw = _image_patches(vision)
    vit = patches * 4 * (3 * vision.n_ff + 4 * vision.n_embd)
    if not flash_attn:
        vit += vision.n_head * patches * patches * 4
    merger = vision.max_tokens * vision.text_n_embd * 4 * 3
    return raw + max(vit, merger)


def vision_work_bytes(vision: VisionWeights) -> int:
    """Memory an image encode uses outside ggml's buffers: the CPU backend's work buffer
    (activations converted to f16 for the FFN's matrix products) and the image's
    pre-processed copies."""
    patches, raw = _image_patches(vision)
    return patches * vision.n_ff * 2 + 2 * raw


def repack_types(cpu_features: Iterable[str]) -> frozenset[str]:
    """ggml types llama.cpp's CPU backend repacks into its CPU_REPACK buffers on a CPU
    with these features (ggml-cpu/repack.cpp); none without the REPACK feature."""
    features = {f.upper() for f in cpu_features}
    if "REPACK" not in features:
        return frozenset()
    types: set[str] = set()
    if "AVX2" in features:
        types |= {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"}
    if "AVX512" in features:
        types |= {"Q2_K"}
    if "NEON" in features and "MATMUL_INT8" in features:
        types |= {"Q4_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "Q8_0"}
    if "NEON" in features and "DOTPROD" in features:
        types |= {"Q4_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "MXFP4"}
    return frozenset(types)


def output_buffer_bytes(shape: TextShape) -> int:
    """The host buffer llama.cpp keeps for one token's logits."""
    return shape.n_vocab * 4


# --- placement --------------------------------------------------------------------------


def layer_devices(n_layers: int, n_gpu_layers: int, split: Sequence[float]) -> list[int]:
    """Device of each repeating layer and of the output head (index n_layers): 0 is the
    CPU, i >= 1 is GPU i-1. Mirrors llama.cpp: the last `n_gpu_layers` slots (output
    head included) go to GPUs, shared in proportion to `split` (free memory)."""
    if not split or n_gpu_layers == 0:
        return [0] * (n_layers + 1)
    n_gpu = n_layers + 1 if n_gpu_layers < 0 else min(n_gpu_layers, n_layers + 1)
    start = n_layers + 1 - n_gpu
    cumulative, running = [], 0.0
    for share in split:
        running += share
        cumulative.append(running / sum(split))
    devices = []
    for il in range(n_layers + 1):
        if il < start:
            devices.append(0)
            continue
        position = (il - start) / n_gpu
        gpu = next((i for i, edge in enumerate(cumulative) if position < edge),
                   len(cumulative) - 1)
        devices.append(gpu + 1)
    return devices


def estimate(text: TextWeights, run: RunShape, *, n_gpu_layers: int = 0,
             gpus: Sequence[str] = (), split: Sequence[float] = (),
             vision: VisionWeights | None = None,
             repack: frozenset[str] = frozenset()) -> MemoryEstimate:
    """Predict every buffer of a build loaded with these settings. `gpus` names the GPUs
    (in llama.cpp's order) and `split` their shares (llama.cpp uses free memory);
    `repack` the types the CPU backend repacks (see repack_types)."""
    shape = text.shape
    if not gpus:
        n_gpu_layers = 0
    placement = layer_devices(shape.n_layers, n_gpu_layers, split or [1.0] * len(gpus))
    names = ["CPU", *gpus]
    weights = [0] * len(names)
    kv = [0] * len(names)
    has_layers = [False] * len(names)
    kv_layer = kv_layer_bytes(shape, run)
    repacked = 0
    for layer, device in enumerate(placement[:-1]):
        weights[device] += text.layers[layer]
        kv[device] += kv_layer
        has_layers[device] = True
        if device == 0 and text.layer_matrix_types:
            repacked += sum(n for t, n in text.layer_matrix_types[layer].items() if t in repack)
    output_device = placement[-1]
    weights[output_device] += text.output
    if output_device == 0:
        repacked += sum(n for t, n in text.output_matrix_types.items() if t in repack)
    weights[0] += text.token_embd
    compute = [compute_bytes(shape, run, layers=has_layers[i], output=i == output_device)
               if (i == 0 or has_layers[i] or i == output_device) else 0
               for i in range(len(names))]
    compute[0] += output_buffer_bytes(shape)
    projector = [0] * len(names)
    if vision is not None:
        # mtmd runs the projector on the (first) GPU whenever any layer is offloaded.
        on = 1 if n_gpu_layers != 0 and len(names) > 1 else 0
        projector[on] = (vision.weights + vision_compute_bytes(vision, flash_attn=run.flash_attn)
                         + vision_work_bytes(vision))
    tables = shape.n_vocab * VOCAB_HOST_BYTES_PER_TOKEN
    used = [DeviceUse(names[i], weights[i], kv[i], compute[i], projector[i],
                      repacked if i == 0 else 0, tables if i == 0 else 0)
            for i in range(len(names)) if i == 0 or weights[i] or projector[i]]
    gpu_layer_count = sum(1 for d in placement[:-1] if d > 0)
    count = 0 if not gpus else (gpu_layer_count + (1 if output_device > 0 else 0))
    return MemoryEstimate(tuple(used), n_gpu_layers=count, gpu_layer_count=gpu_layer_count)
