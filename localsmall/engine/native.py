"""The one place llama.cpp (llama-cpp-python) is imported, lazily.

Importing llama_cpp loads several shared libraries; doing it on first use keeps
`localsmall --help` and the pure-Python modules instant. This module also owns the
process-wide llama.cpp settings: backend initialisation and where its logs go.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import sys
from collections import deque
from collections.abc import Iterator
from functools import cache
from types import ModuleType
from typing import Any

from localsmall import interrupt

log = logging.getLogger("localsmall.llama")

_verbose = False
_log_callback: Any = None  # kept alive: llama.cpp holds a pointer to it
_recent_errors: deque[str] = deque(maxlen=4)
_graph_nodes = 0
_captures: list[list[str]] = []  # open capture_log() blocks, innermost last
_pending = ""                    # a log line llama.cpp has not finished yet
GGML_LOG_LEVEL_ERROR = 4


@cache
def llama() -> ModuleType:
    """The llama_cpp low-level module, with the backend initialised and logs routed."""
    from localsmall.engine.threads import apply_wait_policy

    apply_wait_policy()  # read by OpenMP when llama.cpp's libraries load, just below
    import llama_cpp

    _install_log_callback(llama_cpp)
    llama_cpp.llama_backend_init()
    return llama_cpp


@cache
def mtmd() -> ModuleType:
    """llama_cpp.mtmd_cpp (libmtmd bindings), with its logs routed like llama's."""
    llama()
    import llama_cpp.mtmd_cpp as mtmd_cpp

    mtmd_cpp.mtmd_log_set(_log_callback, None)
    mtmd_cpp.mtmd_helper_log_set(_log_callback, None)
    return mtmd_cpp


def set_verbose(verbose: bool) -> None:
    """Show llama.cpp and mtmd logs on stderr (`--verbose`), or drop them."""
    global _verbose
    _verbose = verbose


def _install_log_callback(llama_cpp: ModuleType) -> None:
    global _log_callback

    @llama_cpp.llama_log_callback
    def forward(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        # A callback must never raise: ctypes would print and swallow the exception
        # (a Ctrl-C landing here is kept as the interrupt flag instead).
        try:
            _forward(level, text)
        except KeyboardInterrupt:
            interrupt.request()
        except BaseException:  # logging is best effort
            pass

    _log_callback = forward
    llama_cpp.llama_log_set(forward, None)


def _forward(level: int, text: bytes) -> None:
    """Where llama.cpp's log lines go: error memory, graph sizes, captures, stderr."""
    if not text:
        return
    if level == GGML_LOG_LEVEL_ERROR:
        _recent_errors.append(text.decode(errors="replace").strip())
    elif b"graph: nodes = " in text:
        _note_graph_size(text)
    if _captures:
        _collect(text.decode(errors="replace"))
    if _verbose:
        os.write(2, text)


def _note_graph_size(text: bytes) -> None:
    global _graph_nodes
    match = re.search(rb"graph: nodes = (\d+)", text)
    if match:
        _graph_nodes = max(_graph_nodes, int(match.group(1)))


def take_graph_nodes() -> int:
    """Nodes in the largest compute graph llama.cpp reserved since the last call (it logs
    this when a context is created); 0 when unknown. Used for progress inside a batch."""
    global _graph_nodes
    nodes, _graph_nodes = _graph_nodes, 0
    return nodes


def _collect(text: str) -> None:
    """Split llama.cpp's log text into whole lines: it may send a line in pieces."""
    global _pending
    *lines, _pending = (_pending + text).split("\n")
    for capture in _captures:
        capture.extend(lines)


@contextlib.contextmanager
def capture_log() -> Iterator[list[str]]:
    """Collect every log line llama.cpp and mtmd write while the block runs (all levels,
    whether or not --verbose shows them). The list fills as the block runs."""
    global _pending
    llama()  # the log callback must be installed before anything is captured
    lines: list[str] = []
    _captures.append(lines)
    try:
        yield lines
    finally:
        if _pending:
            lines.append(_pending)
            _pending = ""
        # By identity: nested captures hold equal lists.
        _captures[:] = [c for c in _captures if c is not lines]


def last_error_suffix() -> str:
    """llama.cpp's most recent error log line, as ' (reason)', or ''; cleared on read."""
    if not _recent_errors:
        return ""
    reason = _recent_errors[-1]
    _recent_errors.clear()
    return f" (llama.cpp: {reason})"


@cache
def lib_dir() -> str:
    """The folder holding libllama, libggml and friends."""
    spec_origin = llama().__file__
    assert spec_origin is not None
    return os.path.join(os.path.dirname(spec_origin), "lib")


def load_ggml(name: str) -> ctypes.CDLL:
    """One of llama.cpp's libraries (`ggml`, `ggml-base`, `ggml-rpc`), the very copy
    libllama uses: pip installs each Linux library twice (libX.so and libX.so.0, copies,
    not links) and libllama loads the .so.0 ones, so loading libX.so would give a second
    instance with its own state (registries, callbacks)."""
    folder = lib_dir()
    if os.name == "nt":
        candidates = [f"{name}.dll"]
    elif sys.platform == "darwin":
        candidates = [f"lib{name}.0.dylib", f"lib{name}.dylib"]
    else:
        candidates = [f"lib{name}.so.0", f"lib{name}.so"]
    for candidate in candidates:
        path = os.path.join(folder, candidate)
        if os.path.exists(path):
            return ctypes.CDLL(path)
    raise OSError(f"{candidates[-1]} is missing from {folder}")
