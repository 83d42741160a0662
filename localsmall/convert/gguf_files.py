"""GGUF headers for the two files a Mistral Small 3.2 build is made of.

A text model (architecture `llama`, as the published builds use) and a Pixtral vision
projector (`clip`, projector type `pixtral`). These functions write the metadata;
callers add the tensors. They serve both the converter and the test fixtures, so a
tiny test model and a converted real one carry the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from localsmall.convert.tekken import GgufVocab
from localsmall.errors import ConversionError
from localsmall.models.shape import DecoderShape

TEXT_ARCH = "llama"
PIXTRAL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXTRAL_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TextHParams(DecoderShape):
    """Hyper-parameters of the decoder: its shape and what a GGUF adds to it."""

    context_length: int = 131072
    rope_theta: float = 1_000_000_000.0
    rms_eps: float = 1e-5


@dataclass(frozen=True)
class VisionHParams:
    """Hyper-parameters of the Pixtral vision encoder and its projector."""

    n_layers: int
    n_embd: int
    n_head: int
    n_ff: int
    projection_dim: int          # the text model's n_embd
    patch_size: int = 14
    image_size: int = 1540
    spatial_merge_size: int = 2
    rms_eps: float = 1e-5
    image_mean: tuple[float, float, float] = PIXTRAL_MEAN
    image_std: tuple[float, float, float] = PIXTRAL_STD
    activation: str = "silu"     # the encoder's FFN activation: "silu" or "gelu"


@dataclass(frozen=True)
class FileInfo:
    """general.* metadata."""

    name: str
    license: str | None = "apache-2.0"
    source_repo: str | None = None    # Hugging Face repo id the weights came from
    basename: str | None = None       # e.g. Mistral-Small-3.2-24B-Instruct-2506


def _general(writer: gguf.GGUFWriter, info: FileInfo, file_type: int) -> None:
    writer.add_name(info.name)
    if info.basename:
        writer.add_basename(info.basename)
    if info.license:
        writer.add_license(info.license)
    if info.source_repo:
        url = f"https://huggingface.co/{info.source_repo}"
        writer.add_source_url(url)
        writer.add_source_repo_url(url)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def text_writer(path: str, hp: TextHParams, vocab: GgufVocab, *, info: FileInfo,
                chat_template: str | None, file_type: int) -> gguf.GGUFWriter:
    """A GGUFWriter for the text model with every key written; tensors still to add."""
    writer = gguf.GGUFWriter(path, TEXT_ARCH)
    _general(writer, info, file_type)
    writer.add_vocab_size(hp.n_vocab)
    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layers)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("tekken")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_unk_token_id(vocab.unk_id)
    writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)
    return writer


def mmproj_writer(path: str, vp: VisionHParams, *, info: FileInfo,
                  file_type: int) -> gguf.GGUFWriter:
    """A GGUFWriter for the Pixtral projector with every key written."""
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    _general(writer, info, file_type)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type("pixtral")
    if vp.activation not in ("silu", "gelu"):
        raise ConversionError(f"vision encoder activation {vp.activation!r} is not supported "
                              "by llama.cpp's Pixtral encoder")
    if vp.activation == "silu":
        writer.add_vision_use_silu(True)
    else:
        writer.add_vision_use_gelu(True)
    writer.add_vision_embedding_length(vp.n_embd)
    writer.add_vision_feed_forward_length(vp.n_ff)
    writer.add_vision_block_count(vp.n_layers)
    writer.add_vision_head_count(vp.n_head)
    writer.add_vision_attention_layernorm_eps(vp.rms_eps)
    writer.add_vision_projection_dim(vp.projection_dim)
    writer.add_vision_image_size(vp.image_size)
    writer.add_vision_patch_size(vp.patch_size)
    writer.add_vision_image_mean(list(vp.image_mean))
    writer.add_vision_image_std(list(vp.image_std))
    writer.add_vision_spatial_merge_size(vp.spatial_merge_size)
    return writer
