"""Warm conversations across requests: the prefix cache of the server.

Clients resend the whole conversation with every request. Each warm conversation lives
in its own sequence of one llama.cpp context whose KV cells are shared by all
sequences (a unified cache), so switching conversations costs nothing: no state is
copied in or out. A request goes to the sequence whose cache it extends (or nearly: one
that differs only in its last few tokens, as when a reply is regenerated); a new or
branched conversation takes a free (or the least recently used) sequence and first
borrows the longest matching prefix of any other one (llama.cpp shares those cells
rather than copying them). When the context runs out of cells, the least recently used
other conversations are dropped. As the server starts, the default system prompt is
warmed into one slot (`warm`, server.warmup), so the first conversation of every client
borrows it rather than reading it.

Everything here runs on one thread at a time: the loader's (`warm`, before the
scheduler's worker starts), then the scheduler's single worker thread.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from localsmall.chat import system_state
from localsmall.engine.kvcache import CacheItem, KvCache, common_prefix, positions
from localsmall.engine.types import ProgressCallback, TurnStats

if TYPE_CHECKING:
    from localsmall.engine.model import Engine
    from localsmall.server.warmup import SystemPrompt

TOKENS_PER_SLOT = 4096  # default: one warm conversation per this much planned context
MAX_DEFAULT_SLOTS = 8
# A slot whose cache differs from a request only in its last few items (a regenerated
# reply, a stop string cut) is reused in place rather than copied into another slot.
SMALL_TAIL = 32


def default_slots(n_ctx: int) -> int:
    """Slots for a context of `n_ctx` tokens: the plan sized the context to the machine's
    memory, and the slots share it, so a bigger plan keeps more conversations warm."""
    return max(1, min(MAX_DEFAULT_SLOTS, n_ctx // TOKENS_PER_SLOT))


@dataclass(frozen=True)
class SlotChoice:
    """Where a request runs and what it found there."""

    seq_id: int
    reused_positions: int     # positions of the prompt already in the cache
    borrowed_from: int | None  # another slot whose prefix was shared into this one
    evicted: int               # slots emptied to make room


class SlotPool:
    """The engine's sequences as warm conversations, least recently used evicted first."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.slots: tuple[KvCache, ...] = engine.sequences
        self._clock = itertools.count(1)
        self._last_used = [0] * len(self.slots)
        self.evictions = 0
        self.system_prompt: SystemPrompt | None = None  # what warming it did (/health)
        self._warm_tokens: list[int] = []
        engine.on_cache_full = self._evict_for_current

    def __len__(self) -> int:
        return len(self.slots)

    def select(self, items: Sequence[CacheItem], *, reserve: int = 0) -> SlotChoice:
        """Pick the slot for a prompt laid out as `items`, prepare its cache and make it
        the engine's current sequence. `reserve`: positions wanted beyond the prompt."""
        common = [common_prefix(s.items, items) for s in self.slots]
        extending = [i for i, s in enumerate(self.slots)
                     if s.items and common[i] > 0 and len(s.items) - common[i] <= SMALL_TAIL]
        borrowed = None
        if extending:
            target = max(extending, key=lambda i: common[i])
        else:
            target = self._free_or_oldest()
            source = max(range(len(self.slots)), key=lambda i: common[i])
            if source != target and common[source] > common[target]:
                self.slots[target].copy_from(self.slots[source], common[source])
                borrowed = source
        evicted = self._make_room(target, positions(items) + reserve)
        self._touch(target)
        self.engine.use_sequence(target)
        reused = positions(items[:self.slots[target].reusable(items)])
        return SlotChoice(target, reused, borrowed, evicted)

    def warm(self, tokens: list[int], files: system_state.StateFiles | None, *,
             on_done: Callable[[TurnStats], None] | None = None) -> system_state.Restored:
        """Start a free slot with `tokens` (the default system prompt): the state saved
        for them in `files`, else a read in the background that saves it there
        (chat.system_state.warm; `on_done` gets its stats, in its thread, unless it was
        cancelled). Until that read ends, requests go through `settle_warmup` first:
        `select` would cancel it."""
        target = self._free_or_oldest()
        self._touch(target)
        self.engine.use_sequence(target)
        self._warm_tokens = list(tokens)
        return system_state.warm(self.engine, tokens, files, on_done=on_done)

    def settle_warmup(self, items: Sequence[CacheItem],
                      on_progress: ProgressCallback | None = None) -> None:
        """Before a request while the default system prompt is still read in the
        background: a prompt that starts with it waits for the read (and borrows it);
        any other cancels the read at once (what was read stays in its slot) rather than
        wait, on a laptop CPU, half a minute for a prompt it does not use."""
        if not self.engine.ahead_running:
            return
        warm = self._warm_tokens
        if list(items[:len(warm)]) != warm:
            self.engine.settle()
            if self.system_prompt is not None and self.system_prompt.state == "reading":
                self.system_prompt = replace(self.system_prompt, state="cancelled")
            return
        try:
            self.engine.wait_ahead(on_progress)
        except (Exception, KeyboardInterrupt) as exc:
            # The read failed, or was stopped (the server stopping: Engine.stop_ahead):
            # this request reads the prompt itself, or is ended by the scheduler.
            if self.system_prompt is not None:
                self.system_prompt = replace(self.system_prompt, state="failed",
                                             notice=str(exc) or repr(exc))

    def _free_or_oldest(self) -> int:
        empty = [i for i, s in enumerate(self.slots) if not s.items]
        if empty:
            return empty[0]
        return min(range(len(self.slots)), key=lambda i: self._last_used[i])

    def _touch(self, seq_id: int) -> None:
        self._last_used[seq_id] = next(self._clock)

    def _make_room(self, target: int, needed: int) -> int:
        """Empty the least recently used other slots until the target's prompt fits.
        Cells shared between slots are counted once per slot, so this errs on the side
        of evicting."""
        n_ctx = self.engine.n_ctx
        evicted = 0
        while sum(positions(s.items) for i, s in enumerate(self.slots) if i != target) \
                + needed > n_ctx:
            if not self._evict_oldest(other_than=target):
                break
            evicted += 1
        return evicted

    def _evict_oldest(self, *, other_than: int) -> bool:
        busy = [i for i, s in enumerate(self.slots) if s.items and i != other_than]
        if not busy:
            return False
        oldest = min(busy, key=lambda i: self._last_used[i])
        self.slots[oldest].truncate(0)
        self.evictions += 1
        return True

    def _evict_for_current(self) -> bool:
        """llama.cpp found no free cell while decoding: drop another conversation."""
        return self._evict_oldest(other_than=self.engine.kv.seq_id)

    def used_positions(self) -> list[int]:
        return [s.n_past for s in self.slots]
