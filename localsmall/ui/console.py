"""The two consoles (results on stdout; progress, notices and errors on stderr) and the
one-line message styles every command uses."""

from __future__ import annotations

import sys
from functools import cache
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.theme import Theme

THEME = Theme({
    "error": "bold red",
    "warn": "yellow",
    "notice": "cyan",
    "muted": "grey50",
    "user": "bold green",
    "ok": "green",
})


# C0 controls but tab and newline, DEL, and C1 controls: shown as visible stand-ins
# (U+2400 "control pictures" for C0, U+FFFD otherwise) so that text from a file (a
# loaded chat, a file name) can never move the cursor, retitle the terminal or hide
# what it prints.
_CONTROLS = {c: 0x2400 + c for c in range(0x20) if c not in (0x09, 0x0A)}
_CONTROLS |= {0x7F: 0x2421} | {c: 0xFFFD for c in range(0x80, 0xA0)}


def terminal_safe(text: str) -> str:
    """`text` with every control character except tab and newline made harmless."""
    return text.translate(_CONTROLS)


@cache
def out() -> Console:
    """Results: replies, tables, JSON."""
    return Console(theme=THEME, highlight=False, soft_wrap=False)


@cache
def err() -> Console:
    """Progress bars, notices and errors."""
    return Console(theme=THEME, stderr=True, highlight=False)


def error(message: str) -> None:
    """A clean one-line error on stderr."""
    err().print(f"[error]error:[/] {escape(terminal_safe(message))}")


def warn(message: str) -> None:
    err().print(f"[warn]{escape(terminal_safe(message))}[/]")


def notice(message: str) -> None:
    err().print(f"[notice]{escape(terminal_safe(message))}[/]")


def muted(message: str) -> None:
    err().print(f"[muted]{escape(terminal_safe(message))}[/]")


def stdout_write(text: str) -> None:
    """Raw text to stdout (streamed replies of `localsmall run`), flushed at once."""
    sys.stdout.write(text)
    sys.stdout.flush()


def print_json(data: Any, *, one_line: bool = False) -> None:
    """A result as JSON on stdout (`--json`): indented, or on one line as it is (for
    streamed text, non-ASCII kept)."""
    import json

    text = json.dumps(data, ensure_ascii=False) if one_line else json.dumps(data, indent=2)
    stdout_write(text + "\n")


def stderr_is_terminal() -> bool:
    return err().is_terminal
