"""Assumed speeds, for what cannot be measured on this machine (GPUs, partial offload,
and the CPU before a calibration): memory bandwidth for generation, FLOP/s for prompts.

Generation is memory-bandwidth bound: every generated token reads every weight once.
Assumed bandwidths (peak, GB/s; llama.cpp reaches about 60% of them): discrete GPUs by
model name (RTX 4090 1008, 3090 936, 4080 717, 4070 504, 3060 360, A100 1555-2039,
H100 3350, H200 4800, L4 300, ...) or by memory size when unknown (<= 8 GB 300,
<= 12 GB 450, <= 16 GB 600, <= 24 GB 900, larger 1500); Apple silicon by chip (M1 68,
M2/M3 100, M4 120, Pro 200, Max 400, Ultra 800); CPU RAM 50 (dual-channel DDR5), or 150
with more than 16 physical cores (multi-channel servers).
"""

from __future__ import annotations

from dataclasses import dataclass

from localsmall.plan.hardware import GpuDevice, Hardware
from localsmall.plan.memory import MemoryEstimate, TextWeights
from localsmall.units import GIB

BANDWIDTH_EFFICIENCY = 0.6      # share of peak bandwidth llama.cpp reaches when decoding

# name fragment -> peak GB/s; first match wins, so specific names come first
GPU_BANDWIDTH: tuple[tuple[str, float], ...] = (
    ("H200", 4800), ("H100", 3350), ("A100 80", 2039), ("A100", 1555), ("L40", 864),
    ("L4", 300), ("A6000", 768), ("5090", 1792), ("5080", 960), ("5070 Ti", 896),
    ("5070", 672), ("4090", 1008), ("4080", 717), ("4070 Ti", 504), ("4070", 504),
    ("4060 Ti", 288), ("4060", 272), ("3090", 936), ("3080", 760), ("3070", 448),
    ("3060", 360), ("2080", 448), ("7900 XTX", 960), ("7900", 800), ("7800", 624),
    ("6900", 512), ("6800", 512), ("MI300", 5300), ("MI250", 3200),
)
APPLE_BANDWIDTH: tuple[tuple[str, float], ...] = (
    ("Ultra", 800), ("M4 Max", 546), ("Max", 400), ("M4 Pro", 273), ("Pro", 200),
    ("M4", 120), ("M3", 100), ("M2", 100), ("M1", 68),
)


# --- speed --------------------------------------------------------------------------------


def gpu_bandwidth(gpu: GpuDevice) -> float:
    """Assumed peak bandwidth of a GPU in bytes/s (see the module docstring)."""
    table = APPLE_BANDWIDTH if gpu.backend.lower() == "metal" else GPU_BANDWIDTH
    for fragment, gbs in table:
        if fragment.lower() in gpu.description.lower():
            return gbs * 1e9
    if gpu.unified:
        return 100e9
    gib = gpu.memory_total / GIB
    for limit, gbs in ((8.5, 300), (12.5, 450), (16.5, 600), (24.5, 900)):
        if gib <= limit:
            return gbs * 1e9
    return 1500e9


def cpu_bandwidth(hardware: Hardware) -> float:
    """Assumed peak RAM bandwidth for the CPU, bytes/s."""
    apple = next((g for g in hardware.gpus if g.backend.lower() == "metal"), None)
    if apple is not None:
        return gpu_bandwidth(apple)
    return (150e9 if hardware.cpu.physical_cores > 16 else 50e9)


def decode_seconds(memory: MemoryEstimate, text: TextWeights, hardware: Hardware, *,
                   kv_share: float = 0.0) -> float:
    """Seconds per generated token when every token reads each device's weights once
    (the token embedding is only looked up, so it does not count) and `kv_share` of
    each device's KV cache (the share of the context already filled)."""
    seconds = 0.0
    gpus = {g.name: g for g in hardware.usable_gpus}
    for use in memory.devices:
        weights = use.weights - (text.token_embd if use.device == "CPU" else 0)
        bandwidth = gpu_bandwidth(gpus[use.device]) if use.device in gpus else cpu_bandwidth(
            hardware)
        seconds += (weights + use.kv * kv_share) / (bandwidth * BANDWIDTH_EFFICIENCY)
    return seconds


def tokens_per_second(memory: MemoryEstimate, text: TextWeights, hardware: Hardware) -> float:
    """Assumed decode speed at an empty context (see decode_seconds)."""
    seconds = decode_seconds(memory, text, hardware)
    return 1 / seconds if seconds > 0 else 0.0


# --- prompt speed -----------------------------------------------------------------------

# Reading a prompt is compute-bound: about 2 FLOPs per weight per token, at what
# llama.cpp's CPU kernels sustain per physical core with the best SIMD the CPU backend
# uses (rough figures; a session's measured speed replaces them after its first turn).
CPU_PROMPT_FLOPS: tuple[tuple[str, float], ...] = (
    ("amx", 130e9), ("avx512_vnni", 130e9), ("avx512", 100e9), ("avx_vnni", 60e9),
    ("avx2", 50e9), ("sve", 40e9), ("neon", 30e9))
CPU_PROMPT_FLOPS_DEFAULT = 20e9
VISION_EFFICIENCY = 0.5  # the F16 vision tower runs at about half the quantized text rate


@dataclass(frozen=True)
class PromptSpeed:
    """Estimated prompt reading and image encoding speeds on the CPU."""

    prompt_tps: float          # prompt tokens read per second
    image_tps: float           # image tokens encoded per second (0: no projector)


def cpu_prompt_flops(hardware: Hardware, n_threads: int | None = None) -> float:
    """FLOP/s llama.cpp sustains on this CPU while reading a prompt."""
    features = " ".join(hardware.cpu.features).lower()
    per_core = next((flops for name, flops in CPU_PROMPT_FLOPS if name in features),
                    CPU_PROMPT_FLOPS_DEFAULT)
    cores = max(1, hardware.cpu.physical_cores)
    return per_core * (min(n_threads, cores) if n_threads else cores)


def cpu_prompt_speed(hardware: Hardware, *, n_params: int, n_lookup_params: int = 0,
                     vision_params: int = 0, merge: int = 2,
                     n_threads: int | None = None) -> PromptSpeed:
    """Prompt and image speeds for a model of `n_params` weights (`n_lookup_params` of
    them only looked up: the token embedding) and a vision tower of `vision_params`
    whose image tokens each merge `merge` x `merge` patches."""
    flops = cpu_prompt_flops(hardware, n_threads)
    per_token = 2 * max(n_params - n_lookup_params, 1)
    per_image_token = 2 * vision_params * merge * merge
    return PromptSpeed(prompt_tps=flops / per_token,
                       image_tps=(flops * VISION_EFFICIENCY / per_image_token
                                  if vision_params else 0.0))
