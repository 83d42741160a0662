"""What the parts of `Engine` share, declared for the type checker.

`Engine` (engine.model) is built from parts with one job each: prompt evaluation
(engine.evaluation), the token loop (engine.generation) and reading ahead
(engine.read_ahead). Each part is a class `Engine` inherits from and derives from
`EngineParts`, which names the state `Engine.__init__` sets and the methods one part
calls on another. It holds no code and no values: at run time every name resolves on
`Engine` itself.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from localsmall.engine.embed_read import TokenEmbeddings
    from localsmall.engine.generation import Generation
    from localsmall.engine.kvcache import CacheItem, KvCache
    from localsmall.engine.read_ahead import ReadAhead
    from localsmall.engine.read_progress import ReadProgress
    from localsmall.engine.tokenizer import Tokenizer
    from localsmall.engine.types import (
        EngineSettings,
        ProgressCallback,
        PromptPiece,
        TurnStats,
    )
    from localsmall.engine.vision import Projector


class EngineParts:
    """The attributes and cross-part methods of `Engine` (see the module docstring)."""

    settings: EngineSettings
    _llama: Any
    model: Any
    ctx: Any
    vocab: Any
    tokenizer: Tokenizer
    projector: Projector | None
    sequences: tuple[KvCache, ...]
    kv: KvCache
    on_cache_full: Callable[[], bool] | None
    decode_calls: int
    _batch: Any
    _embd_batch: Any
    _batch_nodes: int
    _token_rows: TokenEmbeddings | None
    _abort_cb: Any
    _interrupted: bool
    _reading: ReadProgress | None
    _ahead: ReadAhead | None
    _stop: threading.Event | None
    _live: weakref.ref[Generation] | None

    if TYPE_CHECKING:
        # engine.model
        def layout(self, prompt: Sequence[PromptPiece]) -> list[CacheItem]: ...

        @property
        def n_ctx(self) -> int: ...

        @property
        def control_tokens(self) -> dict[str, int]: ...

        @property
        def fingerprint(self) -> str: ...

        def _check_workers(self) -> None: ...

        # engine.evaluation
        def _decode_tokens(self, tokens: Sequence[int], logits_last: bool,
                           reading: ReadProgress | None = None) -> None: ...

        def _evaluate(self, items: Sequence[CacheItem], prompt: Sequence[PromptPiece],
                      on_progress: ProgressCallback | None) -> TurnStats: ...

        # engine.read_ahead
        def settle(self) -> None: ...

        def _await_ahead(self, on_progress: ProgressCallback | None) -> float: ...
