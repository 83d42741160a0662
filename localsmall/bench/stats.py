"""Repeated measurements: mean and sample standard deviation, as llama-bench reports."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Measurement:
    """A value measured `len(samples)` times."""

    mean: float
    stdev: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Measurement:
        """Mean and sample standard deviation (n - 1; 0 for a single sample)."""
        values = tuple(float(s) for s in samples)
        if not values:
            raise ValueError("no samples")
        mean = math.fsum(values) / len(values)
        if len(values) < 2:
            return cls(mean, 0.0, values)
        variance = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
        return cls(mean, math.sqrt(variance), values)


def rates(n_tokens: int, seconds: Sequence[float]) -> Measurement:
    """Tokens per second of each repetition, averaged (llama-bench's avg_ts/stddev_ts:
    the mean of the per-repetition rates, not the rate of the mean time)."""
    return Measurement.of([n_tokens / s for s in seconds])
