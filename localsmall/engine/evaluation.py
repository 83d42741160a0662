"""Prompt evaluation, a part of `Engine` (engine.model): bringing the KV cache of the
sequence in use to a prompt's layout, reusing the longest prefix it shares with what the
cache holds, in n_batch-position llama_decode calls (token runs, images through the
projector, or both as embeddings: engine.embed_read) that Ctrl-C, `Engine.interrupt()`
or a background read's stop event can end at the next graph node.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from localsmall import interrupt
from localsmall.engine.embed_read import fill_batch
from localsmall.engine.kvcache import CacheItem, ImageSpan, common_prefix, positions
from localsmall.engine.parts import EngineParts
from localsmall.engine.read_progress import ReadProgress, image_progress
from localsmall.engine.types import ImageSlot, ProgressCallback, PromptPiece, TurnStats
from localsmall.errors import ContextFullError, EngineError


class PromptEvaluation(EngineParts):
    """Evaluating prompts into the KV cache, and choosing and trimming that cache."""

    def _should_abort(self, user_data: Any) -> bool:
        # Called by llama.cpp's CPU backend after each graph node while a prompt is read.
        # A callback must never raise (ctypes would swallow it): progress that fails is
        # skipped, and Ctrl-C arrives as the interrupt flag.
        try:
            if self._reading is not None:
                self._reading.node()
        except KeyboardInterrupt:  # raised by the progress display itself: keep it
            interrupt.request()
        except Exception:  # progress is best effort
            pass
        stop = self._stop
        if stop is not None:  # a background read (read_ahead)
            return stop.is_set()
        return self._interrupted or interrupt.requested()

    def interrupt(self) -> None:
        """Ask a prompt evaluation or generation running in another thread to stop: it
        raises KeyboardInterrupt at the next graph node or token."""
        self._interrupted = True

    def reset(self) -> None:
        """Empty the KV cache of the sequence in use."""
        self.settle()
        self.kv.truncate(0)

    def use_sequence(self, seq_id: int) -> None:
        """Work on another sequence of the context (see EngineSettings.n_seq): prompts,
        generation and saved states then use its cache."""
        self.settle()
        self.kv = self.sequences[seq_id]

    def reuse_estimate(self, prompt: Sequence[PromptPiece]) -> tuple[int, int]:
        """(positions reused from the cache, positions to evaluate) if `prompt` ran now."""
        items = self.layout(prompt)
        reused = positions(items[:self.kv.reusable(items)])
        return reused, positions(items) - reused

    def rollback(self, prompt: Sequence[PromptPiece]) -> None:
        """Drop the cached tail that `prompt` does not share (after /undo, for example),
        keeping the common prefix for the next turn."""
        self.settle()
        keep = common_prefix(self.kv.items, self.layout(prompt))
        if keep < len(self.kv.items):
            self.kv.truncate(keep)

    def _decode_tokens(self, tokens: Sequence[int], logits_last: bool,
                       reading: ReadProgress | None = None) -> None:
        batch = self._batch
        n_batch = self.settings.n_batch
        for start in range(0, len(tokens), n_batch):
            part = tokens[start:start + n_batch]
            if reading is not None:
                reading.begin_batch(len(part))
            batch.n_tokens = len(part)
            for i, token in enumerate(part):
                batch.token[i] = token
                batch.pos[i] = self.kv.n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = self.kv.seq_id
                batch.logits[i] = False
            if logits_last and start + len(part) == len(tokens):
                batch.logits[len(part) - 1] = True
            self._decode_batch(batch, functools.partial(self.kv.added, part))
            if reading is not None:
                reading.end_batch(len(part))

    def _decode_batch(self, batch: Any, on_done: Callable[[], None]) -> None:
        """One llama_decode call; `on_done` records what it added to the cache."""
        llama = self._llama
        self.decode_calls += 1
        with interrupt.interrupting():
            status = llama.llama_decode(self.ctx, batch)
            while status == 1 and self.on_cache_full is not None and self.on_cache_full():
                status = llama.llama_decode(self.ctx, batch)
        if status == 0:
            on_done()
        stop = self._stop
        if stop is not None:  # a background read: only its own stop ends it
            if status == 2 or stop.is_set():
                raise KeyboardInterrupt
        # Aborted by the abort callback (2), or Ctrl-C came while llama.cpp ran:
        # stop here, where raising is safe.
        elif interrupt.take() or status == 2 or self._interrupted:
            raise KeyboardInterrupt
        if status != 0:
            raise EngineError(f"llama.cpp failed to evaluate the prompt (status {status})")

    def _evaluate(self, items: Sequence[CacheItem], prompt: Sequence[PromptPiece],
                  on_progress: ProgressCallback | None) -> TurnStats:
        """Bring the KV cache to `items`, reusing the longest common prefix."""
        total = positions(items)
        if total >= self.n_ctx:
            raise ContextFullError(f"the prompt needs {total} tokens but the context holds "
                                   f"{self.n_ctx}; start a new chat or use a larger --ctx")
        keep = self.kv.reusable(items)
        self.kv.truncate(keep)
        stats = TurnStats(prompt_tokens=total, reused_tokens=self.kv.n_past)
        images = {p.image.key: p.image for p in prompt if isinstance(p, ImageSlot)}
        reading = ReadProgress(total - self.kv.n_past, on_progress, self._batch_nodes)
        start = time.perf_counter()
        encode_s, encoded_count, encoded_tokens = 0.0, 0, 0
        self._interrupted = False
        self._reading = reading
        self._llama.llama_set_abort_callback(self.ctx, self._abort_cb, None)
        calls_before = self.decode_calls
        try:
            rest = list(items[keep:])
            if self._token_rows is not None and any(isinstance(x, ImageSpan) for x in rest):
                encode_s, encoded_count, encoded_tokens = self._read_together(
                    rest, images, reading, on_progress)
                rest = []
            else:
                reading.start()
            i = 0
            while i < len(rest):
                if isinstance(rest[i], int):
                    j = i
                    while j < len(rest) and isinstance(rest[j], int):
                        j += 1
                    run = [t for t in rest[i:j] if isinstance(t, int)]
                    self._decode_tokens(run, logits_last=j == len(rest), reading=reading)
                    i = j
                    continue
                span = rest[i]
                assert isinstance(span, ImageSpan)
                seconds = self._read_image(images[span.key], span, reading, on_progress)
                if seconds is not None:
                    encode_s += seconds
                    encoded_count += 1
                    encoded_tokens += span.n_pos
                i += 1
        finally:
            self._reading = None
            self._batch_nodes = reading.nodes_per_batch or self._batch_nodes
            self._llama.llama_set_abort_callback(self.ctx, self._abort_cb.__class__(), None)
        return replace(stats, evaluated_tokens=reading.todo, images_encoded=encoded_count,
                       image_tokens_encoded=encoded_tokens, image_encode_s=encode_s,
                       prompt_eval_s=time.perf_counter() - start,
                       read_batches=self.decode_calls - calls_before)

    def _read_together(self, rest: Sequence[CacheItem], images: dict[str, Any],
                       reading: ReadProgress, on_progress: ProgressCallback | None
                       ) -> tuple[float, int, int]:
        """Encode the images of `rest`, then read all of it (text as token embeddings)
        in n_batch-position llama_decode calls (see embed_read); returns (encode seconds,
        images encoded, their positions)."""
        assert self.projector is not None and self._token_rows is not None
        encode_s, count, n_tokens = 0.0, 0, 0
        rows: list[np.ndarray] = []
        run: list[int] = []
        for item in rest:
            if isinstance(item, int):
                run.append(item)
                continue
            rows.append(self._token_rows.rows(run))
            run = []
            image = images[item.key]
            fresh = not self.projector.is_encoded(item.key)
            t0 = time.perf_counter()
            encoded = self.projector.encode(image, image_progress(on_progress, image.source))
            if fresh:
                encode_s += time.perf_counter() - t0
                count, n_tokens = count + 1, n_tokens + item.n_pos
            if encoded.n_tokens != item.n_pos:
                raise EngineError(f"the projector made {encoded.n_tokens} positions of "
                                  f"{image.source} instead of {item.n_pos}")
            rows.append(encoded.embeddings)
        rows.append(self._token_rows.rows(run))
        embd = np.concatenate(rows)
        if self._embd_batch is None:
            self._embd_batch = self._llama.llama_batch_init(
                max(self.settings.n_batch, 1), embd.shape[1], 1)
        ends = np.cumsum([1 if isinstance(x, int) else x.n_pos for x in rest])
        base, recorded, n_batch = self.kv.n_past, 0, max(self.settings.n_batch, 1)
        reading.start()
        for start in range(0, len(embd), n_batch):
            stop = min(start + n_batch, len(embd))
            reading.begin_batch(stop - start)
            fill_batch(self._embd_batch, embd[start:stop], base + start, self.kv.seq_id,
                       logits_last=stop == len(embd))
            # Record the items this call completed (an image may span two calls).
            complete = int(np.searchsorted(ends, stop, side="right"))
            self._decode_batch(self._embd_batch,
                               functools.partial(self.kv.added, rest[recorded:complete]))
            recorded = complete
            reading.end_batch(stop - start)
        return encode_s, count, n_tokens

    def _read_image(self, image: Any, span: ImageSpan, reading: ReadProgress,
                    on_progress: ProgressCallback | None) -> float | None:
        """Encode (unless its embeddings are cached) and decode one image; returns the
        seconds spent encoding, or None when the cached embeddings were used."""
        assert self.projector is not None
        fresh = not self.projector.is_encoded(span.key)
        t0 = time.perf_counter()
        encoded = self.projector.encode(image, image_progress(on_progress, image.source))
        encode_s = time.perf_counter() - t0
        n_batch = self.settings.n_batch
        remaining = encoded.n_tokens

        def after_batch(n_tokens: int) -> int:
            nonlocal remaining
            remaining -= n_tokens
            self.decode_calls += 1  # mtmd's helper calls llama_decode itself
            reading.end_batch(n_tokens)
            reading.begin_batch(min(n_batch, remaining))
            return 0

        reading.begin_batch(min(n_batch, remaining))
        end = self.projector.decode(self.ctx, encoded, self.kv.n_past, n_batch, after_batch,
                                     seq_id=self.kv.seq_id)
        if end != self.kv.n_past + span.n_pos:
            raise EngineError(f"the projector placed {image.source} over {end - self.kv.n_past}"
                              f" positions instead of {span.n_pos}")
        self.kv.added([span])
        return encode_s if fresh else None

    def logits_for(self, tokens: Sequence[int]) -> np.ndarray:
        """The next-token logits after `tokens`, evaluated from an empty cache
        (float32, one per vocabulary entry). For checking a model against a reference."""
        if not tokens:
            raise EngineError("logits_for needs at least one token")
        self._check_workers()
        self.settle()
        self.reset()
        self._decode_tokens(list(tokens), logits_last=True)
        n_vocab = self.tokenizer.n_tokens
        logits = self._llama.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(n_vocab,)).copy()
