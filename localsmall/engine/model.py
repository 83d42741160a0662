"""The engine: a loaded text model, its context and (optionally) its vision projector.

It evaluates prompts made of token runs and images and streams the reply. The context
keeps what it has read between turns: a new prompt evaluates only what follows the
longest prefix it shares with the cache (text compared by token, images by content),
so a follow-up question costs its own tokens, not the whole conversation.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import os
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from localsmall.engine import native
from localsmall.engine.buffers import BufferReport, parse_buffer_lines
from localsmall.engine.devices import cpu_has_amx_repack, default_threads
from localsmall.engine.kvcache import (
    CacheItem,
    ImageSpan,
    KvCache,
    common_prefix,
    items_from_json,
    items_to_json,
    positions,
)
from localsmall.engine.read_progress import ReadProgress
from localsmall.engine.state import StateMeta, engine_fingerprint, state_checksum
from localsmall.engine.types import (
    KV_TYPES,
    EngineSettings,
    ImageSlot,
    ModelInfo,
    Progress,
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
from localsmall.errors import ContextFullError, EngineError, ModelLoadError, ModelNotFoundError
from localsmall.fileio import atomic_path

_GGML_KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8, "bf16": 30}


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
        self._llama = native.llama()
        native.set_verbose(settings.verbose)
        self.n_threads = settings.n_threads or default_threads()
        self.repack_note = ""
        self.ctx: Any = None
        self.projector: Projector | None = None
        # llama.cpp reports every buffer it allocates in its log: keep those numbers.
        with native.capture_log() as log_lines:
            self.model = self._load_model(on_progress)
            self.vocab = self._llama.llama_model_get_vocab(self.model)
            try:
                native.take_graph_nodes()
                self.ctx = self._new_context()
                self._graph_nodes = native.take_graph_nodes()
                if settings.mmproj_path is not None:
                    self.projector = Projector(
                        Path(settings.mmproj_path), self.model,
                        n_embd=self._llama.llama_model_n_embd_inp(self.model),
                        n_threads=self.n_threads, use_gpu=settings.n_gpu_layers != 0,
                        flash_attn_type=self._flash_attn_type())
            except BaseException:
                self.close()
                raise
        self.buffers: tuple[BufferReport, ...] = parse_buffer_lines(log_lines)
        # One KV bookkeeping per llama.cpp sequence; `kv` is the one in use.
        self.sequences = tuple(KvCache(self._llama, self.ctx, seq)
                               for seq in range(max(settings.n_seq, 1)))
        self.kv = self.sequences[0]
        # Called when llama.cpp finds no free cell for a batch (several sequences share
        # the context): returns True once it made room, and the batch is tried again.
        self.on_cache_full: Callable[[], bool] | None = None
        self._interrupted = False
        self._reading: ReadProgress | None = None
        self._abort_cb = self._llama.ggml_abort_callback(self._should_abort)
        self._batch = self._llama.llama_batch_init(max(settings.n_batch, 1), 0, 1)
        self.info = self._model_info()

    # --- loading -------------------------------------------------------------------------

    def _load_model(self, on_progress: ProgressCallback | None) -> Any:
        llama = self._llama
        params = llama.llama_model_default_params()
        params.n_gpu_layers = self.settings.n_gpu_layers
        placement = os.environ.get("LOCALSMALL_WEIGHT_REPACK", "auto").lower()
        if placement not in ("auto", "on", "off"):
            raise EngineError("LOCALSMALL_WEIGHT_REPACK must be auto, on or off")
        if placement == "off" or (placement == "auto" and cpu_has_amx_repack()):
            # Quantized weights in llama.cpp's AMX buffer crash on batched decode
            # (llama.cpp #20824): keep weights in plain CPU buffers on such CPUs.
            params.use_extra_bufts = False
            self.repack_note = "repacking off" + (" (AMX CPU)" if placement == "auto" else "")

        interrupted = False

        def report(fraction: float, user_data: Any) -> bool:
            nonlocal interrupted
            try:
                if on_progress is not None:
                    on_progress(Progress("load", int(fraction * 1000), 1000, "loading model"))
            except KeyboardInterrupt:
                interrupted = True
            return not interrupted  # False makes llama.cpp stop loading

        callback = llama.llama_progress_callback(report)
        params.progress_callback = callback
        model = llama.llama_model_load_from_file(str(self.settings.model_path).encode(), params)
        if interrupted:
            if model:
                llama.llama_model_free(model)
            raise KeyboardInterrupt
        if not model:
            raise ModelLoadError(
                f"llama.cpp could not load {self.settings.model_path}: not a GGUF model it "
                f"supports, or the file is damaged{native.last_error_suffix()}")
        return model

    def _flash_attn_type(self) -> int:
        llama = self._llama
        if self.settings.flash_attn is None:
            return llama.LLAMA_FLASH_ATTN_TYPE_AUTO
        return (llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.settings.flash_attn
                else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED)

    def _new_context(self) -> Any:
        llama, s = self._llama, self.settings
        params = llama.llama_context_default_params()
        # Never allocate more context than the model was trained for.
        params.n_ctx = min(s.n_ctx, llama.llama_model_n_ctx_train(self.model)) or s.n_ctx
        params.n_batch = s.n_batch
        params.n_ubatch = min(s.n_batch, 512)
        params.n_seq_max = max(s.n_seq, 1)
        if s.n_seq > 1:
            # Sequences share all n_ctx cells (each may grow to the whole context)
            # instead of splitting the context into n_seq fixed parts.
            params.kv_unified = True
        params.n_threads = params.n_threads_batch = self.n_threads
        params.flash_attn_type = self._flash_attn_type()
        params.type_k = params.type_v = _GGML_KV_TYPES[s.kv_type]
        params.no_perf = False
        ctx = llama.llama_init_from_model(self.model, params)
        if not ctx:
            hint = ""
            if s.kv_type not in ("f16", "f32", "bf16") and s.flash_attn is False:
                hint = "; a quantized KV cache needs flash attention"
            raise ModelLoadError(
                f"llama.cpp could not create a context of {s.n_ctx} tokens for "
                f"{s.model_path}{hint}{native.last_error_suffix()}; try a smaller --ctx")
        return ctx

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = self._llama.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):  # long values (chat templates): ask again with room
            buf = ctypes.create_string_buffer(n + 1)
            self._llama.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def _model_info(self) -> ModelInfo:
        llama, m = self._llama, self.model
        desc = ctypes.create_string_buffer(256)
        llama.llama_model_desc(m, desc, len(desc))
        keys = ("general.name", "general.architecture", "general.file_type",
                "tokenizer.ggml.pre")
        metadata = {k: v for k in keys if (v := self._meta(k)) is not None}
        return ModelInfo(
            path=Path(self.settings.model_path), description=desc.value.decode(),
            size_bytes=llama.llama_model_size(m), n_params=llama.llama_model_n_params(m),
            n_ctx_train=llama.llama_model_n_ctx_train(m), n_ctx=llama.llama_n_ctx(self.ctx),
            n_vocab=llama.llama_vocab_n_tokens(self.vocab), n_layers=llama.llama_model_n_layer(m),
            n_embd=llama.llama_model_n_embd(m), chat_template=self._meta("tokenizer.chat_template"),
            has_vision=self.projector is not None,
            gpu_offload=bool(llama.llama_supports_gpu_offload()),
            n_gpu_layers=self.settings.n_gpu_layers,
            weight_buffers=self.repack_note or "default", metadata=metadata)

    # --- tokens --------------------------------------------------------------------------

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

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        """The bytes a token stands for (control tokens render only with special=True)."""
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

    # --- prompt layout -------------------------------------------------------------------

    def layout(self, prompt: Sequence[PromptPiece]) -> list[CacheItem]:
        """The prompt as the context will hold it: token ids and image spans."""
        items: list[CacheItem] = []
        for piece in prompt:
            if isinstance(piece, TokenRun):
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
    def cached_positions(self) -> int:
        """Positions currently held in the KV cache."""
        return self.kv.n_past

    # --- evaluation ----------------------------------------------------------------------

    def _should_abort(self, user_data: Any) -> bool:
        # Called by llama.cpp's CPU backend after each graph node while a prompt is read.
        try:
            if self._reading is not None:
                self._reading.node()
            return self._interrupted
        except KeyboardInterrupt:
            self._interrupted = True
            return True

    def interrupt(self) -> None:
        """Ask a prompt evaluation or generation running in another thread to stop: it
        raises KeyboardInterrupt at the next graph node or token."""
        self._interrupted = True

    def reset(self) -> None:
        """Empty the KV cache of the sequence in use."""
        self.kv.truncate(0)

    def use_sequence(self, seq_id: int) -> None:
        """Work on another sequence of the context (see EngineSettings.n_seq): prompts,
        generation and saved states then use its cache."""
        self.kv = self.sequences[seq_id]

    def reuse_estimate(self, prompt: Sequence[PromptPiece]) -> tuple[int, int]:
        """(positions reused from the cache, positions to evaluate) if `prompt` ran now."""
        items = self.layout(prompt)
        reused = positions(items[:self.kv.reusable(items)])
        return reused, positions(items) - reused

    def rollback(self, prompt: Sequence[PromptPiece]) -> None:
        """Drop the cached tail that `prompt` does not share (after /undo, for example),
        keeping the common prefix for the next turn."""
        keep = common_prefix(self.kv.items, self.layout(prompt))
        if keep < len(self.kv.items):
            self.kv.truncate(keep)

    def _decode_tokens(self, tokens: Sequence[int], logits_last: bool,
                       reading: ReadProgress | None = None) -> None:
        llama, batch = self._llama, self._batch
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
            status = llama.llama_decode(self.ctx, batch)
            while status == 1 and self.on_cache_full is not None and self.on_cache_full():
                status = llama.llama_decode(self.ctx, batch)
            if status == 2 or self._interrupted:
                raise KeyboardInterrupt
            if status != 0:
                raise EngineError(f"llama.cpp failed to evaluate the prompt (status {status})")
            self.kv.added(part)
            if reading is not None:
                reading.end_batch(len(part))

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
        reading = ReadProgress(total - self.kv.n_past, on_progress, self._graph_nodes)
        start = time.perf_counter()
        encode_s, encoded_count = 0.0, 0
        self._interrupted = False
        self._reading = reading
        self._llama.llama_set_abort_callback(self.ctx, self._abort_cb, None)
        try:
            rest = list(items[keep:])
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
                i += 1
        finally:
            self._reading = None
            self._llama.llama_set_abort_callback(self.ctx, self._abort_cb.__class__(), None)
        return replace(stats, evaluated_tokens=reading.todo, images_encoded=encoded_count,
                       image_encode_s=encode_s, prompt_eval_s=time.perf_counter() - start)

    def _read_image(self, image: Any, span: ImageSpan, reading: ReadProgress,
                    on_progress: ProgressCallback | None) -> float | None:
        """Encode (unless its embeddings are cached) and decode one image; returns the
        seconds spent encoding, or None when the cached embeddings were used."""
        assert self.projector is not None
        fresh = not self.projector.is_encoded(span.key)
        t0 = time.perf_counter()
        encoded = self.projector.encode(image, self._image_progress(on_progress, image))
        encode_s = time.perf_counter() - t0
        n_batch = self.settings.n_batch
        remaining = encoded.n_tokens

        def after_batch(n_tokens: int) -> int:
            nonlocal remaining
            remaining -= n_tokens
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

    @staticmethod
    def _image_progress(on_progress: ProgressCallback | None, image: Any) -> Any:
        if on_progress is None:
            return None
        label = f"encoding {Path(image.source).name}"
        return lambda done, total: on_progress(Progress("image", done, total, label))

    def logits_for(self, tokens: Sequence[int]) -> np.ndarray:
        """The next-token logits after `tokens`, evaluated from an empty cache
        (float32, one per vocabulary entry). For checking a model against a reference."""
        if not tokens:
            raise EngineError("logits_for needs at least one token")
        self.reset()
        self._decode_tokens(list(tokens), logits_last=True)
        n_vocab = self._llama.llama_vocab_n_tokens(self.vocab)
        logits = self._llama.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(n_vocab,)).copy()

    # --- generation ----------------------------------------------------------------------

    def _sampler(self, sampling: SamplingSettings) -> Any:
        llama = self._llama
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        add = llama.llama_sampler_chain_add
        if (sampling.repeat_penalty != 1.0 or sampling.presence_penalty
                or sampling.frequency_penalty):
            n_vocab = llama.llama_vocab_n_tokens(self.vocab)
            add(chain, llama.llama_sampler_init_penalties(
                n_vocab, 64, sampling.repeat_penalty, sampling.frequency_penalty,
                sampling.presence_penalty))
        if sampling.temperature <= 0:
            add(chain, llama.llama_sampler_init_greedy())
            return chain
        if sampling.top_k > 0:
            add(chain, llama.llama_sampler_init_top_k(sampling.top_k))
        if sampling.top_p < 1.0:
            add(chain, llama.llama_sampler_init_top_p(sampling.top_p, 1))
        if sampling.min_p > 0:
            add(chain, llama.llama_sampler_init_min_p(sampling.min_p, 1))
        add(chain, llama.llama_sampler_init_temp(sampling.temperature))
        seed = sampling.seed if sampling.seed is not None else 0xFFFFFFFF  # random
        add(chain, llama.llama_sampler_init_dist(seed))
        return chain

    def generate(self, prompt: Sequence[PromptPiece], sampling: SamplingSettings,
                 on_progress: ProgressCallback | None = None) -> Generation:
        """Start a reply to `prompt`. Iterate the result for tokens; `.result` holds the
        text and stats so far (complete once iteration ends or the generation is closed).
        """
        return Generation(self, prompt, sampling, on_progress)

    def _stream(self, prompt: Sequence[PromptPiece], sampling: SamplingSettings,
                on_progress: ProgressCallback | None,
                result: TurnResult) -> Generator[TokenEvent, None, None]:
        llama = self._llama
        turn_start = time.perf_counter()
        items = self.layout(prompt)
        stats = self._evaluate(items, prompt, on_progress)
        result.stats = stats
        sampler = self._sampler(sampling)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stop: StopReason = ""
        first_token_at = 0.0
        gen_start = time.perf_counter()
        try:
            while True:
                token = llama.llama_sampler_sample(sampler, self.ctx, -1)
                if not result.token_ids:
                    first_token_at = time.perf_counter()
                    gen_start = first_token_at
                if llama.llama_vocab_is_eog(self.vocab, token):
                    stop = "eos"
                    break
                text = decoder.decode(self.token_bytes(token))
                result.token_ids.append(token)
                result.text += text
                yield TokenEvent(token, text)
                if sampling.max_tokens is not None and len(result.token_ids) >= sampling.max_tokens:
                    stop = "length"
                    break
                if self.kv.n_past + 1 >= self.n_ctx:
                    stop = "context"
                    break
                self._decode_tokens([token], logits_last=True)
        except (KeyboardInterrupt, GeneratorExit):
            stop = "interrupted"
            raise
        finally:
            tail = decoder.decode(b"", final=True)
            result.text += tail
            llama.llama_sampler_free(sampler)
            now = time.perf_counter()
            result.stats = replace(
                result.stats, generated_tokens=len(result.token_ids), stop_reason=stop,
                time_to_first_token_s=(first_token_at or now) - turn_start,
                generation_s=now - gen_start if result.token_ids else 0.0,
                context_used=self.kv.n_past, context_size=self.n_ctx)

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
        """Write the KV cache to `path` (atomically) and describe it."""
        empty = (self._llama.llama_token * 1)()
        items = items_to_json(self.kv.items)
        with atomic_path(Path(path)) as tmp:
            written = self._llama.llama_state_seq_save_file(self.ctx, str(tmp).encode(),
                                                            self.kv.seq_id, empty, 0)
            if written == 0:
                raise EngineError(f"llama.cpp could not save the KV cache to {path}")
            checksum = state_checksum(tmp, items)
        return StateMeta(fingerprint=self.fingerprint, items=items, checksum=checksum,
                         n_pos=self.kv.n_past)

    def load_state(self, path: Path, meta: StateMeta) -> str | None:
        """Restore a KV cache saved by `save_state`. Returns None when it was restored, or
        the reason it was refused (the cache is then empty and the chat is re-read)."""
        reason = self._check_state(Path(path), meta)
        if reason is not None:
            return reason
        items = items_from_json(meta.items)
        if items is None or positions(items) != meta.n_pos:
            return "its description is damaged"
        self.reset()
        tokens = (self._llama.llama_token * 1)()
        count = ctypes.c_size_t(0)
        read = self._llama.llama_state_seq_load_file(self.ctx, str(path).encode(),
                                                     self.kv.seq_id, tokens, 1,
                                                     ctypes.byref(count))
        mem = self._llama.llama_get_memory(self.ctx)
        seq = self.kv.seq_id
        if read == 0 or self._llama.llama_memory_seq_pos_max(mem, seq) != meta.n_pos - 1:
            self._llama.llama_memory_seq_rm(mem, self.kv.seq_id, -1, -1)
            return "llama.cpp could not read it"
        self.kv.restored(items, meta.n_pos)
        return None

    def _check_state(self, path: Path, meta: StateMeta) -> str | None:
        if meta.fingerprint != self.fingerprint:
            return "it was saved with another model, projector, KV cache type or llama.cpp"
        if not path.is_file():
            return "the state file is missing"
        if meta.n_pos >= self.n_ctx:
            return f"it holds {meta.n_pos} tokens, more than this {self.n_ctx}-token context"
        if state_checksum(path, meta.items) != meta.checksum:
            return "the state file or its description is damaged"
        return None

    # --- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Free the projector, context and model."""
        llama = self._llama
        if getattr(self, "projector", None) is not None:
            self.projector.close()  # type: ignore[union-attr]
            self.projector = None
        if getattr(self, "_batch", None) is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
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
