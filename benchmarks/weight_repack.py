"""Which weight placement is fastest for quantized models on the CPU.

llama.cpp repacks quantized weights into CPU-specific layouts ("extra buffer types":
CPU_REPACK for AVX2/AVX-512/NEON, AMX on Intel Sapphire Rapids and later). On AMX CPUs
the AMX path crashes on batched decodes (llama.cpp #20824), so localsmall loads with
`use_extra_bufts=False` there. This measures the placements against each other on this
machine (LOCALSMALL_WEIGHT_REPACK):

- off:        no extra buffer types (plain, memory-mapped weights)
- cpu_repack: the matrices CPU_REPACK can multiply routed to it, AMX never used
- on:         llama.cpp's default (skipped on an AMX CPU: it would crash)

Each measurement loads the model in a fresh process (so one model is in memory at a
time), reads a prompt and generates a few tokens, `--per-load` times. Placements
alternate (off, cpu_repack, off, cpu_repack, ...) so a change in the machine's load hits
them alike; the report gives medians, each round's ratio to "off" (the same-run ratio)
and the load averages. Speeds are given both per wall-clock second and per CPU second of
the process: on a shared machine the CPU-time figure is the steadier one.

    .venv/bin/python benchmarks/weight_repack.py [--quant Q4_K_M] [--runs 3]
    .venv/bin/python benchmarks/weight_repack.py --model big.gguf --wrap "flock LOCK timeout 600"
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from placement import Placement, reference_placement
from synthetic import medium_model

from localsmall.engine.devices import list_devices

MODES = ("off", "cpu_repack", "on")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(path: Path, mode: str, *, n_prompt: int, n_gen: int, threads: int,
            per_load: int) -> dict:
    """Load once with this placement and time `per_load` prompt + generation runs."""
    os.environ["LOCALSMALL_WEIGHT_REPACK"] = mode
    from localsmall.engine.model import Engine
    from localsmall.engine.types import EngineSettings, SamplingSettings, TokenRun

    start = time.perf_counter()
    engine = Engine(EngineSettings(model_path=path, n_ctx=max(512, n_prompt + n_gen + 8),
                                   n_threads=threads))
    load_s = time.perf_counter() - start
    runs = []
    with engine:
        ids = tuple((i * 7919) % 120000 + 1000 for i in range(n_prompt))
        for _ in range(per_load):
            engine.reset()
            cpu0 = _cpu_seconds()
            generation = engine.generate([TokenRun(ids)],
                                         SamplingSettings(temperature=0, max_tokens=n_gen))
            cpu1 = cpu0
            for i, _event in enumerate(generation):
                if i == 0:
                    cpu1 = _cpu_seconds()  # the prompt is read (and one token sampled)
            cpu2 = _cpu_seconds()
            stats = generation.result.stats
            runs.append({"prompt_tps": stats.prompt_tps, "gen_tps": stats.generation_tps,
                         "prompt_cpu_tps": n_prompt / max(cpu1 - cpu0, 1e-9),
                         "gen_cpu_tps": (n_gen - 1) / max(cpu2 - cpu1, 1e-9),
                         "tokens": list(generation.result.token_ids)})
        note = engine.repack_note
    return {"mode": mode, "note": note, "load_s": load_s, "runs": runs,
            "loadavg": os.getloadavg()}


def modes(placement: Placement | None = None) -> dict[str, str]:
    """The placements to measure on this CPU (or `placement`'s), each with why it is
    skipped ("" when it runs)."""
    return {"off": "", "cpu_repack": "",
            "on": (placement or reference_placement()).skip_repacking()}


def child(args: argparse.Namespace, path: Path, mode: str, threads: int | None = None) -> dict:
    """One measurement in a fresh process (under `--wrap`, e.g. a lock)."""
    command = [*shlex.split(args.wrap), sys.executable, __file__, "--child", mode,
               "--model", str(path), "--prompt", str(args.prompt), "--gen", str(args.gen),
               "--threads", str(threads or args.threads), "--per-load", str(args.per_load)]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{mode}: exit {out.returncode}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(rounds: list[dict], key: str) -> float:
    return statistics.median(run[key] for r in rounds for run in r["runs"])


def report(results: dict[str, list[dict]], base_name: str = "off") -> None:
    """Medians per placement (or other setting) and the same-round ratios to
    `base_name`'s."""
    keys = ("prompt_tps", "gen_tps", "prompt_cpu_tps", "gen_cpu_tps")
    print(f"{'':11} {'prompt/s':>9} {'gen/s':>7} {'prompt/cpu-s':>13} "
          f"{'gen/cpu-s':>10} {'load s':>7}  load averages (1, 5, 15 min)")
    for mode, rounds in results.items():
        loads = "; ".join(" ".join(f"{x:.1f}" for x in r["loadavg"]) for r in rounds)
        print(f"{mode:11} " + " ".join(f"{_median(rounds, k):{w}.2f}" for k, w in
                                       zip(keys, (9, 7, 13, 10), strict=True))
              + f" {statistics.median(r['load_s'] for r in rounds):7.1f}  {loads}")
        if rounds[0]["note"]:
            print(f"{'':11} ({rounds[0]['note']})")
    base = results.get(base_name, [])
    for mode, rounds in results.items():
        if mode == base_name:
            continue
        ratios = {k: statistics.median(
            statistics.median(run[k] for run in r["runs"])
            / statistics.median(run[k] for run in b["runs"])
            for r, b in zip(rounds, base, strict=False)) for k in keys}
        same = all(run["tokens"] == brun["tokens"] for r, b in zip(rounds, base, strict=False)
                   for run, brun in zip(r["runs"], b["runs"], strict=False))
        print(f"{mode}/{base_name} same-round ratios: prompt {ratios['prompt_tps']:.3f} "
              f"(cpu {ratios['prompt_cpu_tps']:.3f}), generation {ratios['gen_tps']:.3f} "
              f"(cpu {ratios['gen_cpu_tps']:.3f}); same greedy tokens: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant", default="Q4_K_M", help="of the synthetic medium model")
    parser.add_argument("--model", type=Path, help="measure this GGUF instead")
    parser.add_argument("--runs", type=int, default=3, help="loads per placement")
    parser.add_argument("--per-load", type=int, default=2, help="measurements per load")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--gen", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="off,cpu_repack,on")
    parser.add_argument("--wrap", default="", help="command prefix for each measurement")
    parser.add_argument("--child", choices=("auto", *MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = args.model or medium_model(args.quant)[0]
    if args.child:
        print(json.dumps(measure(path, args.child, n_prompt=args.prompt, n_gen=args.gen,
                                 threads=args.threads, per_load=args.per_load)))
        return
    cpu = next(d for d in list_devices() if d.kind == "cpu")
    print(f"model {path.name}; CPU {cpu.description}; extra buffer types: "
          f"{', '.join(cpu.extra_buffer_types) or 'none'}; {args.threads} threads; "
          f"prompt {args.prompt}, generation {args.gen} tokens")
    skipped = modes()
    wanted = [m for m in args.modes.split(",") if m in skipped]
    for mode in wanted:
        if skipped[mode]:
            print(f"{mode}: {skipped[mode]}")
    runnable = [m for m in wanted if not skipped[m]]
    results: dict[str, list[dict]] = {m: [] for m in runnable}
    for _ in range(args.runs):
        for mode in runnable:
            results[mode].append(child(args, path, mode))
            print(f"  {mode}: {results[mode][-1]['runs']}"[:200], file=sys.stderr, flush=True)
    report(results)


if __name__ == "__main__":
    main()
