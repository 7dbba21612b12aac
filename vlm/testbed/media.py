"""Test images for the local web: formats, awkward encodings, broken and hostile bodies.

Pure functions (cached): the bytes `LocalWeb` serves and the statuses a correct downloader
should report for each failure kind. See `vlm.testbed.web`.
"""

from __future__ import annotations

import collections
import functools
import io
import logging
import struct
import threading
import zlib
from typing import Any

import numpy as np
from PIL import Image

from vlm.testbed.digits import render_digit

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- constants

FORMATS = ("jpg", "png", "webp", "gif")
CONTENT_TYPES = {
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
}
_PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF"}

# Variant -> the format it needs (None: any). A variant whose format differs from the URL's
# extension is served in the variant's format, with the matching Content-Type.
VARIANTS: dict[str, str | None] = {
    "cmyk": "jpg",
    "exif6": "jpg",
    "progressive": "jpg",
    "gray": None,
    "palette": "png",
    "rgba": "png",
    "png16": "png",
}

# kind=... of /optout/{kind}/ -> X-Robots-Tag header value(s).
OPTOUT_HEADERS: dict[str, tuple[str, ...]] = {
    "noai": ("noai",),
    "noimageai": ("noimageai, noindex",),
    "noindex": ("noindex",),
    "scoped": ("vlmbot: noai",),
    "otherbot": ("otherbot: noai",),
    "multi": ("nofollow", "noimageindex"),
}

DEFAULT_SIZE = 256
MAX_SIDE = 4096
BOMB_SIDE = 30000
OVERSIZED_BYTES = 40 * 1024 * 1024
STREAM_CHUNK = 256 * 1024

SUCCESS = "success"
FAILED_TO_DOWNLOAD = "failed_to_download"
FAILED_TO_RESIZE = "failed_to_resize"
SKIPPED_OPTOUT = "skipped_optout"
SKIPPED_DUPLICATE = "skipped_duplicate"

# Failure kind -> expected status for a correct downloader with default settings
# (private networks allowed, user agent token "vlmbot", one retry, honours Retry-After).
FAILURE_KINDS: dict[str, str] = {
    "404": FAILED_TO_DOWNLOAD,
    "500": FAILED_TO_DOWNLOAD,
    "403": FAILED_TO_DOWNLOAD,
    "slow": FAILED_TO_DOWNLOAD,
    "reset": FAILED_TO_DOWNLOAD,
    "loop": FAILED_TO_DOWNLOAD,
    "oversized": FAILED_TO_DOWNLOAD,
    "wrongtype": FAILED_TO_DOWNLOAD,
    "flaky": SUCCESS,
    "ratelimit": SUCCESS,
    "redirect": SUCCESS,
    "truncated": FAILED_TO_RESIZE,
    "corrupt": FAILED_TO_RESIZE,
    "empty": FAILED_TO_RESIZE,
    "bomb": FAILED_TO_RESIZE,
    "optout_noai": SKIPPED_OPTOUT,
    "optout_noimageai": SKIPPED_OPTOUT,
    "optout_noindex": SKIPPED_OPTOUT,
    "optout_scoped": SKIPPED_OPTOUT,
    "optout_multi": SKIPPED_OPTOUT,
    "optout_otherbot": SUCCESS,
}

URL_COLUMNS = ("url", "caption", "label", "noisy", "expected_status", "kind", "index")


# ---------------------------------------------------------------- encoding (pure, cached)


def norm_ext(ext: str) -> str:
    ext = ext.lower()
    return "jpg" if ext == "jpeg" else ext


