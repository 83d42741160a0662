"""Synthetic Mistral-Small-shaped models for benchmarks: bigger than the test models (so
timings mean something), smaller than the real 24B one (so they build in seconds).

Files are cached in benchmarks/.cache (git-ignored)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import time  # noqa: E402
from typing import Any  # noqa: E402

from localsmall.convert.gguf_files import TextHParams, VisionHParams  # noqa: E402
from tests import tinymodels as tm  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"

# ~370M parameters: 8 layers of a 1024-wide decoder with the real 131072-token vocabulary.
MEDIUM_TEXT = TextHParams(n_layers=8, n_embd=1024, n_head=8, n_head_kv=2, head_dim=128,
                          n_ff=2816, n_vocab=131072)
MEDIUM_VISION = VisionHParams(n_layers=4, n_embd=256, n_head=4, n_ff=512,
                              projection_dim=MEDIUM_TEXT.n_embd)


def medium_model(quant: str = "Q4_K_M") -> tuple[Path, Path]:
    """(text model, projector) paths, built on first use."""
    CACHE.mkdir(exist_ok=True)
    f16 = CACHE / "medium-F16.gguf"
    mmproj = CACHE / "medium-mmproj-F16.gguf"
    if not f16.exists() or not mmproj.exists():
        tensors = tm.text_tensors(MEDIUM_TEXT)
        tm.write_text_model(f16, hp=MEDIUM_TEXT, tensors=tensors,
                            chat_template=tm.builtin_template())
        tm.write_mmproj(mmproj, tensors, vp=MEDIUM_VISION, dtype="f16")
    if quant.upper() == "F16":
        return f16, mmproj
    out = CACHE / f"medium-{quant}.gguf"
    if not out.exists():
        tm.quantize(f16, out, quant)
    return out, mmproj


def tiny_model() -> tuple[Path, Path]:
    """The test suite's tiny model (F16) and projector."""
    CACHE.mkdir(exist_ok=True)
    f16, mmproj = CACHE / "tiny-F16.gguf", CACHE / "tiny-mmproj.gguf"
    if not f16.exists() or not mmproj.exists():
        tensors = tm.text_tensors(tm.TINY_TEXT)
        tm.write_text_model(f16, tensors=tensors, chat_template=tm.builtin_template())
        tm.write_mmproj(mmproj, tensors)
    return f16, mmproj


def timed_answer(session: Any, text: str) -> tuple[float, Any]:
    """Ask through a ChatSession: (seconds to the first token, the reply's TurnStats)."""
    start = time.perf_counter()
    reply = session.ask(text)
    first = 0.0
    for _ in reply:
        if not first:
            first = time.perf_counter() - start
    return first, reply.stats
