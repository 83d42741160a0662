"""`localsmall convert` on screen: progress bars (tensors and bytes) and the summary."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from localsmall.convert.types import ConvertProgress, ConvertResult
from localsmall.hub.pull import PullProgress
from localsmall.ui.console import err, out


class ConvertProgressView:
    """Renders ConvertProgress events: one bar per output file, with the tensors done,
    the bytes written, the speed and the time left."""

    def __init__(self, console: Console | None = None, *, enabled: bool | None = None) -> None:
        self.console = console or err()
        self.enabled = self.console.is_terminal if enabled is None else enabled
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def _ensure(self) -> Progress:
        if self._progress is None:
            self._progress = Progress(
                TextColumn("{task.description}"), TextColumn("[muted]{task.fields[count]}"),
                BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                console=self.console, transient=False)
            self._progress.start()
        return self._progress

    def __call__(self, event: ConvertProgress) -> None:
        if not self.enabled:
            return
        progress = self._ensure()
        count = (f"tensors {event.tensors_done}/{event.tensors_total}" if event.tensors_total
                 else "quantizing")
        task = self._tasks.get(event.label)
        if task is None:
            task = progress.add_task(escape(event.label), total=event.bytes_total, count=count)
            self._tasks[event.label] = task
        progress.update(task, completed=event.bytes_done, total=event.bytes_total, count=count)

    def download(self, event: PullProgress) -> None:
        """Render the download of a Hub checkpoint in the same display."""
        if not self.enabled or event.total <= 0:
            return
        progress = self._ensure()
        label = f"{event.stage} {event.file}"
        task = self._tasks.get(label)
        if task is None:
            task = progress.add_task(escape(label), total=event.total, count="from the Hub")
            self._tasks[label] = task
        progress.update(task, completed=min(event.done, event.total))

    def stop(self) -> None:
        """Stop rendering (the finished bars stay on screen)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> ConvertProgressView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def render_result(result: ConvertResult) -> None:
    """The files written (stdout) and notes (stderr)."""
    table = Table(title=f"{result.base_name} ({result.layout} layout, {result.architecture})",
                  title_justify="left", show_edge=False)
    table.add_column("file")
    table.add_column("type")
    table.add_column("size", justify="right")
    for file in result.files:
        kind = "projector " + file.quant if file.kind == "mmproj" else file.quant
        table.add_row(escape(str(file.path)), kind, _size(file.size))
    out().print(table)
    if result.model_id:
        quants = [f.quant for f in result.files if f.kind == "model"]
        out().print(f"registered as [bold]{result.model_id}[/]: run `localsmall chat "
                    f"{result.model_id}:{quants[-1]}`")
    for note in result.notes:
        err().print(f"[warn]note:[/] {escape(note)}")
    err().print(f"[muted]done in {result.seconds:.0f} s[/]")
