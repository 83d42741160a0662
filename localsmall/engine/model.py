"""The engine: a loaded text model, its context and (optionally) its vision projector.

It evaluates prompts made of token runs and images and streams the reply. The context
keeps what it has read between turns: a new prompt evaluates only what follows the
longest prefix it shares with the cache (text compared by token, images by content),
so a follow-up question costs its own tokens, not the whole conversation.

This module is `Engine`'s public face: loading, tokens, prompt layout, saved state and
lifetime. Its other jobs are parts it inherits (see engine.parts): prompt evaluation
(engine.evaluation), the token loop and `Generation` (engine.generation) and reading
ahead (engine.read_ahead).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from localsmall import interrupt
from localsmall.engine import native, rpc
from localsmall.engine.buffers import BufferReport, parse_buffer_lines
from localsmall.engine.constrain import constraint_accepts
from localsmall.engine.devices import default_threads
from localsmall.engine.embed_read import TokenEmbeddings
from localsmall.engine.evaluation import PromptEvaluation
from localsmall.engine.generation import Generation, TokenGeneration
from localsmall.engine.kvcache import CacheItem, ImageSpan, KvCache, positions
from localsmall.engine.loading import flash_attn_type, load_model, model_info, new_context
from localsmall.engine.read_ahead import ReadAhead, ReadingAhead
from localsmall.engine.read_progress import CALLBACK_SHARE, ReadProgress
from localsmall.engine.repack import RepackOverrides
from localsmall.engine.state import StateMeta, engine_fingerprint, load_kv_state, save_kv_state
from localsmall.engine.tokenizer import Tokenizer
from localsmall.engine.types import (
    KV_TYPES,
    Constraint,
    EngineSettings,
    ProgressCallback,
    PromptPiece,
    TokenRun,
)
from localsmall.engine.vision import Projector
from localsmall.errors import EngineError, ModelNotFoundError

__all__ = ["Engine", "Generation"]


class Engine(PromptEvaluation, TokenGeneration, ReadingAhead):
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
