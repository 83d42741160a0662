"""Numbers as people read them. Part of the base layer: imports nothing from localsmall."""

from __future__ import annotations

GIB = 1024**3


def gib(n: int) -> str:
    """Bytes as GiB with one decimal ("14.3 GiB"); small sizes in MiB."""
    if n < GIB // 2:
        return f"{n / 1024**2:.0f} MiB"
    return f"{n / GIB:.1f} GiB"


def gib_fixed(n: int, digits: int = 1) -> str:
    """Bytes as GiB, always ("0.2 GiB"): for sizes compared with one another."""
    return f"{n / GIB:.{digits}f} GiB"


def quality_label(kld: float) -> str:
    """How close a quant's output is to the original weights, from its KL divergence."""
    for limit, label in ((0.001, "≈ original"), (0.005, "excellent"), (0.02, "very good"),
                         (0.05, "good"), (0.1, "fair")):
        if kld <= limit:
            return label
    return "degraded"
