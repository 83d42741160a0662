"""How fast a build will run here: from `localsmall bench` results for it, else from a
calibration of llama.cpp's kernels on this machine, else from assumed bandwidths.

A calibration (bench.calibrate) times one decoder layer of the model's real width per
ggml type, through the engine, for generation (batch 1) and for prompt reading (a
batch), and the extra cost of attending to cached positions. A build's time per token is
then the sum over its matrices of weights x seconds per weight of their type, plus the
output head, plus the attention over the cached context:

    generation:  sum(weights_t * gen_s[t]) + n_layers * depth * attn_gen_s
    prompt:      sum(weights_t * pp_n[t])  + n_layers * depth * attn_pp_s   (per token)

A batch of n prompt tokens reads each weight once and computes with it n times, so its
cost per token is pp_n = (gen_s + marginal * (n - 1)) / n, the marginal cost of a
token taken from the calibration's batch (pp_s at n_prompt tokens): small batches are
bound by reading the weights, large ones by computing.

A `localsmall bench` result for the same quant, machine and llama.cpp build replaces
the kernel terms (the attention term still moves it to other depths). GPUs and partial
offload keep the assumed-bandwidth model (plan.assumed): nothing can be measured there
without the hardware, so their speeds are labelled "estimated".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from localsmall.gguf_header import block_size
from localsmall.models.catalog import Quant
from localsmall.plan import quant_mix
from localsmall.plan.assumed import cpu_prompt_flops, decode_seconds
from localsmall.plan.hardware import Hardware
from localsmall.plan.memory import MemoryEstimate, RunShape, TextWeights

Source = Literal["measured", "calibrated", "estimated"]
# (label, done, total): a calibration step starting
CalibrationProgress = Callable[[str, int, int], None]
# Types a calibration times (the main and secondary types of every catalog build).
CALIBRATED_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
# llama.cpp's K-quant mixes give attn_v / ffn_down (and some layers) a larger type.
SECONDARY_TYPE = {"Q2_K": "Q4_K", "Q3_K": "Q5_K", "Q4_K": "Q6_K", "Q5_K": "Q6_K"}
# KV cache bytes per element relative to f16, which the attention terms were timed with.
# A catalog build takes llama.cpp's mix for its name when the mix's layer bytes are within
# this share of the build's (imatrix and "dynamic" builds of the same name may differ).
MIX_SIZE_TOLERANCE = 0.01
KV_SCALE = {"f16": 1.0, "bf16": 1.0, "f32": 2.0, "q8_0": 34 / 64, "q4_0": 18 / 64}


@dataclass(frozen=True)
class MachineKey:
    """What a speed depends on besides the build: the CPU, llama.cpp, device, threads."""

    cpu: str
    build: str       # llama-cpp-python's version and its libraries (see runtime.speeds)
    device: str      # "CPU"
    threads: int
    placement: str   # the engine's weight placement setting


@dataclass(frozen=True)
class KernelTiming:
    """Seconds per weight of one ggml type: for one generated token (batch 1), and per
    token of a prompt read in a batch."""

    gen_s: float
    pp_s: float


@dataclass(frozen=True)
class Calibration:
    """Kernel timings of this machine (see module docstring)."""

    key: MachineKey
    kernels: Mapping[str, KernelTiming]
    attn_gen_s: float     # seconds per cached position and layer, one generated token
    attn_pp_s: float      # ... per prompt token read in a batch
    n_prompt: int         # the batch the prompt timings used
    created: str
    seconds: float        # how long the calibration took
    gen_overhead_s: float = 0.0   # per generated token, whatever the model's size


@dataclass(frozen=True)
class MeasuredSpeed:
    """A `localsmall bench` result, kept for the planner."""

    key: MachineKey
    quant: str            # catalog quant name (or the file name)
    file: str
    size_bytes: int
    tg_tps: float | None
    pp_tps: float | None
    depth: int
    n_ctx: int
    kv_type: str
    gpu_layers: int
    created: str
    n_prompt: int = 512   # the prompt batch pp_tps was measured with


@dataclass(frozen=True)
class SpeedInputs:
    """What the planner knows about this machine's speed."""

    key: MachineKey | None = None
    calibration: Calibration | None = None
    measured: tuple[MeasuredSpeed, ...] = ()
    depth: int | None = None        # speeds "deep" at this depth (None: the whole context)
    min_speed: float | None = None  # generation tokens/s the plan must reach, when deep


@dataclass(frozen=True)
class Speed:
    """Predicted speeds of one option, at an empty context and at `depth`."""

    source: Source
    gen_tps: float
    pp_tps: float | None
    depth: int
    gen_tps_deep: float
    pp_tps_deep: float | None
    notes: tuple[str, ...] = field(default=())


