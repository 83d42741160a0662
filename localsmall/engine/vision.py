"""The vision projector (libmtmd): images in, embeddings out, embeddings into the context.

Encoding an image with the real 24B model's Pixtral tower takes seconds to minutes on
a CPU, so this module reports per-layer progress (through ggml's eval callback on the
projector's graph), lets Ctrl-C abort it, and keeps the embeddings of recent images so
an image is encoded once per conversation even when the context is re-read.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from localsmall import interrupt
from localsmall.engine import native
from localsmall.errors import EngineError, ModelLoadError
from localsmall.gguf_header import read_header
from localsmall.images import PreparedImage

log = logging.getLogger(__name__)

EMBEDDING_CACHE_SIZE = 8  # images whose embeddings stay in memory


@dataclass
class EncodedImage:
    """An image's mtmd chunk (needed to decode it) and its embeddings."""

    chunk: Any              # mtmd_input_chunk*, owned
    embeddings: np.ndarray  # float32 [n_tokens, n_embd]
    n_tokens: int
    n_pos: int
    encode_s: float


@cache
def _ggml_get_name() -> Any:
    lib = ctypes.CDLL(str(Path(native.lib_dir()) / "libggml-base.so"))
    fn = lib.ggml_get_name
    fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_char_p
    return fn


@dataclass(frozen=True)
class _ProjectorFacts:
    """What the projector's file tells beyond what mtmd exposes."""

    n_layers: int                    # vision blocks, for per-layer progress
    img_break: np.ndarray | None     # the [IMG_BREAK] embedding the graph inserts


def _read_facts(path: Path) -> _ProjectorFacts:
    try:
        header = read_header(path)
    except ModelLoadError:
        return _ProjectorFacts(0, None)  # mtmd reports the real problem when it loads
    n_layers = int(header.metadata.get("clip.vision.block_count", 0) or 0)
    try:
        info = header.tensor("v.token_embd.img_break")
    except KeyError:
        return _ProjectorFacts(n_layers, None)
    dtypes = {"F32": np.float32, "F16": np.float16}
    if info.type not in dtypes:
        return _ProjectorFacts(n_layers, None)
    dtype = dtypes[info.type]
    row = np.fromfile(path, dtype, count=info.n_bytes // np.dtype(dtype).itemsize,
                      offset=info.offset)
    return _ProjectorFacts(n_layers, row.astype(np.float32))


