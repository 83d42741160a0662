"""The memory model and the planner on simulated machines (plain data, no GPU needed)."""

from __future__ import annotations

import pytest

from localsmall.models.catalog import load_catalog
from localsmall.plan.hardware import CpuInfo, GpuDevice, Hardware
from localsmall.plan.memory import (
    RunShape,
    estimate,
    kv_layer_bytes,
    layer_devices,
    logits_bytes,
    shape_from_catalog,
    text_weights_from_catalog,
)
from localsmall.plan.rules import budget_for, plan

GIB = 1024**3
MIB = 1024**2
X86 = CpuInfo("x86-64 desktop", 8, 16)


def nvidia(name: str, total_gb: float, free_gb: float, index: int = 0) -> GpuDevice:
    return GpuDevice(f"CUDA{index}", f"NVIDIA GeForce {name}", "CUDA", int(total_gb * GIB),
                     int(free_gb * GIB))


def apple(chip: str, working_set_gb: float) -> GpuDevice:
    # Metal reports its recommended working set: about 2/3 to 3/4 of unified memory.
    return GpuDevice("Metal", f"Apple {chip}", "Metal", int(working_set_gb * GIB),
                     int(working_set_gb * GIB), unified=True)


def machine(gpus: tuple[GpuDevice, ...], ram_gb: float, available_gb: float,
            cpu: CpuInfo = X86) -> Hardware:
    return Hardware(gpus=gpus, gpu_offload=bool(gpus), ram_total=int(ram_gb * GIB),
                    ram_available=int(available_gb * GIB), cpu=cpu)


MACHINES = {
    "24 GB GPU": machine((nvidia("RTX 4090", 24, 23.3),), 64, 56),
    "12 GB GPU + 32 GB RAM": machine((nvidia("RTX 3060", 12, 11.5),), 32, 26),
    "8 GB GPU + 16 GB RAM": machine((nvidia("RTX 4060", 8, 7.6),), 16, 12),
    "16 GB Apple": machine((apple("M2", 10.7),), 16, 11, CpuInfo("Apple M2", 8, 8)),
    "36 GB Apple": machine((apple("M3 Pro", 27),), 36, 28, CpuInfo("Apple M3 Pro", 12, 12)),
    "CPU-only 16 GB": machine((), 16, 13),
    "CPU-only 64 GB": machine((), 64, 58),
    "too small": machine((), 4, 3),
}

# machine -> (quant, where, context, vision)
EXPECTED = {
    "24 GB GPU": ("Q6_K", "gpu", 16384, True),           # halves the context for Q6_K
    "12 GB GPU + 32 GB RAM": ("Q4_K_M", "split", 32768, True),
    "8 GB GPU + 16 GB RAM": ("Q4_K_M", "split", 16384, True),   # RAM is short at 32K
    "16 GB Apple": ("Q2_K", "gpu", 8192, False),           # only without images
    "36 GB Apple": ("Q6_K", "gpu", 32768, True),
    "CPU-only 16 GB": ("Q2_K", "cpu", 8192, True),
    "CPU-only 64 GB": ("Q4_K_M", "cpu", 32768, True),      # bigger quants: too slow on CPU
    "too small": None,
}


@pytest.fixture(scope="module")
def model():
    return load_catalog().default


@pytest.mark.parametrize("name", list(MACHINES))
def test_choice_for_simulated_machines(model, name: str) -> None:
    hardware = MACHINES[name]
    result = plan(model, hardware)
    expected = EXPECTED[name]
    if expected is None:
        assert result.choice is None
        assert result.reason.startswith("Nothing fits: the smallest build, Q2_K")
        assert "3.0 GiB available" in result.reason
        return
    choice = result.choice
    assert choice is not None, result.reason
    assert (choice.quant, choice.where, choice.n_ctx, choice.vision) == expected, result.reason
    # What was chosen fits the budget with its margins, device by device.
    budget = budget_for(hardware)
    assert choice.memory is not None and budget.allows(choice.memory)
    assert choice.ram_bytes <= hardware.ram_available
    if choice.where == "split":
        assert 0 < choice.gpu_layers < choice.n_layers
        assert choice.n_gpu_layers == choice.gpu_layers + 1  # the output head goes first
    assert choice.quant in result.reason and "tokens/s" in result.reason
    assert result.reason.endswith("estimated).")  # no calibration for a simulated machine
    assert len(result.options) == len(model.quants)


