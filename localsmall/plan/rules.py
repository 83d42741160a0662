"""Choosing the build, context and GPU layers for a machine: pure functions over a
`Hardware` snapshot and the memory model (plan.memory).

The rules, in order (each step keeps the highest-quality quant it can):
1. Fully on the GPU: quants close to the original (KL divergence <= 0.03: Q4_K_S and
   up), best first; a quant may halve the requested context (default the catalog's 32K)
   once before a lower quant is tried: quality beats a long context, up to a point.
2. Fully on the GPU again, now shrinking the context by halves down to the catalog's
   floor (min_context): a fast short-context chat beats a slow long one.
3. Split between GPU and RAM (the last layers on the GPU): the best quant up to the
   catalog's default, at the largest context that fits. Bigger quants are not split:
   most of their layers would run at CPU speed.
4. CPU only, within available RAM: same choice as 3.
5. Lossy quants (Q3_K_M, Q2_K) anywhere, GPU first.
6. The same again without the vision projector (images off), then "won't fit", naming
   the smallest build and what it would need.
A context the user gave is never shrunk; a quant the user named runs wherever it fits.

Speed estimates are memory-bandwidth bound: every generated token reads every weight
once. Assumed bandwidths (peak, GB/s; llama.cpp reaches about 60% of them):
discrete GPUs by model name (RTX 4090 1008, 3090 936, 4080 717, 4070 504, 3060 360,
A100 1555-2039, H100 3350, H200 4800, L4 300, ...) or by memory size when unknown
(<= 8 GB 300, <= 12 GB 450, <= 16 GB 600, <= 24 GB 900, larger 1500); Apple silicon
by chip (M1 68, M2/M3 100, M4 120, Pro 200, Max 400, Ultra 800); CPU RAM 50 (dual-
channel DDR5), or 150 with more than 16 physical cores (multi-channel servers).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from localsmall.models.catalog import Model, Quant
from localsmall.plan.hardware import GpuDevice, Hardware
from localsmall.plan.memory import (
    MemoryEstimate,
    RunShape,
    TextWeights,
    VisionWeights,
    estimate,
    text_weights_from_catalog,
    vision_weights_from_catalog,
)
from localsmall.units import GIB, gib_fixed

MIB = 1024**2
GPU_RESERVE_MIN = 512 * MIB     # CUDA/Metal context, cuBLAS workspace, the backend's pool
GPU_RESERVE_SHARE = 0.05        # ... or this share of the device, whichever is larger
RAM_RESERVE = 1 * GIB           # the OS, this process, llama.cpp's CPU work buffers
CLOSE_KLD = 0.03                # "close to the original": eligible to shrink the context
BANDWIDTH_EFFICIENCY = 0.6      # share of peak bandwidth llama.cpp reaches when decoding

Where = Literal["gpu", "split", "cpu", "none"]
WHERE_LABELS: dict[str, str] = {"gpu": "GPU", "split": "GPU + CPU", "cpu": "CPU",
                                "none": "does not fit"}

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


@dataclass(frozen=True)
class QuantOption:
    """How one build would run on this machine."""

    quant: str
    where: Where
    n_ctx: int
    n_gpu_layers: int          # for llama.cpp (the output head counts as a layer)
    gpu_layers: int            # repeating layers on the GPU(s)
    n_layers: int
    gpu_bytes: int
    ram_bytes: int
    size: int                  # file size
    tokens_per_s: float
    quality: int
    kld: float
    vision: bool
    exact: bool                # sizes from the local file's tensor table
    memory: MemoryEstimate | None = field(default=None, compare=False, repr=False)

    @property
    def fits(self) -> bool:
        return self.where != "none"


@dataclass(frozen=True)
class Plan:
    """The chosen build (None when nothing fits), every option, and why."""

    model_id: str
    choice: QuantOption | None
    options: tuple[QuantOption, ...]
    requested_ctx: int
    kv_type: str
    reason: str


@dataclass(frozen=True)
class Budget:
    """What may be allocated: per GPU, in RAM, and (unified memory) in both together."""

    gpus: tuple[int, ...]
    gpu_names: tuple[str, ...]
    split: tuple[float, ...]
    ram: int
    unified: bool

    def allows(self, memory: MemoryEstimate) -> bool:
        if memory.ram > self.ram:
            return False
        if self.unified and memory.total > self.ram:
            return False
        return all(memory.on(name).total <= cap for name, cap in zip(self.gpu_names, self.gpus,
                                                                        strict=True))


def budget_for(hardware: Hardware) -> Budget:
    """Usable memory after safety margins."""
    gpus = hardware.usable_gpus
    ram = max(hardware.ram_available - RAM_RESERVE, 0)
    caps = tuple(max(g.memory_free - max(GPU_RESERVE_MIN, int(g.memory_total * GPU_RESERVE_SHARE)),
                     0) for g in gpus)
    return Budget(gpus=caps, gpu_names=tuple(g.name for g in gpus),
                  split=tuple(float(max(g.memory_free, 1)) for g in gpus), ram=ram,
                  unified=hardware.unified_memory)


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


def tokens_per_second(memory: MemoryEstimate, text: TextWeights, hardware: Hardware) -> float:
    """Decode speed when every token reads each device's weights once (the token
    embedding is only looked up, so it does not count)."""
    seconds = 0.0
    gpus = {g.name: g for g in hardware.usable_gpus}
    for use in memory.devices:
        weights = use.weights - (text.token_embd if use.device == "CPU" else 0)
        bandwidth = gpu_bandwidth(gpus[use.device]) if use.device in gpus else cpu_bandwidth(
            hardware)
        seconds += weights / (bandwidth * BANDWIDTH_EFFICIENCY)
    return 1 / seconds if seconds > 0 else 0.0


# --- placing one build ----------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One build with its sizes (from the catalog or from the local file)."""

    quant: Quant
    text: TextWeights
    vision: VisionWeights | None


