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
from localsmall.fileio import read_regular_file

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


MAX_FILE_BYTES = 256 << 20   # tekken.json is ~15 MB
MAX_VOCAB = 1 << 22          # tekken has 131,072 tokens; llama.cpp's ids are int32
MAX_TOKEN_BYTES = 1024       # real tokens are a few dozen bytes; bounds derive_merges


def read_tekken(path: Path, vocab_size: int | None = None) -> TekkenVocab:
    """Read tekken.json; `vocab_size` (from the model config) truncates the BPE ranks.
    Raises ConversionError for a file that is not a usable tekken tokenizer."""
    try:
        raw = read_regular_file(Path(path), MAX_FILE_BYTES)
        data = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path} is not a readable tekken tokenizer file ({exc})") from None
    except RecursionError:
        raise ConversionError(f"{path} is not a tekken tokenizer file (nested too deep)") \
            from None
    try:
        return _parse_tekken(data, vocab_size)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ConversionError(f"{path} is not a usable tekken tokenizer file "
                              f"({type(exc).__name__}: {exc!s:.200})") from None


def _count(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} is {value!r:.40}, expected a whole number from {low} to "
                         f"{high}")
    return value


def _parse_tekken(data: object, vocab_size: int | None) -> TekkenVocab:
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise TypeError("no config object")
    config = data["config"]
    num_special = _count(config["default_num_special_tokens"], "default_num_special_tokens",
                         0, MAX_VOCAB)
    size = _count(vocab_size or config["default_vocab_size"], "the vocabulary size",
                  num_special, MAX_VOCAB)
    entries, pattern = data["vocab"], config["pattern"]
    if not isinstance(entries, list) or not isinstance(pattern, str):
        raise TypeError("vocab is not a list or pattern is not text")

    special = [SPECIAL_PLACEHOLDER.format(id=i) for i in range(num_special)]
    listed = data.get("special_tokens")
    if listed:
        if not isinstance(listed, list):
            raise TypeError("special_tokens is not a list")
        for item in listed:
            rank = _count(item["rank"], "a special token's rank", 0, num_special - 1)
            if not isinstance(item["token_str"], str):
                raise TypeError("a special token's token_str is not text")
            special[rank] = item["token_str"]
    else:
        special[: len(LEGACY_SPECIAL_TOKENS)] = LEGACY_SPECIAL_TOKENS[:num_special]

    n_ranks = size - num_special
    if n_ranks > len(entries):
        raise ValueError(f"it has {len(entries)} BPE tokens, the model needs {n_ranks}")
    ranks = tuple(_token_bytes(e) for e in entries[:n_ranks])
    return TekkenVocab(special=tuple(special), ranks=ranks, pattern=pattern,
                       version=str(config.get("version", ""))[:100])


def _token_bytes(entry: object) -> bytes:
    if not isinstance(entry, dict) or not isinstance(entry.get("token_bytes"), str):
        raise TypeError("a vocabulary entry has no token_bytes text")
    token = base64.b64decode(entry["token_bytes"], validate=True)  # binascii.Error: ValueError
    if not 0 < len(token) <= MAX_TOKEN_BYTES:
        raise ValueError(f"a token has {len(token)} bytes (1 to {MAX_TOKEN_BYTES} allowed)")
    return token


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
    ordered by the merged token's rank (tiktoken's merge priority). Only cuts where both
    sides have the length of some token are tried, and tokens are at most
    MAX_TOKEN_BYTES long (read_tekken): at most that many steps per byte of vocabulary."""
    known = set(ranks)
    lengths = {len(t) for t in ranks}
    merges: list[tuple[bytes, bytes]] = []
    for token in ranks:
        size = len(token)
        for cut in range(1, size):
            if cut not in lengths or size - cut not in lengths:
                continue
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
