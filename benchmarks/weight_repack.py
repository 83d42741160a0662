"""Which weight placement is fastest for quantized models on the CPU.

llama.cpp repacks quantized weights into CPU-specific layouts ("extra buffer types":
CPU_REPACK for AVX2/AVX-512/NEON, AMX on Intel Sapphire Rapids and later). On AMX CPUs
the AMX path crashes on batched decodes (llama.cpp #20824), so localsmall loads with
`use_extra_bufts=False` there (LOCALSMALL_WEIGHT_REPACK=auto). This measures what that
fallback costs against the default placement on this machine: prompt processing and
generation speed with repacking on and off, alternating runs, medians. On an AMX CPU
"on" cannot run (it would crash): it is skipped with the reason, "off" is still measured.

    .venv/bin/python benchmarks/weight_repack.py [--quant Q4_K_M] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics

from placement import Placement, reference_placement
from synthetic import medium_model

from localsmall.engine.devices import list_devices
from localsmall.engine.model import Engine
from localsmall.engine.types import EngineSettings, SamplingSettings, TokenRun


def measure(path, mode: str, n_prompt: int, n_gen: int) -> tuple[float, float]:
    os.environ["LOCALSMALL_WEIGHT_REPACK"] = mode
    with Engine(EngineSettings(model_path=path, n_ctx=2048, n_threads=2)) as engine:
        ids = [(i * 7919) % 120000 + 1000 for i in range(n_prompt)]
        result = engine.generate([TokenRun(tuple(ids))],
                                 SamplingSettings(temperature=0, max_tokens=n_gen)).run()
        return result.stats.prompt_tps, result.stats.generation_tps


def modes(placement: Placement | None = None) -> dict[str, str]:
    """The placements to measure on this CPU (or `placement`'s), each with why it is
    skipped ("" when it runs)."""
    return {"on": (placement or reference_placement()).skip_repacking(), "off": ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    path, _ = medium_model(args.quant)
    cpu = next(d for d in list_devices() if d.kind == "cpu")
    print(f"model {path.name}; CPU {cpu.description}; extra buffer types: "
          f"{', '.join(cpu.extra_buffer_types) or 'none'}")
    skipped = modes()
    runnable = [mode for mode, reason in skipped.items() if not reason]
    runs: dict[str, list[tuple[float, float]]] = {mode: [] for mode in runnable}
    for _ in range(args.runs):
        for mode in runnable:
            runs[mode].append(measure(path, mode, 256, 32))
    medians: dict[str, tuple[float, float]] = {}
    for mode, reason in skipped.items():
        if reason:
            print(f"repacking {mode:3}: {reason}")
            continue
        medians[mode] = (statistics.median(r[0] for r in runs[mode]),
                         statistics.median(r[1] for r in runs[mode]))
        print(f"repacking {mode:3}: prompt {medians[mode][0]:7.1f} tok/s, "
              f"generation {medians[mode][1]:6.2f} tok/s")
    if "on" not in medians:
        print("off/on ratio: not measurable on this CPU (repacking on cannot run)")
        return
    (pp_on, tg_on), (pp_off, tg_off) = medians["on"], medians["off"]
    print(f"off/on ratio: prompt {pp_off / pp_on:.3f}, generation {tg_off / tg_on:.3f}")


if __name__ == "__main__":
    main()
