"""Quality of quants: perplexity on a text and KL divergence against a reference build,
the way llama.cpp's llama-perplexity measures them (see kld.py for the statistics).

The text is cut into chunks of 512 tokens; each chunk is read from an empty cache and
only its second half is scored, so every prediction has at least 256 tokens of
context. The reference build runs first and its next-token distributions go to a
file (about 256 KiB per scored token at a 131072-token vocabulary, ~0.5 GB for the
default text); then it is unloaded and each quant is loaded in turn and compared
chunk by chunk against that file. So only one model is ever in memory, which is what
makes this possible for the 24B model on a laptop. The file is kept in the cache
directory (keyed by the reference file, the text and the chunking), so measuring
another quant later does not run the reference again.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from localsmall import paths
from localsmall.bench.kld import (
    Divergence,
    DivergenceAccumulator,
    PerplexityAccumulator,
    negative_log_likelihood,
    quantize_log_probs,
    row_words,
)
from localsmall.bench.speed import Steps, display_name
from localsmall.bench.types import QualityRequest, QualityResult
from localsmall.engine.types import ProgressCallback
from localsmall.errors import LocalsmallError, UsageError
from localsmall.fileio import atomic_output
from localsmall.runtime.options import RunOptions
from localsmall.runtime.start import open_engine

if TYPE_CHECKING:
    from localsmall.engine.model import Engine
    from localsmall.models.resolve import LocalBuild

DEFAULT_TEXT_NAME = "localsmall eval.txt"
MAGIC = b"LSKLDREF"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIIII")   # magic, version, n_vocab, n_ctx, n_chunks, first
_TRAILER_LENGTH = struct.Struct("<I")
CACHED_REFERENCES = 4                 # reference files kept in the cache


def default_text() -> str:
    """The evaluation text shipped with localsmall (original prose, CC0)."""
    return resources.files("localsmall").joinpath("data", "eval.txt").read_text(
        encoding="utf-8")


def read_text(path: Path | None) -> tuple[str, str]:
    """(text, name) of the evaluation text: the user's file or the default."""
    if path is None:
        return default_text(), DEFAULT_TEXT_NAME
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--text file not found: {path}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--text must be a UTF-8 text file: {path}") from None
    except OSError as exc:
        raise LocalsmallError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not text.strip():
        raise UsageError(f"--text file is empty: {path}")
    return text, Path(path).name


# --- the reference file ------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceFile:
    """Stored reference log-probabilities (memory-mapped on use)."""

    path: Path
    n_vocab: int
    n_ctx: int
    n_chunks: int
    first: int
    tokens: np.ndarray        # int32 [n_chunks * n_ctx]
    ppl: float                # the reference's own perplexity (from float logits)
    ppl_error: float
    description: str

    @property
    def scored_per_chunk(self) -> int:
        return self.n_ctx - 1 - self.first

    def chunk_tokens(self, index: int) -> np.ndarray:
        return self.tokens[index * self.n_ctx:(index + 1) * self.n_ctx]

    def rows(self, index: int) -> np.ndarray:
        """uint16 rows [scored_per_chunk, row_words] for one chunk."""
        words = row_words(self.n_vocab)
        offset = _HEADER.size + self.tokens.nbytes + index * self.scored_per_chunk * words * 2
        return np.memmap(self.path, dtype=np.uint16, mode="r", offset=offset,
                         shape=(self.scored_per_chunk, words))


