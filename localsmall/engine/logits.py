"""Full next-token logits over a chunk of text, for perplexity and KL divergence.

This is llama-perplexity's evaluation pass: the KV cache is emptied, the chunk is
decoded from position 0 (its first token replaced by BOS when the vocabulary adds
one), and logits are kept only for positions from `first` on, so every scored token
has at least `first` tokens of context.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from localsmall.engine import native
from localsmall.errors import EngineError

if TYPE_CHECKING:
    from localsmall.engine.model import Engine


def text_tokens(engine: Engine, text: str) -> list[int]:
    """The text as llama-perplexity tokenizes it: plain text (no control tokens parsed),
    with the BOS token in front when the vocabulary adds one."""
    llama = native.llama()
    data = text.encode("utf-8")
    capacity = len(data) + 8
    buf = (llama.llama_token * capacity)()
    n = llama.llama_tokenize(engine.vocab, data, len(data), buf, capacity, True, False)
    if n < 0:
        raise EngineError("could not tokenize the evaluation text")
    return list(buf[:n])


def chunk_logits(engine: Engine, tokens: Sequence[int], first: int) -> np.ndarray:
    """float32 logits [len(tokens) - first, n_vocab] for positions first.. of `tokens`
    decoded from an empty cache. Leaves the engine with an empty cache."""
    llama, ctx = native.llama(), engine.ctx
    n_ctx = len(tokens)
    if not 0 <= first < n_ctx or n_ctx > engine.n_ctx:
        raise EngineError(f"cannot score {n_ctx} tokens from position {first} in a context "
                          f"of {engine.n_ctx}")
    n_vocab = int(llama.llama_vocab_n_tokens(engine.vocab))
    ids = np.asarray(tokens, dtype=np.int32).copy()
    if llama.llama_vocab_get_add_bos(engine.vocab):
        ids[0] = llama.llama_vocab_bos(engine.vocab)
    out = np.empty((n_ctx - first, n_vocab), dtype=np.float32)
    n_batch = max(engine.settings.n_batch, 1)
    batch = llama.llama_batch_init(n_batch, 0, 1)
    engine.reset()
    llama.llama_memory_clear(llama.llama_get_memory(ctx), True)
    try:
        done = 0
        for start in range(0, n_ctx, n_batch):
            n = min(n_batch, n_ctx - start)
            batch.n_tokens = n
            n_out = 0
            for k in range(n):
                pos = start + k
                batch.token[k] = int(ids[pos])
                batch.pos[k] = pos
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = 0
                batch.logits[k] = pos >= first
                n_out += pos >= first
            status = llama.llama_decode(ctx, batch)
            if status != 0:
                raise EngineError(f"llama.cpp failed to evaluate the text (status {status})"
                                  f"{native.last_error_suffix()}")
            if n_out:
                out[done:done + n_out] = output_rows(llama, ctx, n_out, n_vocab)
                done += n_out
    finally:
        llama.llama_batch_free(batch)
        llama.llama_memory_clear(llama.llama_get_memory(ctx), True)
        engine.reset()
    return out


def output_rows(llama: Any, ctx: Any, n_out: int, n_vocab: int) -> np.ndarray:
    """A view of the logits of the last llama_decode call's `n_out` output positions
    (valid until the next call: copy what must outlive it)."""
    logits = ctypes.cast(llama.llama_get_logits(ctx), ctypes.POINTER(ctypes.c_float))
    return np.ctypeslib.as_array(logits, shape=(n_out, n_vocab))
