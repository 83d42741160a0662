"""The quantization types `localsmall convert --quant` offers (llama.cpp's own list).

`bits` is the approximate bits per weight of a whole file, used only to check free disk
space before starting; `needs_imatrix` marks the types whose llama.cpp quantizer refuses
to run without an importance matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

from localsmall.errors import UsageError


@dataclass(frozen=True)
class QuantType:
    """One llama.cpp quantization type (a LLAMA_FTYPE_MOSTLY_* value)."""

    name: str
    bits: float
    needs_imatrix: bool = False


QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in (
    QuantType("Q4_0", 4.6), QuantType("Q4_1", 5.1), QuantType("Q5_0", 5.6),
    QuantType("Q5_1", 6.1), QuantType("Q8_0", 8.5),
    QuantType("Q2_K", 3.4), QuantType("Q2_K_S", 3.2, needs_imatrix=True),
    QuantType("Q3_K_S", 3.6), QuantType("Q3_K_M", 4.0), QuantType("Q3_K_L", 4.3),
    QuantType("Q4_K_S", 4.7), QuantType("Q4_K_M", 4.9), QuantType("Q5_K_S", 5.6),
    QuantType("Q5_K_M", 5.7), QuantType("Q6_K", 6.6),
    QuantType("IQ1_S", 1.8, needs_imatrix=True), QuantType("IQ1_M", 2.0, needs_imatrix=True),
    QuantType("IQ2_XXS", 2.3, needs_imatrix=True), QuantType("IQ2_XS", 2.5, needs_imatrix=True),
    QuantType("IQ2_S", 2.7, needs_imatrix=True), QuantType("IQ2_M", 2.9, needs_imatrix=True),
    QuantType("IQ3_XXS", 3.3, needs_imatrix=True), QuantType("IQ3_XS", 3.5),
    QuantType("IQ3_S", 3.7), QuantType("IQ3_M", 3.9), QuantType("IQ4_NL", 4.7),
    QuantType("IQ4_XS", 4.5),
)}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


def parse_quants(spec: str | None) -> tuple[QuantType, ...]:
    """"Q4_K_M,Q5_K_M" -> the types, in order, without duplicates."""
    if not spec:
        return ()
    chosen: list[QuantType] = []
    for raw in spec.split(","):
        name = raw.strip().upper().replace("-", "_")
        if not name:
            continue
        name = ALIASES.get(name, name)
        if name not in QUANT_TYPES:
            known = ", ".join(QUANT_TYPES)
            raise UsageError(f"unknown quant type {raw.strip()!r}; choose from: {known}")
        if QUANT_TYPES[name] not in chosen:
            chosen.append(QUANT_TYPES[name])
    return tuple(chosen)


def estimated_size(quant: QuantType, n_params: int) -> int:
    """A generous size estimate of a quantized file (for the free-disk check)."""
    return int(n_params * (quant.bits + 0.5) / 8) + 32 * 1024 * 1024
