"""A tiny random Mistral Small 3.x (`Mistral3ForConditionalGeneration`) built with
transformers, saved in both of Mistral's checkpoint layouts, with reference outputs.

The shapes follow the real model where it matters to the converter: a decoupled head_dim
(n_head * head_dim != hidden), grouped-query attention, the real 131072-token tekken
vocabulary, a Pixtral vision tower with 2D rotary embeddings, the 2x2 patch merger and
a two-layer GELU projector. Weights are rounded to BF16 (the release's dtype) and the
reference runs in float32, so an F32 conversion can be compared exactly.

Importing this module is cheap; `build_reference` imports torch and transformers.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from localsmall.convert.gguf_files import PIXTRAL_MEAN, PIXTRAL_STD, TextHParams, VisionHParams
from tests.checkpoints import write_safetensors

TEXT = TextHParams(n_layers=2, n_embd=256, n_head=4, n_head_kv=2, head_dim=128, n_ff=512,
                   n_vocab=131072, context_length=131072, rope_theta=1_000_000_000.0)
VISION = VisionHParams(n_layers=2, n_embd=64, n_head=2, n_ff=128, projection_dim=TEXT.n_embd)
IMAGE_SIZE = (112, 84)  # width, height: 4 x 3 merged patches (mtmd upscales below 8)
BASE_NAME = "Mistral-Small-3.2-24B-Instruct-2506"  # a catalog name: the builds register


@dataclass(frozen=True)
class Reference:
    """The checkpoints and what transformers computed from them."""

    transformers_dir: Path
    native_dir: Path
    tokens: list[int]            # a prompt (mistral-common's encoding of a chat)
    logits: np.ndarray           # next-token logits after `tokens`
    image_rgb: bytes             # IMAGE_SIZE pixels, RGB
    image_embeddings: np.ndarray  # [cols * rows, n_embd] projector output
    img_break_row: np.ndarray    # the [IMG_BREAK] row of the text embeddings


# transformers (as saved) -> Mistral-native tensor names
_NATIVE_TEXT = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}
_NATIVE_VISION = {
    "attention.q_proj": "attention.wq", "attention.k_proj": "attention.wk",
    "attention.v_proj": "attention.wv", "attention.o_proj": "attention.wo",
    "attention_norm": "attention_norm", "ffn_norm": "ffn_norm",
    "feed_forward.gate_proj": "feed_forward.w1", "feed_forward.down_proj": "feed_forward.w2",
    "feed_forward.up_proj": "feed_forward.w3",
}
_NATIVE_FIXED = {
    "language_model.model.embed_tokens.weight": "tok_embeddings.weight",
    "language_model.model.norm.weight": "norm.weight",
    "language_model.lm_head.weight": "output.weight",
    "vision_tower.patch_conv.weight": "vision_encoder.patch_conv.weight",
    "vision_tower.ln_pre.weight": "vision_encoder.ln_pre.weight",
    "multi_modal_projector.norm.weight": "pre_mm_projector_norm.weight",
    "multi_modal_projector.patch_merger.merging_layer.weight":
        "patch_merger.merging_layer.weight",
    "multi_modal_projector.linear_1.weight": "vision_language_adapter.w_in.weight",
    "multi_modal_projector.linear_2.weight": "vision_language_adapter.w_out.weight",
}


def hf_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Mistral-native -> transformers Q/K rows, as transformers' own conversion script
    defines it (pairs (2i, 2i+1) of each head become rows i and i + head_dim/2)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(
        rows, cols)


def native_from_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `hf_permute`, written as an explicit row gather."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    order = [h * 2 * half + j * half + i
             for h in range(n_heads) for i in range(half) for j in range(2)]
    native = w[order]
    assert np.array_equal(hf_permute(native, n_heads), w)
    return native


def native_name(hf_name: str) -> str:
    if hf_name in _NATIVE_FIXED:
        return _NATIVE_FIXED[hf_name]
    for prefix, table, new_prefix in (
            ("language_model.model.layers.", _NATIVE_TEXT, "layers."),
            ("vision_tower.transformer.layers.", _NATIVE_VISION,
             "vision_encoder.transformer.layers.")):
        if hf_name.startswith(prefix):
            layer, rest = hf_name[len(prefix):].split(".", 1)
            stem = rest.removesuffix(".weight")
            return f"{new_prefix}{layer}.{table[stem]}.weight"
    raise KeyError(hf_name)


def _hf_config() -> Any:
    from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig

    text = MistralConfig(
        vocab_size=TEXT.n_vocab, hidden_size=TEXT.n_embd, intermediate_size=TEXT.n_ff,
        num_hidden_layers=TEXT.n_layers, num_attention_heads=TEXT.n_head,
        num_key_value_heads=TEXT.n_head_kv, head_dim=TEXT.head_dim,
        max_position_embeddings=TEXT.context_length, rms_norm_eps=TEXT.rms_eps,
        rope_theta=TEXT.rope_theta, sliding_window=None, tie_word_embeddings=False)
    vision = PixtralVisionConfig(
        hidden_size=VISION.n_embd, intermediate_size=VISION.n_ff,
        num_hidden_layers=VISION.n_layers, num_attention_heads=VISION.n_head,
        head_dim=VISION.n_embd // VISION.n_head, image_size=VISION.image_size,
        patch_size=VISION.patch_size, rope_theta=10000.0, hidden_act="silu")
    return Mistral3Config(text_config=text, vision_config=vision, spatial_merge_size=2,
                          image_token_index=10, multimodal_projector_bias=False,
                          projector_hidden_act="gelu", vision_feature_layer=-1,
                          tie_word_embeddings=False)


def _randomise(model: Any, seed: int) -> None:
    """Weights at the scales of a trained model (unit-scale activations, peaked
    attention), not transformers' tiny init, so a wrong permutation shows in outputs."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1:
                param.copy_(1 + 0.1 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            else:
                param.copy_(noise / np.sqrt(param[0].numel()))


def _write_native(native_dir: Path, hf_dir: Path, tekken: Path) -> None:
    from safetensors.torch import load_file

    weights: dict[str, np.ndarray] = {}
    for shard in sorted(hf_dir.glob("model*.safetensors")):
        for name, tensor in load_file(shard).items():
            array = tensor.float().numpy()
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                vision = name.startswith("vision_tower.")
                heads = VISION.n_head if vision else (
                    TEXT.n_head if "q_proj" in name else TEXT.n_head_kv)
                array = native_from_hf(array, heads)
            weights[native_name(name)] = array
    native_dir.mkdir(parents=True)
    write_safetensors(native_dir / "consolidated.safetensors", weights, "F32")
    params = {
        "dim": TEXT.n_embd, "n_layers": TEXT.n_layers, "head_dim": TEXT.head_dim,
        "hidden_dim": TEXT.n_ff, "n_heads": TEXT.n_head, "n_kv_heads": TEXT.n_head_kv,
        "rope_theta": TEXT.rope_theta, "norm_eps": TEXT.rms_eps, "vocab_size": TEXT.n_vocab,
        "vision_encoder": {
            "hidden_size": VISION.n_embd, "num_channels": 3, "max_image_size": 1540,
            "image_size": 1540, "patch_size": 14, "rope_theta": 10000.0,
            "intermediate_size": VISION.n_ff, "num_hidden_layers": VISION.n_layers,
            "num_attention_heads": VISION.n_head, "adapter_bias": False,
            "mm_projector_id": "patch_merge", "spatial_merge_size": 2,
            "add_pre_mm_projector_layer_norm": True, "image_token_id": 10,
            "image_break_token_id": 12, "image_end_token_id": 13},
    }
    (native_dir / "params.json").write_text(json.dumps(params), encoding="utf-8")
    shutil.copyfile(tekken, native_dir / "tekken.json")


def _image(seed: int = 3) -> bytes:
    width, height = IMAGE_SIZE
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8).tobytes()


