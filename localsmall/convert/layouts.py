"""The checkpoint layouts `localsmall convert` reads, as a registry.

- transformers: `config.json` + `model*.safetensors` (+ `model.safetensors.index.json`),
  architecture `Mistral3ForConditionalGeneration` (text + Pixtral vision) or the
  text-only `MistralForCausalLM`. Q/K rows are stored in the rotate-half order
  transformers uses and must be permuted back for llama.cpp.
- mistral: Mistral's native `params.json` + `consolidated*.safetensors`, with a
  `vision_encoder` section when the model sees images. Rotary rows are already in the
  interleaved order llama.cpp uses.

Both need Mistral's `tekken.json` tokenizer next to the weights (the official
repositories ship it with either layout).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localsmall.convert.gguf_files import PIXTRAL_MEAN, PIXTRAL_STD, TextHParams, VisionHParams
from localsmall.convert.safetensors_files import TensorEntry, read_headers
from localsmall.errors import ConversionError
from localsmall.fileio import read_regular_file

TOKENIZER_FILE = "tekken.json"
MAX_CONFIG_BYTES = 64 << 20
MAX_LAYERS = 1024              # a config beyond this is damaged, not a bigger model
MAX_WIDTH = 1 << 20            # widths, head counts
MAX_VOCAB = 1 << 22
MAX_CONTEXT = 1 << 24
DEFAULT_CONTEXT = 131072
PIXTRAL_ROPE_THETA = 10000.0   # llama.cpp's Pixtral encoder hard-codes it
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "vision_encoder.",
                   "vision_language_adapter.", "patch_merger.", "pre_mm_projector_norm")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read far enough to plan its conversion (no tensor data yet)."""

    layout: str                       # key in LAYOUTS
    directory: Path
    architecture: str                 # as the checkpoint names it
    text: TextHParams
    vision: VisionHParams | None
    tensors: dict[str, TensorEntry]   # source name -> where its data is
    tokenizer: Path                   # tekken.json
    rotate_half: bool                 # Q/K rows in transformers' rotate-half order
    notes: tuple[str, ...] = ()
    canonical: Callable[[str], str] = field(default=lambda name: name, repr=False)

    def part_of(self, name: str) -> tuple[str, str]:
        """("text" | "vision", the name with layout-specific prefixes normalised)."""
        canonical = self.canonical(name)
        return ("vision" if canonical.startswith(VISION_PREFIXES) else "text"), canonical


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_regular_file(path, MAX_CONFIG_BYTES).decode("utf-8"))
    except OSError as exc:
        raise ConversionError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConversionError(f"{path} is not valid JSON ({exc})") from None
    except RecursionError:
        raise ConversionError(f"{path} is not a model config (nested too deep)") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    return data


def _int(config: dict[str, Any], key: str, where: str, default: int | None = None, *,
         high: int = MAX_WIDTH) -> int:
    """A whole-number hyper-parameter from 1 to `high`: checked before any shape is
    computed from it (a string, a float, 0 or 4e9 layers is a damaged config)."""
    value = config.get(key)
    if value is None:
        if default is None:
            raise ConversionError(f"{where} has no {key!r}; is this a Mistral checkpoint?")
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ConversionError(f"{where}: {key} is {value!r:.40}, expected a whole number from "
                              f"1 to {high}")
    return value