def place(candidate: Candidate, run: RunShape, hardware: Hardware, budget: Budget,
          *, n_gpu_layers: int | None = None) -> QuantOption:
    """The best placement of one build at one context: all on the GPU, else as many of
    the last layers as fit, else CPU only, else "none" (with the CPU-only needs)."""
    n_layers = candidate.text.shape.n_layers

    def at(ngl: int) -> MemoryEstimate:
        return estimate(candidate.text, run, n_gpu_layers=ngl, gpus=budget.gpu_names,
                        split=budget.split, vision=candidate.vision)

    if n_gpu_layers is not None:
        forced = at(n_gpu_layers)
        return _option(candidate, run, forced, hardware, budget.allows(forced))
    if budget.gpu_names:
        for ngl in range(n_layers + 1, 0, -1):
            memory = at(ngl)
            if budget.allows(memory):
                return _option(candidate, run, memory, hardware, True)
            if memory.ram > budget.ram:
                break  # fewer GPU layers only needs more RAM
    cpu = at(0)
    return _option(candidate, run, cpu, hardware, budget.allows(cpu))


def _option(candidate: Candidate, run: RunShape, memory: MemoryEstimate, hardware: Hardware,
            fits: bool) -> QuantOption:
    n_layers = candidate.text.shape.n_layers
    where: Where = "none"
    if fits:
        where = ("gpu" if memory.gpu_layer_count == n_layers and memory.n_gpu_layers > n_layers
                 else "split" if memory.n_gpu_layers else "cpu")
    quant = candidate.quant
    return QuantOption(
        quant=quant.quant, where=where, n_ctx=run.n_ctx, n_gpu_layers=memory.n_gpu_layers,
        gpu_layers=memory.gpu_layer_count, n_layers=n_layers, gpu_bytes=memory.gpu,
        ram_bytes=memory.ram, size=quant.remote.size,
        tokens_per_s=tokens_per_second(memory, candidate.text, hardware) if fits else 0.0,
        quality=quant.quality, kld=quant.kld, vision=candidate.vision is not None,
        exact=candidate.text.exact, memory=memory)


# --- choosing ---------------------------------------------------------------------------


