"""Splitting a model between this machine and RPC workers (llama.cpp's RPC backend).

llama.cpp keeps the input embeddings and the first layers on the local CPU and gives
the last `n_gpu_layers` slots (the output head is the last one) to the remote devices in
the order given, shared in proportion to `tensor_split`. Each layer's KV cache lives with
the layer. The vision projector runs where mtmd puts it: on this machine (workers are
not in the device list it picks from).

The rule: every device gets layers in proportion to the memory it has left once its
fixed buffers are counted (the local CPU: input embeddings, vocabulary, logits and the
projector; the last worker: the output head and its logits compute buffer), as
llama.cpp's own default split does, so that every machine keeps the same headroom. The
context shrinks by halves (down to the catalog's floor) when the total does not fit.

The network's cost per generated token: each worker receives the hidden state and the
attention inputs (positions and the KQ mask over the cached positions), passes the
hidden state on through this machine, and the last one returns the logits; a few round
trips per worker. `benchmarks/rpc_split.py` measures the real figure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from localsmall.errors import UsageError
from localsmall.models.catalog import Model
from localsmall.plan.memory import (
    DeviceUse,
    MemoryEstimate,
    RunShape,
    TextWeights,
    VisionWeights,
    estimate,
    kv_layer_bytes,
    vision_compute_bytes,
    vision_work_bytes,
)
from localsmall.plan.rules import CLOSE_KLD, candidates, context_steps

GIB = 1024**3
MIB = 1024**2
WORKER_RESERVE_MIN = 512 * MIB   # the worker's own process, its backend's scratch
WORKER_RESERVE_SHARE = 0.05
ROUND_TRIPS_PER_WORKER = 4       # set inputs, compute, (copy out), synchronise; per token
LAN_BANDWIDTH = 1e9 / 8          # 1 Gbit/s in bytes/s
LAN_LATENCY_S = 0.0003           # a round trip on a switched gigabit LAN


@dataclass(frozen=True)
class WorkerMemory:
    """A remote device and its memory, read from the worker (or given for planning)."""

    endpoint: str
    name: str            # llama.cpp's name for it here: RPC0, RPC1, ...
    memory_free: int
    memory_total: int

    @property
    def budget(self) -> int:
        """What the plan may use on it, after a safety margin."""
        reserve = max(WORKER_RESERVE_MIN, int(self.memory_total * WORKER_RESERVE_SHARE))
        return max(self.memory_free - reserve, 0)


@dataclass(frozen=True)
class Share:
    """One device's part of the split."""

    device: str                # "CPU" or the remote device's name
    endpoint: str | None       # None for this machine
    first_layer: int
    n_layers: int
    output: bool               # holds the output head
    memory: DeviceUse
    budget: int

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.budget


@dataclass(frozen=True)
class RpcSplit:
    """How a build is split over this machine and the workers."""

    n_ctx: int
    n_gpu_layers: int                  # for llama.cpp (the output head counts)
    tensor_split: tuple[float, ...]    # one share per remote device, for llama.cpp
    shares: tuple[Share, ...]          # the local CPU first, then the workers
    memory: MemoryEstimate
    bytes_per_token: int               # network traffic per generated token (estimate)
    round_trips_per_token: int

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.shares)

    def network_seconds_per_token(self, *, bandwidth: float = LAN_BANDWIDTH,
                                  latency: float = LAN_LATENCY_S) -> float:
        """Time the network adds to each generated token."""
        return self.bytes_per_token / bandwidth + self.round_trips_per_token * latency


def network_bytes_per_token(text: TextWeights, run: RunShape, n_workers: int) -> int:
    """Bytes crossing the network per generated token: per worker the hidden state in
    and out (f32), the positions and the KQ mask over the cache (f16 with flash
    attention, else f32), and the output head's logits (f32) back from the last one."""
    shape = text.shape
    hidden = shape.n_embd * 4
    mask = run.n_kv * (2 if run.flash_attn else 4)
    per_worker = 2 * hidden + mask + 64
    return n_workers * per_worker + shape.n_vocab * 4