def open_reference(path: Path) -> ReferenceFile | None:
    """A complete reference file, or None when it is missing or does not add up."""
    try:
        with open(path, "rb") as f:
            magic, version, n_vocab, n_ctx, n_chunks, first = _HEADER.unpack(
                f.read(_HEADER.size))
            if magic != MAGIC or version != FORMAT_VERSION or not 0 < first < n_ctx:
                return None
            tokens = np.frombuffer(f.read(4 * n_ctx * n_chunks), dtype="<i4").astype(np.int32)
            size = path.stat().st_size
            f.seek(size - _TRAILER_LENGTH.size)
            (trailer_length,) = _TRAILER_LENGTH.unpack(f.read(_TRAILER_LENGTH.size))
            rows_bytes = n_chunks * (n_ctx - 1 - first) * row_words(n_vocab) * 2
            if size != _HEADER.size + tokens.nbytes + rows_bytes + trailer_length + 4:
                return None
            f.seek(size - _TRAILER_LENGTH.size - trailer_length)
            trailer = json.loads(f.read(trailer_length))
    except (OSError, struct.error, ValueError):
        return None
    accumulated = PerplexityAccumulator(int(trailer["count"]), float(trailer["sum_nll"]),
                                        float(trailer["sum_nll2"]))
    ppl, ppl_error = accumulated.result()
    return ReferenceFile(path=path, n_vocab=n_vocab, n_ctx=n_ctx, n_chunks=n_chunks,
                         first=first, tokens=tokens, ppl=ppl, ppl_error=ppl_error,
                         description=str(trailer.get("description", "")))


def _scored_logits(engine: Engine, tokens: np.ndarray, first: int) -> np.ndarray:
    """Logits that predict tokens first+1 .. end of the chunk."""
    from localsmall.engine.logits import chunk_logits

    return chunk_logits(engine, tokens.tolist(), first)[:-1]


def write_reference(engine: Engine, tokens: np.ndarray, n_ctx: int, n_chunks: int,
                    dest: Path, steps: Steps) -> ReferenceFile:
    """Run the reference over the chunks and store its log-probabilities in `dest`."""
    first = n_ctx // 2
    n_vocab = engine.info.n_vocab
    used = np.ascontiguousarray(tokens[:n_ctx * n_chunks], dtype="<i4")
    perplexity = PerplexityAccumulator()
    with atomic_output(dest) as f:
        f.write(_HEADER.pack(MAGIC, FORMAT_VERSION, n_vocab, n_ctx, n_chunks, first))
        f.write(used.tobytes())
        for index in range(n_chunks):
            steps.stage(f"reference chunk {index + 1}/{n_chunks}")
            chunk = used[index * n_ctx:(index + 1) * n_ctx]
            logits = _scored_logits(engine, chunk, first)
            perplexity.add(negative_log_likelihood(logits, chunk[first + 1:]))
            f.write(quantize_log_probs(logits).tobytes())
            steps.advance()
        trailer = json.dumps({"count": perplexity.count, "sum_nll": perplexity.sum_nll,
                              "sum_nll2": perplexity.sum_nll2,
                              "description": engine.info.description}).encode()
        f.write(trailer + _TRAILER_LENGTH.pack(len(trailer)))
    reference = open_reference(dest)
    if reference is None:
        raise LocalsmallError(f"the reference file {dest} could not be read back; "
                              "check the disk and try again")
    return reference


def compare(engine: Engine, reference: ReferenceFile, steps: Steps, label: str) -> Divergence:
    """Score a loaded model against the reference, chunk by chunk."""
    if engine.info.n_vocab != reference.n_vocab:
        raise UsageError(f"{engine.info.path.name} has a different vocabulary from the "
                         "reference build; compare quants of the same model")
    totals = DivergenceAccumulator()
    for index in range(reference.n_chunks):
        steps.stage(f"{label}: chunk {index + 1}/{reference.n_chunks}")
        chunk = reference.chunk_tokens(index)
        logits = _scored_logits(engine, chunk, reference.first)
        totals.add(logits, np.asarray(reference.rows(index)), chunk[reference.first + 1:])
        steps.advance()
    return totals.result()


# --- orchestration -----------------------------------------------------------------------


def _cache_path(reference: LocalBuild, text: str, request: QualityRequest) -> Path:
    file = Path(reference.model_path).resolve()
    stat = file.stat()
    key = hashlib.sha256()
    for part in (str(file), str(stat.st_size), str(stat.st_mtime_ns), str(request.chunk),
                 str(request.max_chunks), str(FORMAT_VERSION)):
        key.update(part.encode() + b"\0")
    key.update(text.encode())
    return paths.cache_dir() / "bench" / f"kld-reference-{key.hexdigest()[:24]}.bin"


