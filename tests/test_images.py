"""Tests for vlm.data.images: checks, colour handling, resize modes and encoding."""

from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

from vlm.data.images import ImageConfig, ImageError, ProcessedImage, process_image

# ------------------------------------------------------------------------------------------
# helpers


def _gradient(w: int, h: int) -> np.ndarray:
    """A smooth RGB test pattern of w x h (no noise, so JPEG round trips stay close)."""
    x = np.linspace(0.0, 1.0, w)[None, :]
    y = np.linspace(0.0, 1.0, h)[:, None]
    r = 255 * x + 0 * y
    g = 255 * y + 0 * x
    b = 127.5 + 100 * np.sin(6 * x) * np.cos(4 * y)
    return np.stack([r, g, b], axis=2).round().astype(np.uint8)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb(w: int, h: int, fmt: str = "PNG", **kw) -> bytes:
    return _encode(Image.fromarray(_gradient(w, h)), fmt, **kw)


def _decode(out: ProcessedImage) -> Image.Image:
    im = Image.open(io.BytesIO(out.data))
    im.load()
    return im


@functools.lru_cache(maxsize=1)
def _digits() -> np.ndarray | None:
    """sklearn's 8x8 handwritten digits (values 0..16), or None without sklearn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - sklearn is a dev dependency
        return None
    return load_digits().images


def _digits_image(tiles: int = 12, scale: int = 16) -> Image.Image:
    """Real handwritten digits tiled into a grayscale image; a gradient without sklearn."""
    digits = _digits()
    if digits is None:  # pragma: no cover
        return Image.fromarray(_gradient(tiles * 8 * scale, tiles * 8 * scale)).convert("L")
    digits = digits[: tiles * tiles]
    rows = [np.hstack(list(digits[r * tiles : (r + 1) * tiles])) for r in range(tiles)]
    arr = (np.vstack(rows) * (255 / 16)).round().astype(np.uint8)
    return Image.fromarray(arr, "L").resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.BICUBIC)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """A valid 20000x20000 1-bit black PNG: ~50 KB on disk, 400 Mpx (and 400 MB in Pillow) decoded."""
    side = 20000
    row = b"\x00" * (1 + side // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------
# config


def test_config_defaults_validate():
    """The default config passes its own validation."""
    ImageConfig().validate()


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"image_size": 0}, "image.image_size"),
        ({"resize_mode": "stretch"}, "image.resize_mode"),
        ({"min_image_size": -1}, "image.min_image_size"),
        ({"max_aspect_ratio": 0.5}, "image.max_aspect_ratio"),
        ({"max_image_pixels": 0}, "image.max_image_pixels"),
        ({"encode_format": "gif"}, "image.encode_format"),
        ({"encode_quality": 101}, "image.encode_quality"),
        ({"border_color": [0, 0]}, "image.border_color"),
        ({"border_color": [0, 0, 256]}, "image.border_color"),
    ],
)
def test_config_validate_names_field(changes, field):
    """An out-of-range value raises ValueError naming the dotted field."""
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ImageConfig(**changes).validate()


def test_config_loads_through_config_loader():
    """The dataclass works with the project's typed config loader (get_type_hints, Literal, list)."""
    from vlm.config import from_dict

    cfg = from_dict(ImageConfig, {"resize_mode": "center_crop", "border_color": [0, 0, 0], "max_aspect_ratio": 3})
    assert cfg.resize_mode == "center_crop"
    assert cfg.border_color == [0, 0, 0]
    assert cfg.max_aspect_ratio == 3.0


# ------------------------------------------------------------------------------------------
# resize modes


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("no", (300, 200)),
        ("border", (256, 256)),
        ("keep_ratio", (384, 256)),
        ("keep_ratio_largest", (256, 171)),  # 200 * 256 / 300 = 170.67, rounded half up
        ("center_crop", (256, 256)),
    ],
)
def test_resize_mode_output_size(mode, expected):
    """Each resize mode gives the documented size for a 300x200 input."""
    out = process_image(_rgb(300, 200), ImageConfig(resize_mode=mode, encode_format="png"))
    assert (out.width, out.height) == expected
    assert _decode(out).size == expected
    assert (out.original_width, out.original_height) == (300, 200)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("keep_ratio", (256, 384)),  # portrait: the width is the smaller side
        ("keep_ratio_largest", (171, 256)),
    ],
)
def test_resize_mode_portrait(mode, expected):
    """The ratio-keeping modes treat a portrait image symmetrically."""
    out = process_image(_rgb(200, 300), ImageConfig(resize_mode=mode, image_size=256))
    assert (out.width, out.height) == expected


