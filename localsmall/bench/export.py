"""A benchmark report as JSON, CSV, Markdown, and as the table the terminal shows.

Every format carries the system the numbers were measured on. The table layout
(`table`) is shared by Markdown and the Rich view so both show the same columns.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from localsmall.bench.stats import Measurement
from localsmall.bench.types import BenchReport, QualityResult, SpeedResult
from localsmall.units import GIB, gib_fixed

FORMAT_ID = "localsmall-bench/1"


# --- JSON ------------------------------------------------------------------------------


def to_json(report: BenchReport) -> str:
    """The whole report, samples included."""
    data = {"format": FORMAT_ID} | dataclasses.asdict(report)
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


# --- flat rows (CSV) ---------------------------------------------------------------------


def _measurement(prefix: str, value: Measurement | None) -> dict[str, Any]:
    return {prefix: value.mean if value else None,
            f"{prefix}_stdev": value.stdev if value else None}


def _system_columns(report: BenchReport) -> dict[str, Any]:
    s = report.system
    return {"cpu_model": s.cpu_model, "cpu_features": s.cpu_features,
            "physical_cores": s.physical_cores, "logical_cpus": s.logical_cpus,
            "ram_bytes": s.ram_bytes, "gpus": "; ".join(s.gpus),
            "backends": ",".join(s.backends), "llama_cpp": s.llama_cpp,
            "localsmall_version": s.localsmall_version, "os": s.os,
            "created": report.created}


def _quality_columns(q: QualityResult | None) -> dict[str, Any]:
    if q is None:
        return dict.fromkeys(QUALITY_KEYS)
    return {"ppl": q.ppl, "ppl_error": q.ppl_error, "kld": q.kld, "kld_error": q.kld_error,
            "same_top_pct": None if q.same_top is None else 100 * q.same_top,
            "same_top_pct_error": None if q.same_top_error is None else 100 * q.same_top_error,
            "rms_dp_pct": None if q.rms_dp is None else 100 * q.rms_dp,
            "quality_reference": q.reference, "quality_tokens": q.tokens}


QUALITY_KEYS = ("ppl", "ppl_error", "kld", "kld_error", "same_top_pct", "same_top_pct_error",
                "rms_dp_pct", "quality_reference", "quality_tokens")


def _speed_columns(r: SpeedResult) -> dict[str, Any]:
    return {"name": r.name, "model": r.model, "quant": r.quant, "file": r.file,
            "size_bytes": r.size_bytes, "n_params": r.n_params, "threads": r.threads,
            "gpu_layers": r.gpu_layers, "kv_type": r.kv_type, "flash_attn": r.flash_attn,
            "n_batch": r.n_batch, "n_ctx": r.n_ctx, "depth": r.depth,
            "n_prompt": r.n_prompt, "n_gen": r.n_gen,
            **_measurement("pp_tps", r.pp), **_measurement("tg_tps", r.tg),
            "load_s": r.load_s, **_measurement("ttft_s", r.ttft),
            "ttft_tokens": r.ttft_tokens, **_measurement("image_encode_s", r.image_encode),
            "image_tokens": r.image_tokens, "peak_rss_bytes": r.peak_rss_bytes,
            "device_memory_bytes": r.device_memory_bytes, "notes": "; ".join(r.notes)}


SPEED_KEYS = ("name", "model", "quant", "file", "size_bytes", "n_params", "threads",
              "gpu_layers", "kv_type", "flash_attn", "n_batch", "n_ctx", "depth", "n_prompt",
              "n_gen", "pp_tps", "pp_tps_stdev", "tg_tps", "tg_tps_stdev", "load_s", "ttft_s",
              "ttft_s_stdev", "ttft_tokens", "image_encode_s", "image_encode_s_stdev",
              "image_tokens", "peak_rss_bytes", "device_memory_bytes", "notes")


def quality_by_file(report: BenchReport) -> dict[str, QualityResult]:
    return {q.file: q for q in report.quality}


def flat_rows(report: BenchReport) -> list[dict[str, Any]]:
    """One row per speed measurement, with the quality of its file and the system."""
    quality = quality_by_file(report)
    system = _system_columns(report)
    rows = [_speed_columns(r) | _quality_columns(quality.get(r.file)) | system
            for r in report.speed]
    measured = {r.file for r in report.speed}
    for q in report.quality:  # quality of a file without speed rows (the reference)
        if q.file not in measured:
            known = {"name": q.name, "model": q.model, "quant": q.quant, "file": q.file,
                     "size_bytes": q.size_bytes}
            rows.append(dict.fromkeys(SPEED_KEYS) | known | _quality_columns(q) | system)
    return rows


def to_csv(report: BenchReport) -> str:
    """A header line, then one line per row of `flat_rows`."""
    rows = flat_rows(report)
    buffer = io.StringIO()
    fields = [*SPEED_KEYS, *QUALITY_KEYS, *_system_columns(report)]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# --- the table people read -------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """Column headers, cells as text, and which columns are numbers (right-aligned)."""

    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: tuple[bool, ...]


def size_text(n_bytes: int | None) -> str:
    if n_bytes is None:
        return "—"
    if n_bytes >= GIB:
        return gib_fixed(n_bytes, 2)
    return f"{n_bytes / 2**20:.1f} MiB"


def _rate(m: Measurement | None) -> str:
    return "—" if m is None else f"{m.mean:.2f} ± {m.stdev:.2f}"


def _seconds(m: Measurement | None) -> str:
    return "—" if m is None else f"{m.mean:.2f} ± {m.stdev:.2f}"


def _error_text(value: float | None, error: float | None, fmt: str, scale: float = 1.0) -> str:
    if value is None:
        return "—"
    if abs(value * scale) >= 1e6:  # e.g. the perplexity of an untrained model
        fmt = ".3e"
    return f"{value * scale:{fmt}} ± {(error or 0) * scale:{fmt}}"


Cell = Callable[[SpeedResult | None, QualityResult | None], str]
Column = tuple[str, bool, Cell]


def _speed(fn: Callable[[SpeedResult], str]) -> Cell:
    """A cell from the speed result ("—" on a quality-only row)."""
    return lambda r, q: "—" if r is None else fn(r)


def _quality(fn: Callable[[QualityResult], str]) -> Cell:
    """A cell from the quality result ("—" when the file's quality was not measured)."""
    return lambda r, q: "—" if q is None else fn(q)


def _name(r: SpeedResult | None, q: QualityResult | None) -> str:
    return r.name if r is not None else q.name if q is not None else "—"


def _size(r: SpeedResult | None, q: QualityResult | None) -> str:
    return size_text(r.size_bytes if r is not None else q.size_bytes if q is not None else None)


def _columns(report: BenchReport, compare: bool) -> list[Column]:
    depth = f" @ d{report.depth}" if report.depth else ""
    speed = report.speed
    cols: list[Column] = [("model", False, _name), ("size", True, _size)]
    if speed:
        cols.append(("threads", True, _speed(lambda r: str(r.threads))))
    if any(r.gpu_layers for r in speed):
        cols.append(("ngl", True, _speed(lambda r: str(r.gpu_layers))))
    if any(r.kv_type != "f16" for r in speed):
        cols.append(("KV", False, _speed(lambda r: r.kv_type)))
    if report.n_prompt:
        cols.append((f"pp{report.n_prompt}{depth} t/s", True, _speed(lambda r: _rate(r.pp))))
    if report.n_gen:
        cols.append((f"tg{report.n_gen}{depth} t/s", True, _speed(lambda r: _rate(r.tg))))
    if compare:
        relative = _relative_speeds(report)
        cols.append(("pp× / tg×", True, _speed(lambda r: relative.get(id(r), "—"))))
    if speed:
        cols.append(("load s", True, _speed(lambda r: f"{r.load_s:.2f}")))
    if any(r.ttft for r in speed):
        cols.append(("first token s", True, _speed(lambda r: _seconds(r.ttft))))
    if any(r.image_encode for r in speed):
        cols.append(("image s", True, _speed(lambda r: _seconds(r.image_encode))))
    if speed:
        cols.append(("peak RAM", True, _speed(lambda r: size_text(r.peak_rss_bytes))))
    if any(r.device_memory_bytes is not None for r in speed):
        cols.append(("GPU mem", True, _speed(lambda r: size_text(r.device_memory_bytes))))
    if report.quality:
        cols += [
            ("PPL", True, _quality(lambda q: _error_text(q.ppl, q.ppl_error, ".3f"))),
            ("KLD", True, _quality(lambda q: "reference" if q.is_reference
                                   else _error_text(q.kld, q.kld_error, ".5f"))),
            ("same top %", True, _quality(lambda q: "—" if q.is_reference else
                                          _error_text(q.same_top, q.same_top_error, ".2f",
                                                      100))),
        ]
    return cols


def _relative_speeds(report: BenchReport) -> dict[int, str]:
    """pp and tg of each row relative to the largest file run with the same settings
    (typically the slowest and most precise), as "pp× / tg×"."""
    groups: dict[tuple[Any, ...], list[SpeedResult]] = {}
    for r in report.speed:
        groups.setdefault((r.threads, r.gpu_layers, r.kv_type, r.flash_attn), []).append(r)
    out = {}
    for rows in groups.values():
        base = max(rows, key=lambda r: r.size_bytes)
        for r in rows:
            parts = [f"{a.mean / b.mean:.2f}" for a, b in ((r.pp, base.pp), (r.tg, base.tg))
                     if a is not None and b is not None and b.mean > 0]
            out[id(r)] = " / ".join(parts) or "—"
    return out


def table(report: BenchReport, *, compare: bool = False) -> Table:
    """The results as a table: one row per measurement (sorted by file size with
    --compare), quality joined by file."""
    quality = quality_by_file(report)
    measured = {r.file for r in report.speed}
    pairs: list[tuple[SpeedResult | None, QualityResult | None]] = [
        (r, quality.get(r.file)) for r in report.speed]
    pairs += [(None, q) for q in report.quality if q.file not in measured]
    if compare:
        pairs.sort(key=lambda p: -(p[0].size_bytes if p[0] else p[1].size_bytes if p[1] else 0))
    cols = _columns(report, compare)
    rows = tuple(tuple(fn(r, q) for _, _, fn in cols) for r, q in pairs)
    return Table(headers=tuple(c[0] for c in cols), rows=rows,
                 numeric=tuple(c[1] for c in cols))


def system_lines(report: BenchReport) -> list[tuple[str, str]]:
    """The system, as (label, value) pairs."""
    s = report.system
    return [
        ("CPU", f"{s.cpu_model} · {s.physical_cores} cores ({s.logical_cpus} logical)"),
        ("CPU features", s.cpu_features or "—"),
        ("RAM", size_text(s.ram_bytes)),
        ("GPU", "; ".join(s.gpus) or "none"),
        ("backends", ", ".join(s.backends)),
        ("llama.cpp", s.llama_cpp),
        ("localsmall", f"{s.localsmall_version} · Python {s.python} · {s.os}"),
        ("date", report.created),
    ]


def to_markdown(report: BenchReport, *, compare: bool = False) -> str:
    """A Markdown document: the system as a list, then the results table."""
    t = table(report, compare=compare)
    lines = ["# localsmall bench", ""]
    lines += [f"- **{label}**: {value}" for label, value in system_lines(report)]
    if report.quality:
        q = report.quality[0]
        lines.append(f"- **quality**: {q.tokens} tokens of {report.quality_text} in "
                     f"{q.chunks} chunks of {q.chunk}, reference {q.reference}")
    lines += ["", "| " + " | ".join(t.headers) + " |",
              "| " + " | ".join("---:" if n else "---" for n in t.numeric) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
              for row in t.rows]
    notes = sorted({n for r in report.speed for n in r.notes})
    if notes:
        lines += [""] + [f"Note: {n}" for n in notes]
    return "\n".join(lines) + "\n"


def render(report: BenchReport, fmt: str, *, compare: bool = False) -> str:
    """The report in one of the file formats: json, csv or md."""
    renderers: dict[str, Callable[[], str]] = {
        "json": lambda: to_json(report),
        "csv": lambda: to_csv(report),
        "md": lambda: to_markdown(report, compare=compare),
    }
    return renderers[fmt]()
