"""Reading images for the vision encoder (Pillow): validation, orientation, RGB, size.

An image is prepared once, when the user attaches it: the result holds RGB pixels
already at the size the projector will see, on the 28-pixel grid Pixtral uses
(14 px patches merged 2x2), so llama.cpp's own preprocessing leaves it unchanged and
the number of image tokens is known before encoding.
"""

from __future__ import annotations

import errno
import hashlib
import io
import math
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from localsmall.errors import ImageError
from localsmall.fileio import read_regular_file

SUPPORTED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "WEBP": "WebP",
                     "GIF": "GIF", "BMP": "BMP"}
MAX_SIDE = 1540            # Mistral Small 3.2's longest image side
GRID = 28                  # pixels per image token: 14 px patches, 2x2 merge
MAX_IMAGE_TOKENS = 1024    # llama.cpp's cap for Pixtral (merged patches)
MIN_IMAGE_TOKENS = 8       # below this llama.cpp upscales the image
MAX_PIXELS = 100_000_000   # larger files are refused as decompression bombs
MAX_FILE_BYTES = 200 * 1024 * 1024


@dataclass(frozen=True)
class PreparedImage:
    """An image ready for the projector: RGB bytes at `width` x `height`."""

    key: str                  # sha256 of size + pixels: identifies the content
    width: int
    height: int
    rgb: bytes
    source: str               # where it came from (a path), for display
    original_size: tuple[int, int]

    @property
    def grid(self) -> tuple[int, int]:
        """Image tokens per row and number of rows."""
        return self.width // GRID, self.height // GRID

    @property
    def n_tokens(self) -> int:
        """Positions the image takes in the prompt: its patches plus one [IMG_BREAK]
        per row but the last (llama.cpp adds the closing [IMG_END] as text)."""
        cols, rows = self.grid
        return cols * rows + rows - 1

    def to_png(self) -> bytes:
        """The prepared pixels as PNG bytes (to embed in a saved conversation)."""
        out = io.BytesIO()
        Image.frombytes("RGB", (self.width, self.height), self.rgb).save(out, "PNG")
        return out.getvalue()


def fit_to_grid(width: int, height: int, *, max_side: int = MAX_SIDE,
                max_tokens: int = MAX_IMAGE_TOKENS,
                min_tokens: int = MIN_IMAGE_TOKENS) -> tuple[int, int]:
    """The size an image is resized to: longest side at most `max_side`, sides multiples
    of 28, and between `min_tokens` and `max_tokens` image tokens (aspect kept)."""
    scale = min(1.0, max_side / max(width, height))
    w, h = width * scale, height * scale
    out_w = max(GRID, round(w / GRID) * GRID)
    out_h = max(GRID, round(h / GRID) * GRID)
    tokens = (out_w // GRID) * (out_h // GRID)
    if tokens > max_tokens:
        beta = math.sqrt(w * h / (max_tokens * GRID * GRID))
        out_w = max(GRID, math.floor(w / beta / GRID) * GRID)
        out_h = max(GRID, math.floor(h / beta / GRID) * GRID)
    elif tokens < min_tokens:
        beta = math.sqrt(min_tokens * GRID * GRID / (w * h))
        out_w = math.ceil(w * beta / GRID) * GRID
        out_h = math.ceil(h * beta / GRID) * GRID
    return out_w, out_h


def _open(data: bytes, source: str) -> Image.Image:
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that: refuse both.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            fmt = image.format or ""
            if fmt not in SUPPORTED_FORMATS:
                raise ImageError(f"{source}: {fmt or 'this'} images are not supported; "
                                 "use PNG, JPEG, WebP, GIF or BMP")
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(f"{source}: image is too large ({image.width}x{image.height}"
                                 f" pixels); the limit is {MAX_PIXELS // 1_000_000} megapixels")
            image.seek(0)  # first frame of an animated GIF or WebP
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"{source}: image is too large (decompression bomb "
                             "protection); resize it first") from None
        except UnidentifiedImageError:
            raise ImageError(f"{source}: not an image (or a format Pillow cannot read); "
                             "use PNG, JPEG, WebP, GIF or BMP") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{source}: image is truncated or corrupt ({exc})") from None
    return image


def _gray16_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale (PNG's I;16 or I) scaled to 8 bits: Pillow's own conversion
    clamps every value above 255, which turns most of such an image white."""
    values = np.asarray(image).astype(np.int64)  # any byte order
    scaled = (np.clip(values, 0, 65535) * 255 + 32767) // 65535
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def _to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        image = _gray16_to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency"
                                               in image.info):
        # Transparent pixels become white, as image viewers show them.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def prepare_image_bytes(data: bytes, source: str) -> PreparedImage:
    """Validate and prepare image file contents (see `prepare_image`)."""
    image = _open(data, source)
    try:
        image = _to_rgb(image)
        original = image.size
        size = fit_to_grid(*original)
        if size != original:
            image = image.resize(size, Image.Resampling.BICUBIC)
        rgb = image.tobytes()
    except (OSError, SyntaxError, ValueError, TypeError, IndexError, struct.error) as exc:
        # Pillow's decoders and converters fail in many ways on damaged files.
        raise ImageError(f"{source}: image is corrupt ({exc})") from None
    key = hashlib.sha256(f"{size[0]}x{size[1]}:".encode() + rgb).hexdigest()
    return PreparedImage(key=key, width=size[0], height=size[1], rgb=rgb, source=source,
                         original_size=original)


def prepare_image(path: str | Path) -> PreparedImage:
    """Read an image file for the model. Raises ImageError with a one-line reason for a
    missing file, something that is not a regular file (a device or FIFO is never read),
    a non-image, a truncated file, a decompression bomb or an unsupported format."""
    file = Path(path).expanduser()
    source = str(path)
    try:
        data = read_regular_file(file, MAX_FILE_BYTES)
    except FileNotFoundError:
        raise ImageError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{source}: is a directory, not an image") from None
    except PermissionError:
        raise ImageError(f"{source}: permission denied") from None
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            raise ImageError(f"{source}: file is too large for an image "
                             f"(over {MAX_FILE_BYTES // 2**20} MiB)") from None
        if exc.errno == errno.EINVAL:
            raise ImageError(f"{source}: not a regular file (a device, FIFO or socket); "
                             "give an image file") from None
        raise ImageError(f"{source}: cannot read ({exc.strerror or exc})") from None
    return prepare_image_bytes(data, source)
