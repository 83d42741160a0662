"""What `localsmall bench` is asked to measure and what it found. Pure data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from localsmall.bench.stats import Measurement
from localsmall.bench.system import SystemSnapshot
from localsmall.engine.types import Progress
from localsmall.runtime.options import RunOptions

QUALITY_CHUNK = 512        # tokens per perplexity chunk (llama-perplexity's usual -c 512)
QUICK_QUALITY_CHUNKS = 2   # chunks scored with --quick


@dataclass(frozen=True)
class QualityRequest:
    """Perplexity and KL divergence of every target against a reference build."""

    text_path: Path | None = None          # None: the evaluation text shipped with localsmall
    reference: RunOptions | None = None    # None: the highest-precision build available
    chunk: int = QUALITY_CHUNK
    max_chunks: int | None = None


@dataclass(frozen=True)
class BenchRequest:
    """A benchmark: every target x every sweep value, then (optionally) quality.

    `targets` hold the model choice (catalog ref + quant, or a file) and settings that
    are not swept; None sweep values mean "whatever `chat` would use"."""

    targets: tuple[RunOptions, ...]
    threads: tuple[int | None, ...] = (None,)
    gpu_layers: tuple[int | None, ...] = (None,)
    kv_types: tuple[str, ...] = ("f16",)
    n_prompt: int = 512
    n_gen: int = 128
    repetitions: int = 5
    depth: int = 0
    image: Path | None = None      # None: a generated 512x512 image (when a projector loads)
    chat_prompt: bool = True       # measure time to first token on a chat-sized prompt
    quality: QualityRequest | None = None


@dataclass(frozen=True)
class BenchStep:
    """Progress through the whole benchmark, for the UI."""

    done: int
    total: int
    label: str


BenchEvent = BenchStep | Progress
BenchCallback = Callable[[BenchEvent], None]


@dataclass(frozen=True)
class SpeedResult:
    """One model x settings combination."""

    name: str                  # short: the quant, or the file name
    model: str                 # what ran (catalog label or file name)
    quant: str                 # quant name, or llama.cpp's description of the file
    file: str
    size_bytes: int
    n_params: int
    threads: int
    gpu_layers: int
    kv_type: str
    flash_attn: str            # auto, on, off
    n_batch: int
    n_ctx: int
    depth: int
    n_prompt: int
    n_gen: int
    pp: Measurement | None     # prompt tokens per second
    tg: Measurement | None     # generated tokens per second
    load_s: float
    ttft: Measurement | None   # seconds to the first token of a chat reply
    ttft_tokens: int
    image_encode: Measurement | None  # seconds to encode one image
    image_tokens: int
    peak_rss_bytes: int
    device_memory_bytes: int | None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class QualityResult:
    """How much one build's predictions differ from the reference's on the text."""

    name: str
    model: str
    quant: str
    file: str
    size_bytes: int
    reference: str             # the reference build's file name
    is_reference: bool
    tokens: int                # scored tokens
    chunks: int
    chunk: int
    ppl: float
    ppl_error: float
    kld: float | None = None   # None for the reference itself
    kld_error: float | None = None
    same_top: float | None = None   # fraction of tokens with the same most likely token
    same_top_error: float | None = None
    rms_dp: float | None = None
    rms_dp_error: float | None = None


@dataclass(frozen=True)
class BenchReport:
    """Everything one `localsmall bench` run measured."""

    created: str               # ISO 8601 time the run started
    system: SystemSnapshot
    n_prompt: int
    n_gen: int
    repetitions: int
    depth: int
    speed: tuple[SpeedResult, ...]
    quality: tuple[QualityResult, ...] = ()
    quality_text: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