def encode_image(
    index: int, ext: str, width: int, height: int, variant: str | None = None, seed: int = 0
) -> tuple[bytes, str]:
    """Digit `index` rendered at `width` x `height` and encoded -> (bytes, content type).

    `variant` (see VARIANTS) picks an awkward-but-valid encoding; jpg-only and png-only
    variants override `ext`.
    """
    ext = norm_ext(ext)
    if ext not in FORMATS:
        raise ValueError(f"unknown image format {ext!r}; expected one of {FORMATS}")
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {tuple(VARIANTS)}")
    if variant is not None and VARIANTS[variant] is not None:
        ext = VARIANTS[variant]
    img = render_digit(index, width, height, seed=seed)
    buf = io.BytesIO()
    fmt = _PIL_FORMATS[ext]
    if variant == "cmyk":
        img.convert("CMYK").save(buf, "JPEG", quality=88)
    elif variant == "exif6":
        # Stored rotated 90 degrees counter-clockwise; Orientation=6 says "rotate 90 CW to
        # display", so only a viewer that honours EXIF sees the upright width x height image.
        exif = Image.Exif()
        exif[0x0112] = 6
        img.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=88, exif=exif.tobytes())
    elif variant == "progressive":
        img.save(buf, "JPEG", quality=88, progressive=True)
    elif variant == "gray":
        gray = img.convert("L")
        if fmt == "JPEG":
            gray.save(buf, fmt, quality=88)
        else:
            gray.save(buf, fmt)
    elif variant == "palette":
        pal = img.quantize(colors=16, method=Image.Quantize.MEDIANCUT)
        # The most common index is the paper: make it the transparent one.
        counts = np.bincount(np.asarray(pal, dtype=np.uint8).ravel(), minlength=16)
        pal.save(buf, "PNG", transparency=int(counts.argmax()), compress_level=1)
    elif variant == "rgba":
        arr = np.asarray(img.convert("L"), dtype=np.int16)
        # Paper semi-transparent, ink opaque: composited on white the digit still shows.
        alpha = np.clip(96 + (255 - arr) * 2, 0, 255).astype(np.uint8)
        rgba = img.copy()
        rgba.putalpha(Image.fromarray(alpha))
        rgba.save(buf, "PNG", compress_level=1)
    elif variant == "png16":
        arr16 = np.asarray(img.convert("L"), dtype=np.uint16) * np.uint16(257)
        Image.fromarray(arr16).save(buf, "PNG", compress_level=1)  # mode I;16
    elif fmt == "JPEG":
        img.save(buf, "JPEG", quality=88)
    elif fmt == "PNG":
        img.save(buf, "PNG", compress_level=1)
    elif fmt == "WEBP":
        img.save(buf, "WEBP", quality=80, method=0)
    else:
        img.save(buf, fmt)
    return buf.getvalue(), CONTENT_TYPES[ext]


@functools.lru_cache(maxsize=1)
def bomb_png() -> bytes:
    """A ~110 kB PNG declaring 30000 x 30000 1-bit pixels (all black): a decompression bomb.

    Written by hand (zlib of repeated zero rows, compressed in chunks) so it costs a few
    hundred ms once, never a 900-megapixel image in memory.
    """
    width = height = BOMB_SIDE
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed 1-bit samples
    rows_per_block = 1000
    block = row * rows_per_block
    comp = zlib.compressobj(9)
    parts = []
    done = 0
    while done < height:
        take = min(rows_per_block, height - done)
        parts.append(comp.compress(block if take == rows_per_block else row * take))
        done += take
    parts.append(comp.flush())
    data = b"".join(parts)

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    idats = b"".join(chunk(b"IDAT", data[i : i + (1 << 20)]) for i in range(0, len(data), 1 << 20))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idats + chunk(b"IEND", b"")


def corrupt_jpeg(jpeg: bytes, seed: int = 0) -> bytes:
    """Keep the SOI marker and the JFIF APP0 segment, replace everything after with garbage.

    The garbage holds no 0xFF byte, so no decoder can find the next marker.
    """
    if jpeg[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    header_len = 2
    if jpeg[2:4] == b"\xff\xe0":
        header_len = 4 + struct.unpack(">H", jpeg[4:6])[0]
    rng = np.random.default_rng(seed)
    garbage = rng.integers(0, 255, size=max(len(jpeg) - header_len, 64), dtype=np.uint8).tobytes()
    return jpeg[:header_len] + garbage


class ByteLRU:
    """Thread-safe LRU of encoded bodies bounded by total bytes."""

    def __init__(self, max_bytes: int = 128 * 1024 * 1024, max_item_bytes: int = 16 * 1024 * 1024):
        self._data: collections.OrderedDict[Any, tuple[bytes, str]] = collections.OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._max_item = max_item_bytes
        self._lock = threading.Lock()

    def get(self, key: Any) -> tuple[bytes, str] | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: Any, value: tuple[bytes, str]) -> None:
        size = len(value[0])
        if size > self._max_item:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= len(old[0])
            self._data[key] = value
            self._bytes += size
            while self._bytes > self._max_bytes and self._data:
                _, dropped = self._data.popitem(last=False)
                self._bytes -= len(dropped[0])

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)
