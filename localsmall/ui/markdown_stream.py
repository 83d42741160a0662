"""Markdown rendered as a reply streams in.

Re-rendering the whole reply on each token would push long replies off the screen and
redraw them over and over. Instead the rendered lines above a small moving window are
printed once, for good, and only the window (the last lines, which may still change as
Markdown blocks close) is redrawn live.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

from localsmall.ui.console import terminal_safe

LIVE_LINES = 8          # lines at the bottom that stay editable
MIN_INTERVAL_S = 0.08   # redraw at most ~12 times a second


class MarkdownStream:
    """Feed it the reply text so far; call `finish()` at the end. Redraws happen at most
    once per `min_interval_s` of `clock` (tests pass their own clock)."""

    def __init__(self, console: Console, *, min_interval_s: float = MIN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._printed = 0
        self._live: Live | None = None
        self._last_draw: float | None = None
        self._text = ""

    def _render_lines(self, text: str) -> list[str]:
        buffer = io.StringIO()
        scratch = Console(file=buffer, width=self.console.width, force_terminal=True,
                          color_system="truecolor" if self.console.color_system else None,
                          highlight=False)
        scratch.print(Markdown(terminal_safe(text), code_theme="monokai"))
        return buffer.getvalue().splitlines()

    def update(self, text: str) -> None:
        self._text = text
        now = self._clock()
        if self._last_draw is not None and now - self._last_draw < self.min_interval_s:
            return
        self._last_draw = now
        self._draw(final=False)

    def _draw(self, final: bool) -> None:
        lines = self._render_lines(self._text) if self._text else []
        stable = len(lines) if final else max(len(lines) - LIVE_LINES, 0)
        if self._live is None and not final:
            self._live = Live(Text(""), console=self.console, auto_refresh=False,
                              transient=True)
            self._live.start()
        if stable > self._printed:
            chunk = Text.from_ansi("\n".join(lines[self._printed:stable]))
            if self._live is not None:
                self._live.console.print(chunk)
            else:
                self.console.print(chunk)
            self._printed = stable
        if self._live is not None:
            self._live.update(Text.from_ansi("\n".join(lines[stable:])), refresh=True)

    def finish(self) -> None:
        """Print whatever is still live, for good."""
        if self._live is not None:
            self._live.update(Text(""), refresh=True)
            self._live.stop()
            self._live = None
        self._draw(final=True)
