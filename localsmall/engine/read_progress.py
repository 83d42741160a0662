"""Progress of reading a prompt into the context, for the progress bar."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from localsmall.engine.types import Progress, ProgressCallback

# ggml's CPU backend calls the abort callback for the nodes it computes, not for views,
# reshapes and permutes: about half the nodes llama.cpp reports for a graph (0.52 on the
# full-size model, 0.57 on the tests' tiny one). The first guess until a batch is counted.
CALLBACK_SHARE = 0.55


class ReadProgress:
    """Progress of reading a prompt. Whole batches are counted as they finish; inside a
    batch (a minute or more for the 24B model on a laptop CPU), the share of the compute
    graph's nodes done so far, counted through llama.cpp's abort callback, moves the bar.
    `batch_nodes`: callbacks a batch makes (counted in an earlier read, else estimated
    from the graph's size); `nodes_per_batch` holds the count of this read's last batch."""

    def __init__(self, todo: int, on_progress: ProgressCallback | None,
                 batch_nodes: int) -> None:
        self.todo = todo
        self.done = 0
        self._report = on_progress
        self._graph_nodes = batch_nodes
        self._batch = 0
        self._nodes = 0
        self.nodes_per_batch = 0

    def start(self) -> None:
        """Report the read before its first batch, so a bar can show at once."""
        if self.todo > 0:
            self._emit(0)

    def begin_batch(self, n_tokens: int) -> None:
        self._batch, self._nodes = n_tokens, 0

    def node(self) -> None:
        self._nodes += 1
        if self._report is not None and self._graph_nodes and self._nodes % 8 == 0:
            share = min(self._nodes / self._graph_nodes, 0.99)
            self._emit(self.done + self._batch * share)

    def end_batch(self, n_tokens: int) -> int:
        if self._nodes:
            self.nodes_per_batch = self._nodes
        self.done += n_tokens
        self._emit(self.done)
        return 0

    def _emit(self, done: float) -> None:
        if self._report is not None:
            self._report(Progress("prompt", done, self.todo, "reading prompt"))


def image_progress(on_progress: ProgressCallback | None,
                   source: str) -> Callable[[int, int], None] | None:
    """The projector's encode progress (done, total) as Progress events, or None."""
    if on_progress is None:
        return None
    label = f"encoding {Path(source).name}"
    return lambda done, total: on_progress(Progress("image", done, total, label))