def test_machine_without_usable_gpu_never_plans_offload(model) -> None:
    cpu_build = Hardware(gpus=(nvidia("RTX 4090", 24, 23),), gpu_offload=False,
                         ram_total=64 * GIB, ram_available=58 * GIB, cpu=X86)
    choice = plan(model, cpu_build).choice
    assert choice is not None and choice.where == "cpu" and choice.n_gpu_layers == 0


def test_two_gpus_share_the_layers(model) -> None:
    hardware = machine((nvidia("RTX 3060", 12, 11.5, 0), nvidia("RTX 3060", 12, 11.5, 1)),
                       64, 56)
    choice = plan(model, hardware).choice
    assert choice is not None and choice.where == "gpu"
    used = {d.device: d.total for d in choice.memory.devices}
    assert used["CUDA0"] > 4 * GIB and used["CUDA1"] > 4 * GIB
    assert max(used["CUDA0"], used["CUDA1"]) <= budget_for(hardware).gpus[0]


def test_user_settings_are_kept(model) -> None:
    big = MACHINES["24 GB GPU"]
    pinned_ctx = plan(model, big, ctx=32768).choice
    assert pinned_ctx.n_ctx == 32768 and pinned_ctx.quant == "Q5_K_M"  # quality gives way
    assert plan(model, big, quants=("Q8_0",)).choice.where == "split"  # runs where it fits
    forced = plan(model, big, n_gpu_layers=10).choice
    assert forced.n_gpu_layers == 10 and forced.where == "split"
    no_images = plan(model, big, vision=False).choice
    assert not no_images.vision and no_images.memory.on("CUDA0").projector == 0
    q8_cache = plan(model, big, kv_type="q8_0").choice
    assert q8_cache.quant == "Q6_K" and q8_cache.n_ctx == 32768  # a smaller cache fits 32K


def test_kv_cache_and_logits_sizes_for_mistral_small(model) -> None:
    shape = shape_from_catalog(model)
    f16 = RunShape(n_ctx=32768)
    assert kv_layer_bytes(shape, f16) * shape.n_layers == 5 * GIB
    assert kv_layer_bytes(shape, RunShape(n_ctx=32768, kv_type="q8_0")) == 128 * MIB * 34 // 64
    assert kv_layer_bytes(shape, RunShape(n_ctx=32768, kv_type="q4_0")) == 128 * MIB * 18 // 64
    assert kv_layer_bytes(shape, RunShape(n_ctx=1000)) == kv_layer_bytes(shape,
                                                                         RunShape(n_ctx=1024))
    assert logits_bytes(shape, f16) == 256 * MIB


def test_catalog_estimate_adds_up_to_the_file(model) -> None:
    for quant in model.quants:
        weights = text_weights_from_catalog(model, quant)
        assert abs(weights.total - quant.remote.size) / quant.remote.size < 0.001
        assert weights.output > weights.token_embd or quant.quant in ("Q6_K", "Q8_0")


def test_layers_are_placed_last_to_first_like_llama_cpp() -> None:
    assert layer_devices(4, 0, [1.0]) == [0, 0, 0, 0, 0]
    assert layer_devices(4, 1, [1.0]) == [0, 0, 0, 0, 1]        # the output head only
    assert layer_devices(4, 3, [1.0]) == [0, 0, 1, 1, 1]
    assert layer_devices(4, -1, [1.0]) == [1, 1, 1, 1, 1]
    assert layer_devices(4, 99, [1.0, 1.0]) == [1, 1, 1, 2, 2]   # split by free memory


def test_partial_offload_moves_memory_from_ram_to_gpu(model) -> None:
    weights = text_weights_from_catalog(model, model.quant("Q4_K_M"))
    run = RunShape(n_ctx=16384)
    cpu = estimate(weights, run, gpus=("CUDA0",), n_gpu_layers=0)
    half = estimate(weights, run, gpus=("CUDA0",), n_gpu_layers=21)
    assert half.gpu_layer_count == 20 and half.n_gpu_layers == 21
    assert half.ram < cpu.ram and half.gpu > 0
    assert abs(half.on("CUDA0").weights - (20 * weights.layers[0] + weights.output)) == 0
    assert cpu.on("CPU").weights == weights.total
