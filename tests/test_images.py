"""Reading images: formats, orientation, colour, size, and every kind of bad file."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from localsmall.errors import ImageError
from localsmall.images import MAX_IMAGE_TOKENS, fit_to_grid, prepare_image
from tests.tinymodels import image_bytes


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_supported_formats(make_image, fmt: str) -> None:
    image = prepare_image(make_image(f"a.{fmt.lower()}", 112, 84, fmt=fmt))
    assert (image.width, image.height) == (112, 84)
    assert len(image.rgb) == 112 * 84 * 3
    assert image.grid == (4, 3) and image.n_tokens == 4 * 3 + 2


def test_gif_uses_the_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (112, 84), colour) for colour in ("red", "blue")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    image = prepare_image(path)
    assert image.rgb[:3] == bytes((255, 0, 0))  # red, not the blue second frame


# What a viewer shows: a 112x56 picture (4x2 image tokens, on the grid: no resize) with a
# different colour in each quadrant, so any rotation or mirror changes where they land.
QUADRANTS = {"top left": (220, 30, 30), "top right": (30, 200, 30),
             "bottom left": (30, 30, 220), "bottom right": (240, 220, 40)}


def _shown() -> Image.Image:
    image = Image.new("RGB", (112, 56))
    for (row, col), colour in zip([(0, 0), (0, 1), (1, 0), (1, 1)], QUADRANTS.values(),
                                  strict=True):
        image.paste(colour, (col * 56, row * 28, col * 56 + 56, row * 28 + 28))
    return image


# The pixels a camera stores for each EXIF orientation of the picture above: viewers
# undo this (3: turn 180 degrees, 6: turn 90 clockwise, 8: turn 90 anticlockwise).
STORED = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
          8: Image.Transpose.ROTATE_270}
EXIF_FORMATS = {"JPEG": {}, "PNG": {}, "WEBP": {"lossless": True}}


@pytest.mark.parametrize("fmt", list(EXIF_FORMATS))
@pytest.mark.parametrize("orientation", list(STORED))
def test_exif_orientation_is_applied(tmp_path: Path, fmt: str, orientation: int) -> None:
    stored = _shown().transpose(STORED[orientation])
    assert stored.size == ((56, 112) if orientation in (6, 8) else (112, 56))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo.{fmt.lower()}"
    stored.save(path, fmt, exif=exif, **EXIF_FORMATS[fmt])
    assert Image.open(path).getexif().get(0x0112) == orientation  # the tag is in the file
    image = prepare_image(path)
    assert (image.width, image.height) == (112, 56)  # as the viewer shows it
    pixels = Image.frombytes("RGB", (112, 56), image.rgb)
    centres = {"top left": (28, 14), "top right": (84, 14), "bottom left": (28, 42),
               "bottom right": (84, 42)}
    for name, colour in QUADRANTS.items():
        got = pixels.getpixel(centres[name])
        # JPEG is lossy: near the colour, far from every other quadrant's colour
        assert max(abs(a - b) for a, b in zip(got, colour, strict=True)) < 40, (name, got)


def test_transparency_becomes_white(tmp_path: Path) -> None:
    path = tmp_path / "clear.png"
    Image.new("RGBA", (112, 84), (0, 0, 0, 0)).save(path)
    assert set(prepare_image(path).rgb) == {255}


def test_grayscale_is_converted_to_rgb(make_image) -> None:
    path = make_image("g.png", 112, 84, mode="L")
    grey = Image.open(path).tobytes()
    image = prepare_image(path)
    assert len(image.rgb) == 112 * 84 * 3 and len(set(grey)) > 100
    # each pixel's grey level in all three channels, in place
    assert image.rgb == bytes(v for level in grey for v in (level, level, level))


def test_large_images_are_downscaled(make_image) -> None:
    image = prepare_image(make_image("big.png", 3000, 1500))
    assert max(image.width, image.height) <= 1540
    assert image.width % 28 == 0 and image.height % 28 == 0
    cols, rows = image.grid
    assert cols * rows <= MAX_IMAGE_TOKENS
    assert abs(image.width / image.height - 2.0) < 0.1  # aspect kept
    assert image.original_size == (3000, 1500)


def test_fit_to_grid_rules() -> None:
    assert fit_to_grid(112, 84) == (112, 84)                 # already on the grid
    assert fit_to_grid(100, 90) == (112, 84)                 # rounded to multiples of 28
    w, h = fit_to_grid(20000, 100)
    assert w <= 1540 and h >= 28                             # longest side capped
    w, h = fit_to_grid(30, 30)
    assert (w // 28) * (h // 28) >= 8                        # tiny images grow to 8 tokens
    w, h = fit_to_grid(1540, 1540)
    assert (w // 28) * (h // 28) <= MAX_IMAGE_TOKENS


def test_same_pixels_same_key(make_image) -> None:
    a = prepare_image(make_image("a.png", seed=3))
    b = prepare_image(make_image("b.bmp", seed=3, fmt="BMP"))
    c = prepare_image(make_image("c.png", seed=4))
    assert a.key == b.key != c.key


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        prepare_image(tmp_path / "nope.png")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="directory"):
        prepare_image(tmp_path)


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is text, not a picture")
    with pytest.raises(ImageError, match="not an image"):
        prepare_image(path)


@pytest.mark.parametrize(("fmt", "name", "keep"), [("PNG", "cut.png", 2), ("JPEG", "cut.jpg", 3)])
def test_truncated_image(tmp_path: Path, fmt: str, name: str, keep: int) -> None:
    data = image_bytes(400, 300, fmt=fmt)
    path = tmp_path / name
    path.write_bytes(data[: len(data) // keep])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        prepare_image(path)


def test_decompression_bomb(tmp_path: Path) -> None:
    # A tiny PNG file whose header claims 20000 x 20000 pixels (400 megapixels).
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, "PNG")
    path = tmp_path / "bomb.png"
    path.write_bytes(buffer.getvalue())
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageError, match="too large"):
        prepare_image(path)


def test_unsupported_format(tmp_path: Path) -> None:
    path = tmp_path / "scan.tiff"
    Image.new("RGB", (112, 84)).save(path, "TIFF")
    with pytest.raises(ImageError, match="TIFF images are not supported"):
        prepare_image(path)


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (32768, 128), (65535, 255),
                                                 (257 * 64, 64)])
def test_16_bit_grayscale_is_scaled_not_clamped(tmp_path: Path, value: int,
                                                expected: int) -> None:
    """Pillow's own conversion clamps I;16 values above 255: mid-gray became white."""
    import numpy as np

    path = tmp_path / "gray16.png"
    Image.fromarray(np.full((84, 112), value, dtype=np.uint16)).save(path, "PNG")
    with Image.open(path) as opened:
        assert opened.mode in ("I;16", "I")  # really a 16-bit file
    image = prepare_image(path)
    pixels = set(image.rgb)
    assert pixels == {expected}, pixels


def test_devices_and_fifos_are_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(ImageError, match="not a regular file"):
            prepare_image(path)
