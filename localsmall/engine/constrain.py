"""Sampling under a constraint: control tokens forbidden, and a llama.cpp grammar (lazy
when it waits for a trigger token).

Checking every one of the 131072 vocabulary entries against a grammar costs about half a
second per token on a laptop CPU, so this samples the way llama.cpp's own tools do: draw
a token as if there were no grammar and keep it when the grammar accepts it (the usual
case once a model follows the format). Only when it is refused is the grammar applied,
first to the 512 likeliest tokens, then the 8192 likeliest, and to the whole vocabulary
when none of those fits. That is exact for greedy decoding (the likeliest token that fits
is always in the first list that holds one that fits); when sampling, tokens outside that
list are left out, which for a trained model carry next to no probability.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from localsmall.engine.types import Constraint
from localsmall.errors import EngineError

_TOKEN = re.compile(r"<(\[[A-Za-z_/]+\])>")
SHORTLISTS = (512, 8192)
_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


def resolve_tokens(grammar: str, control: Mapping[str, int]) -> str:
    """The grammar with each `<[NAME]>` replaced by llama.cpp's `<[id]>`."""
    def token_id(match: re.Match[str]) -> str:
        piece = match.group(1)
        if piece not in control:
            raise EngineError(f"this model has no {piece} token, which the reply's grammar "
                              "needs (is it a Mistral Small 3.2 model?)")
        return f"<[{control[piece]}]>"
    return _TOKEN.sub(token_id, grammar)


def grammar_sampler(llama: Any, vocab: Any, constraint: Constraint,
                    control: Mapping[str, int]) -> Any:
    """llama.cpp's grammar sampler for the constraint (the caller frees it)."""
    text = resolve_tokens(constraint.grammar, control).encode("utf-8")
    if constraint.lazy:
        triggers = [control[t] for t in constraint.triggers if t in control]
        if not triggers:
            raise EngineError("this model has none of the tokens that start the grammar")
        ids = (llama.llama_token * len(triggers))(*triggers)
        patterns = (ctypes.c_char_p * 1)()
        sampler = llama.llama_sampler_init_grammar_lazy_patterns(
            vocab, text, b"root", patterns, 0, ids, len(triggers))
    else:
        sampler = llama.llama_sampler_init_grammar(vocab, text, b"root")
    if not sampler:
        raise EngineError("llama.cpp refused the reply's grammar (a bug in localsmall: please "
                          "report it with the schema or tools)")
    return sampler


class ConstrainedSampler:
    """A sampler chain (owned) plus a constraint; `sample(ctx)` returns the next token and
    records it in both."""

    def __init__(self, llama: Any, vocab: Any, chain: Any, constraint: Constraint,
                 control: Mapping[str, int]) -> None:
        self._llama, self._vocab, self.chain = llama, vocab, chain
        self.n_vocab = int(llama.llama_vocab_n_tokens(vocab))
        self._banned = np.array([], dtype=np.int64)
        if constraint.allowed_control is not None:
            allowed = set(constraint.allowed_control)
            self._banned = np.array(
                [i for piece, i in control.items()
                 if piece not in allowed and not llama.llama_vocab_is_eog(vocab, i)],
                dtype=np.int64)
        self.grammar = (grammar_sampler(llama, vocab, constraint, control)
                        if constraint.grammar else None)
        self._data = np.zeros(self.n_vocab, dtype=_DATA)
        self._every = np.arange(self.n_vocab, dtype=np.int32)
        self._one = llama.llama_token_data(0, 0.0, 0.0)

    def _logits(self, ctx: Any) -> np.ndarray:
        raw = self._llama.llama_get_logits_ith(ctx, -1)
        logits = np.ctypeslib.as_array(raw, shape=(self.n_vocab,)).copy()
        logits[self._banned] = -np.inf
        return logits

    def _apply(self, sampler: Any, ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Run `sampler` over candidates (ids, logits); returns the data it left."""
        data = self._data[:len(ids)]
        data["id"], data["logit"], data["p"] = ids, logits, 0.0
        array = self._llama.llama_token_data_array(
            data.ctypes.data_as(self._llama.llama_token_data_p), len(ids), -1, False)
        self._llama.llama_sampler_apply(sampler, ctypes.byref(array))
        self._selected = int(array.selected)
        return data[:array.size]

    def _draw(self, ids: np.ndarray, logits: np.ndarray) -> int | None:
        data = self._apply(self.chain, ids, logits)
        if self._selected < 0 or not np.isfinite(data[self._selected]["logit"]):
            return None
        return int(data[self._selected]["id"])

    def _fits(self, token: int) -> bool:
        assert self.grammar is not None
        self._one.id, self._one.logit, self._one.p = token, 0.0, 0.0
        array = self._llama.llama_token_data_array(ctypes.pointer(self._one), 1, -1, False)
        self._llama.llama_sampler_apply(self.grammar, ctypes.byref(array))
        return bool(np.isfinite(self._one.logit))

    def _draw_fitting(self, ids: np.ndarray, logits: np.ndarray) -> int | None:
        assert self.grammar is not None
        kept = self._apply(self.grammar, ids, logits)
        kept = kept[np.isfinite(kept["logit"])]
        if len(kept) == 0:
            return None
        return self._draw(kept["id"].copy(), kept["logit"].copy())

    def sample(self, ctx: Any) -> int:
        """The next token (also accepted by the chain and the grammar)."""
        logits = self._logits(ctx)
        every = self._every
        token = self._draw(every, logits)
        if self.grammar is not None and (token is None or not self._fits(token)):
            token = None
            for size in SHORTLISTS:
                top = np.argpartition(-logits, size)[:size]
                token = self._draw_fitting(top.astype(np.int32), logits[top])
                if token is not None:
                    break
            if token is None:
                token = self._draw_fitting(every, logits)
        if token is None:
            raise EngineError("no token fits the reply's grammar (a bug in localsmall: "
                              "please report it with the schema or tools)")
        if self.grammar is not None:
            self._llama.llama_sampler_accept(self.grammar, token)
        self._llama.llama_sampler_accept(self.chain, token)
        return token

    def free(self) -> None:
        """Free the chain and the grammar."""
        if self.grammar is not None:
            self._llama.llama_sampler_free(self.grammar)
            self.grammar = None
        if self.chain is not None:
            self._llama.llama_sampler_free(self.chain)
            self.chain = None


def constraint_accepts(llama: Any, vocab: Any, constraint: Constraint,
                       control: Mapping[str, int], tokens: list[int]) -> bool:
    """Whether a reply of exactly `tokens` (then end of sequence) meets the constraint."""
    banned = set()
    if constraint.allowed_control is not None:
        banned = {i for piece, i in control.items() if piece not in constraint.allowed_control
                  and not llama.llama_vocab_is_eog(vocab, i)}
    grammar = grammar_sampler(llama, vocab, constraint, control) if constraint.grammar else None
    one = llama.llama_token_data(0, 0.0, 0.0)
    try:
        for token in [*tokens, int(llama.llama_vocab_eos(vocab))]:
            if token in banned:
                return False
            if grammar is None:
                continue
            one.id, one.logit, one.p = token, 0.0, 0.0
            array = llama.llama_token_data_array(ctypes.pointer(one), 1, -1, False)
            llama.llama_sampler_apply(grammar, ctypes.byref(array))
            if not np.isfinite(one.logit):
                return False
            if not llama.llama_vocab_is_eog(vocab, token):
                llama.llama_sampler_accept(grammar, token)
        return True
    finally:
        if grammar is not None:
            llama.llama_sampler_free(grammar)