def test_resize_upscales_small_image_by_default():
    """Without resize_only_if_bigger a small image is scaled up to the target."""
    out = process_image(_rgb(100, 50), ImageConfig(resize_mode="keep_ratio"))
    assert (out.width, out.height) == (512, 256)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("no", (120, 80)),
        ("keep_ratio", (120, 80)),
        ("keep_ratio_largest", (120, 80)),
        ("center_crop", (80, 80)),  # no scaling; the centred min(w, h) square
        ("border", (256, 256)),  # no scaling; still padded to the square canvas
    ],
)
def test_resize_only_if_bigger_keeps_small_image(mode, expected):
    """resize_only_if_bigger never upscales a small image."""
    cfg = ImageConfig(resize_mode=mode, resize_only_if_bigger=True, encode_format="png")
    out = process_image(_rgb(120, 80), cfg)
    assert (out.width, out.height) == expected


def test_resize_only_if_bigger_still_downscales():
    """resize_only_if_bigger still shrinks an image larger than the target."""
    cfg = ImageConfig(resize_mode="keep_ratio", resize_only_if_bigger=True)
    out = process_image(_rgb(600, 400), cfg)
    assert (out.width, out.height) == (384, 256)


def test_border_pads_with_border_color_centered():
    """Mode border centres the image on a canvas of border_color."""
    cfg = ImageConfig(resize_mode="border", image_size=64, border_color=[10, 20, 30], encode_format="png")
    red = _encode(Image.new("RGB", (128, 64), (255, 0, 0)), "PNG")
    arr = np.asarray(_decode(process_image(red, cfg)))
    assert arr.shape == (64, 64, 3)
    assert tuple(arr[0, 0]) == (10, 20, 30) and tuple(arr[-1, -1]) == (10, 20, 30)
    assert tuple(arr[32, 32]) == (255, 0, 0)
    rows = np.where((arr == (255, 0, 0)).all(axis=2).any(axis=1))[0]
    assert (rows.min(), rows.max()) == (16, 47)  # 32 rows of image, 16 of border each side


def test_center_crop_keeps_centre():
    """Mode center_crop keeps the middle of a wide image and drops its sides."""
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, :100] = (255, 0, 0)
    arr[:, 100:200] = (0, 255, 0)
    arr[:, 200:] = (0, 0, 255)
    cfg = ImageConfig(resize_mode="center_crop", image_size=50, encode_format="png")
    out = np.asarray(_decode(process_image(_encode(Image.fromarray(arr), "PNG"), cfg))).astype(int)
    assert out.shape == (50, 50, 3)
    # The outermost columns carry filter support from the neighbours, as resize-then-crop would.
    assert np.abs(out[:, 2:-2] - (0, 255, 0)).max() <= 2


# ------------------------------------------------------------------------------------------
# size and shape checks


def test_min_image_size_drops_small_image():
    """An image whose smaller side is below min_image_size is rejected with the sizes."""
    with pytest.raises(ImageError, match=r"image too small: 300x20 < min_image_size=32"):
        process_image(_rgb(300, 20), ImageConfig(min_image_size=32))


def test_min_image_size_keeps_image_at_limit():
    """An image exactly at min_image_size passes."""
    out = process_image(_rgb(32, 40), ImageConfig(min_image_size=32))
    assert out.original_width == 32


def test_max_aspect_ratio_drops_elongated_image():
    """An image more elongated than max_aspect_ratio is rejected."""
    with pytest.raises(ImageError, match=r"aspect ratio 4 exceeds max_aspect_ratio=3"):
        process_image(_rgb(400, 100), ImageConfig(max_aspect_ratio=3.0))


def test_bomb_guard_default_limit_rejects_before_decoding(bomb_png):
    """A 20000x20000 PNG is refused from its header, with our message, not Pillow's."""
    assert len(bomb_png) < 200_000
    with pytest.raises(ImageError, match=r"decompression bomb: 20000x20000 pixels exceeds max_image_pixels=89478485"):
        process_image(bomb_png, ImageConfig())


def test_bomb_guard_uses_configured_limit():
    """max_image_pixels below Pillow's own limit is enforced by our guard."""
    with pytest.raises(ImageError, match=r"decompression bomb: 300x200 pixels exceeds max_image_pixels=50000"):
        process_image(_rgb(300, 200), ImageConfig(max_image_pixels=50_000))


