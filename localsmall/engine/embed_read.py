"""Reading an image turn in as few llama_decode calls as possible: text tokens and image
embeddings side by side in the same batches.

On a CPU every llama_decode call pays one pass over all the model's weights, however few
positions it carries (about as long as generating one token: over a second for the 24B
model on a 2-core machine, several under load). Read the usual way, an image turn is
three calls at least: the text before the image, the image (mtmd's helper decodes it on
its own, n_batch positions per call), and the text after it ([IMG_END], the question,
[/INST]). Handing llama.cpp the text as embeddings too (rows of the model's token_embd
table, dequantized here as llama.cpp's get_rows does) makes it one call for a turn of up
to n_batch positions.

Used only with projectors whose image positions are causal and sequential like text
(Pixtral: see Projector.plain) and models whose token table gguf can dequantize; other
cases keep mtmd's helper.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from localsmall.errors import ModelLoadError
from localsmall.gguf_header import read_header

TOKEN_TABLE = "token_embd.weight"


class TokenEmbeddings:
    """Rows of a GGUF model's token embedding table, read from the file on demand."""

    def __init__(self, path: Path, offset: int, qtype: int, n_embd: int,
                 row_bytes: int, n_vocab: int) -> None:
        self.path = path
        self._offset = offset
        self._qtype = qtype
        self.n_embd = n_embd
        self._row_bytes = row_bytes
        self.n_vocab = n_vocab

    @classmethod
    def open(cls, path: Path, n_embd: int) -> TokenEmbeddings | None:
        """The table of the model at `path`, or None when it cannot be read here (another
        width, a split file, a type gguf cannot dequantize)."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            info = read_header(path).tensor(TOKEN_TABLE)
            qtype = GGMLQuantizationType[info.type]
        except (ModelLoadError, KeyError, OSError):
            return None
        if qtype not in GGML_QUANT_SIZES or len(info.shape) != 2 or info.shape[0] != n_embd:
            return None
        block, type_size = GGML_QUANT_SIZES[qtype]
        if n_embd % block:
            return None
        row_bytes = n_embd // block * type_size
        if row_bytes * info.shape[1] != info.n_bytes:
            return None
        return cls(path, info.offset, int(qtype), n_embd, row_bytes, info.shape[1])

    def rows(self, tokens: Sequence[int]) -> np.ndarray:
        """float32 [len(tokens), n_embd]: what llama.cpp's input layer makes of `tokens`."""
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        if not tokens:
            return np.zeros((0, self.n_embd), np.float32)
        wanted = sorted(set(tokens))
        if wanted[0] < 0 or wanted[-1] >= self.n_vocab:
            raise ValueError(f"token id out of range: {wanted[0]}..{wanted[-1]}")
        raw = bytearray()
        with open(self.path, "rb") as f:
            for token in wanted:
                f.seek(self._offset + token * self._row_bytes)
                raw += f.read(self._row_bytes)
        data = np.frombuffer(bytes(raw), np.uint8).reshape(len(wanted), self._row_bytes)
        table = dequantize(data, GGMLQuantizationType(self._qtype)).astype(np.float32)
        index = {token: i for i, token in enumerate(wanted)}
        return table.reshape(len(wanted), self.n_embd)[[index[t] for t in tokens]]


def fill_batch(batch: object, rows: np.ndarray, first_pos: int, seq_id: int,
               logits_last: bool) -> None:
    """Put `rows` (float32 [n, n_embd]) into an embedding llama_batch at positions
    first_pos.. of sequence `seq_id`; only the last row's logits when `logits_last`."""
    n = rows.shape[0]
    data = np.ascontiguousarray(rows, dtype=np.float32)
    b = batch  # a llama_batch made by llama_batch_init(n_batch, n_embd, 1)
    b.n_tokens = n  # type: ignore[attr-defined]
    ctypes.memmove(b.embd, data.ctypes.data, data.nbytes)  # type: ignore[attr-defined]
    for i in range(n):
        b.pos[i] = first_pos + i  # type: ignore[attr-defined]
        b.n_seq_id[i] = 1  # type: ignore[attr-defined]
        b.seq_id[i][0] = seq_id  # type: ignore[attr-defined]
        b.logits[i] = False  # type: ignore[attr-defined]
    if logits_last and n:
        b.logits[n - 1] = True  # type: ignore[attr-defined]


def batch_count(n_positions: int, n_batch: int) -> int:
    """llama_decode calls needed for `n_positions` read together."""
    return -(-n_positions // max(n_batch, 1)) if n_positions > 0 else 0
