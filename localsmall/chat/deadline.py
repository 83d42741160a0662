"""A deadline for Python code running in one thread, enforced from another.

Rendering an untrusted chat template must stop after a bound of time, wherever its
loops are. A trace function that checks the clock on every line does that, but it makes
every render ~8x slower (0.7 ms instead of 0.09 ms for a 12-message conversation, on
the way to every reply's first token). Here a watchdog thread raises an exception in the
overdue thread instead (`PyThreadState_SetAsyncExc`): CPython delivers it at the next
backward jump or call of that thread's bytecode, so a tight loop stops as surely as with
the tracer, and code that meets its deadline runs at full speed.

An exception raised that way could land in a finalizer run by the garbage collector,
which swallows it: the watchdog raises it again every `REPEAT_S` until the code leaves.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

REPEAT_S = 0.25
T = TypeVar("T")


@dataclass
class _Guard:
    thread_id: int
    exception: type[BaseException]
    raise_at: float      # the deadline, then the next time to raise again
    raised: bool = False


class _Watchdog:
    """One daemon thread watching every guarded block of code (started on first use)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._guarded: dict[int, _Guard] = {}
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None
        self._sleeping_until: float | None = None  # None: idle, waiting for work

    def enter(self, seconds: float, exception: type[BaseException]) -> int:
        deadline = time.monotonic() + seconds
        with self._lock:
            token = next(self._tokens)
            self._guarded[token] = _Guard(threading.get_ident(), exception, deadline)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="localsmall-deadline",
                                                daemon=True)
                self._thread.start()
            # The watchdog sleeps until the earliest deadline it knows (or for good when
            # idle): wake it only when this one is earlier. Back-to-back renders with
            # the same bound then cost no thread switch.
            if self._sleeping_until is None or deadline < self._sleeping_until:
                self._wake.notify()
        return token

    def leave(self, token: int) -> None:
        with self._lock:
            guard = self._guarded.pop(token, None)
            if guard is not None and guard.raised:
                _raise_in(guard.thread_id, None)  # drop one not delivered yet

    def _run(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                for guard in self._guarded.values():
                    if guard.raise_at <= now:
                        _raise_in(guard.thread_id, guard.exception)
                        guard.raised, guard.raise_at = True, now + REPEAT_S
                upcoming = [g.raise_at for g in self._guarded.values()]
                # Keep the last deadline as the wake-up time even once its code left:
                # the next guarded block then finds the watchdog already sleeping.
                if upcoming:
                    self._sleeping_until = min(upcoming)
                elif self._sleeping_until is not None and self._sleeping_until <= now:
                    self._sleeping_until = None
                timeout = None if self._sleeping_until is None else \
                    max(self._sleeping_until - now, 0.0)
                self._wake.wait(timeout)


def _raise_in(thread_id: int, exception: type[BaseException] | None) -> None:
    """Make `thread_id` raise `exception` at its next bytecode check (None: cancel)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exception) if exception else None)


_WATCHDOG = _Watchdog()


def run_with_deadline(work: Callable[[], T], *, seconds: float,
                      exception: type[BaseException]) -> T:
    """`work()` in this thread; past `seconds`, `exception` is raised inside it (derive it
    from BaseException only, so that no `except Exception` in `work` swallows it). The
    caller catches `exception`."""
    token = _WATCHDOG.enter(seconds, exception)
    try:
        try:
            return work()
        finally:
            _WATCHDOG.leave(token)
    except exception:
        # Delivered as `leave` began: leave for good now (nothing more is raised until
        # REPEAT_S has passed), so that it can never land in the caller's code later.
        _WATCHDOG.leave(token)
        raise
