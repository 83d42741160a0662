"""Images named by `image_url` parts: data: URLs decoded, http(s) URLs fetched, both with
a size limit (and a time limit for fetches), then prepared like any image."""

from __future__ import annotations

import base64
import binascii
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from localsmall.errors import ImageError
from localsmall.images import PreparedImage, prepare_image_bytes
from localsmall.server.errors import invalid
from localsmall.server.requests import ImageRef

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+/-]*)(?P<params>(?:;[^,;]*)*?)(?P<b64>;base64)?,",
                       re.IGNORECASE)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024   # one image, decoded or downloaded
    fetch_timeout_s: float = 10.0       # whole download of an http(s) image
    allow_remote: bool = True           # fetch http(s) URLs at all
    max_tokens: int | None = None       # image budget: --image-tokens, or the CPU default


def decode_data_url(ref: ImageRef, limits: ImageLimits) -> bytes:
    """The bytes of a `data:` URL (base64 or percent-encoded)."""
    match = _DATA_URL.match(ref.url)
    if match is None:
        raise invalid(ref.param, "a data URL must look like data:image/png;base64,...")
    payload = ref.url[match.end():]
    if len(payload) > limits.max_bytes * 4 // 3 + 4:
        raise _too_large(ref, limits)
    if not match.group("b64"):
        from urllib.parse import unquote_to_bytes

        data = unquote_to_bytes(payload)
    else:
        try:
            data = base64.b64decode(payload.strip(), validate=False)
        except (binascii.Error, ValueError):
            raise invalid(ref.param, "the image's data URL is not valid base64") from None
    if len(data) > limits.max_bytes:
        raise _too_large(ref, limits)
    return data


def _size(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n / 2**10:g} KiB"


def _too_large(ref: ImageRef, limits: ImageLimits) -> Exception:
    return invalid(ref.param, f"the image is larger than the {_size(limits.max_bytes)} "
                   "limit", code="image_too_large")


def _not_an_image(content_type: str) -> bool:
    """A Content-Type that no image is served as (a web page, an error as JSON); other
    types, octet-stream or none, are left for the image decoder to judge."""
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind.startswith("text/") or kind in ("application/json", "application/xml",
                                                "application/xhtml+xml")


async def fetch_url(ref: ImageRef, limits: ImageLimits) -> bytes:
    """Download an http(s) image within the size and time limits."""
    import anyio
    import httpx2

    if not limits.allow_remote:
        raise invalid(ref.param, "this server does not fetch image URLs; send the image as a "
                      "data: URL")
    deadline = time.monotonic() + limits.fetch_timeout_s
    chunks: list[bytes] = []
    size = 0
    try:
        with anyio.fail_after(limits.fetch_timeout_s):
            async with httpx2.AsyncClient(follow_redirects=True, max_redirects=3,
                                          timeout=limits.fetch_timeout_s) as client, \
                    client.stream("GET", ref.url) as response:
                if response.status_code != 200:
                    raise invalid(ref.param, f"fetching the image failed: {ref.url} answered "
                                  f"{response.status_code}")
                content_type = response.headers.get("content-type", "")
                if _not_an_image(content_type):
                    raise invalid(ref.param, f"{ref.url} is not an image (it answered "
                                  f"{content_type[:60]})", code="invalid_image")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limits.max_bytes:
                    raise _too_large(ref, limits)
                async for block in response.aiter_bytes():
                    size += len(block)
                    if size > limits.max_bytes:
                        raise _too_large(ref, limits)
                    chunks.append(block)
                    if time.monotonic() > deadline:
                        raise TimeoutError
    except TimeoutError:
        raise invalid(ref.param, f"fetching the image took longer than "
                      f"{limits.fetch_timeout_s:g} s", code="image_fetch_timeout") from None
    except httpx2.TooManyRedirects:
        raise invalid(ref.param, "fetching the image failed: more than 3 redirects") \
            from None
    except httpx2.HTTPError as exc:
        raise invalid(ref.param, f"fetching the image failed ({type(exc).__name__}: "
                      f"{str(exc)[:200]})") from None
    return b"".join(chunks)


def prepare(ref: ImageRef, data: bytes, index: int,
            limits: ImageLimits = ImageLimits()) -> PreparedImage:
    """Validate and prepare downloaded or decoded image bytes (CPU work: run it in a
    thread)."""
    source = ref.url if ref.url.startswith(("http://", "https://")) else f"image {index}"
    try:
        return prepare_image_bytes(data, source[:200], max_tokens=limits.max_tokens)
    except ImageError as exc:
        raise invalid(ref.param, str(exc), code="invalid_image") from None


class RecentImages:
    """Images prepared from recent data: URLs. Clients resend the whole conversation, so
    turn 6 carries turn 1's image again: decoding and resizing it once is enough.

    A URL is found by its length and a few slices (cheap even for megabytes), then
    confirmed by comparing the whole URL with the one kept (a memcmp, ~10 us per MB):
    no hash of the megabytes on the way to every first token, and never a wrong image.
    At most `size` images and `max_chars` characters of URLs are kept."""

    def __init__(self, size: int = 16, max_chars: int = 64 * 2**20) -> None:
        self._images: OrderedDict[tuple[object, ...], tuple[str, PreparedImage]] = \
            OrderedDict()
        self._size, self._max_chars, self._chars = size, max_chars, 0
        self._lock = threading.Lock()

    @staticmethod
    def _key(url: str, limits: ImageLimits) -> tuple[object, ...]:
        middle = len(url) // 2
        return (limits.max_tokens, len(url), url[:80], url[middle:middle + 64], url[-64:])

    def get(self, url: str, limits: ImageLimits) -> PreparedImage | None:
        key = self._key(url, limits)
        with self._lock:
            known = self._images.get(key)
            if known is None or known[0] != url:
                return None
            self._images.move_to_end(key)
            return known[1]

    def put(self, url: str, limits: ImageLimits, image: PreparedImage) -> None:
        if len(url) > self._max_chars:
            return
        key = self._key(url, limits)
        with self._lock:
            if (old := self._images.pop(key, None)) is not None:
                self._chars -= len(old[0])
            self._images[key] = (url, image)
            self._chars += len(url)
            while len(self._images) > self._size or self._chars > self._max_chars:
                self._chars -= len(self._images.popitem(last=False)[1][0])


RECENT = RecentImages()


def known_image(ref: ImageRef, limits: ImageLimits) -> PreparedImage | None:
    """The prepared image of a data: URL seen recently, without decoding it again."""
    return RECENT.get(ref.url, limits) if ref.url[:5].lower() == "data:" else None


async def load_image(ref: ImageRef, limits: ImageLimits, index: int) -> PreparedImage:
    """The prepared image an `image_url` part names."""
    import anyio

    scheme = ref.url.split(":", 1)[0].lower()
    if scheme == "data":
        if (known := RECENT.get(ref.url, limits)) is not None:
            return known
        data = decode_data_url(ref, limits)
        image = await anyio.to_thread.run_sync(prepare, ref, data, index, limits)
        RECENT.put(ref.url, limits, image)
        return image
    elif scheme in ("http", "https"):
        data = await fetch_url(ref, limits)
    else:
        raise invalid(ref.param, "image_url must be a data: URL or an http(s) URL")
    return await anyio.to_thread.run_sync(prepare, ref, data, index, limits)
