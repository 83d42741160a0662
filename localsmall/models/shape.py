"""The decoder's dimensions: one definition for the catalog (memory planned before a
download), the memory model (read from a GGUF) and the converter (written to one)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderShape:
    """The text decoder's dimensions (head_dim is decoupled from n_embd / n_head)."""

    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
