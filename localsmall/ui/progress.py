"""Progress bars for long work: loading a model, encoding an image, reading a prompt,
downloading a build."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from localsmall.engine.types import Progress as EngineProgress
from localsmall.hub.pull import PullProgress
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


class DownloadProgress:
    """A callable that renders pull progress (bytes, speed, ETA) as bars on stderr."""

    def __init__(self, console: Console | None = None, *, enabled: bool | None = None) -> None:
        self.console = console or err()
        self.enabled = self.console.is_terminal if enabled is None else enabled
        self._progress: Progress | None = None
        self._tasks: dict[tuple[str, str], TaskID] = {}

    def _ensure(self) -> Progress:
        if self._progress is None:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=self.console)
            self._progress.start()
        return self._progress

    def __call__(self, event: PullProgress) -> None:
        if not self.enabled or event.total <= 0:
            return
        progress = self._ensure()
        key = (event.stage, event.file)
        if key not in self._tasks:
            label = f"{'verifying' if event.stage == 'verify' else 'downloading'} {event.file}"
            # A resumed download starts where the last one stopped: speed counts new bytes.
            self._tasks[key] = progress.add_task(label, total=event.total,
                                                 completed=event.done)
        progress.update(self._tasks[key], completed=min(event.done, event.total))

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._tasks.clear()

    def __enter__(self) -> DownloadProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