def _float(config: dict[str, Any], key: str, where: str, default: float) -> float:
    """A positive finite number (rope theta, norm epsilon)."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(value) or value <= 0:
        raise ConversionError(f"{where}: {key} is {value!r:.40}, expected a positive number")
    return float(value)


def _section(config: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """A nested object of the config (absent: empty)."""
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise ConversionError(f"{where}: {key} is not an object")
    return value


def _tokenizer(directory: Path) -> Path:
    path = directory / TOKENIZER_FILE
    if path.is_file():
        return path
    hint = (" (this checkpoint has a SentencePiece tokenizer, which localsmall does not "
            "convert)" if (directory / "tokenizer.model").is_file() else "")
    raise ConversionError(
        f"no {TOKENIZER_FILE} in {directory}{hint}; localsmall needs Mistral's tekken "
        f"tokenizer file, published next to the weights in the official repository")


# --- transformers layout ----------------------------------------------------------------

TRANSFORMERS_ARCHITECTURES = {
    "Mistral3ForConditionalGeneration": True,   # -> has a vision tower
    "MistralForCausalLM": False,
}
# Older and newer transformers versions save Mistral3 weights under different prefixes.
_TRANSFORMERS_PREFIXES = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def _transformers_canonical(name: str) -> str:
    for old, new in _TRANSFORMERS_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _check_vision_rope(theta: float, where: str) -> None:
    """llama.cpp's Pixtral encoder has its 2D rope theta built in."""
    if theta != PIXTRAL_ROPE_THETA:
        raise ConversionError(f"{where}: rope theta {theta} differs from the {PIXTRAL_ROPE_THETA} "
                              "llama.cpp's Pixtral encoder uses")


def _rope_theta(config: dict[str, Any], default: float, where: str = "config") -> float:
    params = _section(config, "rope_parameters", where)
    if "rope_theta" in config:
        return _float(config, "rope_theta", where, default)
    return _float(params, "rope_theta", where, default)


def _check_rope_scaling(config: dict[str, Any], where: str) -> None:
    scaling = _section(config, "rope_scaling", where)
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    kind = kind or _section(config, "rope_parameters", where).get("rope_type", "default")
    if kind not in (None, "default"):
        raise ConversionError(f"{where} uses rope scaling {kind!r:.40}, which localsmall's "
                              "converter does not handle")


