"""What an image turn costs on this machine, and how big images are made so it stays
bounded: the speeds known for the machine (measured in this chat, else the plan's
estimate), the seconds an image will take, and the token budget that keeps it short.

An image of N tokens costs N / image_tps seconds of encoding plus N / prompt_tps of
reading into the context; on a CPU the reading dominates (a 341-token image read at
6 tokens/s is a minute), so a CPU-only plan picks a budget that keeps an image turn
near `target_s` seconds. GPUs keep the full resolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from localsmall.engine.types import TurnStats
from localsmall.images import MAX_IMAGE_TOKENS, MIN_IMAGE_BUDGET, PreparedImage

TARGET_IMAGE_S = 20.0        # what the automatic budget aims for on a CPU
SLOW_IMAGE_S = 10.0          # from here on, an image's cost is said before the turn
MIN_MEASURED_TOKENS = 32     # shorter reads say little about the speed
MEASURED = "measured in this chat"
PLANNED = "the plan's estimate"


@dataclass(frozen=True)
class Speeds:
    """Prompt reading and image encoding speeds, and where they come from."""

    prompt_tps: float
    image_tps: float
    source: str                # MEASURED or PLANNED

    def describe(self) -> str:
        return f"prompt {self.prompt_tps:.1f} tok/s, {self.source}"


@dataclass(frozen=True)
class ImagePolicy:
    """How images are sized in a session."""

    max_tokens: int | None = None     # the user's --image-tokens (None: see `auto`)
    auto: bool = False                # CPU-only plan: a budget from the speeds
    planned: Speeds | None = None     # the plan's estimate for this machine
    target_s: float = TARGET_IMAGE_S


def image_seconds(n_tokens: int, speeds: Speeds) -> float:
    """Seconds to encode an image of `n_tokens` and read it into the context."""
    seconds = n_tokens / speeds.prompt_tps if speeds.prompt_tps > 0 else 0.0
    if speeds.image_tps > 0:
        seconds += n_tokens / speeds.image_tps
    return seconds


def budget_for(speeds: Speeds, target_s: float) -> int:
    """The most image tokens that take at most `target_s` at these speeds."""
    per_token = image_seconds(1, speeds)
    if per_token <= 0:
        return MAX_IMAGE_TOKENS
    return max(MIN_IMAGE_BUDGET, min(MAX_IMAGE_TOKENS, math.floor(target_s / per_token)))


def fixed_budget(policy: ImagePolicy) -> int | None:
    """One budget for every image, for a server (it has no chat of its own to measure
    speeds in): the user's, else on a CPU-only plan the one that keeps an image near the
    target at the plan's speeds, else None (full resolution)."""
    if policy.max_tokens is not None:
        return policy.max_tokens
    if policy.auto and policy.planned is not None:
        return budget_for(policy.planned, policy.target_s)
    return None


def measured_speeds(turns: Sequence[TurnStats], planned: Speeds | None) -> Speeds | None:
    """The latest speeds measured in this chat (long enough reads only), the missing one
    scaled from the plan's ratio; the plan's estimate when nothing was measured."""
    prompt = next((t.read_tps for t in reversed(turns)
                   if t.evaluated_tokens >= MIN_MEASURED_TOKENS and t.read_s > 0),
                  0.0)
    image = next((t.image_encode_tps for t in reversed(turns)
                  if t.image_tokens_encoded >= MIN_MEASURED_TOKENS and t.image_encode_s > 0),
                 0.0)
    if not prompt:
        return planned
    if not image and planned is not None and planned.prompt_tps > 0:
        image = prompt * planned.image_tps / planned.prompt_tps
    return Speeds(prompt_tps=prompt, image_tps=image, source=MEASURED)


def image_limit(policy: ImagePolicy, speeds: Speeds | None) -> int | None:
    """The token budget for the next image (None: the model's full resolution)."""
    if policy.max_tokens is not None:
        return policy.max_tokens
    if not policy.auto or speeds is None:
        return None
    return budget_for(speeds, policy.target_s)


def cost_note(image: PreparedImage, speeds: Speeds | None, *, automatic: bool,
              target_s: float = TARGET_IMAGE_S) -> str:
    """What an image will cost here, said before a slow turn, with the command that
    changes it ("" when it is quick or no speed is known)."""
    if speeds is None or speeds.prompt_tps <= 0:
        return ""
    name = Path(image.source).name
    quoted = f"'{image.source}'" if " " in image.source else image.source
    seconds = image_seconds(image.n_tokens, speeds)
    here = f"about {seconds:.0f} s to read here ({speeds.describe()})"
    if image.downscaled and automatic:
        full = image_seconds(image.full_tokens, speeds)
        return (f"{name} is scaled to {image.n_tokens} tokens (from {image.full_tokens}) to "
                f"keep this CPU near {target_s:.0f} s per image: {here}. Full size would "
                f"take about {full:.0f} s: /image --tokens {image.full_tokens} {quoted}")
    if seconds < SLOW_IMAGE_S:
        return ""
    smaller = budget_for(speeds, target_s)
    note = f"This image is {image.n_tokens} tokens: {here}."
    if smaller < image.n_tokens:
        note += (f" For a faster answer, send it smaller: /image --tokens {smaller} {quoted}"
                 f" (about {image_seconds(smaller, speeds):.0f} s)")
    return note
