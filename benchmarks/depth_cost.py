"""Does the planner's cost of a deep context hold? On a narrow model with the real
attention (32 query heads, 8 KV heads, head_dim 128) and the real layer count, times
generation and prompt reading at an empty context and at --depth with `localsmall
bench`'s own code, and compares the extra seconds per token with the calibration's
(plan.speed: n_layers x depth x attn_gen_s / attn_pp_s). Narrow matrices make filling a
deep context cheap; the attention over the cache is the same as the full model's.

    python benchmarks/depth_cost.py --depth 4096
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    from localsmall.bench.calibration_model import LayerShape, write_calibration_model
    from localsmall.bench.runner import run_bench
    from localsmall.bench.types import BenchRequest
    from localsmall.models.catalog import load_catalog
    from localsmall.plan.hardware import detect
    from localsmall.runtime.options import RunOptions
    from localsmall.runtime.speeds import speed_inputs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("-p", "--n-prompt", type=int, default=128)
    parser.add_argument("-n", "--n-gen", type=int, default=8)
    parser.add_argument("-r", "--repetitions", type=int, default=2)
    args = parser.parse_args()
    calibration = speed_inputs(load_catalog().default, detect()).calibration
    assert calibration is not None, "no calibration (LOCALSMALL_CALIBRATE=0?)"
    with tempfile.TemporaryDirectory() as tmp:
        path = write_calibration_model(Path(tmp) / "narrow.gguf",
                                       shape=LayerShape(256, 32, 8, 128, 256),
                                       qtype="Q8_0", n_layers=args.layers)
        rows = {}
        for depth in (0, args.depth):
            before = load()
            request = BenchRequest(
                targets=(RunOptions(model_path=path, n_ctx=args.depth + 512, vision=False),),
                n_prompt=args.n_prompt, n_gen=args.n_gen, repetitions=args.repetitions,
                depth=depth, chat_prompt=False)
            (row,) = run_bench(request).speed
            assert row.tg is not None and row.pp is not None
            rows[depth] = (row.tg.mean, row.pp.mean)
            print(f"depth {depth}: gen {row.tg.mean:.2f} tok/s, prompt {row.pp.mean:.1f} "
                  f"tok/s (load {before} / {load()})", flush=True)
    (g0, p0), (g1, p1) = rows[0], rows[args.depth]
    per = args.layers * args.depth
    for name, measured, model in (("generation", 1 / g1 - 1 / g0, calibration.attn_gen_s),
                                  ("prompt", 1 / p1 - 1 / p0, calibration.attn_pp_s)):
        print(f"{name}: {measured / per * 1e6:.3f} us measured vs {model * 1e6:.3f} us "
              f"modelled per cached position and layer (ratio {model * per / measured:.2f})")


if __name__ == "__main__":
    main()