def _transformers_text(config: dict[str, Any], where: str) -> TextHParams:
    _check_rope_scaling(config, where)
    n_embd = _int(config, "hidden_size", where)
    n_head = _int(config, "num_attention_heads", where)
    return TextHParams(
        n_layers=_int(config, "num_hidden_layers", where, high=MAX_LAYERS), n_embd=n_embd,
        n_head=n_head, n_head_kv=_int(config, "num_key_value_heads", where, n_head),
        head_dim=_int(config, "head_dim", where, max(n_embd // n_head, 1)),
        n_ff=_int(config, "intermediate_size", where),
        n_vocab=_int(config, "vocab_size", where, high=MAX_VOCAB),
        context_length=_int(config, "max_position_embeddings", where, DEFAULT_CONTEXT,
                            high=MAX_CONTEXT),
        rope_theta=_rope_theta(config, 10000.0, where),
        rms_eps=_float(config, "rms_norm_eps", where, 1e-5))


def _image_norm(directory: Path) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Image mean/std from preprocessor_config.json when present (Pixtral's otherwise)."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return PIXTRAL_MEAN, PIXTRAL_STD
    config = _read_json(path)
    triples = []
    for key, default in (("image_mean", PIXTRAL_MEAN), ("image_std", PIXTRAL_STD)):
        value = config.get(key, default)
        if not isinstance(value, list | tuple) or len(value) != 3 or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in value):
            raise ConversionError(f"{path}: {key} is not three numbers")
        triples.append((float(value[0]), float(value[1]), float(value[2])))
    return triples[0], triples[1]


def _transformers_vision(config: dict[str, Any], text: TextHParams, directory: Path,
                         where: str) -> VisionHParams:
    vision = _section(config, "vision_config", where)
    vwhere = f"{where} (vision_config)"
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise ConversionError(f"{where}: projector activation "
                              f"{config.get('projector_hidden_act')!r:.40} is not supported")
    if config.get("vision_feature_layer", -1) != -1:
        raise ConversionError(f"{where}: only vision_feature_layer -1 is supported")
    _check_vision_rope(_rope_theta(vision, PIXTRAL_ROPE_THETA, vwhere), vwhere)
    mean, std = _image_norm(directory)
    activation = str(vision.get("hidden_act", "silu"))[:40]
    return VisionHParams(
        **_vision_shape(vision, vwhere, text),
        image_size=_int(vision, "image_size", vwhere, 1540, high=1 << 16),
        spatial_merge_size=_int(config, "spatial_merge_size", where, 2, high=64),
        rms_eps=_float(vision, "layer_norm_eps", vwhere, 1e-5),
        image_mean=mean, image_std=std, activation=activation)


def _transformers_weights(directory: Path) -> dict[str, TensorEntry]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(f, str) and Path(f).name == f for f in weight_map.values()):
            raise ConversionError(f"{index} has no weight_map")
        names = sorted({str(f) for f in weight_map.values()})
        missing = [f for f in names if not (directory / f).is_file()]
        if missing:
            listed = ", ".join(repr(n) for n in missing[:3])
            raise ConversionError(f"{len(missing)} weight file(s) listed in {index.name} are "
                                  f"missing from {directory}: {listed}")
        tensors = read_headers(directory / f for f in names)
        absent = [n for n, f in weight_map.items()
                  if n not in tensors or tensors[n].file.name != Path(f).name]
        if absent:
            listed = ", ".join(repr(n) for n in absent[:3])
            raise ConversionError(f"{index.name} lists tensors its files do not hold "
                                  f"({listed}); the download is incomplete")
        return tensors
    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise ConversionError(f"no model*.safetensors weights in {directory}")
    return read_headers(files)


def read_transformers(directory: Path) -> Checkpoint:
    """A transformers-layout checkpoint (config.json)."""
    where = str(directory / "config.json")
    config = _read_json(directory / "config.json")
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    arch = str(architectures[0] if isinstance(architectures, list) else architectures)[:100]
    if arch not in TRANSFORMERS_ARCHITECTURES:
        known = ", ".join(TRANSFORMERS_ARCHITECTURES)
        shown = "".join(c if c.isprintable() else "?" for c in arch)  # one line, always
        raise ConversionError(f"{directory} holds a {shown} model; localsmall converts "
                              f"Mistral checkpoints only ({known})")
    has_vision = TRANSFORMERS_ARCHITECTURES[arch]
    text_config = _section(config, "text_config", where) if has_vision else config
    text = _transformers_text(text_config, where)
    notes = []
    if text_config.get("sliding_window"):
        notes.append(f"the checkpoint declares sliding-window attention "
                     f"({text_config['sliding_window']!s:.20} tokens); llama.cpp's llama "
                     "architecture attends to the whole context")
    vision = _transformers_vision(config, text, directory, where) if has_vision else None
    tokenizer = _tokenizer(directory)
    return Checkpoint(layout="transformers", directory=directory, architecture=arch, text=text,
                      vision=vision, tensors=_transformers_weights(directory),
                      tokenizer=tokenizer, rotate_half=True, notes=tuple(notes),
                      canonical=_transformers_canonical)


# --- Mistral-native layout -----------------------------------------------------------------


def _native_text(params: dict[str, Any], where: str) -> TextHParams:
    n_embd = _int(params, "dim", where)
    n_head = _int(params, "n_heads", where)
    if params.get("yarn") or params.get("rope_scaling"):
        raise ConversionError(f"{where} uses rope scaling, which localsmall's converter does "
                              "not handle")
    return TextHParams(
        n_layers=_int(params, "n_layers", where, high=MAX_LAYERS), n_embd=n_embd,
        n_head=n_head, n_head_kv=_int(params, "n_kv_heads", where, n_head),
        head_dim=_int(params, "head_dim", where, max(n_embd // n_head, 1)),
        n_ff=_int(params, "hidden_dim", where),
        n_vocab=_int(params, "vocab_size", where, high=MAX_VOCAB),
        context_length=_int(params, "max_seq_len", where, _int(
            params, "max_position_embeddings", where, DEFAULT_CONTEXT, high=MAX_CONTEXT),
            high=MAX_CONTEXT),
        rope_theta=_float(params, "rope_theta", where, 1_000_000.0),
        rms_eps=_float(params, "norm_eps", where, 1e-5))


def _vision_shape(vision: dict[str, Any], vwhere: str, text: TextHParams) -> dict[str, Any]:
    """The encoder's dimensions, named alike in both layouts."""
    return {"n_layers": _int(vision, "num_hidden_layers", vwhere, high=MAX_LAYERS),
            "n_embd": _int(vision, "hidden_size", vwhere),
            "n_head": _int(vision, "num_attention_heads", vwhere),
            "n_ff": _int(vision, "intermediate_size", vwhere),
            "projection_dim": text.n_embd,
            "patch_size": _int(vision, "patch_size", vwhere, 14, high=1024)}


def _native_vision(params: dict[str, Any], text: TextHParams, where: str) -> VisionHParams:
    vision = _section(params, "vision_encoder", where)
    vwhere = f"{where} (vision_encoder)"
    if vision.get("mm_projector_id", "patch_merge") != "patch_merge":
        raise ConversionError(f"{vwhere}: projector {vision.get('mm_projector_id')!r:.40} is "
                              "not supported (Mistral Small 3.x uses patch_merge)")
    _check_vision_rope(_float(vision, "rope_theta", vwhere, PIXTRAL_ROPE_THETA), vwhere)
    return VisionHParams(
        **_vision_shape(vision, vwhere, text),
        image_size=_int(vision, "image_size", vwhere, _int(
            vision, "max_image_size", vwhere, 1540, high=1 << 16), high=1 << 16),
        spatial_merge_size=_int(vision, "spatial_merge_size", vwhere, 1, high=64),
        rms_eps=_float(params, "norm_eps", where, 1e-5),
        activation="silu")


def read_mistral(directory: Path) -> Checkpoint:
    """A Mistral-native checkpoint (params.json + consolidated*.safetensors)."""
    where = str(directory / "params.json")
    params = _read_json(directory / "params.json")
    if params.get("quantization"):
        raise ConversionError(f"{where}: the weights are quantized "
                              f"({params['quantization']!s:.60}); convert the BF16 release "
                              "instead")
    if params.get("moe"):
        raise ConversionError(f"{where} describes a mixture-of-experts model; localsmall "
                              "converts dense Mistral models only")
    text = _native_text(params, where)
    vision = _native_vision(params, text, where) if params.get("vision_encoder") else None
    files = sorted(directory.glob("consolidated*.safetensors"))
    if not files:
        raise ConversionError(f"no consolidated.safetensors next to {where}; download the "
                              "weights too")
    tokenizer = _tokenizer(directory)
    return Checkpoint(layout="mistral", directory=directory, architecture="mistral-native",
                      text=text, vision=vision, tensors=read_headers(files),
                      tokenizer=tokenizer, rotate_half=False)


# --- detection ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A checkpoint layout: the file that identifies it, its weight files and reader."""

    marker: str                     # config file that identifies the layout
    weights: str                    # glob of its weight files
    read: Callable[[Path], Checkpoint]
    description: str


LAYOUTS: dict[str, Layout] = {
    # Native first: when a directory holds both (the official repository does), it needs
    # no Q/K permutation and is one file.
    "mistral": Layout("params.json", "consolidated*.safetensors", read_mistral,
                      "params.json + consolidated.safetensors"),
    "transformers": Layout("config.json", "model*.safetensors", read_transformers,
                           "config.json + model*.safetensors"),
}


def detect(directory: Path) -> Checkpoint:
    """Read the checkpoint in `directory` with the first layout whose files are there."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConversionError(f"{directory} is not a directory")
    complete = [k for k, lay in LAYOUTS.items()
                if (directory / lay.marker).is_file() and any(directory.glob(lay.weights))]
    partial = [k for k, lay in LAYOUTS.items() if (directory / lay.marker).is_file()]
    candidates = complete or partial
    if not candidates:
        expected = "; or ".join(lay.description for lay in LAYOUTS.values())
        raise ConversionError(f"no checkpoint found in {directory}: expected {expected}")
    return LAYOUTS[candidates[0]].read(directory)
