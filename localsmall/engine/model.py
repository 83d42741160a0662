"""The engine: a loaded text model, its context and (optionally) its vision projector.

It evaluates prompts made of token runs and images and streams the reply. The context
keeps what it has read between turns: a new prompt evaluates only what follows the
longest prefix it shares with the cache (text compared by token, images by content),
so a follow-up question costs its own tokens, not the whole conversation.
"""

from __future__ import annotations

import codecs
import functools
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from localsmall import interrupt
from localsmall.engine import native, rpc
from localsmall.engine.buffers import BufferReport, parse_buffer_lines
from localsmall.engine.constrain import ConstrainedSampler, constraint_accepts
from localsmall.engine.devices import default_threads
from localsmall.engine.embed_read import TokenEmbeddings, fill_batch
from localsmall.engine.kvcache import (
    CacheItem,
    ImageSpan,
    KvCache,
    common_prefix,
    positions,
)
from localsmall.engine.loading import flash_attn_type, load_model, model_info, new_context
from localsmall.engine.read_ahead import ReadAhead
from localsmall.engine.read_progress import CALLBACK_SHARE, ReadProgress, image_progress
from localsmall.engine.repack import RepackOverrides
from localsmall.engine.sampler import argmax_token, plain_greedy, sampler_chain
from localsmall.engine.state import StateMeta, engine_fingerprint, load_kv_state, save_kv_state
from localsmall.engine.tokenizer import Tokenizer
from localsmall.engine.types import (
    KV_TYPES,
    Constraint,
    EngineSettings,
    ImageSlot,
    ProgressCallback,
    PromptPiece,
    SamplingSettings,
    StopReason,
    TokenEvent,
    TokenRun,
    TurnResult,
    TurnStats,
)
from localsmall.engine.vision import Projector
from localsmall.errors import ContextFullError, EngineError, ModelNotFoundError


