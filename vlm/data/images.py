"""Decode, validate, resize and re-encode downloaded images.

The resize modes are the ones img2dataset users know (``no``, ``border``, ``keep_ratio``,
``keep_ratio_largest``, ``center_crop``, plus ``resize_only_if_bigger``); img2dataset's resizer
is the design this module follows. It is a fresh implementation on Pillow rather than OpenCV,
and it leans on three things for speed:

* JPEGs that will be downscaled are decoded at reduced scale (``Image.draft``: libjpeg's DCT
  scaling by 1/2, 1/4 or 1/8), never below the size the resize needs, so no detail is lost.
* Resizing uses ``reducing_gap`` (a cheap integer box reduction first, then the filter over
  the remaining factor) and, for ``center_crop``, resamples only the kept square (``box=``).
* Work happens in the stored orientation and in the fewest channels: grayscale stays ``L``
  until after the resize, and the EXIF rotation is applied to the small resized image.

Every failure of the bytes themselves (empty, not an image, truncated, corrupt, too big, too
small, too elongated) raises `ImageError` with a one-line reason; callers record it and move
on. The same bytes and config always give the same output bytes.
"""

from __future__ import annotations

import io
import math
import threading
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageConfig", "ImageError", "ProcessedImage", "process_image"]

ResizeMode = Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]
EncodeFormat = Literal["jpg", "png", "webp"]

_RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
_ENCODE_FORMATS = ("jpg", "png", "webp")

# Resampling: Lanczos over what is left after the integer box reduction that `reducing_gap`
# allows (3.0 is, per Pillow's docs, indistinguishable from a full-precision resample).
_RESAMPLE = Image.Resampling.LANCZOS
_REDUCING_GAP = 3.0
# PNG is written for speed: zlib level 1 (about 2x faster than the default 6, ~10% larger).
_PNG_COMPRESS_LEVEL = 1
# libwebp effort 0 (fast) .. 6 (slow); 4 is libwebp's own default trade-off.
_WEBP_METHOD = 4

# Formats never opened: EPS decodes by running Ghostscript, which is no thing to point at
# bytes from the web.
_DENIED_FORMATS = frozenset({"EPS"})

# EXIF orientation tag -> the transpose that undoes it (the table ImageOps.exif_transpose uses).
_EXIF_ORIENTATION = 0x0112
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})

_WHITE = (255, 255, 255)


