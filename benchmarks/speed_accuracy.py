"""Is `localsmall plan`'s speed right? Predicts generation and prompt tokens/s for a GGUF
from this machine's calibration (plan.speed, the same code `plan` uses; calibrating
first when the cache has none), then measures the file with `localsmall bench`'s own
code (bench.runner, without the chat-prompt timing) at each --ctx, and prints
predicted / measured (target: within 25%).

Full-size files need the shared lock on a shared machine:
    flock /work/fullsize.lock timeout 600 python benchmarks/speed_accuracy.py \
        /work/fullshape/q4km-40L.gguf --ctx 4096 -p 32 -n 4

Each row notes the load averages before and after its measurement: on a busy machine
both sides are slowed, by different amounts (many small synchronised steps suffer more).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def vmstat(name: str) -> int:
    """A counter of /proc/vmstat (pgpgin: KiB read from disk)."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return int(value)
    return 0


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def page_in(path: Path, evict: list[Path]) -> float:
    """Drop `evict` (other big files) from the page cache, then read `path` into it, so
    neither the measurement nor the calibration waits for the disk; seconds taken."""
    started = time.perf_counter()
    for other in evict:
        with other.open("rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    with path.open("rb") as f:
        while f.read(64 << 20):
            pass
    return time.perf_counter() - started


def predict(path: Path, n_ctx: int, depth: int, n_prompt: int) -> dict[str, object]:
    import dataclasses

    from localsmall.models.catalog import load_catalog
    from localsmall.plan.hardware import detect
    from localsmall.plan.memory import RunShape, estimate, text_weights_from_file
    from localsmall.plan.speed import predict as predict_speed
    from localsmall.runtime.speeds import speed_inputs

    hardware = detect()
    started = time.perf_counter()
    inputs = speed_inputs(load_catalog().default, hardware, depth=depth,
                          on_progress=lambda label, done, total: print(
                              f"  calibrating: {label} [{done}/{total}]", file=sys.stderr))
    inputs = dataclasses.replace(inputs, measured=())  # predict, never echo a bench result
    text = text_weights_from_file(path)
    run = RunShape(n_ctx=n_ctx, n_batch=max(n_prompt, 1))
    speed = predict_speed(text=text, quant=None, memory=estimate(text, run), hardware=hardware,
                          run=run, inputs=inputs)
    return {"source": speed.source, "gen": speed.gen_tps_deep, "pp": speed.pp_tps_deep,
            "calibration_s": inputs.calibration.seconds if inputs.calibration else None,
            "predict_s": time.perf_counter() - started}


def measure(path: Path, n_ctx: int, depth: int, n_prompt: int, n_gen: int,
            reps: int) -> dict[str, object]:
    from localsmall.bench.runner import run_bench
    from localsmall.bench.types import BenchRequest
    from localsmall.runtime.options import RunOptions

    request = BenchRequest(targets=(RunOptions(model_path=path, n_ctx=n_ctx, vision=False),),
                           n_prompt=n_prompt, n_gen=n_gen, repetitions=reps, depth=depth,
                           chat_prompt=False)
    (row,) = run_bench(request).speed
    return {"gen": row.tg.mean if row.tg else None, "pp": row.pp.mean if row.pp else None,
            "gen_samples": row.tg.samples if row.tg else (),
            "pp_samples": row.pp.samples if row.pp else (),
            "peak_rss_gib": row.peak_rss_bytes / 2**30, "threads": row.threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--ctx", type=int, action="append", required=True)
    parser.add_argument("--depth", type=int, default=0)
    parser.add_argument("-p", "--n-prompt", type=int, default=32)
    parser.add_argument("-n", "--n-gen", type=int, default=4)
    parser.add_argument("-r", "--repetitions", type=int, default=1)
    parser.add_argument("--out", type=Path, help="append JSON lines here")
    parser.add_argument("--evict", type=Path, action="append", default=[],
                        help="drop this file from the page cache first (repeatable)")
    args = parser.parse_args()
    seconds = page_in(args.model, args.evict)
    print(f"{args.model.name} read into the page cache in {seconds:.0f} s; "
          f"{available_gib():.1f} GiB available; load {load()}", file=sys.stderr)
    print("| file | ctx | depth | gen predicted | gen bench | ratio | prompt predicted | "
          "prompt bench | ratio | load before / after | RAM available | read from disk |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n_ctx in args.ctx:
        before = load()
        predicted = predict(args.model, n_ctx, args.depth, args.n_prompt)
        free, read = available_gib(), vmstat("pgpgin")
        measured = measure(args.model, n_ctx, args.depth, args.n_prompt, args.n_gen,
                           args.repetitions)
        after = load()
        # read from disk while measuring (loading, and weights evicted and read again
        # under memory pressure), in GiB
        measured["disk_read_gib"] = (vmstat("pgpgin") - read) / 2**20
        measured["available_gib_before"] = free

        def ratio(key: str, predicted: dict = predicted, measured: dict = measured) -> str:
            p, m = predicted[key], measured[key]
            return f"{p / m:.2f}" if isinstance(p, float) and isinstance(m, float) else "-"

        print(f"| {args.model.name} | {n_ctx} | {args.depth} | {predicted['gen']:.3f} | "
              f"{measured['gen']:.3f} | {ratio('gen')} | {predicted['pp']:.2f} | "
              f"{measured['pp']:.2f} | {ratio('pp')} | {before} / {after} | "
              f"{free:.1f} GiB | {measured['disk_read_gib']:.1f} GiB |", flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps({"model": str(args.model), "ctx": n_ctx,
                                    "depth": args.depth, "predicted": predicted,
                                    "measured": measured, "load_before": before,
                                    "load_after": after}) + "\n")


if __name__ == "__main__":
    main()
