"""What a chat session hands back: a reply being streamed, and the results of saving,
loading and counting. Nothing here prints."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from localsmall.chat.conversation import Conversation
from localsmall.engine.model import Generation
from localsmall.engine.types import TurnStats


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
    """A reply being streamed. Iterate for text pieces; when iteration ends (or the
    reply is interrupted and closed) the reply joins the conversation."""

    def __init__(self, generation: Generation, notices: list[str], *,
                 abandon: Callable[[], None], commit: Callable[[Reply], None]) -> None:
        self.generation = generation
        self.notices = notices
        self._abandon = abandon  # undoes what started the reply if it produced nothing
        self._commit = commit    # adds the reply to the conversation
        self._done = False

    def __iter__(self) -> Iterator[str]:
        return self._stream(spelled=False)

    def pieces(self) -> Iterator[str]:
        """Like iterating, with control tokens spelled out ("[TOOL_CALLS]"): what the
        tool-call parser reads."""
        return self._stream(spelled=True)

    def _stream(self, *, spelled: bool) -> Iterator[str]:
        try:
            for event in self.generation:
                yield event.piece if spelled else event.text
        finally:
            self._finish()

    @property
    def text(self) -> str:
        return self.generation.result.text

    @property
    def stats(self) -> TurnStats:
        return self.generation.result.stats

    def close(self) -> None:
        """Stop the reply early (Ctrl-C). What was generated so far is kept."""
        self.generation.close()
        self._finish()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        if not self.generation.result.token_ids and self.stats.stop_reason in ("", "interrupted"):
            self._abandon()  # stopped (or failed) before a single token: as if never sent
        else:
            self._commit(self)
