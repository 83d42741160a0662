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

With a speed target (SpeedInputs.min_speed) a placement counts only when its generation
speed at the planned depth (the whole context unless a depth is given) reaches it, so
the same rules then trade context first, then quality, for speed. Speeds come from
plan.speed (bench results, a calibration of this machine, or assumed bandwidths).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from localsmall.errors import SpeedTargetError
from localsmall.models.catalog import Model, Quant
from localsmall.plan.hardware import Hardware
from localsmall.plan.memory import (
    MemoryEstimate,
    RunShape,
    TextWeights,
    VisionWeights,
    estimate,
    text_weights_from_catalog,
    vision_weights_from_catalog,
)
from localsmall.plan.speed import NO_SPEED, Speed, SpeedInputs, predict
from localsmall.units import GIB, gib_fixed

MIB = 1024**2
GPU_RESERVE_MIN = 512 * MIB     # CUDA/Metal context, cuBLAS workspace, the backend's pool
GPU_RESERVE_SHARE = 0.05        # ... or this share of the device, whichever is larger
RAM_RESERVE = 1 * GIB           # the OS, this process, llama.cpp's CPU work buffers
CLOSE_KLD = 0.03                # "close to the original": eligible to shrink the context

Where = Literal["gpu", "split", "cpu", "none"]
WHERE_LABELS: dict[str, str] = {"gpu": "GPU", "split": "GPU + CPU", "cpu": "CPU",
                                "none": "does not fit"}

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
    # tokens_per_s is generation at an empty context; the *_deep speeds hold at
    # speed_depth cached tokens (the whole context unless planned for a depth)
    prompt_tps: float | None = None
    tokens_per_s_deep: float = 0.0
    prompt_tps_deep: float | None = None
    speed_depth: int = 0
    speed_source: str = "estimated"   # measured (bench), calibrated or estimated

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


# --- placing one build ----------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One build with its sizes (from the catalog or from the local file)."""

    quant: Quant
    text: TextWeights
    vision: VisionWeights | None


def place(candidate: Candidate, run: RunShape, hardware: Hardware, budget: Budget,
          *, n_gpu_layers: int | None = None, speeds: SpeedInputs | None = None) -> QuantOption:
    """The best placement of one build at one context: all on the GPU, else as many of
    the last layers as fit, else CPU only, else "none" (with the CPU-only needs)."""
    n_layers = candidate.text.shape.n_layers

    def at(ngl: int) -> MemoryEstimate:
        return estimate(candidate.text, run, n_gpu_layers=ngl, gpus=budget.gpu_names,
                        split=budget.split, vision=candidate.vision)

    if n_gpu_layers is not None:
        forced = at(n_gpu_layers)
        return _option(candidate, run, forced, hardware, budget.allows(forced), speeds)
    if budget.gpu_names:
        for ngl in range(n_layers + 1, 0, -1):
            memory = at(ngl)
            if budget.allows(memory):
                return _option(candidate, run, memory, hardware, True, speeds)
            if memory.ram > budget.ram:
                break  # fewer GPU layers only needs more RAM
    cpu = at(0)
    return _option(candidate, run, cpu, hardware, budget.allows(cpu), speeds)


def _option(candidate: Candidate, run: RunShape, memory: MemoryEstimate, hardware: Hardware,
            fits: bool, speeds: SpeedInputs | None) -> QuantOption:
    n_layers = candidate.text.shape.n_layers
    where: Where = "none"
    if fits:
        where = ("gpu" if memory.gpu_layer_count == n_layers and memory.n_gpu_layers > n_layers
                 else "split" if memory.n_gpu_layers else "cpu")
    quant = candidate.quant
    speed: Speed = predict(text=candidate.text, quant=quant, memory=memory, hardware=hardware,
                           run=run, inputs=speeds) if fits else NO_SPEED
    return QuantOption(
        quant=quant.quant, where=where, n_ctx=run.n_ctx, n_gpu_layers=memory.n_gpu_layers,
        gpu_layers=memory.gpu_layer_count, n_layers=n_layers, gpu_bytes=memory.gpu,
        ram_bytes=memory.ram, size=quant.remote.size,
        tokens_per_s=speed.gen_tps, quality=quant.quality, kld=quant.kld,
        vision=candidate.vision is not None, exact=candidate.text.exact, memory=memory,
        prompt_tps=speed.pp_tps, tokens_per_s_deep=speed.gen_tps_deep,
        prompt_tps_deep=speed.pp_tps_deep, speed_depth=speed.depth, speed_source=speed.source)


def fast_enough(option: QuantOption, speeds: SpeedInputs | None) -> bool:
    """Whether an option reaches the speed target (always, without one)."""
    if speeds is None or speeds.min_speed is None:
        return True
    return option.tokens_per_s_deep >= speeds.min_speed


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
           n_gpu_layers: int | None = None, anywhere: bool = False,
           speeds: SpeedInputs | None = None) -> QuantOption | None:
    """The first build and context the rules accept (fast enough, with a speed target),
    or None. With `anywhere` (builds the user named or already has) or GPU layers the
    user set, a build the rules skip still runs where it fits."""
    budget = budget_for(hardware)
    ctx_steps = context_steps(model, requested, fixed_ctx)
    for _, group, contexts, accepted in _steps(model, builds, ctx_steps):
        for build in group:
            for n_ctx in contexts:
                run = RunShape(n_ctx=n_ctx, kv_type=kv_type, n_batch=n_batch,
                               flash_attn=flash_attn)
                option = place(build, run, hardware, budget, n_gpu_layers=n_gpu_layers,
                               speeds=speeds)
                if option.where in accepted and fast_enough(option, speeds):
                    return option
    if not anywhere and n_gpu_layers is None:
        return None
    for build in builds:
        for n_ctx in ctx_steps:
            run = RunShape(n_ctx=n_ctx, kv_type=kv_type, n_batch=n_batch, flash_attn=flash_attn)
            option = place(build, run, hardware, budget, n_gpu_layers=n_gpu_layers,
                           speeds=speeds)
            if option.fits and fast_enough(option, speeds):
                return option
    return None


