"""The default system prompt, warmed into a slot as the server starts.

Requests without a system message get the default one (PromptBuilder), so every new
conversation starts with the same few hundred positions: with the 24B model on a CPU,
reading them made the first request wait 35-40 s. As `chat` does (chat.system_state),
the server loads the KV state saved for them by an earlier start (a fraction of a
second), or reads them in the background and saves them for the next start. A request
that starts with the default prompt waits for that read and then borrows the prompt from
its slot; one with a system prompt of its own cancels the read rather than wait for it
(SlotPool.settle_warmup, on the scheduler's worker: one llama_decode at a time).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from localsmall.chat import system_state
from localsmall.server.requests import ApiMessage, ChatRequest

if TYPE_CHECKING:
    from localsmall.engine.model import Engine
    from localsmall.engine.types import TurnStats
    from localsmall.server.prompting import PromptBuilder
    from localsmall.server.slots import SlotPool

State = Literal["restored", "reading", "read", "cancelled", "failed"]


@dataclass(frozen=True)
class SystemPrompt:
    """What became of the default system prompt: `restored` from a saved state,
    `reading` in the background, `read` (and saved), `cancelled` (a request with
    another system prompt came first) or `failed` (requests read it themselves).
    `seconds`: restoring or reading it; `notice`: why a saved state could not be used,
    or why the read failed ("" otherwise)."""

    state: State
    tokens: int
    seconds: float = 0.0
    notice: str = ""


def system_tokens(engine: Engine, builder: PromptBuilder) -> list[int]:
    """The tokens every request without a system message starts with."""
    def prompt_for(text: str) -> Any:
        request = ChatRequest(model="", messages=(ApiMessage("user", (text,)),))
        return builder.build(request, {})
    return system_state.shared_start(engine, prompt_for)


def begin(engine: Engine, pool: SlotPool, builder: PromptBuilder,
          log: Callable[[str], None] | None = None) -> SystemPrompt | None:
    """Restore the default system prompt into a slot, or start reading it in the
    background (`log` gets a line when that read ends); None when there is none worth
    keeping (`--no-system`, a short one)."""
    if not builder.system_prompt:
        return None
    tokens = system_tokens(engine, builder)
    if len(tokens) < system_state.MIN_POSITIONS:
        return None
    try:
        files: system_state.StateFiles | None = system_state.state_files(engine)
    except OSError:  # a model file that cannot be fingerprinted: read, keep nothing
        files = None
    start = time.perf_counter()

    def read(stats: TurnStats) -> None:  # in the read's thread, when it was not cancelled
        reading = pool.system_prompt
        if reading is not None and reading.state == "reading":
            pool.system_prompt = dataclasses.replace(reading, state="read",
                                                     seconds=stats.prompt_eval_s)
            if log is not None:
                log(f"system prompt read in {stats.prompt_eval_s:.1f} s ({reading.tokens} "
                    "tokens), kept for the next start")

    try:
        restored = pool.warm(tokens, files, on_done=read)
    except Exception as exc:  # a lost RPC worker, say: serving goes on without it
        warm = SystemPrompt("failed", len(tokens), notice=str(exc) or repr(exc))
        pool.system_prompt = warm
        return warm
    if restored.n_pos:
        warm = SystemPrompt("restored", restored.n_pos, time.perf_counter() - start)
    else:
        warm = SystemPrompt("reading", len(tokens), notice=system_state.notice(restored))
    pool.system_prompt = warm
    return warm


def health(warm: SystemPrompt | None) -> dict[str, Any]:
    """The /health fields: what happened to the default system prompt (none without)."""
    if warm is None:
        return {}
    return {"system_prompt": warm.state, "system_prompt_tokens": warm.tokens}