class Engine:
    """A loaded model ready to chat. Call `close()` (or use `with`) to free it."""

    def __init__(self, settings: EngineSettings,
                 on_progress: ProgressCallback | None = None) -> None:
        if settings.kv_type not in KV_TYPES:
            raise EngineError(f"unknown KV cache type {settings.kv_type!r}; "
                              f"use one of {', '.join(KV_TYPES)}")
        for path, what in ((settings.model_path, "model"), (settings.mmproj_path, "projector")):
            if path is not None and not Path(path).is_file():
                raise ModelNotFoundError(f"{what} file not found: {path}")
        self.settings = settings
        self._rpc_lost = False
        self._llama = native.llama()
        # Workers (--rpc) are checked and registered before llama.cpp sees them.
        self.remote_devices = tuple(rpc.connect(settings.rpc_servers)
                                    if settings.rpc_servers else ())
        native.set_verbose(settings.verbose)
        self.n_threads = settings.n_threads or default_threads()
        self.repack_note = ""
        self._overrides: RepackOverrides | None = None  # kept alive with the model
        self.ctx: Any = None
        self.projector: Projector | None = None
        # llama.cpp reports every buffer it allocates in its log: keep those numbers.
        # Ctrl-C while loading only sets the flag; the progress callback stops the load.
        with native.capture_log() as log_lines, interrupt.interrupting():
            self.model, self.repack_note, self._overrides = load_model(
                self._llama, settings, on_progress,
                remote=tuple(d.handle for d in self.remote_devices))
            self.vocab = self._llama.llama_model_get_vocab(self.model)
            self.tokenizer = Tokenizer(self._llama, self.vocab)
            try:
                native.take_graph_nodes()
                self.ctx = new_context(self._llama, self.model, settings, self.n_threads)
                # Abort callbacks a prompt batch makes: estimated until a read counts them.
                self._batch_nodes = int(native.take_graph_nodes() * CALLBACK_SHARE)
                if settings.mmproj_path is not None:
                    self.projector = Projector(
                        Path(settings.mmproj_path), self.model,
                        n_embd=self._llama.llama_model_n_embd_inp(self.model),
                        n_threads=self.n_threads, use_gpu=settings.n_gpu_layers != 0,
                        flash_attn_type=flash_attn_type(self._llama, settings))
                interrupt.raise_if_requested()
            except BaseException:
                self.close()
                raise
        # Text as embeddings, so an image turn shares llama_decode calls (embed_read).
        self._token_rows = (TokenEmbeddings.open(Path(settings.model_path),
                                                 self._llama.llama_model_n_embd_inp(self.model))
                            if self.projector is not None and self.projector.plain else None)
        self._embd_batch: Any = None
        self.buffers: tuple[BufferReport, ...] = parse_buffer_lines(log_lines)
        # One KV bookkeeping per llama.cpp sequence; `kv` is the one in use.
        self.sequences = tuple(KvCache(self._llama, self.ctx, seq)
                               for seq in range(max(settings.n_seq, 1)))
        self.kv = self.sequences[0]
        # Called when llama.cpp finds no free cell for a batch (several sequences share
        # the context): returns True once it made room, and the batch is tried again.
        self.on_cache_full: Callable[[], bool] | None = None
        # Engine.interrupt(), from another thread (the server); Ctrl-C is the process-wide
        # flag in localsmall.interrupt.
        self._interrupted = False
        self._reading: ReadProgress | None = None
        # A read in a background thread (read_ahead) and, while it runs, its stop event:
        # that read stops for it alone, never for Ctrl-C (the waiting turn acts on that).
        self._ahead: ReadAhead | None = None
        self._stop: threading.Event | None = None
        self._live: weakref.ref[Generation] | None = None  # the reply being generated
        self._abort_cb = self._llama.ggml_abort_callback(self._should_abort)
        self.decode_calls = 0  # llama_decode calls made (prompt reading and generation)
        self._batch = self._llama.llama_batch_init(max(settings.n_batch, 1), 0, 1)
        self.info = model_info(self._llama, self.model, self.ctx, settings,
                               has_vision=self.projector is not None,
                               repack_note=self.repack_note)

    # --- tokens (see engine.tokenizer) ----------------------------------------------------

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        """Token ids for `text` (`special=True` parses control tokens: template text)."""
        return self.tokenizer.tokenize(text, special=special)

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        return self.tokenizer.detokenize(tokens, special=special)

    @property
    def n_vocab(self) -> int:
        return self.tokenizer.n_tokens

    def valid_tokens(self, tokens: Sequence[int]) -> bool:
        """Whether every id is in the vocabulary (ids outside must never reach llama.cpp)."""
        return self.tokenizer.valid(tokens)

    @property
    def control_tokens(self) -> dict[str, int]:
        """Every control token of the vocabulary by its text ("[TOOL_CALLS]": 9)."""
        return self.tokenizer.control_tokens

    def constraint_accepts(self, constraint: Constraint, tokens: Sequence[int]) -> bool:
        """Whether a reply of exactly `tokens` meets `constraint` (for tests and checks)."""
        return constraint_accepts(self._llama, self.vocab, constraint, self.control_tokens,
                                  list(tokens))

    @property
    def bos_token(self) -> str:
        return self.tokenizer.bos_token

    @property
    def eos_token(self) -> str:
        return self.tokenizer.eos_token

    # --- prompt layout -------------------------------------------------------------------

    def layout(self, prompt: Sequence[PromptPiece]) -> list[CacheItem]:
        """The prompt as the context will hold it: token ids and image spans."""
        items: list[CacheItem] = []
        for piece in prompt:
            if isinstance(piece, TokenRun):
                self.tokenizer.check(piece.ids)
                items.extend(piece.ids)
            else:
                if self.projector is None:
                    raise EngineError("this model was loaded without a vision projector; "
                                      "images need one (--mmproj, or `localsmall pull`)")
                items.extend(self.projector.prefix_tokens)
                items.append(ImageSpan(piece.image.key, piece.image.n_tokens))
                items.extend(self.projector.suffix_tokens)
        return items

    def count_tokens(self, prompt: Sequence[PromptPiece]) -> int:
        """Context positions a prompt needs."""
        return positions(self.layout(prompt))

    @property
    def n_ctx(self) -> int:
        return int(self._llama.llama_n_ctx(self.ctx))

    @property
    def reads_images_together(self) -> bool:
        """Whether an image turn's text and images share llama_decode calls (embed_read)."""
        return self._token_rows is not None

    @property
    def cached_positions(self) -> int:
        """Positions currently held in the KV cache."""
        return self.kv.n_past

    # --- evaluation ----------------------------------------------------------------------

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

    # --- generation ----------------------------------------------------------------------

    def generate(self, prompt: Sequence[PromptPiece], sampling: SamplingSettings,
                 on_progress: ProgressCallback | None = None) -> Generation:
        """Start a reply to `prompt`. Iterate the result for tokens; `.result` holds the
        text and stats so far (complete once iteration ends or the generation is closed).
        """
        generation = Generation(self, prompt, sampling, on_progress)
        self._live = weakref.ref(generation)
        return generation

    def _stream(self, prompt: Sequence[PromptPiece], sampling: SamplingSettings,
                on_progress: ProgressCallback | None,
                result: TurnResult) -> Generator[TokenEvent, None, None]:
        llama = self._llama
        turn_start = time.perf_counter()
        items = self.layout(prompt)
        self._check_workers()
        waited_s = self._await_ahead(on_progress)
        stats = replace(self._evaluate(items, prompt, on_progress), waited_s=waited_s)
        result.stats = stats
        sampler = sampler_chain(llama, self.tokenizer.n_tokens, sampling)
        constrained = None
        if sampling.constraint is not None:
            try:
                constrained = ConstrainedSampler(llama, self.vocab, sampler,
                                                 sampling.constraint, self.control_tokens)
            except BaseException:
                llama.llama_sampler_free(sampler)
                raise
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        greedy, n_vocab = plain_greedy(sampling), self.tokenizer.n_tokens
        stop: StopReason = ""
        first_token_at = 0.0
        gen_start = time.perf_counter()
        try:
            while True:
                if interrupt.take():  # Ctrl-C: the reply ends here, what came is kept
                    stop = "interrupted"
                    break
                token = (constrained.sample(self.ctx) if constrained is not None
                         else argmax_token(llama, self.ctx, n_vocab) if greedy
                         else llama.llama_sampler_sample(sampler, self.ctx, -1))
                if not result.token_ids:
                    first_token_at = time.perf_counter()
                    gen_start = first_token_at
                if self.tokenizer.is_end(token):
                    stop = "eos"
                    break
                text = decoder.decode(self.tokenizer.token_bytes(token))
                result.token_ids.append(token)
                result.text += text
                piece = self.tokenizer.token_piece(token) if self.tokenizer.is_control(token) \
                    else text
                yield TokenEvent(token, text, piece)
                if sampling.max_tokens is not None and len(result.token_ids) >= sampling.max_tokens:
                    stop = "length"
                    break
                if self.kv.n_past + 1 >= self.n_ctx:
                    stop = "context"
                    break
                try:
                    self._decode_tokens([token], logits_last=True)
                except KeyboardInterrupt:
                    stop = "interrupted"
                    if self._interrupted:
                        raise  # Engine.interrupt(): the caller (the server) sees it raised
                    break
        except (KeyboardInterrupt, GeneratorExit):
            stop = "interrupted"
            raise
        finally:
            tail = decoder.decode(b"", final=True)
            result.text += tail
            if constrained is not None:
                constrained.free()  # frees the chain too
            else:
                llama.llama_sampler_free(sampler)
            now = time.perf_counter()
            result.stats = replace(
                result.stats, generated_tokens=len(result.token_ids), stop_reason=stop,
                time_to_first_token_s=(first_token_at or now) - turn_start,
                generation_s=now - gen_start if result.token_ids else 0.0,
                context_used=self.kv.n_past, context_size=self.n_ctx)

    # --- reading ahead (engine.read_ahead) -------------------------------------------------

    def read_ahead(self, tokens: Sequence[int], *, label: str, save_to: Path | None = None,
                   on_done: Callable[[TurnStats, StateMeta | None], None] | None = None
                   ) -> None:
        """Read `tokens` into the cache in a background thread (after what the cache
        shares with them), then save the cache to `save_to` if given; `on_done` gets the
        read's stats and the saved state's description, in that thread, when the read
        was not cancelled. The next turn waits for it, showing its progress as `label`;
        anything else that touches the context cancels it first."""
        self.settle()
        self._check_workers()
        items = list(tokens)
        self.tokenizer.check(items)
        keep = self.kv.reusable(items)
        fingerprint = self.fingerprint if save_to else ""  # computed here, not in the thread

        def work(stop: threading.Event, progress: ProgressCallback
                 ) -> tuple[TurnStats, StateMeta | None]:
            self._stop = stop
            try:
                stats = self._evaluate(items, (), progress)
            finally:
                self._stop = None
            meta = (save_kv_state(self._llama, self.ctx, self.kv, save_to,
                                  fingerprint=fingerprint) if save_to else None)
            return stats, meta

        self._ahead = ReadAhead(work, label=label, total=positions(items[keep:]),
                                base=positions(items[:keep]), on_done=on_done)

    def ahead_positions(self) -> tuple[int, float]:
        """(positions a background read will still add to the cache, positions it
        still has to read: fewer, inside a batch); (0, 0) when none is running."""
        ahead = self._ahead
        if ahead is None or not ahead.running:
            return 0, 0.0
        return max(ahead.total - (self.kv.n_past - ahead.base), 0), ahead.left()

    @property
    def ahead_running(self) -> bool:
        return self._ahead is not None and self._ahead.running

    def stop_ahead(self) -> None:
        """Ask a background read to stop at its next graph node, without waiting (safe
        from any thread: a server shutting down while a request waits for the read)."""
        ahead = self._ahead
        if ahead is not None:
            ahead.stop.set()

    def settle(self) -> None:
        """Cancel a background read (if any) and wait for its thread: the context takes
        one llama.cpp call at a time."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.cancel()

    def wait_ahead(self, on_progress: ProgressCallback | None = None) -> TurnStats | None:
        """Wait for the background read to end (the server's start: requests wait for
        it) and return its stats; None when no read was started. Ctrl-C (the interrupt
        flag) cancels it and raises KeyboardInterrupt; the read's own failure is raised
        here."""
        ahead = self._ahead
        if ahead is None:
            return None
        self._await_ahead(on_progress)
        if ahead.failure is not None:
            raise ahead.failure
        return ahead.stats

    def _await_ahead(self, on_progress: ProgressCallback | None) -> float:
        """Wait for a background read before a turn (Ctrl-C cancels it and raises);
        returns the seconds waited."""
        ahead = self._ahead
        if ahead is None:
            return 0.0
        try:
            return ahead.wait(on_progress)
        finally:
            self._ahead = None

    # --- saved state ---------------------------------------------------------------------

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identity of everything a KV state depends on (model, projector, KV type,
        llama.cpp build)."""
        import llama_cpp

        s = self.settings
        return engine_fingerprint(Path(s.model_path), Path(s.mmproj_path) if s.mmproj_path
                                  else None, s.kv_type, llama_cpp.__version__)

    def save_state(self, path: Path) -> StateMeta:
        """Write the KV cache to `path` (atomically) and describe it, signed with this
        user's key (see engine.state)."""
        self.settle()
        return save_kv_state(self._llama, self.ctx, self.kv, path, fingerprint=self.fingerprint)

    def load_state(self, path: Path, meta: StateMeta) -> str | None:
        """Restore a KV cache saved by `save_state`: None when restored, else the reason it
        was refused (the cache is then empty and the chat is re-read)."""
        self.settle()
        return load_kv_state(self._llama, self.ctx, self.kv, path, meta,
                             fingerprint=self.fingerprint, n_ctx=self.n_ctx,
                             n_vocab=self.n_vocab, max_bytes=self._state_bound())

    def _state_bound(self) -> int:
        """The most bytes a state of this context can take: K and V of every position at
        4 bytes per value (no cache is wider), and room for llama.cpp's headers."""
        llama, m = self._llama, self.model
        per_position = 2 * 4 * llama.llama_model_n_layer(m) * max(
            llama.llama_model_n_embd(m), 1024)
        return per_position * self.n_ctx + (64 << 20)

    # --- lifetime ------------------------------------------------------------------------

    def _check_workers(self) -> None:
        """Before touching remote buffers: a worker that is gone would make llama.cpp
        abort the process, so say so while the caller can still keep its state."""
        if not self.settings.rpc_servers:
            return
        if self._rpc_lost:
            raise rpc.WorkerLostError("a worker was lost earlier in this session; restart "
                                      "it and start again")
        try:
            rpc.check_alive(self.settings.rpc_servers)
        except rpc.WorkerLostError:
            self._rpc_lost = True
            raise

    def close(self) -> None:
        """Free the projector, context and model (closing a reply still being generated
        first: its clean-up reads the context, which must not be freed under it)."""
        llama = self._llama
        if getattr(self, "_ahead", None) is not None:
            self.settle()
        ref = getattr(self, "_live", None)
        live = ref() if ref is not None else None
        if live is not None:
            live.close()
        self._live = None
        if getattr(self, "_rpc_lost", False):
            # Freeing remote buffers needs the lost worker (llama.cpp would abort):
            # leave them to the end of the process.
            self.projector = self._batch = self._embd_batch = self.ctx = self.model = None
            return
        if getattr(self, "projector", None) is not None:
            self.projector.close()  # type: ignore[union-attr]
            self.projector = None
        if getattr(self, "_batch", None) is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_embd_batch", None) is not None:
            llama.llama_batch_free(self._embd_batch)
            self._embd_batch = None
        if getattr(self, "ctx", None):
            llama.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Generation:
    """A reply being generated: iterate for `TokenEvent`s; `.result` fills as it goes."""

    def __init__(self, engine: Engine, prompt: Sequence[PromptPiece],
                 sampling: SamplingSettings, on_progress: ProgressCallback | None) -> None:
        self.result = TurnResult()
        self._events = engine._stream(prompt, sampling, on_progress, self.result)

    def __iter__(self) -> Iterator[TokenEvent]:
        return self._events

    def __next__(self) -> TokenEvent:
        return next(self._events)

    def close(self) -> None:
        """Stop generating (what was generated stays in the result and the cache)."""
        self._events.close()

    def run(self) -> TurnResult:
        """Generate to the end and return the result."""
        for _ in self._events:
            pass
        return self.result
