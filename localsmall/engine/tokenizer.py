"""The model's vocabulary (llama.cpp's `llama_vocab`): text to token ids and back."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from typing import Any

from localsmall.errors import EngineError


class Tokenizer:
    """Tokenizing and detokenizing with a loaded model's vocabulary."""

    def __init__(self, llama: Any, vocab: Any) -> None:
        self._llama = llama
        self.vocab = vocab
        self._n_tokens = int(llama.llama_vocab_n_tokens(vocab))

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        """Token ids for `text`. `special=True` parses control tokens such as [INST]
        (template text); user text is tokenized with `special=False`."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (self._llama.llama_token * capacity)()
        n = self._llama.llama_tokenize(self.vocab, data, len(data), buf, capacity, False, special)
        if n < 0:
            raise EngineError("tokenization failed")
        return list(buf[:n])

    def valid(self, tokens: Sequence[int]) -> bool:
        """Whether every id is in this vocabulary. llama.cpp looks token ids up with
        `at()`: one out of range throws inside C++ and aborts the whole process, so ids
        from outside (a saved chat) are checked before they reach it."""
        n_tokens = self.n_tokens
        return all(isinstance(t, int) and 0 <= t < n_tokens for t in tokens)

    def check(self, tokens: Sequence[int]) -> None:
        """EngineError unless every id is in this vocabulary (see `valid`)."""
        if not self.valid(tokens):
            raise EngineError(f"token ids outside this model's {self.n_tokens}-token "
                              "vocabulary; the saved chat or prompt does not belong to it")

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        """The bytes a token stands for (control tokens render only with special=True)."""
        if not (isinstance(token, int) and 0 <= token < self._n_tokens):
            self.check((token,))  # raises, with the reason
        buf = ctypes.create_string_buffer(256)
        n = self._llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """Text for a sequence of token ids."""
        return b"".join(self.token_bytes(t, special=special) for t in tokens).decode(
            "utf-8", errors="replace")

    def token_piece(self, token: int) -> str:
        """A token as text, control tokens included ("[INST]")."""
        return self.token_bytes(token, special=True).decode("utf-8", errors="replace")

    @property
    def bos_token(self) -> str:
        return self.token_piece(self._llama.llama_vocab_bos(self.vocab))

    @property
    def eos_token(self) -> str:
        return self.token_piece(self._llama.llama_vocab_eos(self.vocab))

    @property
    def n_tokens(self) -> int:
        return self._n_tokens

    def is_control(self, token: int) -> bool:
        """A control token ([INST], [TOOL_CALLS], ...): it renders as text only when asked."""
        return bool(self._llama.llama_vocab_is_control(self.vocab, token))

    @functools.cached_property
    def control_tokens(self) -> dict[str, int]:
        """Every control token by its text ("[TOOL_CALLS]": 9)."""
        return {self.token_piece(i): i for i in range(self.n_tokens) if self.is_control(i)}

    def is_end(self, token: int) -> bool:
        """An end-of-generation token (end of sequence, end of turn)."""
        return bool(self._llama.llama_vocab_is_eog(self.vocab, token))