def plan(model: Model, hardware: Hardware, *, ctx: int | None = None, kv_type: str = "f16",
         quants: Sequence[str] | None = None, n_gpu_layers: int | None = None,
         vision: bool = True, local: Mapping[str, TextWeights] | None = None,
         local_vision: VisionWeights | None = None, n_batch: int = 512,
         flash_attn: bool = True, speeds: SpeedInputs | None = None) -> Plan:
    """Choose a build for this machine and describe every option (see module docstring).
    `ctx` and `n_gpu_layers` pin what the user gave on the command line; `quants` limits
    the choice (one quant the user named, or the builds already downloaded); `speeds`
    holds what is known of this machine's speed, and the speed target if any
    (SpeedTargetError when a build fits but none reaches it)."""
    requested = ctx or model.default_context
    choice = None
    used_vision = vision
    for with_vision in ([True, False] if vision else [False]):
        builds = candidates(model, local=local, local_vision=local_vision, vision=with_vision,
                            quants=quants)
        choice = choose(model, builds, hardware, requested=requested, fixed_ctx=ctx is not None,
                        kv_type=kv_type, n_batch=n_batch, flash_attn=flash_attn,
                        n_gpu_layers=n_gpu_layers, anywhere=quants is not None,
                        speeds=speeds)
        used_vision = with_vision
        if choice is not None:
            break
    table_ctx = choice.n_ctx if choice else requested
    budget = budget_for(hardware)
    builds = candidates(model, local=local, local_vision=local_vision, vision=used_vision)
    run = RunShape(n_ctx=table_ctx, kv_type=kv_type, n_batch=n_batch, flash_attn=flash_attn)
    options = tuple(place(b, run, hardware, budget, speeds=speeds) for b in builds)
    if choice is not None:
        options = tuple(choice if o.quant == choice.quant else o for o in options)
    reason = explain(model, choice, hardware, requested, vision, options, kv_type)
    if speeds is not None and speeds.min_speed is not None:
        unhurried = plan(model, hardware, ctx=ctx, kv_type=kv_type, quants=quants,
                         n_gpu_layers=n_gpu_layers, vision=vision, local=local,
                         local_vision=local_vision, n_batch=n_batch, flash_attn=flash_attn,
                         speeds=replace(speeds, min_speed=None))
        if choice is None:
            if unhurried.choice is not None:
                raise SpeedTargetError(_too_slow(unhurried, speeds.min_speed, ctx is not None))
        else:
            reason += _traded(unhurried.choice, choice, speeds.min_speed)
    return Plan(model_id=model.id, choice=choice, options=options, requested_ctx=requested,
                kv_type=kv_type, reason=reason)


def _speed(tps: float) -> str:
    return f"{tps:.2f}" if tps < 1 else f"{tps:.1f}" if tps < 10 else f"{tps:.0f}"


def _traded(before: QuantOption | None, after: QuantOption, target: float) -> str:
    """What the speed target cost, in one sentence (empty when nothing changed)."""
    if before is None or (before.quant, before.n_ctx, before.where) == \
            (after.quant, after.n_ctx, after.where):
        return f" It reaches the {_speed(target)} tokens/s asked for."
    gave = []
    if before.quant != after.quant:
        gave.append(f"quality ({before.quant} -> {after.quant})")
    if before.n_ctx != after.n_ctx:
        gave.append(f"context ({before.n_ctx:,} -> {after.n_ctx:,} tokens)")
    if before.where != after.where:
        gave.append(f"placement ({WHERE_LABELS[before.where]} -> {WHERE_LABELS[after.where]})")
    return (f" To reach {_speed(target)} tokens/s it traded {' and '.join(gave)}: "
            f"{before.quant} at {before.n_ctx:,} tokens would generate about "
            f"{_speed(before.tokens_per_s_deep)} tokens/s at {before.speed_depth:,} tokens.")


def _too_slow(unhurried: Plan, target: float, fixed_ctx: bool) -> str:
    assert unhurried.choice is not None
    fits = [o for o in unhurried.options if o.fits] + [unhurried.choice]
    fastest = max(fits, key=lambda o: o.tokens_per_s_deep)
    hint = ("a smaller --ctx or --depth" if fixed_ctx else "a smaller --depth")
    return (f"Nothing reaches {_speed(target)} tokens/s on this machine: the fastest build "
            f"that fits, {fastest.quant}, generates about {_speed(fastest.tokens_per_s_deep)} "
            f"tokens/s at {fastest.speed_depth:,} tokens of context "
            f"({fastest.speed_source}). Lower --min-speed, or plan for {hint}.")


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
    parts.append(f", at about {_speed(choice.tokens_per_s)} tokens/s")
    if choice.speed_depth:
        parts.append(f" ({_speed(choice.tokens_per_s_deep)} with {choice.speed_depth:,} "
                     f"tokens in the context; {choice.speed_source}).")
    else:
        parts.append(f" ({choice.speed_source}).")
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