def test_bomb_guard_not_preempted_by_pillow_limit(monkeypatch):
    """Pillow's global MAX_IMAGE_PIXELS does not reject an image the config allows."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    out = process_image(_rgb(300, 200), ImageConfig(resize_mode="no"))
    assert (out.width, out.height) == (300, 200)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored after the unguarded header read


# ------------------------------------------------------------------------------------------
# broken input


def test_empty_bytes():
    """Empty bytes raise ImageError('empty response body')."""
    with pytest.raises(ImageError, match="^empty response body$"):
        process_image(b"", ImageConfig())


def test_not_an_image():
    """Bytes that are no image format raise 'cannot identify image file'."""
    with pytest.raises(ImageError, match="^cannot identify image file"):
        process_image(b"<!DOCTYPE html><html><body>404</body></html>", ImageConfig())


def test_truncated_jpeg():
    """A JPEG cut off mid-scan raises ImageError mentioning truncation."""
    data = _rgb(400, 300, "JPEG", quality=90)
    with pytest.raises(ImageError, match="truncated"):
        process_image(data[: len(data) // 2], ImageConfig())
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # the module never relaxes Pillow's check


def test_truncated_jpeg_with_draft_disabled():
    """Truncation is caught on the full-scale decode path too."""
    data = _rgb(400, 300, "JPEG", quality=90)
    with pytest.raises(ImageError, match="truncated"):
        process_image(data[: len(data) // 2], ImageConfig(use_draft=False, resize_mode="no"))


def test_corrupt_png():
    """A PNG with a damaged data chunk raises ImageError with a one-line message."""
    data = bytearray(_rgb(64, 64))
    idat = data.index(b"IDAT")
    data[idat + 20 : idat + 40] = b"\xff" * 20
    with pytest.raises(ImageError) as info:
        process_image(bytes(data), ImageConfig())
    assert "\n" not in str(info.value)


def test_header_only_jpeg():
    """A JPEG with a header but no scan data raises ImageError."""
    data = _rgb(64, 64, "JPEG")
    sos = data.index(b"\xff\xda")
    with pytest.raises(ImageError):
        process_image(data[: sos + 4], ImageConfig())


def test_eps_is_not_opened():
    """EPS (decoded by running Ghostscript) is refused as an unknown format."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"
    with pytest.raises(ImageError, match="cannot identify image file"):
        process_image(eps, ImageConfig())


# ------------------------------------------------------------------------------------------
# orientation and colour


def test_exif_orientation_6_swaps_original_size():
    """EXIF orientation 6 (rotate 90 clockwise) swaps the reported original size and the pixels."""
    arr = np.zeros((200, 300, 3), np.uint8)
    arr[:50, :50] = (255, 0, 0)  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95)
    out = process_image(data, ImageConfig(resize_mode="no", encode_format="png"))
    assert (out.original_width, out.original_height) == (200, 300)
    assert (out.width, out.height) == (200, 300)
    px = np.asarray(_decode(out)).astype(int)
    assert px[10, -10, 0] > 200 and px[10, -10, 1] < 60  # stored top-left -> displayed top-right
    assert px[10, 10].max() < 60