NO_SPEED = Speed("estimated", 0.0, None, 0, 0.0, None)


def bytes_per_weight(ggml_type: str) -> float | None:
    """Bytes per weight of a ggml type by name (None: unknown to ggml)."""
    try:
        block, size = block_size(ggml_type)
    except KeyError:
        return None
    return size / block


def _layer_params(text: TextWeights) -> int:
    s = text.shape
    q, kv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    return 2 * s.n_embd * q + 2 * s.n_embd * kv + 3 * s.n_embd * s.n_ff


def weight_mix(text: TextWeights, quant: Quant | None) -> tuple[dict[str, float],
                                                                dict[str, float]]:
    """Weights per ggml type of the repeating layers and of the output head: from the
    file's tensor table, else the catalog's main type (its embedding's) topped up with
    the next larger type to match the build's size."""
    layers: dict[str, float] = {}
    output: dict[str, float] = {}
    for per_layer in text.layer_matrix_types:
        for kind, n_bytes in per_layer.items():
            bpw = bytes_per_weight(kind)
            if bpw:
                layers[kind] = layers.get(kind, 0.0) + n_bytes / bpw
    for kind, n_bytes in text.output_matrix_types.items():
        bpw = bytes_per_weight(kind)
        if bpw:
            output[kind] = output.get(kind, 0.0) + n_bytes / bpw
    if not layers:
        layers = _catalog_mix(text, quant)
    if not output:
        known = quant_mix.output_type(quant.quant) if quant else None
        kind = (quant.output_type if quant and quant.output_type else known or "Q6_K").upper()
        output = {kind: float(text.shape.n_vocab * text.shape.n_embd)}
    return layers, output


def _catalog_mix(text: TextWeights, quant: Quant | None) -> dict[str, float]:
    """Weights per type of a build not on disk: llama.cpp's mix for its quant name when
    that mix has the build's size (quant_mix), else the catalog's main type topped up
    with the next larger one to match the size."""
    params = float(_layer_params(text) * text.shape.n_layers)
    size = sum(text.layers)
    mix = quant_mix.layer_weights(quant.quant, text.shape) if quant else None
    if mix is not None:
        mix_bytes = sum(n * (bytes_per_weight(kind) or 0.0) for kind, n in mix.items())
        if abs(mix_bytes - size) <= MIX_SIZE_TOLERANCE * size:
            return mix
    main = (quant.embd_type if quant and quant.embd_type else "Q4_K").upper()
    return _mix_for(main, size / max(params, 1.0), params)


def _mix_for(main: str, bpw: float, params: float) -> dict[str, float]:
    second = SECONDARY_TYPE.get(main)
    main_bpw = bytes_per_weight(main) or bpw
    second_bpw = bytes_per_weight(second) if second else None
    if second is None or second_bpw is None or bpw <= main_bpw:
        return {main: params}
    share = min((bpw - main_bpw) / (second_bpw - main_bpw), 1.0)
    return {main: params * (1 - share), second: params * share}


def kernel(calibration: Calibration, ggml_type: str) -> KernelTiming:
    """The timing of a type; an uncalibrated one takes the calibrated type closest in
    size, scaled by bytes for generation (memory-bound)."""
    kernels = calibration.kernels
    if ggml_type in kernels:
        return kernels[ggml_type]
    bpw = bytes_per_weight(ggml_type) or 0.5625
    sized = [(abs((bytes_per_weight(k) or 0) - bpw), k) for k in kernels]
    _, nearest = min(sized)
    ratio = bpw / (bytes_per_weight(nearest) or bpw)
    return KernelTiming(kernels[nearest].gen_s * ratio, kernels[nearest].pp_s)


def marginal_per_weight(timing: KernelTiming, n_calibrated: int) -> float:
    """Seconds per weight of each prompt token in a batch beyond the one pass over the
    weights every batch makes (`gen_s`), from a batch of `n_calibrated` tokens."""
    if n_calibrated <= 1:
        return timing.pp_s
    return max((timing.pp_s * n_calibrated - timing.gen_s) / (n_calibrated - 1), 0.0)


def prompt_per_weight(timing: KernelTiming, n_calibrated: int, n_batch: int) -> float:
    """Seconds per weight and prompt token in a batch of `n_batch` (module docstring)."""
    if n_calibrated <= 1:
        return timing.pp_s
    marginal = marginal_per_weight(timing, n_calibrated)
    n = max(n_batch, 1)
    return (timing.gen_s + marginal * (n - 1)) / n


def _kernel_seconds(calibration: Calibration, mix: Mapping[str, float],
                    n_batch: int) -> tuple[float, float]:
    gen = pp = 0.0
    for kind, params in mix.items():
        timing = kernel(calibration, kind)
        gen += params * timing.gen_s
        pp += params * prompt_per_weight(timing, calibration.n_prompt, n_batch)
    return gen, pp


