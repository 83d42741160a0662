"""Calibrating the planner's speeds: llama.cpp's own kernels timed on this machine.

For each ggml type, one decoder layer of the model's real width (calibration_model) is
loaded through the engine, so the engine's real weight placement (repacking, AMX, ...)
applies, and timed the way `localsmall bench` times a model (engine.timing): generation
one token at a time, prompt reading in one batch, with logits for every token (llama.cpp
runs the last layer's FFN only for the tokens that need logits, and here the last layer
is the only one). The median of a few short repetitions counts: on a quiet machine it is
the fastest run, on a busy one the typical run (what `localsmall bench` reports then).

The cost of the attention over cached positions is timed apart on a model with the real
heads and head size but narrow matrices (cheap to fill to a depth): generation and prompt
reading at an empty cache and at `depth`, the difference per position and layer. The
depth is deep enough that a layer's cache outgrows the core's own caches (as in a long
chat) and the difference stands well above the noise of a shared machine. (Checked with
benchmarks/depth_cost.py on 40 narrow layers at depth 4096: reading the cache "like the
weights", once per query head at the weights' bandwidth, was 1.8x too cheap for
generation; a prompt batch reads it far less often than once per query token, 5x
cheaper than that model.)
"""

from __future__ import annotations

import datetime as dt
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from localsmall.bench.calibration_model import LayerShape, write_calibration_model
from localsmall.engine.types import EngineSettings
from localsmall.plan.speed import (
    CALIBRATED_TYPES,
    Calibration,
    CalibrationProgress,
    KernelTiming,
    MachineKey,
    bytes_per_weight,
)


@dataclass(frozen=True)
class CalibrationRequest:
    """What to time. The defaults take seconds on a laptop at Mistral Small 3.2's width;
    tests pass a narrow `shape`."""

    shape: LayerShape
    types: Sequence[str] = CALIBRATED_TYPES
    n_threads: int | None = None
    n_prompt: int = 128
    n_gen: int = 12                 # single-token decodes timed (the fastest counts)
    repetitions: int = 3            # prompt batches timed (the fastest counts)
    depth: int = 2048               # cached positions for the attention timing
    attention_layers: int = 4
    attention_n_embd: int = 256     # narrow matrices: the attention model's prefill is cheap
    workdir: Path | None = None     # where the temporary GGUF files go (None: the temp dir)


def calibrate(request: CalibrationRequest, *, key: MachineKey,
              on_progress: CalibrationProgress | None = None) -> Calibration:
    """Time every type and the attention; the files written are deleted afterwards."""
    started = time.perf_counter()
    total = len(request.types) + 1
    report = on_progress or (lambda label, done, total: None)
    kernels: dict[str, KernelTiming] = {}
    with tempfile.TemporaryDirectory(prefix="localsmall-calibration-",
                                     dir=request.workdir) as tmp:
        overhead = _decode_overhead(Path(tmp), request)
        for i, qtype in enumerate(request.types):
            report(f"timing {qtype} kernels", i, total)
            n_layers = layers_beyond_cache(request.shape, qtype)
            path = write_calibration_model(Path(tmp) / f"{qtype}.gguf", shape=request.shape,
                                           qtype=qtype, n_layers=n_layers)
            gen, pp = _time_layer(path, request)
            path.unlink()
            gen, pp = gen - overhead, pp
            params = request.shape.layer_params * n_layers
            # the decode's fixed cost is paid once per token, not once per layer
            kernels[qtype] = KernelTiming(gen_s=max(gen, (gen + overhead) / 2) / params,
                                          pp_s=pp / params)
        report("timing attention over a filled context", len(request.types), total)
        attn_gen, attn_pp = _time_attention(Path(tmp) / "attention.gguf", request)
        # reading the cache can never beat reading it once per query head at the
        # weights' bandwidth (a timing that noise pushed below that)
        attn_gen = max(attn_gen, kv_read_seconds(kernels, request.shape))
    report("done", total, total)
    return Calibration(key=key, kernels=kernels, attn_gen_s=attn_gen, attn_pp_s=attn_pp,
                       n_prompt=request.n_prompt,
                       created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                       seconds=time.perf_counter() - started, gen_overhead_s=overhead)


MAX_CALIBRATION_LAYERS = 3


