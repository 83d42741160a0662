"""Progress of reading a prompt into the context, for the progress bar."""

from __future__ import annotations

import time
from collections.abc import Callable

from localsmall.engine.types import Progress, ProgressCallback


class ReadProgress:
    """Progress of reading a prompt. Whole batches are counted as they finish; inside a
    batch (a minute or more for the 24B model on a laptop CPU), the share of the compute
    graph's nodes done so far, counted through llama.cpp's abort callback, moves the bar."""

    def __init__(self, todo: int, on_progress: ProgressCallback | None, graph_nodes: int) -> None:
        self.todo = todo
        self.done = 0
        self._report = on_progress
        self._graph_nodes = graph_nodes
        self._batch = 0
        self._nodes = 0

    def start(self) -> None:
        """Report the read before its first batch, so a bar can show at once."""
        if self.todo > 0:
            self._emit(0)

    def begin_batch(self, n_tokens: int) -> None:
        self._batch, self._nodes = n_tokens, 0

    def node(self) -> None:
        self._nodes += 1
        if self._report is not None and self._graph_nodes and self._nodes % 8 == 0:
            share = min(self._nodes / self._graph_nodes, 0.99)
            self._emit(self.done + int(self._batch * share))

    def end_batch(self, n_tokens: int) -> int:
        self.done += n_tokens
        self._emit(self.done)
        return 0

    def _emit(self, done: int) -> None:
        if self._report is not None:
            self._report(Progress("prompt", done, self.todo, "reading prompt"))


class ProgressLog:
    """A progress callback that writes lines instead of bars, for logs (the server's
    request log, a `run` whose stderr is not a terminal): each stage's progress with
    elapsed time and an ETA from its rate so far, at most every `every_s` seconds, and
    a last line when a stage completes.

        engine.generate(prompt, sampling, ProgressLog(logger.info))
    """

    def __init__(self, write: Callable[[str], None], *, every_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._write = write
        self._every_s = every_s
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
        self._last_line = now
        if done:
            self._finished.add(key)
        self._write(progress_line(event, now - start))


def progress_line(event: Progress, elapsed_s: float) -> str:
    """'reading prompt: 120/351 (34%), 20.1 s, about 38 s left' (the ETA from the rate
    so far; none until there is one)."""
    share = event.done / event.total if event.total else 0.0
    line = (f"{event.label or event.stage}: {event.done}/{event.total} ({share:.0%}), "
            f"{elapsed_s:.1f} s")
    if 0 < event.done < event.total and elapsed_s > 0:
        line += f", about {elapsed_s * (event.total - event.done) / event.done:.0f} s left"
    return line