@dataclass
class ImageConfig:
    """How downloaded images are checked, resized and re-encoded (the ``image`` config section)."""

    image_size: int = 256
    """Target side in pixels for the resize modes."""
    resize_mode: ResizeMode = "border"
    """``no`` keeps the size; ``keep_ratio`` scales the smaller side to image_size;
    ``keep_ratio_largest`` scales the larger side to image_size; ``center_crop`` scales the
    smaller side to image_size and keeps the centred square; ``border`` scales the larger side
    to image_size and pads (centred) with border_color to a square."""
    resize_only_if_bigger: bool = False
    """Never upscale: an image whose relevant side is already <= image_size keeps its scale."""
    min_image_size: int = 0
    """Drop the image if the smaller side of the original is below this."""
    max_aspect_ratio: float = math.inf
    """Drop the image if max(w, h) / min(w, h) of the original exceeds this."""
    max_image_pixels: int = 89_478_485
    """Decompression-bomb guard on the original w*h, checked from the header before decoding."""
    encode_format: EncodeFormat = "jpg"
    """Output format."""
    encode_quality: int = 95
    """JPEG/WebP quality, 1-100 (PNG ignores it)."""
    border_color: list[int] = field(default_factory=lambda: [255, 255, 255])
    """RGB pad colour for resize_mode border."""
    use_draft: bool = True
    """Decode JPEGs at reduced scale (libjpeg DCT scaling) when downscaling."""

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is out of range."""
        if self.image_size <= 0:
            raise ValueError(f"image.image_size must be > 0, got {self.image_size}")
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(f"image.resize_mode must be one of {', '.join(_RESIZE_MODES)}, got {self.resize_mode!r}")
        if self.min_image_size < 0:
            raise ValueError(f"image.min_image_size must be >= 0, got {self.min_image_size}")
        if math.isnan(self.max_aspect_ratio) or self.max_aspect_ratio < 1:
            raise ValueError(f"image.max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        if self.max_image_pixels <= 0:
            raise ValueError(f"image.max_image_pixels must be > 0, got {self.max_image_pixels}")
        if self.encode_format not in _ENCODE_FORMATS:
            raise ValueError(
                f"image.encode_format must be one of {', '.join(_ENCODE_FORMATS)}, got {self.encode_format!r}"
            )
        if not 1 <= self.encode_quality <= 100:
            raise ValueError(f"image.encode_quality must be in 1..100, got {self.encode_quality}")
        if len(self.border_color) != 3 or any(
            isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= 255 for c in self.border_color
        ):
            raise ValueError(f"image.border_color must be three integers in 0..255, got {self.border_color!r}")


class ImageError(Exception):
    """The bytes are not a usable image; message is a short human-readable reason."""


@dataclass
class ProcessedImage:
    """An encoded output image and its sizes."""

    data: bytes
    """Encoded output."""
    ext: str
    """``jpg``, ``png`` or ``webp`` (the config's encode_format)."""
    width: int
    """Output width."""
    height: int
    """Output height."""
    original_width: int
    """Width of the input after its EXIF orientation is applied."""
    original_height: int
    """Height of the input after its EXIF orientation is applied."""


# --------------------------------------------------------------------------------------------
# opening


_unguarded_open_lock = threading.Lock()


def _allowed_formats() -> list[str]:
    Image.init()
    return [f for f in Image.ID if f not in _DENIED_FORMATS]


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open lazily (header only), leaving the pixel-count decision to our own guard.

    Pillow's own guard (`Image.MAX_IMAGE_PIXELS`, an error past twice that value) runs inside
    `Image.open` and would reject an image with its own wording, or reject one the config
    allows. When it fires, or when the config allows more than Pillow does, the header is
    read again with Pillow's guard switched off for just that call (under a lock, restoring
    the global afterwards), so `process_image` applies `max_image_pixels` itself.
    """
    formats = _allowed_formats()
    pil_limit = Image.MAX_IMAGE_PIXELS
    if pil_limit is not None and max_pixels <= pil_limit:
        try:
            return Image.open(io.BytesIO(data), formats=formats)
        except Image.DecompressionBombError:
            pass  # certainly over our limit too; reopen only to learn the size for the message
    with _unguarded_open_lock:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(io.BytesIO(data), formats=formats)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8); 1 when absent or unreadable."""
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # malformed EXIF is common on the web; ignore it, keep the pixels
        return 1
    return value if isinstance(value, int) and value in _ORIENTATION_TRANSPOSE else 1


# --------------------------------------------------------------------------------------------
# colour


