"""Reading text into the KV cache in a background thread: the chat's system prompt while
the user types the first message.

llama.cpp's context takes one call at a time, so the engine owns the one read ahead and
settles it before anything else touches the context: a turn waits for it (its progress
shown by the turn's bar, Ctrl-C stops it), everything else cancels it (the read stops at
its next graph node; the batches it finished stay in the cache). The thread never
prints and never raises: what it produced, or why not, is kept for the engine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from localsmall import interrupt
from localsmall.engine.types import Progress, ProgressCallback, TurnStats

POLL_S = 0.1  # how often a waiting turn redraws the read's progress and checks Ctrl-C

# The work: reads with the stop event and a progress sink; returns its stats and anything
# else the caller wants back (a saved state's description).
Work = Callable[[threading.Event, ProgressCallback], tuple[TurnStats, Any]]


class ReadAhead:
    """One background read: started at once, then waited for or cancelled."""

    def __init__(self, work: Work, *, label: str, total: int, base: int = 0,
                 on_done: Callable[[TurnStats, Any], None] | None = None) -> None:
        self.label = label
        self.total = total    # positions to read
        self.base = base      # positions the cache kept before them
        self.stop = threading.Event()
        self.stats: TurnStats | None = None   # set when the read finished (not cancelled)
        self.extra: Any = None
        self.failure: BaseException | None = None
        self._latest: Progress | None = None
        self._work = work
        self._on_done = on_done
        self._thread = threading.Thread(target=self._run, name="localsmall-read-ahead",
                                        daemon=True)
        self._thread.start()

    def _record(self, event: Progress) -> None:
        if event.stage == "prompt":
            self._latest = event

    def _run(self) -> None:
        try:
            stats, extra = self._work(self.stop, self._record)
            if self._on_done is not None:
                self._on_done(stats, extra)
            self.stats, self.extra = stats, extra
        except BaseException as exc:  # a thread has no one to raise to
            self.failure = exc

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def left(self) -> float:
        """Positions still to read (fractional inside a batch); 0 once it ended."""
        if not self.running:
            return 0.0
        latest = self._latest
        return float(self.total) if latest is None else max(latest.total - latest.done, 0.0)

    def wait(self, on_progress: ProgressCallback | None) -> float:
        """Wait for the read to end, its progress shown through `on_progress` under this
        read's label; returns the seconds waited. Ctrl-C (the interrupt flag) cancels
        it and raises KeyboardInterrupt here, in the waiting thread."""
        start = time.perf_counter()
        while self._thread.is_alive():
            if interrupt.take():
                self.cancel()
                raise KeyboardInterrupt
            latest = self._latest
            if on_progress is not None:
                done = latest.done if latest is not None else 0.0
                on_progress(Progress("prompt", done, self.total, self.label))
            self._thread.join(POLL_S)
        if on_progress is not None and self.stats is not None:
            on_progress(Progress("prompt", self.total, self.total, self.label))
        return time.perf_counter() - start

    def cancel(self) -> None:
        """Stop the read at its next graph node and wait for the thread to end."""
        self.stop.set()
        self._thread.join()
