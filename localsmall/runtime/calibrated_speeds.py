"""An image turn's costs from this machine's kernel calibration (issue 12), for the image
budget before anything was measured with the model itself (chat.speeds' CALIBRATED).

A calibration times each quant type's kernels per weight: one generated token (`gen_s`:
a pass over the weights, the fixed cost of a llama_decode call) and a prompt read in a
batch (`pp_s`, whose part beyond the pass is the cost of each position). Weighted by the
file's own tensor table, that gives the reading costs. The encoder is not calibrated: its
figures are the plan's estimate, scaled by how far the calibration finds the plan off.
Only a cached calibration is used; none is run here (plan and --min-speed run them).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from localsmall.chat.speeds import CALIBRATED, Speeds
from localsmall.plan.hardware import Hardware
from localsmall.plan.speed import Calibration, kernel, marginal_per_weight, weight_mix


def calibrated_speeds(calibration: Calibration, *, model_path: Path, planned: Speeds
                      ) -> Speeds | None:
    """The reading costs of the model at `model_path` by `calibration`, with `planned`'s
    encoder scaled alike (None: the file or the calibration says too little)."""
    from localsmall.errors import LocalsmallError
    from localsmall.plan.memory import text_weights_from_file

    try:
        text = text_weights_from_file(Path(model_path))
    except (OSError, LocalsmallError):
        return None
    layers, output = weight_mix(text, None)
    batch_s = calibration.gen_overhead_s
    token_s = 0.0
    n = max(calibration.n_prompt, 2)
    for kind, params in layers.items():
        timing = kernel(calibration, kind)
        batch_s += params * timing.gen_s
        token_s += params * marginal_per_weight(timing, n)
    for kind, params in output.items():  # the output head: once per call (last position)
        batch_s += params * kernel(calibration, kind).gen_s
    if batch_s <= 0 or token_s <= 0:
        return None
    fixed = batch_s / planned.batch_s if planned.batch_s > 0 else 1.0
    per_token = token_s / planned.token_s if planned.token_s > 0 else 1.0
    speeds = replace(planned, batch_s=batch_s, token_s=token_s,
                     encode_s=planned.encode_s * fixed,
                     encode_token_s=planned.encode_token_s * per_token, source=CALIBRATED)
    return speeds if speeds.valid() else None


def cached_calibration(hardware: Hardware, n_threads: int) -> Calibration | None:
    """This machine's calibration for `n_threads` from the cache (never runs one)."""
    from localsmall.plan.speed_cache import load_calibration
    from localsmall.runtime.speeds import machine_key

    try:
        return load_calibration(machine_key(hardware, n_threads))
    except (OSError, ValueError):
        return None
