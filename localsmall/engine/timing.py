"""Timed decode loops for `localsmall bench`, measured the way llama.cpp's llama-bench
measures them, so the two tools give the same numbers for the same file and settings.

- Prompt processing: `n` random token ids (the first one BOS when the vocabulary adds
  one) decoded in chunks of `n_batch`, only each chunk's last token asking for logits,
  the clock stopped after `llama_synchronize`.
- Token generation: `n` single-token decodes, each with logits and a synchronize,
  random ids instead of sampled ones (sampling is not part of the measurement).
- Context depth: `depth` tokens decoded first, untimed; the KV state after the first
  prefill is saved and restored for later repetitions instead of recomputed.

Token ids are drawn before the clock starts and batches are filled with bulk copies,
so the Python around the decode calls costs microseconds per chunk.
"""

from __future__ import annotations

import ctypes
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from localsmall.engine import native
from localsmall.errors import EngineError

if TYPE_CHECKING:
    from localsmall.engine.model import Engine


class DecodeTimer:
    """Runs timed prompt/generation passes on a loaded engine's context.

    The passes bypass the engine's prompt cache, so the engine is reset on `close()`
    (and must be reset before the engine is used for chat again)."""

    def __init__(self, engine: Engine, *, seed: int = 42, all_logits: bool = False) -> None:
        self._engine = engine
        self._llama = llama = native.llama()
        self._ctx = engine.ctx
        vocab = engine.vocab
        self.n_vocab = int(llama.llama_vocab_n_tokens(vocab))
        self.bos = int(llama.llama_vocab_bos(vocab))
        self.add_bos = bool(llama.llama_vocab_get_add_bos(vocab))
        self.n_batch = max(engine.settings.n_batch, 1)
        self._rng = np.random.default_rng(seed)
        self._batch = llama.llama_batch_init(self.n_batch, 0, 1)
        for i in range(self.n_batch):  # every token in sequence 0, set once
            self._batch.n_seq_id[i] = 1
            self._batch.seq_id[i][0] = 0
        self._depth = 0
        self._depth_state: Any = None
        # Logits for every token: llama.cpp then runs the last layer's FFN for the whole
        # batch instead of the one token that needs logits (the kernel calibration's
        # one-layer models time a full layer this way).
        self._all_logits = all_logits

    # --- building blocks -----------------------------------------------------------------

    def _next_pos(self) -> int:
        mem = self._llama.llama_get_memory(self._ctx)
        return int(self._llama.llama_memory_seq_pos_max(mem, 0)) + 1

    def _random_tokens(self, n: int, *, bos_first: bool) -> np.ndarray:
        tokens = self._rng.integers(0, self.n_vocab, size=n, dtype=np.int32)
        if bos_first and n and self.add_bos:
            tokens[0] = self.bos
        return tokens

    def _decode(self, tokens: np.ndarray, pos: int) -> None:
        """One llama_decode of `tokens` at positions pos.., logits for the last one."""
        n = len(tokens)
        batch = self._batch
        batch.n_tokens = n
        ctypes.memmove(batch.token, tokens.ctypes.data, n * 4)
        positions = np.arange(pos, pos + n, dtype=np.int32)
        ctypes.memmove(batch.pos, positions.ctypes.data, n * 4)
        ctypes.memset(batch.logits, 1 if self._all_logits else 0, n)
        batch.logits[n - 1] = 1
        status = self._llama.llama_decode(self._ctx, batch)
        if status != 0:
            raise EngineError(f"llama.cpp failed to decode a benchmark batch (status {status})"
                              f"{native.last_error_suffix()}; use a larger --ctx, or a smaller "
                              "-p/-n/--depth")

    # --- the measured passes ---------------------------------------------------------------

    def clear(self) -> None:
        """Empty the KV cache (as llama-bench does before each repetition)."""
        self._llama.llama_memory_clear(self._llama.llama_get_memory(self._ctx), False)

    def prompt(self, n_tokens: int) -> float:
        """Seconds to process `n_tokens` random prompt tokens after what is cached."""
        tokens = self._random_tokens(n_tokens, bos_first=True)
        pos = self._next_pos()
        start = time.perf_counter_ns()
        for offset in range(0, n_tokens, self.n_batch):
            chunk = tokens[offset:offset + self.n_batch]
            self._decode(chunk, pos + offset)
        self._llama.llama_synchronize(self._ctx)
        return (time.perf_counter_ns() - start) / 1e9

    def generate(self, n_tokens: int) -> float:
        """Seconds for `n_tokens` single-token decodes after what is cached."""
        tokens = self._random_tokens(n_tokens, bos_first=True)
        pos = self._next_pos()
        llama, ctx = self._llama, self._ctx
        start = time.perf_counter_ns()
        for i in range(n_tokens):
            self._decode(tokens[i:i + 1], pos + i)
            llama.llama_synchronize(ctx)
        return (time.perf_counter_ns() - start) / 1e9

    def prefill(self, depth: int) -> None:
        """Fill the cleared cache with `depth` tokens (untimed). The state after the
        first prefill is kept and restored on later calls with the same depth."""
        if depth <= 0:
            return
        llama, ctx = self._llama, self._ctx
        if self._depth == depth and self._depth_state is not None:
            state = self._depth_state
            if llama.llama_state_seq_set_data(ctx, state, len(state), 0):
                return
        self.prompt(depth)
        size = int(llama.llama_state_seq_get_size(ctx, 0))
        state = (ctypes.c_uint8 * size)()
        llama.llama_state_seq_get_data(ctx, state, size, 0)
        self._depth, self._depth_state = depth, state

    def close(self) -> None:
        """Free the batch and saved state; leave the engine with an empty cache."""
        if self._batch is not None:
            self._llama.llama_batch_free(self._batch)
            self._batch = None
        self._depth_state = None
        self.clear()
        self._engine.reset()

    def __enter__(self) -> DecodeTimer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
