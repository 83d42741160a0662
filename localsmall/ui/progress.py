"""Progress bars for long work: loading a model, encoding an image, reading a prompt."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from localsmall.engine.types import Progress as EngineProgress
from localsmall.ui.console import err


class WorkProgress:
    """A callable that renders engine progress events as bars on stderr.

    Bars appear only when the work reports, and vanish (transient) when `stop()` is
    called, so a chat reply can stream right after the prompt has been read.
    """

    def __init__(self, console: Console | None = None, *, enabled: bool | None = None,
                 transient: bool = True) -> None:
        self.console = console or err()
        self.enabled = self.console.is_terminal if enabled is None else enabled
        self._progress: Progress | None = None
        self._tasks: dict[tuple[str, str], TaskID] = {}
        self._transient = transient

    def _ensure(self) -> Progress:
        if self._progress is None:
            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), console=self.console, transient=self._transient)
            self._progress.start()
        return self._progress

    def __call__(self, event: EngineProgress) -> None:
        if not self.enabled or event.total <= 0:
            return
        progress = self._ensure()
        key = (event.stage, event.label)
        if key not in self._tasks:
            self._tasks[key] = progress.add_task(event.label or event.stage, total=event.total)
        task = self._tasks[key]
        progress.update(task, completed=min(event.done, event.total), total=event.total)

    def stop(self) -> None:
        """Remove the bars (if any were shown)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._tasks.clear()

    def __enter__(self) -> WorkProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
