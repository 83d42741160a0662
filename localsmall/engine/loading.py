"""Loading a model and creating its context (llama.cpp's `llama_model` and
`llama_context`), and describing what was loaded."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

from localsmall import interrupt
from localsmall.engine import native
from localsmall.engine.devices import cpu_has_amx_repack, supports_gpu_offload
from localsmall.engine.repack import REPACK_BUFT, RepackOverrides, repack_overrides
from localsmall.engine.types import (
    KV_CACHE_TYPES,
    EngineSettings,
    ModelInfo,
    Progress,
    ProgressCallback,
)
from localsmall.errors import EngineError, ModelLoadError

# On AMX CPUs, LOCALSMALL_WEIGHT_REPACK=auto routes repackable weights to CPU_REPACK
# (never AMX) when True; measured in benchmarks/weight_repack.py.
REPACK_ON_AMX = False


def load_model(llama: Any, settings: EngineSettings, on_progress: ProgressCallback | None,
               *, remote: tuple[int, ...] = ()) -> tuple[Any, str, RepackOverrides | None]:
    """The loaded model, a note when its weights are placed other than llama.cpp's
    default, and the buffer overrides that must live as long as the model.
    `remote`: RPC devices (ggml_backend_dev_t) that take the last n_gpu_layers layers,
    shared by settings.tensor_split; local GPUs are then left out."""
    params = llama.llama_model_default_params()
    params.n_gpu_layers = settings.n_gpu_layers
    overrides, repack_note = _weight_placement(params, settings, remote=bool(remote))

    def report(fraction: float, user_data: Any) -> bool:
        # A callback must never raise: Ctrl-C arrives as the interrupt flag (the caller
        # runs this inside interrupt.interrupting()), and a failing progress display is
        # skipped.
        try:
            if on_progress is not None:
                on_progress(Progress("load", int(fraction * 1000), 1000, "loading model"))
        except KeyboardInterrupt:  # raised by the progress display itself: keep it
            interrupt.request()
        except Exception:  # progress is best effort
            pass
        return not interrupt.requested()  # False makes llama.cpp stop loading

    callback = llama.llama_progress_callback(report)
    params.progress_callback = callback
    keep_alive = _offload_to(llama, params, remote, settings.tensor_split) if remote else None
    with interrupt.interrupting():
        model = llama.llama_model_load_from_file(str(settings.model_path).encode(), params)
    if interrupt.take():
        if model:
            llama.llama_model_free(model)
        raise KeyboardInterrupt
    if not model:
        raise ModelLoadError(
            f"llama.cpp could not load {settings.model_path}: not a GGUF model it "
            f"supports, or the file is damaged{native.last_error_suffix()}")
    del keep_alive  # llama.cpp copied the device list and the split while loading
    return model, repack_note, overrides


WEIGHT_REPACK_MODES = ("auto", "on", "off", "cpu_repack")


def _weight_placement(params: Any, settings: EngineSettings, *,
                      remote: bool) -> tuple[RepackOverrides | None, str]:
    """Set where llama.cpp puts quantized weights (LOCALSMALL_WEIGHT_REPACK): the
    CPU_REPACK overrides to keep alive with the model, and a note for ModelInfo."""
    placement = os.environ.get("LOCALSMALL_WEIGHT_REPACK", "auto").lower()
    if placement not in WEIGHT_REPACK_MODES:
        raise EngineError(f"LOCALSMALL_WEIGHT_REPACK must be {', '.join(WEIGHT_REPACK_MODES[:-1])}"
                          f" or {WEIGHT_REPACK_MODES[-1]}")
    if placement == "on" or (placement == "auto" and not cpu_has_amx_repack()):
        return None, ""  # llama.cpp's own choice
    # Quantized weights in llama.cpp's AMX buffer crash on batched decode
    # (llama.cpp #20824): extra buffer types stay off on such CPUs.
    params.use_extra_bufts = False
    why = " (AMX CPU)" if placement == "auto" else ""
    if placement == "off" or (placement == "auto" and not REPACK_ON_AMX):
        return None, "repacking off" + why
    # Overrides send weights to a CPU buffer: only when every layer stays on the CPU.
    if remote or (settings.n_gpu_layers != 0 and supports_gpu_offload()):
        return None, "repacking off" + why + " (layers offloaded)"
    overrides = repack_overrides(Path(settings.model_path))
    if overrides is None:
        return None, "repacking off" + why + " (no repackable weights)"
    params.tensor_buft_overrides = overrides.address
    return overrides, (f"{REPACK_BUFT} for {len(overrides.tensors)} matrices, "
                       f"AMX off" + why)


def placement_summary(*, amx: bool, mode: str | None = None) -> str:
    """One line on where quantized weights go on a CPU with (or without) the AMX buffer
    type, under LOCALSMALL_WEIGHT_REPACK (`mode`, default: the environment's)."""
    mode = (mode or os.environ.get("LOCALSMALL_WEIGHT_REPACK", "auto")).lower()
    if mode == "on" or (mode == "auto" and not amx):
        return "llama.cpp's default: repacked layouts where the CPU has them"
    if mode == "off":
        return "plain buffers, no repacking (LOCALSMALL_WEIGHT_REPACK=off)"
    if mode == "cpu_repack":
        return (f"{REPACK_BUFT} for the matrices it can multiply, AMX unused "
                f"(LOCALSMALL_WEIGHT_REPACK=cpu_repack)")
    if mode != "auto":
        return f"LOCALSMALL_WEIGHT_REPACK={mode} is not valid: use auto, on, off or cpu_repack"
    crash = "AMX CPU: its buffer crashes on batched decodes (llama.cpp #20824)"
    if REPACK_ON_AMX:
        return f"{REPACK_BUFT} for the matrices it can multiply, AMX unused ({crash})"
    return (f"plain buffers, no repacking ({crash}; {REPACK_BUFT} without AMX measured slower "
            f"for prompts on an AMX Xeon, benchmarks/weight_repack.py; "
            f"LOCALSMALL_WEIGHT_REPACK=cpu_repack uses it)")


def _offload_to(llama: Any, params: Any, devices: tuple[int, ...],
                split: tuple[float, ...]) -> tuple[Any, ...]:
    """Point the model params at these devices only (a NULL-terminated list) and their
    shares; returns the ctypes arrays, which must live until the model is loaded."""
    device_list = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
    params.devices = ctypes.addressof(device_list)
    if not split:
        return (device_list,)
    if len(split) != len(devices):
        raise EngineError(f"{len(split)} split shares for {len(devices)} remote devices")
    shares = (ctypes.c_float * max(int(llama.llama_max_devices()), len(split)))(*split)
    params.tensor_split = shares
    return device_list, shares


def flash_attn_type(llama: Any, settings: EngineSettings) -> int:
    """llama.cpp's flash attention setting for --flash-attn (None: auto)."""
    if settings.flash_attn is None:
        return int(llama.LLAMA_FLASH_ATTN_TYPE_AUTO)
    return int(llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn
               else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED)


def new_context(llama: Any, model: Any, settings: EngineSettings, n_threads: int) -> Any:
    """A context with the settings' size, batch, KV cache type and sequences."""
    s = settings
    params = llama.llama_context_default_params()
    # Never allocate more context than the model was trained for.
    params.n_ctx = min(s.n_ctx, llama.llama_model_n_ctx_train(model)) or s.n_ctx
    params.n_batch = s.n_batch
    params.n_ubatch = min(s.n_batch, 512)
    params.n_seq_max = max(s.n_seq, 1)
    if s.n_seq > 1:
        # Sequences share all n_ctx cells (each may grow to the whole context)
        # instead of splitting the context into n_seq fixed parts.
        params.kv_unified = True
    params.n_threads = params.n_threads_batch = n_threads
    params.flash_attn_type = flash_attn_type(llama, s)
    params.type_k = params.type_v = KV_CACHE_TYPES[s.kv_type].ggml_type
    params.no_perf = False
    ctx = llama.llama_init_from_model(model, params)
    if not ctx:
        hint = ""
        if KV_CACHE_TYPES[s.kv_type].quantized and s.flash_attn is False:
            hint = "; a quantized KV cache needs flash attention"
        raise ModelLoadError(
            f"llama.cpp could not create a context of {s.n_ctx} tokens for "
            f"{s.model_path}{hint}{native.last_error_suffix()}; try a smaller --ctx")
    return ctx


def meta_value(llama: Any, model: Any, key: str) -> str | None:
    """A GGUF metadata value of the loaded model, as text (None: not there)."""
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    if n < 0:
        return None
    if n >= len(buf):  # long values (chat templates): ask again with room
        buf = ctypes.create_string_buffer(n + 1)
        llama.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", errors="replace")


def model_info(llama: Any, model: Any, ctx: Any, settings: EngineSettings, *,
               has_vision: bool, repack_note: str) -> ModelInfo:
    """What was loaded: sizes, shape, chat template and where the weights went."""
    m = model
    desc = ctypes.create_string_buffer(256)
    llama.llama_model_desc(m, desc, len(desc))
    keys = ("general.name", "general.architecture", "general.file_type",
            "tokenizer.ggml.pre")
    metadata = {k: v for k in keys if (v := meta_value(llama, m, k)) is not None}
    vocab = llama.llama_model_get_vocab(m)
    return ModelInfo(
        path=Path(settings.model_path), description=desc.value.decode(),
        size_bytes=llama.llama_model_size(m), n_params=llama.llama_model_n_params(m),
        n_ctx_train=llama.llama_model_n_ctx_train(m), n_ctx=llama.llama_n_ctx(ctx),
        n_vocab=llama.llama_vocab_n_tokens(vocab), n_layers=llama.llama_model_n_layer(m),
        n_embd=llama.llama_model_n_embd(m),
        chat_template=meta_value(llama, m, "tokenizer.chat_template"),
        has_vision=has_vision, gpu_offload=bool(llama.llama_supports_gpu_offload()),
        n_gpu_layers=settings.n_gpu_layers, weight_buffers=repack_note or "default",
        metadata=metadata)