def _counts(capacity: Sequence[int], per_layer: int, n_layers: int) -> list[int]:
    """Layers per device in proportion to capacity (largest remainder), never more
    than a device holds; the total may fall short when everything is full."""
    room = [max(c, 0) // max(per_layer, 1) for c in capacity]
    total = sum(max(c, 0) for c in capacity)
    if total == 0:
        return [0] * len(capacity)
    ideal = [n_layers * max(c, 0) / total for c in capacity]
    counts = [min(int(x), r) for x, r in zip(ideal, room, strict=True)]
    order = sorted(range(len(capacity)), key=lambda i: ideal[i] - int(ideal[i]), reverse=True)
    while sum(counts) < n_layers:
        free = [i for i in order if counts[i] < room[i]]
        if not free:
            break
        counts[free[0]] += 1
        order.remove(free[0])
        order.append(free[0])
    return counts


def _fixed_costs(text: TextWeights, run: RunShape, workers: Sequence[WorkerMemory],
                 vision: VisionWeights | None) -> list[int]:
    """Memory each device needs besides its repeating layers and their KV cache: the
    estimate with every layer on this machine and the output head on the last worker,
    less those layers."""
    names = [w.name for w in workers]
    base = estimate(text, run, n_gpu_layers=1, gpus=names,
                    split=[0.0] * (len(names) - 1) + [1.0])
    layers = sum(text.layers) + text.shape.n_layers * kv_layer_bytes(text.shape, run)
    fixed = [base.on("CPU").total - layers + _projector_bytes(vision, run)]
    fixed += [base.on(n).total for n in names]
    return fixed


def _projector_bytes(vision: VisionWeights | None, run: RunShape) -> int:
    if vision is None:
        return 0
    return (vision.weights + vision_compute_bytes(vision, flash_attn=run.flash_attn)
            + vision_work_bytes(vision))


def split(text: TextWeights, run: RunShape, *, local_budget: int,
          workers: Sequence[WorkerMemory], vision: VisionWeights | None = None,
          counts: Sequence[int] | None = None) -> RpcSplit:
    """Place the layers over this machine (first) and the workers (in order). `counts`
    forces the layers per device (local first); otherwise they follow memory."""
    if not workers:
        raise ValueError("split needs at least one worker")
    n_layers = text.shape.n_layers
    per_layer = max(text.layers, default=0) + kv_layer_bytes(text.shape, run)
    budgets = [local_budget, *(w.budget for w in workers)]
    if counts is None:
        fixed = _fixed_costs(text, run, workers, vision)
        counts = _counts([b - f for b, f in zip(budgets, fixed, strict=True)], per_layer,
                         n_layers)
        if sum(counts) < n_layers:  # short of memory: spread anyway, it will not fit
            counts = _counts(budgets, 1, n_layers)
            counts[0] += n_layers - sum(counts)
    counts = list(counts)
    if len(counts) != len(budgets) or sum(counts) != n_layers:
        raise ValueError("counts must give every layer to one device")
    remote = counts[1:]
    n_gpu_layers = sum(remote) + 1
    shares_for_llama = (*(float(c) for c in remote[:-1]), float(remote[-1] + 1))
    names = [w.name for w in workers]
    memory = estimate(text, run, n_gpu_layers=n_gpu_layers, gpus=names,
                      split=shares_for_llama)
    cpu = memory.on("CPU")
    cpu = dataclasses.replace(cpu, projector=_projector_bytes(vision, run))
    devices = (cpu, *(memory.on(n) for n in names))
    memory = dataclasses.replace(memory, devices=tuple(d for d in devices
                                                       if d.device == "CPU" or d.total))
    shares, first = [], 0
    for i, device in enumerate(devices):
        shares.append(Share(device=device.device,
                            endpoint=None if i == 0 else workers[i - 1].endpoint,
                            first_layer=first, n_layers=counts[i],
                            output=i == len(devices) - 1, memory=device,
                            budget=budgets[i]))
        first += counts[i]
    active = sum(1 for c in remote if c) or 1
    return RpcSplit(n_ctx=run.n_ctx, n_gpu_layers=n_gpu_layers,
                    tensor_split=shares_for_llama, shares=tuple(shares), memory=memory,
                    bytes_per_token=network_bytes_per_token(text, run, active),
                    round_trips_per_token=ROUND_TRIPS_PER_WORKER * active)


def best_split(text: TextWeights, runs: Sequence[RunShape], *, local_budget: int,
               workers: Sequence[WorkerMemory],
               vision: VisionWeights | None = None) -> RpcSplit:
    """The split at the first (largest) context that fits, else at the last one."""
    result = None
    for run in runs:
        result = split(text, run, local_budget=local_budget, workers=workers, vision=vision)
        if result.fits:
            return result
    assert result is not None, "no context to try"
    return result


# --- choosing a build for this machine and its workers ----------------------------------


@dataclass(frozen=True)
class RpcOption:
    """How one build would be split."""

    quant: str
    split: RpcSplit
    quality: int
    kld: float
    size: int
    vision: bool
    exact: bool


@dataclass(frozen=True)
class RpcPlan:
    """Every build split over this machine and the workers, and the one to run."""

    model_id: str
    workers: tuple[WorkerMemory, ...]
    local_budget: int
    options: tuple[RpcOption, ...]
    choice: RpcOption | None
    reason: str


def plan_rpc(model: Model, *, workers: Sequence[WorkerMemory], local_budget: int,
             ctx: int | None = None, kv_type: str = "f16", n_batch: int = 512,
             flash_attn: bool = True, vision: bool = True,
             quants: Sequence[str] | None = None,
             local: Mapping[str, TextWeights] | None = None,
             local_vision: VisionWeights | None = None) -> RpcPlan:
    """The best quality that fits over this machine and the workers: among the quants
    close to the original, at the requested context or its half; else any quant at
    any context down to the catalog's floor."""
    builds = candidates(model, local=local, local_vision=local_vision, vision=vision,
                        quants=quants)
    steps = context_steps(model, ctx or model.default_context, ctx is not None)
    options = []
    for build in builds:
        runs = [RunShape(n_ctx=n, kv_type=kv_type, n_batch=n_batch, flash_attn=flash_attn)
                for n in steps]
        result = best_split(build.text, runs, local_budget=local_budget, workers=workers,
                            vision=build.vision)
        options.append(RpcOption(build.quant.quant, result, build.quant.quality,
                                 build.quant.kld, build.quant.remote.size,
                                 build.vision is not None, build.text.exact))
    long_enough = set(steps[:2])
    choice = next((o for o in options if o.split.fits and o.kld <= CLOSE_KLD
                   and o.split.n_ctx in long_enough), None)
    choice = choice or next((o for o in options if o.split.fits), None)
    total = local_budget + sum(w.budget for w in workers)
    if choice is None:
        smallest = min(options, key=lambda o: o.split.memory.total) if options else None
        need = f" (the smallest needs about {smallest.split.memory.total / GIB:.1f} GiB)" \
            if smallest else ""
        reason = (f"No build fits in {total / GIB:.1f} GiB over this machine and "
                  f"{len(workers)} remote device(s){need}; add a worker or free memory.")
    else:
        reason = (f"{choice.quant} at {choice.split.n_ctx:,} tokens: the best quality that "
                  f"fits in {total / GIB:.1f} GiB over this machine and "
                  f"{len(workers)} remote device(s).")
    return RpcPlan(model.id, tuple(workers), local_budget, tuple(options), choice, reason)


def parse_worker_memory(spec: str) -> WorkerMemory | None:
    """`HOST:PORT=16GiB` (a simulated worker, for planning): None without `=`."""
    address, sep, size = spec.partition("=")
    if not sep:
        return None
    text = size.strip().lower().replace(" ", "")
    units = {"tib": 1024**4, "gib": GIB, "mib": MIB, "tb": 10**12, "gb": 10**9, "mb": 10**6,
             "t": 1024**4, "g": GIB, "m": MIB, "": 1}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            number = text[: len(text) - len(suffix)] if suffix else text
            try:
                value = int(float(number) * units[suffix])
            except ValueError:
                break
            return WorkerMemory(address.strip(), "", value, value)
    raise UsageError(f"bad worker memory {spec!r}; write HOST:PORT=16GiB")


def rpc_plan_dict(result: RpcPlan) -> dict[str, object]:
    """The plan as JSON-ready data (`plan --rpc --json`)."""

    def share(s: Share) -> dict[str, object]:
        m = s.memory
        return {"device": s.device, "endpoint": s.endpoint, "first_layer": s.first_layer,
                "n_layers": s.n_layers, "output": s.output, "weights": m.weights, "kv": m.kv,
                "compute": m.compute, "projector": m.projector, "total": m.total,
                "budget": s.budget, "fits": s.fits}

    def option(o: RpcOption) -> dict[str, object]:
        sp = o.split
        return {"quant": o.quant, "fits": sp.fits, "n_ctx": sp.n_ctx, "size": o.size,
                "kld": o.kld, "vision": o.vision, "exact": o.exact,
                "n_gpu_layers": sp.n_gpu_layers, "tensor_split": list(sp.tensor_split),
                "shares": [share(s) for s in sp.shares],
                "network_bytes_per_token": sp.bytes_per_token,
                "network_ms_per_token_1gbit": round(sp.network_seconds_per_token() * 1000, 3)}

    return {"model": result.model_id, "local_budget": result.local_budget,
            "workers": [dataclasses.asdict(w) for w in result.workers],
            "choice": result.choice.quant if result.choice else None, "reason": result.reason,
            "options": [option(o) for o in result.options]}
