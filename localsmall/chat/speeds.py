"""What reading and image encoding cost on this machine, and where the figures come from.

The model of a turn's cost, in seconds (see chat.cost for its use):

- reading the prompt: every llama_decode call makes one pass over all the model's weights
  whatever it carries (`batch_s`: about the time to generate one token), plus `token_s`
  per position read. On a 2-core CPU with the 24B model the first is over a second and
  the second about a sixth of one, so a short read is mostly fixed cost.
- encoding an image: `encode_s` per image (a pass over the projector's weights and the
  encoder's set-up) plus `encode_token_s` per image token (4 patches each).

The figures come from the best source there is, in this order: this chat's own turns
(MEASURED), an earlier session on this machine with the same model and threads (STORED,
see runtime.speed_memory), this machine's kernel calibration weighted by the model file's
tensor types (CALIBRATED, see runtime.calibrated_speeds), the plan's estimate (PLANNED:
memory bandwidth for the fixed part, compute for the per-token part; often optimistic on a
busy machine). A measurement
that cannot separate the fixed from the per-token part scales the next source's pair by
one factor (the machine is that much slower or faster than it says).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from localsmall.engine.types import TurnStats

MEASURED = "measured in this chat"
STORED = "measured here earlier"
CALIBRATED = "this machine's calibration"
PLANNED = "the plan's estimate"
MIN_MEASURED_TOKENS = 16     # shorter reads say little about the per-token part
MIN_MEASURED_STEPS = 2       # generated tokens (after the first) that time a batch


@dataclass(frozen=True)
class Speeds:
    """The costs of reading and encoding (see the module docstring), in seconds."""

    batch_s: float             # per llama_decode call
    token_s: float             # per prompt position read
    encode_s: float            # per image encoded
    encode_token_s: float      # per image token encoded
    source: str                # MEASURED, STORED or PLANNED

    @property
    def prompt_tps(self) -> float:
        """Prompt positions read per second in a long read (fixed costs left out)."""
        return 1 / self.token_s if self.token_s > 0 else 0.0

    def valid(self) -> bool:
        """All four figures finite and usable (a stored file may hold anything)."""
        values = (self.batch_s, self.token_s, self.encode_s, self.encode_token_s)
        return all(math.isfinite(v) and 0 <= v < 1e6 for v in values) and self.token_s > 0

    def scaled(self, factor: float, source: str) -> Speeds:
        """Every figure `factor` times as long."""
        return Speeds(self.batch_s * factor, self.token_s * factor, self.encode_s * factor,
                      self.encode_token_s * factor, source)

    def describe(self) -> str:
        return (f"{self.batch_s:.1f} s per batch + {self.prompt_tps:.1f} tok/s reading, "
                f"{self.source}")


def read_seconds(n_positions: int, n_batches: int, speeds: Speeds) -> float:
    """Seconds to read `n_positions` in `n_batches` llama_decode calls."""
    return n_batches * speeds.batch_s + n_positions * speeds.token_s


def encode_seconds(n_tokens: int, speeds: Speeds) -> float:
    """Seconds to encode one image of `n_tokens`."""
    return speeds.encode_s + n_tokens * speeds.encode_token_s if n_tokens > 0 else 0.0


def _step_s(turns: Sequence[TurnStats]) -> float:
    """Seconds per generated token in the latest reply long enough to tell (0: none).
    Each is one llama_decode call of one position: the fixed cost of a batch."""
    for t in reversed(turns):
        steps = t.generated_tokens - 1
        if steps >= MIN_MEASURED_STEPS and t.generation_s > 0:
            return t.generation_s / steps
    return 0.0


def _reading(turns: Sequence[TurnStats], base: Speeds, batch_s: float) -> Speeds | None:
    """`base` with its reading figures fitted to the latest long read (None: none)."""
    for t in reversed(turns):
        if t.evaluated_tokens < MIN_MEASURED_TOKENS or t.read_s <= 0:
            continue
        batches = max(t.read_batches, 1)
        if batch_s > 0:
            per_token = (t.read_s - batches * batch_s) / t.evaluated_tokens
            # A read faster than its batches alone: the two timings disagree (load
            # changed between them); trust the read, scaled as a whole below.
            if per_token > 0:
                return replace(base, batch_s=batch_s, token_s=per_token, source=MEASURED)
        predicted = read_seconds(t.evaluated_tokens, batches, base)
        if predicted > 0:
            factor = t.read_s / predicted
            return replace(base, batch_s=base.batch_s * factor, token_s=base.token_s * factor,
                           source=MEASURED)
    if batch_s > 0 and base.batch_s > 0:  # only generation measured: scale by it
        factor = batch_s / base.batch_s
        return replace(base, batch_s=batch_s, token_s=base.token_s * factor, source=MEASURED)
    return None


def _encoding(turns: Sequence[TurnStats], base: Speeds, reading_factor: float
              ) -> tuple[float, float]:
    """(encode_s, encode_token_s): fitted to the two latest measured encodes of one
    image each when their sizes differ enough to tell the parts apart, else the latest
    one scales `base`'s pair; with none, the factor the reading was found off by."""
    encodes = [(t.image_tokens_encoded, t.image_encode_s) for t in turns
               if t.images_encoded == 1 and t.image_encode_s > 0]
    sizes = dict(encodes[-4:])  # the latest timing of each size
    if len(sizes) >= 2:
        (n1, s1), (n2, s2) = sorted(sizes.items())[0], sorted(sizes.items())[-1]
        if n2 >= 1.5 * n1:
            per_token = (s2 - s1) / (n2 - n1)
            fixed = s1 - n1 * per_token
            if per_token > 0 and fixed >= 0:
                return fixed, per_token
    for t in reversed(turns):
        if t.images_encoded and t.image_encode_s > 0:
            predicted = (t.images_encoded * base.encode_s
                         + t.image_tokens_encoded * base.encode_token_s)
            if predicted > 0:
                factor = t.image_encode_s / predicted
                return base.encode_s * factor, base.encode_token_s * factor
    return base.encode_s * reading_factor, base.encode_token_s * reading_factor


def measured_speeds(turns: Sequence[TurnStats], base: Speeds | None) -> Speeds | None:
    """Speeds fitted to this chat's turns (their timings replace `base`'s, the best
    earlier source), or `base` itself when no turn measured anything usable."""
    if base is None:
        return None
    reading = _reading(turns, base, _step_s(turns))
    if reading is None:
        if not any(t.images_encoded and t.image_encode_s > 0 for t in turns):
            return base
        reading = replace(base, source=MEASURED)
    factor = reading.token_s / base.token_s if base.token_s > 0 else 1.0
    encode_s, encode_token_s = _encoding(turns, base, factor)
    return replace(reading, encode_s=encode_s, encode_token_s=encode_token_s)