def _to_8bit_l(im: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit integer / float single-band image scaled (not clipped) to ``L``.

    ``I;16*`` maps 0..65535 onto 0..255 (v / 257, rounded). ``I`` and ``F`` carry no declared
    range, so: values already within 0..255 are kept; within 0..65535 are treated as 16-bit;
    ``F`` within 0..1 is treated as normalised; anything else is stretched min..max.
    """
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        out = (arr.astype(np.uint32) + 128) // 257
        return Image.fromarray(out.astype(np.uint8), "L")
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.all():
        arr = np.where(finite, arr, 0.0)
    lo = float(arr.min()) if arr.size else 0.0
    hi = float(arr.max()) if arr.size else 0.0
    if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = arr * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = arr
    elif lo >= 0.0 and hi <= 65535.0:
        scaled = arr / 257.0
    elif hi > lo:
        scaled = (arr - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def _flatten(im: Image.Image) -> Image.Image:
    """Reduce any mode to ``L`` or ``RGB``; transparency is composited onto white.

    Grayscale stays ``L`` (three times less to resize) and becomes RGB at the end.
    """
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _to_8bit_l(im)
    if mode == "1":
        return im.convert("L")
    if mode in ("LA", "La"):
        la = im if mode == "LA" else im.convert("LA")
        lum, alpha = la.split()
        out = Image.new("L", la.size, 255)
        out.paste(lum, mask=alpha)
        return out
    if mode in ("L", "RGB") and "transparency" not in im.info:
        return im
    if mode == "P" and not im.has_transparency_data:
        return im.convert("RGB")
    if mode in ("RGBA", "RGBa", "PA", "P", "L", "RGB"):
        rgba = im if mode == "RGBA" else im.convert("RGBA")
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")  # CMYK, YCbCr, RGBX, HSV, LAB, ...


# --------------------------------------------------------------------------------------------
# geometry


def _scaled(w: int, h: int, side: int, scale_smaller: bool) -> tuple[int, int]:
    """(w, h) scaled so its smaller (or larger) side is ``side``; the other side is rounded
    half up and kept >= 1. Orientation-symmetric: swapping w and h swaps the result."""
    ref = min(w, h) if scale_smaller else max(w, h)
    if w == ref:
        return side, max(1, int(h * side / w + 0.5))
    return max(1, int(w * side / h + 0.5)), side


def process_image(data: bytes, cfg: ImageConfig) -> ProcessedImage:
    """Decode ``data``, check it against ``cfg``, resize it and encode it.

    Steps: read the header (no pixels yet) and apply the bomb, minimum-size and aspect-ratio
    checks to the original size; pick the target size; for a JPEG being downscaled, ask
    libjpeg for the smallest DCT scale that still covers the target (``use_draft``); decode
    the first frame; flatten to RGB (alpha onto white, 16-bit scaled to 8-bit); resize;
    apply the EXIF orientation; pad or crop; encode.

    Resize modes, with S = ``cfg.image_size`` and sizes rounded half up:

    * ``no``: size kept.
    * ``keep_ratio``: smaller side -> S (300x200 -> 384x256).
    * ``keep_ratio_largest``: larger side -> S (300x200 -> 256x171).
    * ``center_crop``: smaller side -> S, centred S x S square kept (300x200 -> 256x256). The
      square is taken in the source and resampled straight to S x S, so the crop is centred to
      sub-pixel precision.
    * ``border``: larger side -> S, then centred on an S x S canvas of ``border_color``.

    With ``resize_only_if_bigger``, an image whose relevant side (the smaller for keep_ratio
    and center_crop, the larger for keep_ratio_largest and border) is already <= S is not
    scaled: keep_ratio / keep_ratio_largest return it as is, center_crop keeps its centred
    min(w, h) square (so the output is smaller than S x S), border still pads it to S x S.

    Raises:
        ImageError: the bytes are empty, not an image, truncated or corrupt, over
            ``max_image_pixels``, under ``min_image_size``, over ``max_aspect_ratio``, or in a
            colour mode that cannot be converted to RGB.
    """
    if not data:
        raise ImageError("empty response body")
    try:
        im = _open(data, cfg.max_image_pixels)
    except UnidentifiedImageError:
        raise ImageError(f"cannot identify image file (starts with {bytes(data[:16])!r})") from None
    except ImageError:
        raise
    except Exception as exc:  # plugins raise OSError, SyntaxError, struct.error, EOFError, ...
        raise ImageError(f"cannot read image header: {_one_line(exc)}") from None

    with im:
        fmt = im.format or "image"
        sw, sh = im.size
        if sw <= 0 or sh <= 0:
            raise ImageError(f"invalid image size {sw}x{sh}")
        if sw * sh > cfg.max_image_pixels:
            raise ImageError(f"decompression bomb: {sw}x{sh} pixels exceeds max_image_pixels={cfg.max_image_pixels}")
        # Both checks are symmetric in w and h, so they hold before the orientation is known.
        if min(sw, sh) < cfg.min_image_size:
            lw, lh = (sh, sw) if _orientation(im) in _SWAPS_AXES else (sw, sh)
            raise ImageError(f"image too small: {lw}x{lh} < min_image_size={cfg.min_image_size}")
        aspect = max(sw, sh) / min(sw, sh)
        if aspect > cfg.max_aspect_ratio:
            raise ImageError(f"aspect ratio {aspect:.3g} exceeds max_aspect_ratio={cfg.max_aspect_ratio:g}")
        try:
            return _decode_resize_encode(im, sw, sh, cfg)
        except ImageError:
            raise
        except Image.DecompressionBombError:
            raise ImageError(
                f"decompression bomb: {sw}x{sh} pixels exceeds max_image_pixels={cfg.max_image_pixels}"
            ) from None
        except Exception as exc:
            raise ImageError(f"cannot decode {fmt}: {_one_line(exc)}") from None


def _decode_resize_encode(im: Image.Image, sw: int, sh: int, cfg: ImageConfig) -> ProcessedImage:
    """The decoding part of `process_image`, in the stored (pre-EXIF) orientation ``sw x sh``."""
    size = cfg.image_size
    mode = cfg.resize_mode
    only_bigger = cfg.resize_only_if_bigger

    # Plan in the stored orientation; every rule is symmetric in w and h, so the EXIF
    # rotation can wait until the image is small.
    resize_to: tuple[int, int] | None = None  # output of the resample, if any
    crop_side: int | None = None  # center_crop: side of the centred source square
    if mode in ("keep_ratio", "center_crop"):
        if not (only_bigger and min(sw, sh) <= size):
            resize_to = _scaled(sw, sh, size, scale_smaller=True)
        if mode == "center_crop":
            crop_side = min(sw, sh)
    elif mode in ("keep_ratio_largest", "border"):
        if not (only_bigger and max(sw, sh) <= size):
            resize_to = _scaled(sw, sh, size, scale_smaller=False)
    if resize_to == (sw, sh):
        resize_to = None

    # Reduced-scale JPEG decode: draft keeps the decoded size >= the requested one.
    region = (0.0, 0.0, float(sw), float(sh))  # the original's extent in decoded pixels
    if (
        cfg.use_draft
        and resize_to is not None
        and resize_to[0] < sw
        and resize_to[1] < sh
        and im.format in ("JPEG", "MPO")
    ):
        drafted = im.draft("RGB", resize_to)
        if drafted is not None:
            region = tuple(float(v) for v in drafted[1])  # (0, 0, sw/scale, sh/scale)

    im.load()  # first frame only; truncated data raises here
    orientation = _orientation(im)
    img = _flatten(im)

    fx = region[2] / sw
    fy = region[3] / sh
    if crop_side is not None:
        # Centred square in original coordinates, mapped into the decoded image.
        x0 = (sw - crop_side) / 2.0
        y0 = (sh - crop_side) / 2.0
        box = (x0 * fx, y0 * fy, (x0 + crop_side) * fx, (y0 + crop_side) * fy)
        if resize_to is not None:
            img = img.resize((size, size), _RESAMPLE, box=box, reducing_gap=_REDUCING_GAP)
        elif crop_side != sw or crop_side != sh:
            img = img.crop(tuple(int(v) for v in box))
    elif resize_to is not None:
        img = img.resize(resize_to, _RESAMPLE, box=region, reducing_gap=_REDUCING_GAP)
    elif img.size != (sw, sh):  # cannot happen (draft only when resizing); keep it honest
        img = img.resize((sw, sh), _RESAMPLE, box=region)

    if orientation != 1:
        img = img.transpose(_ORIENTATION_TRANSPOSE[orientation])
    ow, oh = (sh, sw) if orientation in _SWAPS_AXES else (sw, sh)

    if img.mode != "RGB":
        img = img.convert("RGB")
    if mode == "border" and img.size != (size, size):
        canvas = Image.new("RGB", (size, size), tuple(cfg.border_color))
        canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
        img = canvas

    return ProcessedImage(
        data=_encode(img, cfg),
        ext=cfg.encode_format,
        width=img.width,
        height=img.height,
        original_width=ow,
        original_height=oh,
    )


def _encode(img: Image.Image, cfg: ImageConfig) -> bytes:
    buf = io.BytesIO()
    if cfg.encode_format == "jpg":
        img.save(buf, "JPEG", quality=cfg.encode_quality, optimize=False)
    elif cfg.encode_format == "png":
        img.save(buf, "PNG", compress_level=_PNG_COMPRESS_LEVEL)
    elif cfg.encode_format == "webp":
        img.save(buf, "WEBP", quality=cfg.encode_quality, method=_WEBP_METHOD)
    else:
        raise ValueError(f"unknown encode_format {cfg.encode_format!r}")
    return buf.getvalue()
