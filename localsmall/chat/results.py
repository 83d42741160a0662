"""What a chat session hands back: a reply being streamed, and the results of saving,
loading and counting. Nothing here prints."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from localsmall.chat.conversation import Conversation
from localsmall.engine.model import Generation
from localsmall.engine.types import ProgressCallback, TurnStats
from localsmall.images import PreparedImage


@dataclass(frozen=True)
class SessionStats:
    """Counters for /stats."""

    turns: int
    messages: int
    images: int
    context_used: int
    context_size: int
    last: TurnStats | None
    total_prompt_evaluated: int
    total_prompt_reused: int
    total_generated: int
    dropped_turns: int
    model: str


@dataclass(frozen=True)
class SavedChat:
    path: Path
    messages: int
    state_tokens: int          # positions of KV cache saved beside the chat (0: none)


@dataclass(frozen=True)
class LoadedChat:
    conversation: Conversation
    state_tokens: int          # positions restored into the KV cache (0: none)
    state_ignored: str         # why a saved KV cache was not used ("" when it was)


class Reply:
    """A reply ready to stream. `stream(on_progress)` starts it: the engine reads the
    prompt (its progress goes to `on_progress`, given by whoever shows it), then text
    pieces follow. When the stream ends (or the reply is closed) it joins the
    conversation. The progress callback is an argument of the call that starts the
    work, never state set beforehand, so the engine always reports to the caller."""

    def __init__(self, start: Callable[[ProgressCallback | None], Generation],
                 notices: list[str], *, abandon: Callable[[], None],
                 commit: Callable[[Reply], None], images: tuple[PreparedImage, ...] = ()
                 ) -> None:
        self._start = start      # starts the engine's generation, with a progress callback
        self.notices = notices
        self.images = images     # the images of the message being answered
        self.generation: Generation | None = None
        self._abandon = abandon  # undoes what started the reply if it produced nothing
        self._commit = commit    # adds the reply to the conversation
        self._done = False

    def stream(self, on_progress: ProgressCallback | None = None, *,
               spelled: bool = False) -> Iterator[str]:
        """Start the reply: image encoding and prompt reading report to `on_progress`,
        then the text comes piece by piece (`spelled`: control tokens spelled out)."""
        if self.generation is not None or self._done:
            raise RuntimeError("a reply streams only once")
        self.generation = self._start(on_progress)
        return self._pieces(self.generation, spelled)

    def __iter__(self) -> Iterator[str]:
        return self.stream()

    def pieces(self, on_progress: ProgressCallback | None = None) -> Iterator[str]:
        """Like `stream`, with control tokens spelled out ("[TOOL_CALLS]"): what the
        tool-call parser reads."""
        return self.stream(on_progress, spelled=True)

    def _pieces(self, generation: Generation, spelled: bool) -> Iterator[str]:
        try:
            for event in generation:
                yield event.piece if spelled else event.text
        finally:
            self._finish()

    @property
    def text(self) -> str:
        return self.generation.result.text if self.generation is not None else ""

    @property
    def stats(self) -> TurnStats:
        return self.generation.result.stats if self.generation is not None else TurnStats()

    @property
    def token_ids(self) -> list[int]:
        return self.generation.result.token_ids if self.generation is not None else []

    @property
    def downscaled(self) -> tuple[PreparedImage, ...]:
        """The turn's images that a token budget made smaller than full size."""
        return tuple(i for i in self.images if i.downscaled)

    def close(self) -> None:
        """Stop the reply early (Ctrl-C). What was generated so far is kept."""
        if self.generation is not None:
            self.generation.close()
        self._finish()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        if not self.token_ids and self.stats.stop_reason in ("", "interrupted"):
            self._abandon()  # stopped (or failed) before a single token: as if never sent
        else:
            self._commit(self)