def predict(*, text: TextWeights, quant: Quant | None, memory: MemoryEstimate,
            hardware: Hardware, run: RunShape, inputs: SpeedInputs | None) -> Speed:
    """The speeds of one placed build (see module docstring)."""
    depth = run.n_ctx if inputs is None or inputs.depth is None else min(inputs.depth,
                                                                          run.n_ctx)
    on_cpu = memory.n_gpu_layers == 0
    if not on_cpu or inputs is None or inputs.calibration is None:
        measured = _measured(inputs, quant, run) if on_cpu else None
        return _estimated(text=text, memory=memory, hardware=hardware, run=run, depth=depth,
                          measured=measured, inputs=inputs)
    calibration = inputs.calibration
    n_layers = text.shape.n_layers
    kv = KV_SCALE.get(run.kv_type, 1.0)
    layers, output = weight_mix(text, quant)
    gen_layers, pp_layers = _kernel_seconds(calibration, layers, run.n_ubatch)
    gen_out, _ = _kernel_seconds(calibration, output, run.n_ubatch)
    gen0 = gen_layers + gen_out + calibration.gen_overhead_s
    pp0 = pp_layers + gen_out / max(run.n_ubatch, 1)  # logits for one token per batch
    source: Source = "calibrated"
    measured = _measured(inputs, quant, run)
    at_gen = at_pp = 0
    if measured is not None:
        source = "measured"
        if measured.tg_tps:
            gen0, at_gen = 1 / measured.tg_tps, measured.depth
        if measured.pp_tps:
            # measured with its own batch: moved to this run's by the calibration
            _, pp_then = _kernel_seconds(calibration, layers, min(measured.n_prompt,
                                                                  run.n_ubatch))
            pp0, at_pp = pp_layers / max(pp_then, 1e-30) / measured.pp_tps, measured.depth

    def gen_at(d: int) -> float:
        return 1 / max(gen0 + n_layers * (d - at_gen) * calibration.attn_gen_s * kv, 1e-9)

    def pp_at(d: int) -> float:
        return 1 / max(pp0 + n_layers * (d - at_pp) * calibration.attn_pp_s * kv, 1e-9)

    return Speed(source, gen_at(0), pp_at(0), depth, gen_at(depth), pp_at(depth))


def _measured(inputs: SpeedInputs | None, quant: Quant | None,
              run: RunShape) -> MeasuredSpeed | None:
    """The latest bench result for this quant, machine, build and KV type, CPU only."""
    if inputs is None or inputs.key is None or quant is None:
        return None
    found = [m for m in inputs.measured
             if m.key == inputs.key and m.quant.lower() == quant.quant.lower()
             and m.kv_type == run.kv_type and m.gpu_layers == 0]
    return max(found, key=lambda m: m.created) if found else None


def _estimated(*, text: TextWeights, memory: MemoryEstimate, hardware: Hardware,
               run: RunShape, depth: int, measured: MeasuredSpeed | None,
               inputs: SpeedInputs | None) -> Speed:
    """Assumed bandwidth (generation) and FLOP/s (prompt, CPU only): nothing measured
    on this machine for this placement, or no calibration to move a bench result."""
    share = depth / max(run.n_kv, 1)
    gen0 = decode_seconds(memory, text, hardware)
    gen_deep = decode_seconds(memory, text, hardware, kv_share=share)
    pp0 = pp_deep = None
    if memory.n_gpu_layers == 0:
        flops = cpu_prompt_flops(hardware)
        s = text.shape
        per_token = 2 * (_layer_params(text) * s.n_layers + s.n_vocab * s.n_embd / 512)
        attention = 4 * s.n_layers * s.n_head * s.head_dim * depth
        pp0, pp_deep = flops / per_token, flops / (per_token + attention)
    if measured is not None and measured.depth == 0:
        # A bench result at an empty context stands; the assumed KV cost moves it deeper.
        extra = gen_deep - gen0
        if measured.tg_tps:
            gen0 = 1 / measured.tg_tps
            gen_deep = gen0 + extra
        if measured.pp_tps and pp0 and pp_deep:
            pp_deep = 1 / (1 / measured.pp_tps + 1 / pp_deep - 1 / pp0)
            pp0 = measured.pp_tps
        return Speed("measured", _rate(gen0), pp0, depth, _rate(gen_deep), pp_deep)
    return Speed("estimated", _rate(gen0), pp0, depth, _rate(gen_deep), pp_deep)


def _rate(seconds: float) -> float:
    return 1 / seconds if seconds > 0 else 0.0
