"""`localsmall bench` on screen: progress while it measures (stderr), then the results
table and the system it ran on (stdout)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from localsmall.bench.export import system_lines, table
from localsmall.bench.types import BenchEvent, BenchReport, BenchStep
from localsmall.ui.console import err, out


class BenchProgress:
    """Renders benchmark events: one bar for the whole run (what runs now as its
    label) and, while a model loads, a second bar for the load."""

    def __init__(self, console: Console | None = None, *, enabled: bool | None = None) -> None:
        self.console = console or err()
        self.enabled = self.console.is_terminal if enabled is None else enabled
        self._progress: Progress | None = None
        self._overall: TaskID | None = None
        self._load: TaskID | None = None

    def _ensure(self) -> Progress:
        if self._progress is None:
            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                MofNCompleteColumn(), TimeElapsedColumn(), console=self.console,
                transient=True)
            self._progress.start()
        return self._progress

    def __call__(self, event: BenchEvent) -> None:
        if not self.enabled:
            return
        progress = self._ensure()
        if isinstance(event, BenchStep):
            if self._overall is None:
                self._overall = progress.add_task("", total=event.total)
            progress.update(self._overall, description=escape(event.label),
                            completed=event.done, total=event.total)
            if self._load is not None:
                progress.remove_task(self._load)
                self._load = None
            return
        if event.stage == "load" and event.total > 0:
            if self._load is None:
                self._load = progress.add_task("  loading", total=event.total)
            progress.update(self._load, completed=event.done, total=event.total)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> BenchProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def results_table(report: BenchReport, *, compare: bool = False) -> Table:
    """The results as a Rich table."""
    data = table(report, compare=compare)
    title = "localsmall bench" + (" — quants compared" if compare else "")
    view = Table(title=title, title_style="bold", header_style="bold cyan")
    for index, (header, numeric) in enumerate(zip(data.headers, data.numeric, strict=True)):
        widest = max((len(row[index]) for row in data.rows), default=0)
        view.add_column(escape(header), justify="right" if numeric else "left",
                        min_width=None if numeric else min(widest, 28))
    for row in data.rows:
        view.add_row(*(escape(cell) for cell in row))
    return view


def show_report(report: BenchReport, *, compare: bool = False) -> None:
    """The results table, the system it ran on, and any notes (stdout)."""
    console = out()
    view = results_table(report, compare=compare)
    if console.is_terminal:
        console.print(view)
    else:  # piped output has no width to fit: print the table whole, not wrapped at 80
        saved = console.width
        wide = console.options.update_width(10_000)
        console.width = max(console.measure(view, options=wide).maximum, saved)
        try:
            console.print(view)
        finally:
            console.width = saved
    system = Table(show_header=False, box=None, pad_edge=False)
    system.add_column(style="muted")
    system.add_column()
    for label, value in system_lines(report):
        system.add_row(label, escape(value))
    if report.quality:
        q = report.quality[0]
        system.add_row("quality", escape(
            f"{q.tokens} tokens of {report.quality_text} ({q.chunks} × {q.chunk}-token "
            f"chunks), KL divergence against {q.reference}"))
    console.print(system)
    for note in sorted({n for r in report.speed for n in r.notes}):
        console.print(f"[muted]note: {escape(note)}[/]")
