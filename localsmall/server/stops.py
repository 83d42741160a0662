"""Stop sequences over streamed text: text is released only once it cannot be the start
of a stop string, and generation ends at the first stop string (which is not sent)."""

from __future__ import annotations


class StopMatcher:
    """Feed generated text piece by piece; get back what is safe to send."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text that can be sent now. Sets `stopped` when a stop string appeared."""
        if not self.stops:
            return text
        if self.stopped:
            return ""
        buffer = self._held + text
        cut = min((i for s in self.stops if (i := buffer.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buffer[:cut]
        keep = self._partial_tail(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep]

    def flush(self) -> str:
        """What was held back, once generation ended without a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_tail(self, buffer: str) -> int:
        """Length of the longest end of `buffer` that begins some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), best, -1):
                if stop.startswith(buffer[-n:]):
                    best = n
                    break
        return best