def last_level_cache() -> int:
    """Bytes of the CPU's largest cache (0: unknown), from Linux's sysfs."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best


def layers_beyond_cache(shape: LayerShape, qtype: str) -> int:
    """Layers the timed file holds: enough that its weights do not fit the CPU's last
    cache (a server's can hold a whole layer, which a real model never enjoys), at most
    MAX_CALIBRATION_LAYERS."""
    layer = shape.layer_params * (bytes_per_weight(qtype) or 1.0)
    need = int(1.5 * last_level_cache() // max(layer, 1.0)) + 1
    return max(1, min(need, MAX_CALIBRATION_LAYERS))


def _engine_settings(path: Path, request: CalibrationRequest, n_ctx: int) -> EngineSettings:
    return EngineSettings(model_path=path, n_ctx=max(256, -(-n_ctx // 256) * 256),
                          n_batch=max(request.n_prompt, 1), n_threads=request.n_threads)


def _time_layer(path: Path, request: CalibrationRequest) -> tuple[float, float]:
    """Best seconds per generated token and per prompt token of one layer."""
    from localsmall.engine.model import Engine
    from localsmall.engine.timing import DecodeTimer

    n = request.n_prompt + request.n_gen + 8
    with Engine(_engine_settings(path, request, n)) as engine, \
            DecodeTimer(engine, all_logits=True) as timer:
        timer.generate(1)  # warm-up: page in the weights, build the graph
        gen = statistics.median(timer.generate(1) for _ in range(request.n_gen))
        pp = []
        for _ in range(request.repetitions):
            timer.clear()
            pp.append(timer.prompt(request.n_prompt) / request.n_prompt)
    return gen, statistics.median(pp)


def _decode_overhead(tmp: Path, request: CalibrationRequest) -> float:
    """Seconds a generated token costs whatever the model's size (waking the threads,
    the graph, the call): narrow models of 1 and 4 layers give the cost of a layer's
    steps and what remains. A one-layer timing pays it once per layer; a model once per
    token."""
    from localsmall.engine.model import Engine
    from localsmall.engine.timing import DecodeTimer

    shape = request.shape
    narrow = LayerShape(request.attention_n_embd, shape.n_head, shape.n_head_kv,
                        shape.head_dim, 256)
    times = {}
    for n_layers in (1, 4):
        path = write_calibration_model(tmp / f"overhead{n_layers}.gguf", shape=narrow,
                                       qtype="Q8_0", n_layers=n_layers)
        with Engine(_engine_settings(path, request, request.n_gen + 8)) as engine, \
                DecodeTimer(engine) as timer:
            timer.generate(1)
            times[n_layers] = statistics.median(timer.generate(1)
                                                for _ in range(request.n_gen))
        path.unlink()
    per_layer = max(times[4] - times[1], 0.0) / 3
    return max(times[1] - per_layer, 0.0)


def _time_attention(path: Path, request: CalibrationRequest) -> tuple[float, float]:
    """Seconds per cached position and layer: for a generated token, and for each prompt
    token read in a batch."""
    from localsmall.engine.model import Engine
    from localsmall.engine.timing import DecodeTimer

    shape = request.shape
    narrow = LayerShape(request.attention_n_embd, shape.n_head, shape.n_head_kv,
                        shape.head_dim, 256)
    write_calibration_model(path, shape=narrow, qtype="Q8_0",
                            n_layers=request.attention_layers)
    depth, n_prompt = request.depth, request.n_prompt
    n_ctx = depth + max(n_prompt, request.n_gen + 1) + 8
    with Engine(_engine_settings(path, request, n_ctx)) as engine, \
            DecodeTimer(engine, all_logits=True) as timer:
        gen: dict[int, float] = {}
        pp: dict[int, float] = {}
        for at in (0, depth):
            timer.clear()
            timer.prefill(at)
            timer.generate(1)  # warm-up at this depth
            gen[at] = statistics.median(timer.generate(1) for _ in range(request.n_gen))
            pps = []
            for _ in range(request.repetitions):
                timer.clear()
                timer.prefill(at)
                pps.append(timer.prompt(n_prompt) / n_prompt)
            pp[at] = statistics.median(pps)
    per = max(depth * request.attention_layers, 1)
    return max(gen[depth] - gen[0], 0.0) / per, max(pp[depth] - pp[0], 0.0) / per


def kv_read_seconds(kernels: dict[str, KernelTiming], shape: LayerShape) -> float:
    """The least time for one query token to attend to one cached position of one layer:
    llama.cpp's CPU flash attention reads a position's K and V rows (f16) once per query
    head, at best at the bandwidth the fastest-reading weight type reached."""
    per_byte = min(t.gen_s / (bytes_per_weight(k) or 1.0) for k, t in kernels.items())
    return shape.n_head * shape.head_dim * 2 * 2 * per_byte
