"""Reading text into the KV cache in a background thread: the chat's system prompt while
the user types the first message.

llama.cpp's context takes one call at a time, so the engine owns the one read ahead and
settles it before anything else touches the context: a turn waits for it (its progress
shown by the turn's bar, Ctrl-C stops it), everything else cancels it (the read stops at
its next graph node; the batches it finished stay in the cache). The thread never
prints and never raises: what it produced, or why not, is kept for the engine.

`ReadAhead` is one such read; `ReadingAhead` is the part of `Engine` (engine.model) that
starts, waits for and settles it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from localsmall import interrupt
from localsmall.engine.kvcache import positions
from localsmall.engine.parts import EngineParts
from localsmall.engine.state import StateMeta, save_kv_state
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


class ReadingAhead(EngineParts):
    """The part of `Engine` that owns its one background read (see the module docstring)."""

    def read_ahead(self, tokens: Sequence[int], *, label: str, save_to: Path | None = None,
                   on_done: Callable[[TurnStats, StateMeta | None], None] | None = None
                   ) -> None:
        """Read `tokens` into the cache in a background thread (after what the cache
        shares with them), then save the cache to `save_to` if given; `on_done` gets the
        read's stats and the saved state's description, in that thread, when the read
        was not cancelled. The next turn waits for it, showing its progress as `label`;
        anything else that touches the context cancels it first."""
        self.settle()
        self._check_workers()
        items = list(tokens)
        self.tokenizer.check(items)
        keep = self.kv.reusable(items)
        fingerprint = self.fingerprint if save_to else ""  # computed here, not in the thread

        def work(stop: threading.Event, progress: ProgressCallback
                 ) -> tuple[TurnStats, StateMeta | None]:
            self._stop = stop
            try:
                stats = self._evaluate(items, (), progress)
            finally:
                self._stop = None
            meta = (save_kv_state(self._llama, self.ctx, self.kv, save_to,
                                  fingerprint=fingerprint) if save_to else None)
            return stats, meta

        self._ahead = ReadAhead(work, label=label, total=positions(items[keep:]),
                                base=positions(items[:keep]), on_done=on_done)

    def ahead_positions(self) -> tuple[int, float]:
        """(positions a background read will still add to the cache, positions it
        still has to read: fewer, inside a batch); (0, 0) when none is running."""
        ahead = self._ahead
        if ahead is None or not ahead.running:
            return 0, 0.0
        return max(ahead.total - (self.kv.n_past - ahead.base), 0), ahead.left()

    @property
    def ahead_running(self) -> bool:
        return self._ahead is not None and self._ahead.running

    def stop_ahead(self) -> None:
        """Ask a background read to stop at its next graph node, without waiting (safe
        from any thread: a server shutting down while a request waits for the read)."""
        ahead = self._ahead
        if ahead is not None:
            ahead.stop.set()

    def settle(self) -> None:
        """Cancel a background read (if any) and wait for its thread: the context takes
        one llama.cpp call at a time."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.cancel()

    def wait_ahead(self, on_progress: ProgressCallback | None = None) -> TurnStats | None:
        """Wait for the background read to end (the server's start: requests wait for
        it) and return its stats; None when no read was started. Ctrl-C (the interrupt
        flag) cancels it and raises KeyboardInterrupt; the read's own failure is raised
        here."""
        ahead = self._ahead
        if ahead is None:
            return None
        self._await_ahead(on_progress)
        if ahead.failure is not None:
            raise ahead.failure
        return ahead.stats

    def _await_ahead(self, on_progress: ProgressCallback | None) -> float:
        """Wait for a background read before a turn (Ctrl-C cancels it and raises);
        returns the seconds waited."""
        ahead = self._ahead
        if ahead is None:
            return 0.0
        try:
            return ahead.wait(on_progress)
        finally:
            self._ahead = None
