"""Running llama.cpp's quantizer in a child process.

`llama_model_quantize` is one long C call (minutes for a 24B model) that neither reports
progress nor stops on Ctrl-C. Run in a child process, it can be killed at once, its
memory is returned when it ends, and the parent shows progress by watching the output
file grow. The child writes under a temporary name; the parent renames it only after a
clean exit and a check that the file reads back as GGUF.

The child is `python -m localsmall.convert.quantize_job SPEC.json`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from localsmall.errors import ConversionError, LocalsmallError, ModelLoadError
from localsmall.fileio import atomic_path

POLL_S = 0.2
# Rows llama.cpp's quantizer holds at once; its default (8 GiB) is too much for a laptop.
MAX_BUFFER_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class QuantizeSpec:
    """What the child does."""

    source: str
    dest: str
    quant: str
    threads: int
    imatrix: str | None
    result: str          # where the child writes {"ok": true} or {"error": "..."}


def _imatrix_metadata(matrix: object, path: str) -> dict[str, str | int]:
    from localsmall.convert.imatrix import ImportanceMatrix

    assert isinstance(matrix, ImportanceMatrix)
    meta: dict[str, str | int] = {"quantize.imatrix.file": Path(path).name,
                                  "quantize.imatrix.entries_count": len(matrix.entries)}
    if matrix.datasets:
        meta["quantize.imatrix.dataset"] = matrix.datasets[0]
    if matrix.chunk_count > 0:
        meta["quantize.imatrix.chunks_count"] = matrix.chunk_count
    return meta


def _child(spec: QuantizeSpec) -> None:
    from localsmall.convert.imatrix import read_imatrix
    from localsmall.engine.quantize import quantize_gguf

    entries, metadata = None, None
    if spec.imatrix:
        matrix = read_imatrix(Path(spec.imatrix))
        entries, metadata = matrix.entries, _imatrix_metadata(matrix, spec.imatrix)
    quantize_gguf(Path(spec.source), Path(spec.dest), spec.quant, threads=spec.threads,
                  imatrix=entries, metadata=metadata, max_buffer_bytes=MAX_BUFFER_BYTES)


def main(argv: list[str]) -> int:
    """Child entry point: run the spec, record the outcome in its result file."""
    spec = QuantizeSpec(**json.loads(Path(argv[0]).read_text(encoding="utf-8")))
    try:
        _child(spec)
        outcome: dict[str, object] = {"ok": True}
    except LocalsmallError as exc:
        outcome = {"error": str(exc)}
    Path(spec.result).write_text(json.dumps(outcome), encoding="utf-8")
    return 0 if outcome.get("ok") else 1


def _check_output(path: Path, quant: str) -> None:
    from localsmall.gguf_header import read_header

    try:
        header = read_header(path)
    except ModelLoadError:
        header = None
    if header is None or not header.tensors or header.data_end > header.file_size:
        raise ConversionError(f"the {quant} file llama.cpp wrote is incomplete")


def run_quantize(source: Path, dest: Path, quant: str, *, threads: int,
                 imatrix: Path | None, on_size: Callable[[int], None]) -> Path:
    """Quantize `source` into `dest` in a child process; `on_size(bytes)` reports the
    output's growth. Ctrl-C kills the child and leaves nothing under `dest`."""
    with atomic_path(dest) as tmp, tempfile.TemporaryDirectory(prefix="localsmall-q-") as work:
        spec = QuantizeSpec(str(source), str(tmp), quant, threads,
                            str(imatrix) if imatrix else None, str(Path(work) / "result.json"))
        spec_file = Path(work) / "spec.json"
        spec_file.write_text(json.dumps(asdict(spec)), encoding="utf-8")
        with open(Path(work) / "log.txt", "wb") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "localsmall.convert.quantize_job", str(spec_file)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            try:
                while child.poll() is None:
                    time.sleep(POLL_S)
                    on_size(tmp.stat().st_size if tmp.exists() else 0)
            except BaseException:
                child.kill()
                child.wait()
                raise
        outcome = _outcome(Path(spec.result), Path(work) / "log.txt", child.returncode)
        if "error" in outcome:
            raise ConversionError(str(outcome["error"]))
        _check_output(tmp, quant)
        on_size(tmp.stat().st_size)
    return dest


def _outcome(result: Path, log: Path, returncode: int) -> dict[str, object]:
    try:
        return dict(json.loads(result.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        detail = f": {' / '.join(tail)}" if tail else ""
        return {"error": f"llama.cpp's quantizer stopped unexpectedly (exit status "
                         f"{returncode}){detail}"}


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
