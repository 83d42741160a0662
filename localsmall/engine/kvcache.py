"""What llama.cpp's KV cache holds, item by item: text tokens and image spans.

The engine keeps one list per llama.cpp sequence in step with its cache (a chat uses
sequence 0; the server keeps several conversations in sequences of one context). A new
prompt is laid out the same way; the longest common prefix of the two is what can be reused, and
everything after it is removed from llama.cpp's cache before the rest is evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ImageSpan:
    """An image as it sits in the KV cache: its content key and positions."""

    key: str
    n_pos: int


CacheItem = int | ImageSpan  # a text token id, or an image


def positions(items: Sequence[CacheItem]) -> int:
    """Context positions a layout occupies."""
    return sum(1 if isinstance(i, int) else i.n_pos for i in items)


def common_prefix(a: Sequence[CacheItem], b: Sequence[CacheItem]) -> int:
    """How many leading items two layouts share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def items_to_json(items: Sequence[CacheItem]) -> list[Any]:
    return [i if isinstance(i, int) else {"image": i.key, "n_pos": i.n_pos} for i in items]


def items_from_json(raw: list[Any]) -> list[CacheItem] | None:
    """The layout saved by `items_to_json`, or None when it is malformed."""
    items: list[CacheItem] = []
    for entry in raw:
        if isinstance(entry, int) and not isinstance(entry, bool):
            items.append(entry)
        elif isinstance(entry, dict) and isinstance(entry.get("image"), str) and isinstance(
                entry.get("n_pos"), int):
            items.append(ImageSpan(entry["image"], entry["n_pos"]))
        else:
            return None
    return items


class KvCache:
    """The bookkeeping of one sequence of a llama.cpp context."""

    def __init__(self, llama: Any, ctx: Any, seq_id: int = 0) -> None:
        self._llama = llama
        self._ctx = ctx
        self.seq_id = seq_id
        self.items: list[CacheItem] = []
        self.n_past = 0

    def reusable(self, wanted: Sequence[CacheItem]) -> int:
        """Items of `wanted` that can stay: the common prefix, less the last token when
        all of it is cached (its logits are needed again to sample the reply)."""
        n = common_prefix(self.items, wanted)
        if n == len(wanted):
            n -= 1
            while n > 0 and not isinstance(wanted[n], int):
                n -= 1
        return max(n, 0)

    def truncate(self, n_items: int) -> None:
        """Forget items from `n_items` on, here and in llama.cpp's cache."""
        del self.items[n_items:]
        self.n_past = positions(self.items)
        mem = self._llama.llama_get_memory(self._ctx)
        if not self._llama.llama_memory_seq_rm(mem, self.seq_id, self.n_past, -1):
            self._llama.llama_memory_seq_rm(mem, self.seq_id, -1, -1)
            self.items.clear()
            self.n_past = 0

    def added(self, items: Sequence[CacheItem]) -> None:
        """Record items that were just evaluated into the cache."""
        self.items.extend(items)
        self.n_past += positions(items)

    def copy_from(self, other: KvCache, n_items: int) -> None:
        """Replace this sequence's cache by the first `n_items` of another's. In a
        unified KV cache llama.cpp shares the cells instead of copying them."""
        self.truncate(0)
        items = other.items[:n_items]
        n_pos = positions(items)
        if n_pos:
            mem = self._llama.llama_get_memory(self._ctx)
            self._llama.llama_memory_seq_cp(mem, other.seq_id, self.seq_id, 0, n_pos)
        self.items, self.n_past = list(items), n_pos

    def restored(self, items: list[CacheItem], n_pos: int) -> None:
        """Record a cache loaded from a saved state."""
        self.items, self.n_past = items, n_pos
