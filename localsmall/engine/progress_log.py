"""Progress as log lines, for logs rather than terminals: the server's request log, or a
command whose stderr is not a terminal."""

from __future__ import annotations

import time
from collections.abc import Callable

from localsmall.engine.types import Progress


class ProgressLog:
    """A progress callback that writes lines instead of bars, for logs (the server's
    request log, a `run` whose stderr is not a terminal): each stage's progress with
    elapsed time and an ETA from its rate so far, at most every `every_s` seconds, and
    a last line when a stage completes.

        engine.generate(prompt, sampling, ProgressLog(logger.info))
    """

    def __init__(self, write: Callable[[str], None], *, every_s: float = 2.0,
                 after_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._write = write
        self._every_s = every_s
        self._after_s = after_s  # a stage shorter than this writes nothing at all
        self._clock = clock
        self._started: dict[tuple[str, str], float] = {}
        self._last_line = -float("inf")
        self._finished: set[tuple[str, str]] = set()

    def __call__(self, event: Progress) -> None:
        if event.total <= 0:
            return
        key = (event.stage, event.label)
        now = self._clock()
        start = self._started.setdefault(key, now)
        done = event.done >= event.total
        if key in self._finished or not (done or now - self._last_line >= self._every_s):
            return
        if now - start < self._after_s:
            return
        self._last_line = now
        if done:
            self._finished.add(key)
        self._write(progress_line(event, now - start))


def progress_line(event: Progress, elapsed_s: float) -> str:
    """'reading prompt: 120/351 (34%), 20.1 s, about 38 s left' (the ETA from the rate
    so far; none until there is one)."""
    share = event.done / event.total if event.total else 0.0
    line = (f"{event.label or event.stage}: {int(event.done)}/{event.total} ({share:.0%}), "
            f"{elapsed_s:.1f} s")
    if 0 < event.done < event.total and elapsed_s > 0:
        line += f", about {elapsed_s * (event.total - event.done) / event.done:.0f} s left"
    return line
