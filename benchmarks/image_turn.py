"""What an image turn costs on the full-size model: a Pixtral projector of the real size
(24 layers, 1024 wide, FFN 4096, 16 heads, 5120-wide output: 878 MB in F16, random
weights) for the full-shape text model of ../shared/tools/make_fullshape.py, and a
photo-like test image.

    .venv/bin/python benchmarks/image_turn.py projector OUT.gguf   # ~1 minute, ~3 GB RAM
    .venv/bin/python benchmarks/image_turn.py photo OUT.png 1024 768

Then time a turn, e.g. with the default CPU budget and at full size:

    localsmall run --json --no-system -m model.gguf --mmproj OUT.gguf -i OUT.png -n 1 \
        "What is in this picture?"
    localsmall run --json --no-system ... --image-tokens 1024 ...   # full size

`stats` holds image_tokens_encoded, image_encode_s, read_s and time_to_first_token_s.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localsmall.convert.gguf_files import VisionHParams
from tests import tinymodels as tm

FULL_VISION = VisionHParams(n_layers=24, n_embd=1024, n_head=16, n_ff=4096,
                            projection_dim=5120, patch_size=14, image_size=1540,
                            spatial_merge_size=2, rms_eps=1e-5)


def write_projector(path: Path) -> Path:
    """The real-size projector, F16 like the published mmproj-F16.gguf."""
    # Only the [IMG_BREAK] row of the text embedding goes into the projector.
    img_break = tm.tiny_vocab().token_id("[IMG_BREAK]")
    embd = np.random.default_rng(2).standard_normal((img_break + 1, 5120)).astype(np.float32)
    return tm.write_mmproj(path, {"token_embd.weight": embd * 0.02}, vp=FULL_VISION,
                           dtype="f16")


def write_photo(path: Path, width: int, height: int) -> Path:
    """Smooth gradients and shapes with a little noise: compresses and looks like a photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(0)
    r = 128 + 100 * np.sin(x / 97) * np.cos(y / 131)
    g = 128 + 90 * np.cos((x + y) / 173)
    b = 255 * (y / height)
    pixels = np.stack([r, g, b], axis=-1) + rng.normal(0, 6, (height, width, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


def main(argv: list[str]) -> None:
    if len(argv) >= 2 and argv[0] == "projector":
        print(write_projector(Path(argv[1])))
    elif len(argv) == 4 and argv[0] == "photo":
        print(write_photo(Path(argv[1]), int(argv[2]), int(argv[3])))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