def test_exif_orientation_6_resize_uses_displayed_size():
    """Resize targets apply to the displayed (rotated) image."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(_gradient(300, 200)), "JPEG", exif=exif.tobytes())
    out = process_image(data, ImageConfig(resize_mode="keep_ratio_largest"))
    assert (out.width, out.height) == (171, 256)
    assert _decode(out).getexif().get(0x0112) is None  # no orientation left to apply twice


def test_cmyk_jpeg_to_rgb():
    """A CMYK JPEG comes out as RGB with the right colour."""
    cmyk = Image.new("CMYK", (64, 48), (0, 255, 255, 0))  # red
    out = process_image(_encode(cmyk, "JPEG", quality=95), ImageConfig(encode_format="png", resize_mode="no"))
    im = _decode(out)
    assert im.mode == "RGB"
    r, g, b = np.asarray(im).reshape(-1, 3).mean(axis=0)
    assert r > 240 and g < 15 and b < 15


def test_palette_png_with_transparency_on_white():
    """Transparent palette pixels become white; opaque ones keep their colour."""
    im = Image.new("P", (32, 32), 0)
    im.putpalette([0, 0, 255] + [255, 0, 0] + [0, 0, 0] * 254)
    im.paste(1, (0, 0, 16, 32))  # left half red (index 1), right half index 0
    data = _encode(im, "PNG", transparency=0)  # index 0 transparent
    out = np.asarray(_decode(process_image(data, ImageConfig(resize_mode="no", encode_format="png"))))
    assert tuple(out[5, 5]) == (255, 0, 0)
    assert tuple(out[5, 25]) == (255, 255, 255)


def test_rgba_png_composited_on_white():
    """Half-transparent RGBA is blended onto white, not dropped to black."""
    data = _encode(Image.new("RGBA", (16, 16), (255, 0, 0, 128)), "PNG")
    out = np.asarray(_decode(process_image(data, ImageConfig(resize_mode="no", encode_format="png")))).astype(int)
    assert np.abs(out[8, 8] - (255, 127, 127)).max() <= 1


def test_la_png_composited_on_white():
    """A fully transparent grayscale+alpha image comes out white."""
    data = _encode(Image.new("LA", (16, 16), (0, 0)), "PNG")
    out = np.asarray(_decode(process_image(data, ImageConfig(resize_mode="no", encode_format="png"))))
    assert (out == 255).all()


def test_16bit_png_scaled_not_clipped():
    """A 16-bit grey of 32896 becomes ~128, not the 255 a clip would give."""
    arr = np.full((16, 16), 32896, np.uint16)
    im = Image.frombytes("I;16", (16, 16), arr.astype("<u2").tobytes())
    data = _encode(im, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = _decode(process_image(data, ImageConfig(resize_mode="no", encode_format="png")))
    assert out.mode == "RGB"
    assert np.abs(np.asarray(out).astype(int) - 128).max() <= 1


def test_16bit_png_extremes():
    """16-bit black and white map to 8-bit 0 and 255."""
    arr = np.zeros((8, 16), np.uint16)
    arr[:, 8:] = 65535
    data = _encode(Image.frombytes("I;16", (16, 8), arr.astype("<u2").tobytes()), "PNG")
    out = np.asarray(_decode(process_image(data, ImageConfig(resize_mode="no", encode_format="png"))))
    assert out[:, :8].max() == 0 and out[:, 8:].min() == 255


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_to_rgb(mode):
    """Grayscale and bilevel images come out as RGB with equal channels."""
    src = _digits_image(tiles=4, scale=4).convert(mode)
    out = process_image(_encode(src, "PNG"), ImageConfig(resize_mode="keep_ratio", image_size=64, encode_format="png"))
    arr = np.asarray(_decode(out))
    assert arr.shape == (64, 64, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert arr.min() < 64 and arr.max() > 192  # the digits survive


def test_animated_gif_first_frame():
    """An animated GIF yields its first frame."""
    frames = [Image.new("RGB", (20, 20), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out = np.asarray(_decode(process_image(buf.getvalue(), ImageConfig(resize_mode="no", encode_format="png"))))
    assert tuple(out[10, 10]) == (255, 0, 0)


# ------------------------------------------------------------------------------------------
# encoding, draft, determinism


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_encode_formats(fmt, pil_format):
    """Each encode_format gives a decodable RGB file of that format and the matching ext."""
    out = process_image(_rgb(300, 200, "JPEG"), ImageConfig(encode_format=fmt))
    assert out.ext == fmt
    im = _decode(out)
    assert im.format == pil_format
    assert im.mode == "RGB"
    assert im.size == (out.width, out.height) == (256, 256)


def test_encode_quality_changes_jpeg_size():
    """A lower encode_quality gives a smaller JPEG."""
    data = _rgb(300, 200)
    high = process_image(data, ImageConfig(encode_quality=95)).data
    low = process_image(data, ImageConfig(encode_quality=30)).data
    assert len(low) < len(high)


def test_draft_used_for_large_jpeg_with_sufficient_size(monkeypatch):
    """A big JPEG downscale asks libjpeg for a reduced decode no smaller than the target."""
    calls = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real(self, mode, size)
        calls.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    process_image(_rgb(1600, 1200, "JPEG"), ImageConfig(resize_mode="keep_ratio", image_size=256))
    assert len(calls) == 1
    requested, decoded = calls[0]
    assert requested == (341, 256)
    assert decoded == (400, 300)  # DCT scale 1/4: the largest reduction still >= the target
    calls.clear()
    process_image(_rgb(1600, 1200, "JPEG"), ImageConfig(resize_mode="keep_ratio", use_draft=False))
    assert calls == []


def test_draft_output_close_to_full_decode():
    """Draft decoding of a large JPEG gives nearly the same pixels as a full decode."""
    src = Image.merge("RGB", [_digits_image(tiles=12, scale=20)] * 3)  # 1920x1920 real digits
    src = Image.fromarray(((np.asarray(src).astype(int) + _gradient(1920, 1920)) // 2).astype(np.uint8))
    data = _encode(src, "JPEG", quality=92)
    for mode in ("keep_ratio", "center_crop", "border"):
        cfg = dict(resize_mode=mode, image_size=224, encode_format="png")
        fast = np.asarray(_decode(process_image(data, ImageConfig(use_draft=True, **cfg)))).astype(float)
        full = np.asarray(_decode(process_image(data, ImageConfig(use_draft=False, **cfg)))).astype(float)
        assert fast.shape == full.shape
        assert np.abs(fast - full).mean() < 2.0, mode


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp"])
def test_deterministic(fmt):
    """The same bytes and config give byte-identical output."""
    data = _rgb(500, 333, "JPEG")
    cfg = ImageConfig(resize_mode="center_crop", encode_format=fmt)
    assert process_image(data, cfg).data == process_image(data, cfg).data
