"""Mistral's tekken tokenizer (tekken.json) as a GGUF BPE vocabulary.

tekken is a tiktoken-style byte-level BPE: a list of byte strings ordered by merge rank,
preceded by a block of control tokens ([INST], [IMG], ...). llama.cpp reads the same
vocabulary as a GPT-2 style BPE: tokens spelled in GPT-2's byte-to-unicode alphabet,
control tokens first with their real ids, and merges derived from the ranks (every split
of a token into two vocabulary tokens, ordered by the rank of the merged token: that is
the priority tiktoken gives the merge).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from localsmall.errors import ConversionError

# llama.cpp token types (llama_token_type / gguf.TokenType)
TOKEN_NORMAL = 1
TOKEN_CONTROL = 3

# The control-token layout of tekken files that predate the `special_tokens` list
# (version v3 and earlier). Newer files carry the list themselves.
LEGACY_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)
SPECIAL_PLACEHOLDER = "<SPECIAL_{id}>"


@dataclass(frozen=True)
class TekkenVocab:
    """A tekken tokenizer file, read and truncated to the model's vocabulary size."""

    special: tuple[str, ...]      # control tokens, index = token id
    ranks: tuple[bytes, ...]      # BPE tokens; id = len(special) + rank
    pattern: str                  # the pre-tokenizer regex
    version: str

    @property
    def size(self) -> int:
        return len(self.special) + len(self.ranks)

    def token_id(self, piece: str) -> int:
        """The id of a control token such as "[IMG_BREAK]"."""
        try:
            return self.special.index(piece)
        except ValueError:
            raise KeyError(piece) from None


@dataclass(frozen=True)
class GgufVocab:
    """The vocabulary in the form GGUF's tokenizer.ggml.* keys hold it."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int


def read_tekken(path: Path, vocab_size: int | None = None) -> TekkenVocab:
    """Read tekken.json; `vocab_size` (from the model config) truncates the BPE ranks."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        config = data["config"]
        num_special = int(config["default_num_special_tokens"])
        size = int(vocab_size or config["default_vocab_size"])
        entries = data["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConversionError(f"{path} is not a readable tekken tokenizer file ({exc})") from None

    special = [SPECIAL_PLACEHOLDER.format(id=i) for i in range(num_special)]
    listed = data.get("special_tokens")
    if listed:
        for item in listed:
            special[int(item["rank"])] = item["token_str"]
    else:
        special[: len(LEGACY_SPECIAL_TOKENS)] = LEGACY_SPECIAL_TOKENS

    n_ranks = size - num_special
    if n_ranks > len(entries):
        raise ConversionError(f"{path} has {len(entries)} BPE tokens, the model needs {n_ranks}")
    ranks = tuple(base64.b64decode(e["token_bytes"]) for e in entries[:n_ranks])
    return TekkenVocab(special=tuple(special), ranks=ranks, pattern=config["pattern"],
                       version=str(config.get("version", "")))


@cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def gpt2_spelling(token: bytes) -> str:
    """A token's bytes spelled in GPT-2's byte-to-unicode alphabet."""
    table = _byte_to_unicode()
    return "".join(table[b] for b in token)


def derive_merges(ranks: tuple[bytes, ...]) -> list[tuple[bytes, bytes]]:
    """Every (left, right) split of each multi-byte token into two vocabulary tokens,
    ordered by the merged token's rank (tiktoken's merge priority)."""
    known = set(ranks)
    merges: list[tuple[bytes, bytes]] = []
    for token in ranks:
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in known and right in known:
                merges.append((left, right))
    return merges


def to_gguf_vocab(vocab: TekkenVocab) -> GgufVocab:
    """Convert a tekken vocabulary to GGUF's GPT-2 BPE representation."""
    tokens = list(vocab.special) + [gpt2_spelling(t) for t in vocab.ranks]
    types = [TOKEN_CONTROL] * len(vocab.special) + [TOKEN_NORMAL] * len(vocab.ranks)
    merges = [f"{gpt2_spelling(a)} {gpt2_spelling(b)}" for a, b in derive_merges(vocab.ranks)]

    def find(name: str, fallback: int) -> int:
        try:
            return vocab.token_id(name)
        except KeyError:
            return fallback

    return GgufVocab(tokens=tokens, token_types=types, merges=merges,
                     bos_id=find("<s>", 1), eos_id=find("</s>", 2),
                     unk_id=find("<unk>", 0), pad_id=find("<pad>", 11))