class Projector:
    """An mtmd context for one projector file, bound to a loaded text model."""

    def __init__(self, path: Path, model: Any, *, n_embd: int, n_threads: int,
                 use_gpu: bool, flash_attn_type: int) -> None:
        mtmd = native.mtmd()
        self._mtmd = mtmd
        self.path = path
        self.n_embd = n_embd
        facts = _read_facts(path)
        self.n_layers = facts.n_layers
        self._img_break = facts.img_break
        self._progress: Callable[[int, int], None] | None = None
        self._cb_eval = native.llama().ggml_backend_sched_eval_callback(self._on_eval)

        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = False
        params.flash_attn_type = flash_attn_type
        params.warmup = True
        params.cb_eval = self._cb_eval
        ctx = mtmd.mtmd_init_from_file(str(path).encode(), model, params)
        if not ctx:
            raise ModelLoadError(
                f"llama.cpp could not load the vision projector {path}: it is not an mmproj "
                f"GGUF for this model, or it is damaged{native.last_error_suffix()}")
        self.ctx = ctx
        if not mtmd.mtmd_support_vision(ctx):
            self.close()
            raise ModelLoadError(f"{path} is a projector without a vision encoder")
        self._embeddings: OrderedDict[str, EncodedImage] = OrderedDict()
        # plain: image positions are sequential and causal like text (Pixtral), so an
        # image's embeddings may share llama_decode batches with text (engine.embed_read).
        self.plain = False
        self.prefix_tokens, self.suffix_tokens = self._probe_layout()

    # --- progress and interruption during the encoder's graph --------------------------

    def _on_eval(self, tensor: int, ask: bool, user_data: int) -> bool:
        # A callback must never raise (ctypes would swallow it): Ctrl-C arrives as the
        # interrupt flag, and a failing progress display is skipped.
        try:
            name = _ggml_get_name()(tensor) or b""
            if ask:
                # Ask for the data of each layer's output: the scheduler then stops there,
                # which is where progress is reported and an abort can happen.
                return name.startswith(b"layer_out-")
            if self._progress is not None and self.n_layers:
                layer = int(name.split(b"-")[1].split(b" ")[0])
                self._progress(layer + 1, self.n_layers)
        except KeyboardInterrupt:  # raised by the progress display itself: keep it
            interrupt.request()
        except Exception:  # progress is best effort
            pass
        return not interrupt.requested()

    # --- images ------------------------------------------------------------------------

    def _tokenize(self, image: PreparedImage) -> tuple[list[int], Any, list[int]]:
        """mtmd's tokenization of one image: text before, the image chunk (a copy we
        own), text after ([IMG_END] for Pixtral)."""
        mtmd = self._mtmd
        data = (ctypes.c_uint8 * len(image.rgb)).from_buffer_copy(image.rgb)
        bitmap = mtmd.mtmd_bitmap_init(image.width, image.height, data)
        if not bitmap:
            raise EngineError(f"{image.source}: llama.cpp could not take the image")
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            marker = mtmd.mtmd_default_marker()
            text = mtmd.mtmd_input_text()
            text.text, text.text_len = marker, len(marker)
            text.add_special, text.parse_special = False, True
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise EngineError(f"{image.source}: llama.cpp could not tokenize the image")
            before: list[int] = []
            after: list[int] = []
            image_chunk = None
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    (after if image_chunk is not None else before).extend(
                        ptr[j] for j in range(n.value))
                else:
                    image_chunk = mtmd.mtmd_input_chunk_copy(chunk)
            if image_chunk is None:
                raise EngineError("the projector produced no image chunk")
            return before, image_chunk, after
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)

    def _probe_layout(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Tokenize a small image once to learn the text mtmd puts around an image and
        to check that the prompt's token count for images matches llama.cpp's."""
        from localsmall.images import GRID, PreparedImage

        w, h = 4 * GRID, 3 * GRID
        probe = PreparedImage(key="probe", width=w, height=h, rgb=bytes(w * h * 3),
                              source="probe", original_size=(w, h))
        before, chunk, after = self._tokenize(probe)
        mtmd = self._mtmd
        try:
            n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            self.plain = (not mtmd.mtmd_decode_use_mrope(self.ctx)
                          and not mtmd.mtmd_decode_use_non_causal(self.ctx, chunk)
                          and mtmd.mtmd_input_chunk_get_n_pos(chunk) == n_tokens)
        finally:
            self._mtmd.mtmd_input_chunk_free(chunk)
        if n_tokens != probe.n_tokens:
            raise ModelLoadError(
                f"{self.path}: unexpected image layout ({n_tokens} tokens for a 4x3 grid); "
                "is this a Mistral Small 3.x (Pixtral) projector?")
        return tuple(before), tuple(after)

    def encode(self, image: PreparedImage,
               on_progress: Callable[[int, int], None] | None = None) -> EncodedImage:
        """The image's embeddings, from memory when it was encoded before."""
        cached = self._embeddings.get(image.key)
        if cached is not None:
            self._embeddings.move_to_end(image.key)
            return cached
        _, chunk, _ = self._tokenize(image)
        start = time.perf_counter()
        try:
            embeddings = self._run_encoder(chunk, image, on_progress)
            if not np.isfinite(embeddings).all():
                # Non-finite values come from stale memory in llama.cpp's compute
                # buffers: a second run starts from the first one's finite values.
                embeddings = self._run_encoder(chunk, image, on_progress)
            if not np.isfinite(embeddings).all():
                raise EngineError(f"{image.source}: the vision encoder produced invalid "
                                  "values; try again, or use another projector file")
        except BaseException:
            self._mtmd.mtmd_input_chunk_free(chunk)
            raise
        encoded = EncodedImage(chunk=chunk, embeddings=embeddings,
                               n_tokens=embeddings.shape[0],
                               n_pos=self._mtmd.mtmd_input_chunk_get_n_pos(chunk),
                               encode_s=time.perf_counter() - start)
        self._remember(image.key, encoded)
        return encoded

    def _run_encoder(self, chunk: Any, image: PreparedImage,
                     on_progress: Callable[[int, int], None] | None) -> np.ndarray:
        """One pass of the vision tower over a chunk: [n_tokens, n_embd] float32."""
        mtmd = self._mtmd
        self._progress = on_progress
        try:
            with interrupt.interrupting():
                status = mtmd.mtmd_encode_chunk(self.ctx, chunk)
        finally:
            self._progress = None
        interrupt.raise_if_requested()
        if status != 0:
            raise EngineError(f"{image.source}: the vision encoder failed (status {status})")
        n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        out = mtmd.mtmd_get_output_embd(self.ctx)
        flat = np.ctypeslib.as_array(out, shape=(n_tokens * self.n_embd,)).copy()
        embeddings = flat.reshape(n_tokens, self.n_embd)
        self._write_breaks(embeddings, image)
        return embeddings

    def _write_breaks(self, embeddings: np.ndarray, image: PreparedImage) -> None:
        """Set the [IMG_BREAK] rows (one after each row of patches but the last) to the
        embedding stored in the projector file.

        llama.cpp's Pixtral graph makes these rows from a fresh, uninitialised tensor
        scaled by zero, then adds the embedding. When that memory still holds inf or NaN
        from an earlier graph, 0 x inf = NaN poisons the rows, and through the KV cache
        every later answer. Written from the file they are exact whatever the memory held
        (when nothing went wrong they are already bit-identical)."""
        cols, rows = image.grid
        if (self._img_break is None or self._img_break.size != embeddings.shape[1]
                or embeddings.shape[0] != cols * rows + rows - 1):
            return
        breaks = [(row + 1) * (cols + 1) - 1 for row in range(rows - 1)]
        embeddings[breaks] = self._img_break

    def _remember(self, key: str, encoded: EncodedImage) -> None:
        self._embeddings[key] = encoded
        while len(self._embeddings) > EMBEDDING_CACHE_SIZE:
            _, old = self._embeddings.popitem(last=False)
            self._mtmd.mtmd_input_chunk_free(old.chunk)

    def is_encoded(self, key: str) -> bool:
        """Whether an image's embeddings are in memory."""
        return key in self._embeddings

    def decode(self, lctx: Any, encoded: EncodedImage, n_past: int, n_batch: int,
               on_batch: Callable[[int], int], *, seq_id: int = 0) -> int:
        """Feed an encoded image into the context at position `n_past`; returns the next
        position. `on_batch(n_tokens)` runs after each batch; non-zero aborts."""
        mtmd = self._mtmd
        llama = native.llama()

        def after_batch(view: Any, user_data: Any) -> int:
            # Never raises (see _on_eval); non-zero stops mtmd's decoding.
            if interrupt.requested():
                return 1
            try:
                return on_batch(int(view.contents.n_tokens))
            except KeyboardInterrupt:
                interrupt.request()
                return 1
            except Exception:  # progress is best effort
                return 0

        callback = mtmd.mtmd_helper_post_decode_callback(after_batch)
        new_n_past = llama.llama_pos(0)
        embd = encoded.embeddings
        with interrupt.interrupting():
            status = mtmd.mtmd_helper_decode_image_chunk(
                self.ctx, lctx, encoded.chunk,
                embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                n_past, seq_id, n_batch, ctypes.byref(new_n_past), callback, None)
        interrupt.raise_if_requested()
        if status != 0:
            raise EngineError(f"llama.cpp failed to read an image into the context ({status})")
        return int(new_n_past.value)

    def forget(self) -> None:
        """Drop every cached embedding."""
        while self._embeddings:
            _, old = self._embeddings.popitem()
            self._mtmd.mtmd_input_chunk_free(old.chunk)

    def close(self) -> None:
        """Free the mtmd context and cached chunks."""
        if getattr(self, "ctx", None):
            if hasattr(self, "_embeddings"):
                self.forget()
            self._mtmd.mtmd_free(self.ctx)
            self.ctx = None
