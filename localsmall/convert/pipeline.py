"""`localsmall convert` end to end: checkpoint -> GGUF text model + projector ->
quantized builds, registered so chat, plan and bench find them.

Everything that can be checked is checked before the first byte is written (layout,
config against weights, tokenizer, imatrix, existing outputs, free disk), so a mistake
costs seconds, not the hour a 24B conversion can take.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import gguf

from localsmall import paths
from localsmall.convert.gguf_files import FileInfo, mmproj_writer, text_writer
from localsmall.convert.gguf_stream import StreamCallback, write_gguf
from localsmall.convert.imatrix import ImportanceMatrix, read_imatrix
from localsmall.convert.layouts import Checkpoint, detect
from localsmall.convert.quant_types import estimated_size
from localsmall.convert.quantize_job import run_quantize
from localsmall.convert.safetensors_files import TensorReader
from localsmall.convert.source import Source, readme_license, resolve_source
from localsmall.convert.tekken import GgufVocab, TekkenVocab, read_tekken, to_gguf_vocab
from localsmall.convert.tensor_plan import (
    FILE_TYPES,
    OUTTYPES,
    PlannedTensor,
    map_names,
    plan_text,
    plan_vision,
)
from localsmall.convert.types import (
    ConvertProgress,
    ConvertProgressCallback,
    ConvertRequest,
    ConvertResult,
    OutputFile,
    Stage,
)
from localsmall.errors import ConversionError, DiskSpaceError, UsageError
from localsmall.hub.pull import PullCallback

Q = gguf.GGMLQuantizationType
# Chat templates by tekken version; other versions get none (localsmall's built-in
# template applies at run time).
CHAT_TEMPLATES = {"v11": "mistral-small-3.2.jinja"}
METADATA_MARGIN = 64 * 1024 * 1024   # vocabulary, merges, template, alignment
# The projector's type for each --outtype (quantizing the small vision tower saves little).
MMPROJ_TYPES = {Q.F32: Q.F32, Q.F16: Q.F16, Q.BF16: Q.BF16, Q.Q8_0: Q.F16}


@dataclass(frozen=True)
class _Job:
    """A conversion fully planned and checked, ready to write."""

    source: Source
    checkpoint: Checkpoint
    info: FileInfo
    chat_template: str | None
    outtype: gguf.GGMLQuantizationType
    text: list[PlannedTensor]
    vision: list[PlannedTensor]
    model_path: Path
    mmproj_path: Path | None
    quant_paths: dict[str, Path]
    notes: tuple[str, ...]


# Tokenizers already read in this process, by content: converting a 131k-token
# vocabulary takes seconds, and a session converting twice (both layouts, several
# precisions) reads the same tekken.json each time.
_TOKENIZERS: dict[tuple[str, int], tuple[TekkenVocab, list[GgufVocab]]] = {}


def _tokenizer(path: Path, n_vocab: int) -> tuple[TekkenVocab, list[GgufVocab]]:
    """The tekken vocabulary and a one-slot list for its (lazily built) GGUF form."""
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ConversionError(f"cannot read {path}: {exc.strerror or exc}") from None
    key = (digest, n_vocab)
    if key not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = (read_tekken(path, n_vocab), [])
    return _TOKENIZERS[key]


def _gguf_vocab(path: Path, n_vocab: int) -> GgufVocab:
    tekken, converted = _tokenizer(path, n_vocab)
    if not converted:
        converted.append(to_gguf_vocab(tekken))
    return converted[0]


def free_disk_bytes(directory: Path) -> int:
    """Free bytes on the disk that holds `directory` (or its nearest existing parent)."""
    probe = Path(directory).resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _validate(request: ConvertRequest) -> None:
    if request.outtype is not None and request.outtype not in OUTTYPES:
        raise UsageError(f"--outtype must be one of {', '.join(OUTTYPES)}")
    if request.threads is not None and request.threads < 1:
        raise UsageError("--threads must be at least 1")
    if request.quants and request.outtype == "q8_0":
        raise UsageError("--quant needs a full-precision file to start from; use --outtype "
                         "bf16, f16 or f32 (Q8_0 is also available as --quant Q8_0)")
    if request.imatrix is not None and not request.quants:
        raise UsageError("--imatrix is used by --quant; add the quant types to make")
    needy = [q.name for q in request.quants if q.needs_imatrix]
    if needy and request.imatrix is None:
        raise UsageError(f"{', '.join(needy)} need an importance matrix: pass --imatrix FILE "
                         "(llama.cpp's imatrix format, as published next to GGUF builds)")


def _outtype(request: ConvertRequest, checkpoint: Checkpoint) -> gguf.GGMLQuantizationType:
    if request.outtype is not None:
        return OUTTYPES[request.outtype]
    bf16 = any(entry.dtype == "BF16" for entry in checkpoint.tensors.values())
    return Q.BF16 if bf16 else Q.F16


def _check_imatrix(matrix: ImportanceMatrix, tensors: list[PlannedTensor]) -> None:
    columns = {t.name: t.shape[-1] for t in tensors if len(t.shape) == 2}
    matched = [name for name in matrix.entries if name in columns]
    if not matched:
        raise ConversionError(f"{matrix.path} has no data for this model's tensors; it was "
                              "made for another model")
    for name in matched:
        if matrix.entries[name].size != columns[name]:
            raise ConversionError(f"{matrix.path}: {name} has {matrix.entries[name].size} "
                                  f"values, the model needs {columns[name]}; it was made for "
                                  "another model")


def _chat_template(version: str) -> str | None:
    name = CHAT_TEMPLATES.get(version)
    if name is None:
        return None
    return resources.files("localsmall").joinpath("templates", name).read_text(
        encoding="utf-8")


def _plan(request: ConvertRequest, source: Source, checkpoint: Checkpoint) -> _Job:
    tekken, _ = _tokenizer(checkpoint.tokenizer, checkpoint.text.n_vocab)
    outtype = _outtype(request, checkpoint)
    mapped = map_names(checkpoint)
    text = plan_text(checkpoint, mapped, outtype)
    with_vision = checkpoint.vision is not None and request.mmproj
    vision = (plan_vision(checkpoint, mapped, MMPROJ_TYPES[outtype],
                          tekken.token_id("[IMG_BREAK]")) if with_vision else [])
    if request.imatrix:
        _check_imatrix(read_imatrix(request.imatrix), text)
    template = _chat_template(tekken.version)
    notes = list(checkpoint.notes)
    if template is None:
        notes.append(f"no chat template for tekken {tekken.version or 'without a version'}; "
                     "localsmall's built-in template applies at run time")
    base = source.base_name
    out_dir = Path(request.out_dir or paths.data_dir() / "models" / base).expanduser()
    mmproj_name = f"mmproj-{base}-{MMPROJ_TYPES[outtype].name}.gguf"
    info = FileInfo(name=base, basename=base, source_repo=source.repo_id,
                    license=readme_license(source.directory) or _catalog_license(source))
    return _Job(
        source=source, checkpoint=checkpoint, info=info, chat_template=template,
        outtype=outtype, text=text, vision=vision,
        model_path=out_dir / f"{base}-{outtype.name}.gguf",
        mmproj_path=out_dir / mmproj_name if vision else None,
        quant_paths={q.name: out_dir / f"{base}-{q.name}.gguf" for q in request.quants},
        notes=tuple(notes))


def _outputs(job: _Job) -> list[Path]:
    extra = [job.mmproj_path] if job.mmproj_path else []
    return [job.model_path, *extra, *job.quant_paths.values()]


def _check_outputs(job: _Job, force: bool) -> None:
    existing = [p for p in _outputs(job) if p.exists()]
    if existing and not force:
        raise ConversionError(f"{existing[0]} already exists; pass --force to overwrite it"
                              + (f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""))


def _check_disk(job: _Job, request: ConvertRequest) -> None:
    n_params = sum(t.n_elements for t in job.text)
    needed = (sum(t.nbytes for t in job.text) + sum(t.nbytes for t in job.vision)
              + METADATA_MARGIN + sum(estimated_size(q, n_params) for q in request.quants))
    free = free_disk_bytes(job.model_path.parent)
    if needed > free:
        raise DiskSpaceError(
            f"converting needs about {needed / 1e9:.1f} GB free in {job.model_path.parent}, "
            f"but only {free / 1e9:.1f} GB are free; free some space or choose another "
            "--out directory")


def _reporter(on_progress: ConvertProgressCallback | None, stage: Stage, label: str,
              tensors: list[PlannedTensor]) -> StreamCallback:
    total = sum(t.nbytes for t in tensors)

    def report(done: int, written: int) -> None:
        if on_progress is not None:
            on_progress(ConvertProgress(stage, label, done, len(tensors), written, total))

    return report


def _write(job: _Job, on_progress: ConvertProgressCallback | None) -> list[OutputFile]:
    checkpoint = job.checkpoint
    # Only now, after every check passed: converting the vocabulary takes seconds.
    vocab = _gguf_vocab(checkpoint.tokenizer, checkpoint.text.n_vocab)
    files = []
    with TensorReader() as reader:
        write_gguf(job.model_path,
                   lambda path: text_writer(path, checkpoint.text, vocab, info=job.info,
                                            chat_template=job.chat_template,
                                            file_type=FILE_TYPES[job.outtype]),
                   job.text, reader,
                   _reporter(on_progress, "model", f"model {job.outtype.name}", job.text))
        files.append(OutputFile("model", job.outtype.name, job.model_path,
                                job.model_path.stat().st_size))
        if job.mmproj_path is not None and checkpoint.vision is not None:
            vision = checkpoint.vision
            mmproj_type = MMPROJ_TYPES[job.outtype]
            write_gguf(job.mmproj_path,
                       lambda path: mmproj_writer(path, vision, info=job.info,
                                                  file_type=FILE_TYPES[mmproj_type]),
                       job.vision, reader,
                       _reporter(on_progress, "mmproj", f"projector {mmproj_type.name}",
                                 job.vision))
            files.append(OutputFile("mmproj", mmproj_type.name, job.mmproj_path,
                                    job.mmproj_path.stat().st_size))
    return files


def _quantize(job: _Job, request: ConvertRequest,
              on_progress: ConvertProgressCallback | None) -> list[OutputFile]:
    n_params = sum(t.n_elements for t in job.text)
    files = []
    for quant in request.quants:
        dest = job.quant_paths[quant.name]
        expected = estimated_size(quant, n_params)

        def report(size: int, label: str = f"model {quant.name}", total: int = expected) -> None:
            if on_progress is not None:  # the size is an estimate until the file is done
                on_progress(ConvertProgress("quantize", label, 0, 0, size, max(total, size)))

        run_quantize(job.model_path, dest, quant.name,
                     threads=request.threads or os.cpu_count() or 1,
                     imatrix=request.imatrix, on_size=report)
        size = dest.stat().st_size
        report(size, total=size)
        files.append(OutputFile("model", quant.name, dest, size))
    return files


def _catalog_model(source: Source) -> tuple[str, str] | None:
    """(catalog id, licence) of the catalog model this checkpoint is, if any."""
    from localsmall.models.catalog import load_catalog

    names = {source.base_name.lower()}
    if source.repo_id:
        names.add(source.repo_id.lower())
    for model in load_catalog().models:
        known = {model.id.lower(), model.source_repo.lower(),
                 model.source_repo.rsplit("/", 1)[-1].lower(), *(a.lower() for a in model.aliases)}
        if names & known:
            return model.id, model.license
    return None


def _catalog_license(source: Source) -> str | None:
    match = _catalog_model(source)
    return match[1] if match else None


def _register(job: _Job, files: list[OutputFile], request: ConvertRequest) -> str | None:
    from localsmall.models.registry import RegisteredBuild, register_build

    match = _catalog_model(job.source)
    if match is None:
        return None
    mmproj = str(job.mmproj_path) if job.mmproj_path else None
    for file in files:
        if file.kind == "model":
            register_build(RegisteredBuild(model_id=match[0], quant=file.quant,
                                           model_path=str(file.path), mmproj_path=mmproj,
                                           source=f"converted from {request.source}"))
    return match[0]


def convert_checkpoint(request: ConvertRequest,
                       on_progress: ConvertProgressCallback | None = None,
                       on_download: PullCallback | None = None) -> ConvertResult:
    """Convert a checkpoint (directory or repo id) to GGUF, quantize, register."""
    start = time.perf_counter()
    _validate(request)
    source = resolve_source(request.source, on_download)
    checkpoint = detect(source.directory)
    job = _plan(request, source, checkpoint)
    _check_outputs(job, request.force)
    _check_disk(job, request)
    files = _write(job, on_progress)
    files += _quantize(job, request, on_progress)
    model_id = _register(job, files, request)
    notes = list(job.notes)
    if model_id is None:
        notes.append(f"{source.base_name} is not a catalog model, so the files are not "
                     "registered; run them with --model PATH")
    return ConvertResult(source=request.source, directory=job.model_path.parent,
                         layout=checkpoint.layout, architecture=checkpoint.architecture,
                         base_name=source.base_name, model_id=model_id, files=tuple(files),
                         notes=tuple(notes), seconds=time.perf_counter() - start)