def _prune_cache(keep: Path) -> None:
    """Keep the few most recent reference files (each can be hundreds of MB)."""
    files = sorted(keep.parent.glob("kld-reference-*.bin"),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[CACHED_REFERENCES:]:
        if old != keep:
            old.unlink(missing_ok=True)


def _quality_options(options: RunOptions, request: QualityRequest) -> RunOptions:
    return replace(options, n_ctx=request.chunk, vision=False, mmproj_path=None)


def _reference(build: LocalBuild, options: RunOptions, text: str, request: QualityRequest,
               n_others: int, steps: Steps, on_progress: ProgressCallback | None
               ) -> ReferenceFile:
    """The reference log-probabilities: from the cache, or computed now. Adds the
    chunks to score (now known) to the progress total."""
    cached = _cache_path(build, text, request)
    reference = open_reference(cached)
    if reference is not None:
        steps.grow(reference.n_chunks * n_others)
        steps.advance()
        return reference
    steps.stage(f"loading the reference {Path(build.model_path).name}")
    engine, _ = open_engine(_quality_options(options, request), on_progress=on_progress)
    with engine:
        from localsmall.engine.logits import text_tokens

        tokens = np.asarray(text_tokens(engine, text), dtype=np.int32)
        n_chunks = len(tokens) // request.chunk
        if request.max_chunks is not None:
            n_chunks = min(n_chunks, request.max_chunks)
        if n_chunks < 1:
            raise UsageError(f"the text has only {len(tokens)} tokens; --quality needs at "
                             f"least {request.chunk}")
        steps.grow(n_chunks * (1 + n_others))
        steps.advance()
        reference = write_reference(engine, tokens, request.chunk, n_chunks, cached, steps)
    _prune_cache(cached)
    return reference


def quality_units(targets: list[tuple[RunOptions, LocalBuild]], reference: LocalBuild) -> int:
    """Progress units known before the text is tokenized: one per model load (the
    chunks are added once their number is known)."""
    return 1 + len(list(_others(targets, Path(reference.model_path).resolve())))


def measure_quality(targets: list[tuple[RunOptions, LocalBuild]],
                    reference: tuple[RunOptions, LocalBuild], request: QualityRequest,
                    steps: Steps, on_progress: ProgressCallback | None = None
                    ) -> tuple[list[QualityResult], str]:
    """Perplexity and KL divergence of each target against the reference build.
    Returns the results (the reference first) and the text's name."""
    text, text_name = read_text(request.text_path)
    ref_options, ref_build = reference
    ref_path = Path(ref_build.model_path).resolve()
    others = list(_others(targets, ref_path))
    ref_file = _reference(ref_build, ref_options, text, request, len(others), steps,
                          on_progress)
    base = QualityResult(
        name=display_name(ref_build), model=ref_build.label,
        quant=ref_build.quant or ref_file.description, file=str(ref_build.model_path),
        size_bytes=ref_path.stat().st_size, reference=Path(ref_build.model_path).name,
        is_reference=True, tokens=ref_file.n_chunks * ref_file.scored_per_chunk,
        chunks=ref_file.n_chunks, chunk=ref_file.n_ctx, ppl=ref_file.ppl,
        ppl_error=ref_file.ppl_error)
    results = [base]
    for options, build in others:
        steps.stage(f"loading {Path(build.model_path).name}")
        engine, _ = open_engine(_quality_options(options, request), on_progress=on_progress)
        with engine:
            steps.advance()
            d = compare(engine, ref_file, steps, display_name(build))
            quant = build.quant or engine.info.description
        results.append(replace(
            base, name=display_name(build), model=build.label, quant=quant,
            file=str(build.model_path), size_bytes=Path(build.model_path).stat().st_size,
            is_reference=False, ppl=d.ppl, ppl_error=d.ppl_error, kld=d.kld,
            kld_error=d.kld_error, same_top=d.same_top, same_top_error=d.same_top_error,
            rms_dp=d.rms_dp, rms_dp_error=d.rms_dp_error))
    return results, text_name


def _others(targets: list[tuple[RunOptions, LocalBuild]], reference: Path
            ) -> Iterator[tuple[RunOptions, LocalBuild]]:
    """Targets other than the reference file, each file once."""
    seen = {reference}
    for options, build in targets:
        path = Path(build.model_path).resolve()
        if path not in seen:
            seen.add(path)
            yield options, build
