"""What an image turn costs on this machine, and how big images are made so it stays
bounded: the seconds an image will take (chat.speeds says from what) and the token budget
that keeps it short.

An image of N tokens costs encoding (a fixed part plus N times a per-token part) and
reading: the llama_decode calls the turn needs (each a pass over all the weights) plus
N and the turn's text positions times the per-token cost. The engine reads an image turn
in one call when it can (engine.embed_read), else three (text, image, text). On a CPU the
fixed costs alone can be most of a budget; a CPU-only plan picks the largest image that
keeps an image turn near `target_s`. GPUs keep the full resolution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from localsmall.chat.speeds import Speeds, encode_seconds, read_seconds
from localsmall.images import MAX_IMAGE_TOKENS, MIN_IMAGE_BUDGET, PreparedImage

TARGET_IMAGE_S = 20.0        # what the automatic budget aims for on a CPU
SLOW_IMAGE_S = 10.0          # from here on, an image's cost is said before the turn
TURN_TEXT = 24               # text positions read with an image: template and a question


@dataclass(frozen=True)
class ImagePolicy:
    """How images are sized in a session, and how the engine reads an image turn."""

    max_tokens: int | None = None     # the user's --image-tokens (None: see `auto`)
    auto: bool = False                # CPU-only plan: a budget from the speeds
    base: Speeds | None = None        # speeds known before the chat measures any
    target_s: float = TARGET_IMAGE_S
    n_batch: int = 512                # positions per llama_decode call
    together: bool = True             # text and image share llama_decode calls
    # Keeps speeds this chat measured for the next session (runtime.speed_memory).
    remember: Callable[[Speeds], None] | None = field(default=None, compare=False)


def image_seconds(n_tokens: int, speeds: Speeds, policy: ImagePolicy = ImagePolicy(), *,
                  text: int = TURN_TEXT, ahead: float = 0.0) -> float:
    """Seconds from sending an image turn of `n_tokens` to its first token: what a
    background read still has to read (`ahead` positions, in calls of its own), encoding,
    then reading the image with the `text` positions of the turn the cache does not hold
    (a short question: TURN_TEXT; more when the system prompt or a long text is unread)."""
    n_batch = max(policy.n_batch, 1)
    positions = n_tokens + text
    batches = -(-positions // n_batch)
    if not policy.together:
        batches += 2  # mtmd's helper: the text before and after in calls of their own
    waiting = read_seconds(round(ahead), -(-round(ahead) // n_batch), speeds) if ahead else 0.0
    return waiting + encode_seconds(n_tokens, speeds) + read_seconds(positions, batches, speeds)


def budget_for(speeds: Speeds, policy: ImagePolicy = ImagePolicy()) -> int:
    """The most image tokens whose turn takes at most the policy's target at these
    speeds (MIN_IMAGE_BUDGET when even that is slower: an image cannot be smaller)."""
    low, high = MIN_IMAGE_BUDGET, MAX_IMAGE_TOKENS
    if image_seconds(high, speeds, policy) <= policy.target_s:
        return high
    while high - low > 1:  # the time grows with the tokens: bisect
        middle = (low + high) // 2
        if image_seconds(middle, speeds, policy) <= policy.target_s:
            low = middle
        else:
            high = middle
    return low


def fixed_budget(policy: ImagePolicy) -> int | None:
    """One budget for every image, for a server (it has no chat of its own to measure
    speeds in): the user's, else on a CPU-only plan the one that keeps an image near the
    target at the best speeds known, else None (full resolution)."""
    if policy.max_tokens is not None:
        return policy.max_tokens
    if policy.auto and policy.base is not None:
        return budget_for(policy.base, policy)
    return None


def image_limit(policy: ImagePolicy, speeds: Speeds | None) -> int | None:
    """The token budget for the next image (None: the model's full resolution)."""
    if policy.max_tokens is not None:
        return policy.max_tokens
    if not policy.auto or speeds is None:
        return None
    return budget_for(speeds, policy)


def _text_part(text: int, ahead: float, speeds: Speeds, policy: ImagePolicy) -> str:
    """What the unread text adds, when it is more than a short question's."""
    extra = round(ahead) + max(text - TURN_TEXT, 0)
    if extra < TURN_TEXT:
        return ""
    ahead_batches = -(-round(ahead) // max(policy.n_batch, 1))
    seconds = read_seconds(extra, ahead_batches, speeds)
    what = "the system prompt, still being read" if ahead else "text not read yet"
    return f", {seconds:.0f} s of it for {extra:,} tokens of {what}"


def cost_note(image: PreparedImage, speeds: Speeds | None, *, automatic: bool,
              policy: ImagePolicy = ImagePolicy(), text: int = TURN_TEXT,
              ahead: float = 0.0) -> str:
    """What an image will cost here, said before a slow turn, with the command that
    changes it ("" when it is quick or no speed is known). `text` and `ahead`: the
    turn's unread text (see image_seconds), counted in every figure."""
    if speeds is None or speeds.token_s <= 0:
        return ""
    name = Path(image.source).name
    quoted = f"'{image.source}'" if " " in image.source else image.source
    seconds = image_seconds(image.n_tokens, speeds, policy, text=text, ahead=ahead)
    here = (f"about {seconds:.0f} s to the first token here"
            f"{_text_part(text, ahead, speeds, policy)} ({speeds.describe()})")
    if image.downscaled and automatic:
        full = image_seconds(image.full_tokens, speeds, policy, text=text, ahead=ahead)
        alone = image_seconds(image.n_tokens, speeds, policy)
        aim = (f"to keep this CPU near {policy.target_s:.0f} s per image"
               if alone <= policy.target_s * 1.05 else
               f"(as small as images go: this CPU is too slow or busy for "
               f"{policy.target_s:.0f} s per image)")
        return (f"{name} is scaled to {image.n_tokens} tokens (from {image.full_tokens}) "
                f"{aim}: {here}. Full size would take about {full:.0f} s: "
                f"/image --tokens {image.full_tokens} {quoted}")
    if seconds < SLOW_IMAGE_S:
        return ""
    smaller = budget_for(speeds, policy)
    note = f"This image is {image.n_tokens} tokens: {here}."
    if smaller < image.n_tokens:
        note += (f" For a faster answer, send it smaller: /image --tokens {smaller} {quoted}"
                 f" (about {image_seconds(smaller, speeds, policy, text=text, ahead=ahead):.0f} s)")
    return note
