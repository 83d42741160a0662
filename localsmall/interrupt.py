"""Ctrl-C as a flag, so that stopping never depends on where Python happens to be.

Python raises KeyboardInterrupt at whatever bytecode runs next after SIGINT. Inside a
ctypes callback from llama.cpp (progress, abort, eval, log callbacks) such an exception
is printed and swallowed by ctypes, and in the middle of rendering it can leave a
screen half drawn: a reply could run on after the user pressed Ctrl-C.

So around native work, and around a whole chat, SIGINT only sets a process-wide flag
(`interrupting()`). llama.cpp's abort callback, the projector's eval callback and the
model-load progress callback read the flag and make llama.cpp stop; the Python code that
called llama.cpp then acts on it at a safe point (`raise_if_requested()`, or a reply that
ends with the stop reason "interrupted"). Callbacks never raise.

Outside such sections SIGINT keeps Python's default behaviour (KeyboardInterrupt), which
pure-Python work (downloads, file conversion) relies on to stop and clean up.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

_flag = threading.Event()
_depth = 0                 # nested interrupting() sections open in the main thread
_previous: Any = None      # the SIGINT handler to put back when the outermost one ends


def requested() -> bool:
    """Whether Ctrl-C was pressed and nothing has acted on it yet. Safe in callbacks."""
    return _flag.is_set()


def request() -> None:
    """Ask the running work to stop, as Ctrl-C does (from any thread, or a test)."""
    _flag.set()


def clear() -> None:
    """Forget an earlier request (the chat does this when it shows its prompt)."""
    _flag.clear()


def take() -> bool:
    """Act on a request: True (and the request is consumed) when there was one."""
    if _flag.is_set():
        _flag.clear()
        return True
    return False


def raise_if_requested() -> None:
    """Turn a pending request into KeyboardInterrupt, here: a place where raising is safe."""
    if take():
        raise KeyboardInterrupt


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _flag.set()


@contextlib.contextmanager
def interrupting() -> Iterator[None]:
    """While the block runs, SIGINT sets the flag instead of raising KeyboardInterrupt.

    Nests; only the main thread can own signal handlers, so elsewhere it changes nothing
    (callbacks still read the flag, which `request()` can set)."""
    global _depth, _previous
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth == 0:
        _previous = signal.signal(signal.SIGINT, _on_sigint)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            signal.signal(signal.SIGINT, _previous)
            _previous = None


@contextlib.contextmanager
def raising() -> Iterator[None]:
    """Inside `interrupting()`, give the block SIGINT's usual behaviour back (Python's
    KeyboardInterrupt): for code that expects it, such as an input prompt, which turns it
    into a key. A request still pending is raised at once, so none falls between."""
    if threading.current_thread() is not threading.main_thread() or _depth == 0:
        yield
        return
    signal.signal(signal.SIGINT, _previous)
    try:
        raise_if_requested()
        yield
    finally:
        signal.signal(signal.SIGINT, _on_sigint)