def context_steps(model: Model, requested: int, fixed: bool) -> list[int]:
    """The contexts to try: the requested one, then halves down to the catalog floor."""
    steps = [min(requested, model.context_length)]
    while not fixed and steps[-1] // 2 >= model.min_context:
        steps.append(steps[-1] // 2)
    return steps


def candidates(model: Model, *, local: Mapping[str, TextWeights] | None = None,
               local_vision: VisionWeights | None = None, vision: bool = True,
               quants: Sequence[str] | None = None) -> list[Candidate]:
    """Every catalog build (or those named), best quality first, with exact sizes for
    the files on disk."""
    local = {k.lower(): v for k, v in (local or {}).items()}
    projector = (local_vision or vision_weights_from_catalog(model)) if vision else None
    chosen = [model.quant(q) for q in quants] if quants is not None else model.quants
    return [Candidate(q, local.get(q.quant.lower()) or text_weights_from_catalog(model, q),
                      projector)
            for q in sorted(chosen, key=lambda q: q.quality, reverse=True)]


def _steps(model: Model, builds: Sequence[Candidate], ctx_steps: Sequence[int]
           ) -> Iterator[tuple[str, Sequence[Candidate], Sequence[int], set[str]]]:
    """The planner's rules as (label, builds, contexts, accepted placements)."""
    default_quality = model.quant(model.default_quant).quality
    close = [c for c in builds if c.quant.kld <= CLOSE_KLD]
    modest = [c for c in builds if c.quant.quality <= default_quality and c in close]
    lossy = [c for c in builds if c not in close]
    yield "gpu", close, ctx_steps[:2], {"gpu"}
    yield "gpu-short-context", close, ctx_steps, {"gpu"}
    yield "split", modest, ctx_steps, {"split"}
    yield "cpu", modest, ctx_steps, {"cpu"}
    yield "lossy", lossy, ctx_steps, {"gpu", "split", "cpu"}


def choose(model: Model, builds: Sequence[Candidate], hardware: Hardware, *, requested: int,
           fixed_ctx: bool, kv_type: str, n_batch: int = 512, flash_attn: bool = True,
           n_gpu_layers: int | None = None, anywhere: bool = False) -> QuantOption | None:
    """The first build and context the rules accept, or None. With `anywhere` (builds
    the user named or already has) or GPU layers the user set, a build the rules skip
    still runs where it fits."""
    budget = budget_for(hardware)
    ctx_steps = context_steps(model, requested, fixed_ctx)
    for _, group, contexts, accepted in _steps(model, builds, ctx_steps):
        for build in group:
            for n_ctx in contexts:
                run = RunShape(n_ctx=n_ctx, kv_type=kv_type, n_batch=n_batch,
                               flash_attn=flash_attn)
                option = place(build, run, hardware, budget, n_gpu_layers=n_gpu_layers)
                if option.where in accepted:
                    return option
    if not anywhere and n_gpu_layers is None:
        return None
    for build in builds:
        for n_ctx in ctx_steps:
            run = RunShape(n_ctx=n_ctx, kv_type=kv_type, n_batch=n_batch, flash_attn=flash_attn)
            option = place(build, run, hardware, budget, n_gpu_layers=n_gpu_layers)
            if option.fits:
                return option
    return None


def plan(model: Model, hardware: Hardware, *, ctx: int | None = None, kv_type: str = "f16",
         quants: Sequence[str] | None = None, n_gpu_layers: int | None = None,
         vision: bool = True, local: Mapping[str, TextWeights] | None = None,
         local_vision: VisionWeights | None = None, n_batch: int = 512,
         flash_attn: bool = True) -> Plan:
    """Choose a build for this machine and describe every option (see module docstring).
    `ctx` and `n_gpu_layers` pin what the user gave on the command line; `quants` limits
    the choice (one quant the user named, or the builds already downloaded)."""
    requested = ctx or model.default_context
    choice = None
    used_vision = vision
    for with_vision in ([True, False] if vision else [False]):
        builds = candidates(model, local=local, local_vision=local_vision, vision=with_vision,
                            quants=quants)
        choice = choose(model, builds, hardware, requested=requested, fixed_ctx=ctx is not None,
                        kv_type=kv_type, n_batch=n_batch, flash_attn=flash_attn,
                        n_gpu_layers=n_gpu_layers, anywhere=quants is not None)
        used_vision = with_vision
        if choice is not None:
            break
    table_ctx = choice.n_ctx if choice else requested
    budget = budget_for(hardware)
    builds = candidates(model, local=local, local_vision=local_vision, vision=used_vision)
    run = RunShape(n_ctx=table_ctx, kv_type=kv_type, n_batch=n_batch, flash_attn=flash_attn)
    options = tuple(place(b, run, hardware, budget) for b in builds)
    if choice is not None:
        options = tuple(choice if o.quant == choice.quant else o for o in options)
    return Plan(model_id=model.id, choice=choice, options=options, requested_ctx=requested,
                kv_type=kv_type,
                reason=explain(model, choice, hardware, requested, vision, options, kv_type))


# --- the one sentence -----------------------------------------------------------------------


def explain(model: Model, choice: QuantOption | None, hardware: Hardware, requested: int,
            vision: bool, options: Sequence[QuantOption], kv_type: str) -> str:
    """One sentence saying why the plan is what it is."""
    if choice is None:
        return _explain_none(model, hardware, requested, options, kv_type)
    parts = [f"{choice.quant} is the best quality that runs "]
    if choice.where == "gpu":
        parts.append(f"entirely on the GPU ({gib_fixed(choice.gpu_bytes)} of "
                     f"{gib_fixed(sum(budget_for(hardware).gpus))} usable)")
    elif choice.where == "split":
        parts.append(f"with {choice.gpu_layers} of {choice.n_layers} layers on the GPU "
                     f"({gib_fixed(choice.gpu_bytes)}) and the rest in RAM "
                     f"({gib_fixed(choice.ram_bytes)})")
    else:
        parts.append(f"on the CPU within the {gib_fixed(budget_for(hardware).ram)} of RAM available"
                     + ("" if hardware.usable_gpus else
                        " (no GPU that this llama.cpp build can use)"))
    if choice.n_ctx < requested:
        parts.append(f", at {choice.n_ctx:,} tokens of context instead of {requested:,} "
                     "to keep that quality")
    else:
        parts.append(f", with {choice.n_ctx:,} tokens of context")
    if vision and not choice.vision:
        parts.append("; images are off because the vision projector does not fit too")
    parts.append(f", at about {choice.tokens_per_s:.0f} tokens/s.")
    return "".join(parts)


def _explain_none(model: Model, hardware: Hardware, requested: int,
                  options: Sequence[QuantOption], kv_type: str) -> str:
    smallest = min(model.quants, key=lambda q: q.remote.size)
    text = text_weights_from_catalog(model, smallest)
    run = RunShape(n_ctx=model.min_context, kv_type=kv_type)
    need = estimate(text, run).total + RAM_RESERVE
    have = hardware.ram_available + sum(g.memory_free for g in hardware.usable_gpus
                                        if not g.unified)
    return (f"Nothing fits: the smallest build, {smallest.quant} at {model.min_context:,} "
            f"tokens without images, needs about {gib_fixed(need)} of RAM and GPU memory together, "
            f"and this machine has {gib_fixed(have)} available.")


def plan_dict(result: Plan) -> dict[str, Any]:
    """The plan as JSON-ready data (memory breakdowns per device included)."""

    def option(o: QuantOption) -> dict[str, Any]:
        data = {k: v for k, v in asdict(o).items() if k != "memory"}
        data["fits"] = o.fits
        data["devices"] = ([asdict(d) | {"total": d.total} for d in o.memory.devices]
                           if o.memory else [])
        return data

    return {"model": result.model_id, "requested_ctx": result.requested_ctx,
            "kv_type": result.kv_type, "reason": result.reason,
            "choice": option(result.choice) if result.choice else None,
            "options": [option(o) for o in result.options]}