def build_reference(root: Path, tekken: Path, tokens: list[int]) -> Reference:
    """Build, save (both layouts) and run the tiny model."""
    import torch
    from transformers import Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(_hf_config()).eval()
    _randomise(model, seed=0)
    with torch.no_grad():  # BF16-exact weights; buffers (rotary frequencies) stay float32
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).to(torch.float32))
    hf_dir = root / BASE_NAME
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(hf_dir, max_shard_size="60MB")
    shutil.copyfile(tekken, hf_dir / "tekken.json")
    _write_native(root / "native" / BASE_NAME, hf_dir, tekken)

    width, height = IMAGE_SIZE
    rgb = _image()
    pixels = np.frombuffer(rgb, np.uint8).reshape(height, width, 3) / 255.0
    pixels = (pixels - np.array(PIXTRAL_MEAN)) / np.array(PIXTRAL_STD)
    pixel_values = torch.tensor(pixels.transpose(2, 0, 1)[None], dtype=torch.float32)
    with torch.no_grad():
        # The text reference in float64: exact to well below llama.cpp's float32 error and
        # the same whatever threads torch's matmuls use on a busy machine.
        exact = copy.deepcopy(model).double()
        logits = exact(input_ids=torch.tensor([tokens])).logits[0, -1].float().numpy()
        features = model.get_image_features(
            pixel_values=pixel_values, image_sizes=torch.tensor([[height, width]]),
            vision_feature_layer=-1).pooler_output[0].numpy()
        embd = model.get_input_embeddings().weight[12].numpy().copy()
    return Reference(transformers_dir=hf_dir, native_dir=root / "native" / BASE_NAME,
                     tokens=tokens, logits=logits.copy(), image_rgb=rgb,
                     image_embeddings=features.copy(), img_break_row=embd)
