"""chat/deadline.py: a deadline enforced on Python code from a watchdog thread."""

from __future__ import annotations

import threading
import time

import pytest

from localsmall.chat import deadline
from localsmall.chat.deadline import run_with_deadline

GIVE_UP_S = 60  # a broken watchdog ends these loops here, and the test fails


class Late(BaseException):
    pass


def _spin(stop: float) -> int:
    """A tight loop without calls (as a template's nested loops compile to)."""
    n = 0
    while time.monotonic() < stop:
        n += 1
    return n


def test_a_tight_loop_is_stopped() -> None:
    start = time.monotonic()
    with pytest.raises(Late):
        run_with_deadline(lambda: _spin(start + GIVE_UP_S), seconds=0.2, exception=Late)
    assert time.monotonic() - start < GIVE_UP_S / 2


def test_work_in_time_returns_and_nothing_is_raised_later() -> None:
    assert run_with_deadline(lambda: 42, seconds=0.05, exception=Late) == 42
    # Well past the deadline, code of the same thread runs on undisturbed.
    _spin(time.monotonic() + 0.05 + 3 * deadline.REPEAT_S)


def test_a_swallowed_exception_is_raised_again() -> None:
    swallowed = []

    def work() -> None:
        stop = time.monotonic() + GIVE_UP_S
        try:
            _spin(stop)
        except Late:
            swallowed.append(1)  # as a finalizer run by the garbage collector would
        _spin(stop)

    with pytest.raises(Late):
        run_with_deadline(work, seconds=0.1, exception=Late)
    assert swallowed == [1]


def test_only_the_overdue_thread_is_stopped() -> None:
    results: dict[str, object] = {}

    def guarded(name: str, seconds: float, spin_s: float) -> None:
        try:
            results[name] = run_with_deadline(lambda: _spin(time.monotonic() + spin_s),
                                              seconds=seconds, exception=Late) > 0
        except Late:
            results[name] = "stopped"

    threads = [threading.Thread(target=guarded, args=("runaway", 0.2, GIVE_UP_S)),
               threading.Thread(target=guarded, args=("quick", GIVE_UP_S, 0.5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(GIVE_UP_S * 2)
    assert results == {"runaway": "stopped", "quick": True}


def test_the_work_s_own_errors_pass_through() -> None:
    def work() -> None:
        raise ValueError("own")

    with pytest.raises(ValueError, match="own"):
        run_with_deadline(work, seconds=5, exception=Late)
