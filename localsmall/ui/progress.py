"""Progress bars for long work: loading a model, encoding an image, reading a prompt,
downloading a build."""

from __future__ import annotations

import os
import time

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

PROGRESS_AFTER_ENV = "LOCALSMALL_PROGRESS_AFTER"
PROGRESS_AFTER_S = 0.5  # work that ends sooner shows no bar (no flicker on quick turns)


def progress_after_s() -> float:
    """Seconds of work before a bar appears (LOCALSMALL_PROGRESS_AFTER overrides)."""
    try:
        return max(0.0, float(os.environ.get(PROGRESS_AFTER_ENV, PROGRESS_AFTER_S)))
    except ValueError:
        return PROGRESS_AFTER_S


class WorkProgress:
    """A callable that renders engine progress events as bars on stderr.

    Bars are tracked from the first event but appear only once the work has lasted
    `after_s` seconds (quick turns stay clean), at once and then refreshed ten times a
    second with elapsed time and ETA; they vanish (transient) when `stop()` is called,
    so a chat reply can stream right after the prompt has been read.
    """

    def __init__(self, console: Console | None = None, *, enabled: bool | None = None,
                 transient: bool = True, after_s: float | None = None) -> None:
        self.console = console or err()
        self.enabled = self.console.is_terminal if enabled is None else enabled
        self.after_s = progress_after_s() if after_s is None else after_s
        self._progress: Progress | None = None
        self._tasks: dict[tuple[str, str], TaskID] = {}
        self._transient = transient
        self._first_event = 0.0
        self._shown = False
        self._clock = time.monotonic

    def _ensure(self) -> Progress:
        if self._progress is None:
            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), console=self.console, transient=self._transient)
            self._first_event = self._clock()
        return self._progress

    @property
    def shown(self) -> bool:
        """Whether bars are on the screen now."""
        return self._shown

    def __call__(self, event: EngineProgress) -> None:
        if not self.enabled or event.total <= 0:
            return
        progress = self._ensure()
        key = (event.stage, event.label)
        if key not in self._tasks:
            self._tasks[key] = progress.add_task(event.label or event.stage, total=event.total)
        task = self._tasks[key]
        progress.update(task, completed=min(event.done, event.total), total=event.total)
        if not self._shown and self._clock() - self._first_event >= self.after_s:
            progress.start()  # draws at once, then a thread redraws 10 times a second
            self._shown = True

    def stop(self) -> None:
        """Remove the bars (if any were shown)."""
        if self._progress is not None:
            if self._shown:
                self._progress.stop()
            self._progress = None
            self._tasks.clear()
            self._shown = False

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


class CalibrationLine:
    """One line on stderr while the machine's speeds are calibrated: rewritten in place
    on a terminal, one line per step otherwise (logs, tests)."""

    def __init__(self, console: Console | None = None) -> None:
        self._console = console or err()
        self._live = self._console.is_terminal
        self._shown = False

    def __call__(self, label: str, done: int, total: int) -> None:
        text = f"Calibrating this machine's speeds (once): {label} [{done}/{total}]"
        if self._live:
            self._console.file.write("\r\x1b[2K" + text)
            self._console.file.flush()
        else:
            self._console.print(text, markup=False, highlight=False)
        self._shown = True

    def __enter__(self) -> CalibrationLine:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live and self._shown:
            self._console.file.write("\n")
            self._console.file.flush()
