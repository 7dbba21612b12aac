"""Real images for local runs: sklearn's 1,797 handwritten 8x8 digits, rendered as photos.

`render_digit` upscales one digit smoothly onto a lightly tinted, slightly noisy "paper"
canvas of any size, so downloads, resizing and a CLIP zero-shot eval have real pixels to
work on. Every 6th image (i % 6 == 5) is held out for that eval and is never served in the
URL lists the local web writes by default.
"""

from __future__ import annotations

import functools
import random
from typing import Any

import numpy as np
from PIL import Image

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

_HELDOUT_EVERY = 6
_HELDOUT_REMAINDER = 5


@functools.lru_cache(maxsize=1)
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 8, 8) in 0..255, labels int64 (N,)) from sklearn's digits set."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.clip(np.rint(data.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = np.asarray(data.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def num_digits() -> int:
    """Number of digit images available (1,797)."""
    return int(load_digit_images()[0].shape[0])


def heldout_indices() -> np.ndarray:
    """Indices kept out of served URL lists (i % 6 == 5), for zero-shot evaluation."""
    n = num_digits()
    return np.arange(_HELDOUT_REMAINDER, n, _HELDOUT_EVERY, dtype=np.int64)


def train_indices() -> np.ndarray:
    """All indices that are not held out."""
    idx = np.arange(num_digits(), dtype=np.int64)
    return idx[idx % _HELDOUT_EVERY != _HELDOUT_REMAINDER]


# ---------------------------------------------------------------- rendering

_NOISE_TILE = 1024
_NOISE_PAD = 256


@functools.lru_cache(maxsize=1)
def _noise_tile() -> np.ndarray:
    """A fixed int8 noise field sliced at per-image offsets (cheaper than fresh noise)."""
    size = _NOISE_TILE + _NOISE_PAD
    rng = np.random.default_rng(12345)
    tile = rng.integers(-9, 10, size=(size, size), dtype=np.int8)
    tile.setflags(write=False)
    return tile


def _noise(h: int, w: int, oy: int, ox: int) -> np.ndarray:
    tile = _noise_tile()
    if h + oy <= tile.shape[0] and w + ox <= tile.shape[1]:
        return tile[oy : oy + h, ox : ox + w]
    reps = (-(-(h + oy) // tile.shape[0]), -(-(w + ox) // tile.shape[1]))
    return np.tile(tile, reps)[oy : oy + h, ox : ox + w]


def render_digit(index: int, width: int, height: int, *, seed: int = 0) -> Image.Image:
    """Digit `index` as an RGB photo of `width` x `height`: dark ink on light tinted paper.

    Deterministic in (index, width, height, seed); different seeds change tint, ink colour,
    slant, placement and noise, never the digit itself.
    """
    images, _ = load_digit_images()
    n = images.shape[0]
    if not 0 <= index < n:
        raise IndexError(f"digit index {index} out of range 0..{n - 1}")
    if width < 1 or height < 1:
        raise ValueError(f"size must be positive, got {width}x{height}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index)])

    # Colours: light paper with a slight tint, dark ink (black / blue-black / brownish).
    paper = 240.0 + rng.uniform(-14.0, 12.0, size=3)
    ink = rng.uniform(8.0, 50.0, size=3)
    ink[int(rng.integers(0, 3))] += rng.uniform(0.0, 40.0)

    # Digit: 8x8 -> 64x64 (bicubic), slight slant, -> side x side (bicubic).
    side = max(1, int(round(min(width, height) * rng.uniform(0.8, 0.95))))
    # A blank 1-pixel margin lets strokes that touch the 8x8 border fade out instead of
    # ending in a hard edge; the contrast curve firms up the otherwise very soft strokes.
    small = Image.fromarray(np.pad(images[index], 1))
    small = small.resize((80, 80), Image.Resampling.BICUBIC)
    small = small.rotate(float(rng.uniform(-9.0, 9.0)), resample=Image.Resampling.BICUBIC, fillcolor=0)
    glyph = small.resize((side, side), Image.Resampling.BICUBIC)
    alpha = np.asarray(glyph, dtype=np.float32)
    alpha -= np.float32(40.0)
    alpha *= np.float32(rng.uniform(0.85, 1.0) / 150.0)
    np.clip(alpha, 0.0, 1.0, out=alpha)

    # One "lightness" plane (255 = brightest paper, 0 = ink): a gentle linear shading as an
    # outer sum, the glyph blended in, then grain. Colour comes from a palette at the end,
    # which keeps the per-pixel work to a single (h, w) plane.
    gy = np.linspace(-1.0, 1.0, height, dtype=np.float32) * np.float32(rng.uniform(-7.0, 7.0))
    gx = np.linspace(-1.0, 1.0, width, dtype=np.float32) * np.float32(rng.uniform(-7.0, 7.0))
    plane = (np.float32(244.0) + gy)[:, None] + gx[None, :]

    slack_y, slack_x = height - side, width - side
    y0 = int(np.clip(slack_y // 2 + rng.integers(-slack_y // 8 - 1, slack_y // 8 + 2), 0, max(slack_y, 0)))
    x0 = int(np.clip(slack_x // 2 + rng.integers(-slack_x // 8 - 1, slack_x // 8 + 2), 0, max(slack_x, 0)))
    gh, gw = min(side, height - y0), min(side, width - x0)
    region = plane[y0 : y0 + gh, x0 : x0 + gw]
    region -= alpha[:gh, :gw] * region

    oy, ox = (int(v) for v in rng.integers(0, _NOISE_PAD, size=2))
    plane += _noise(height, width, oy, ox)
    np.clip(plane, 0.0, 255.0, out=plane)

    t = np.linspace(0.0, 1.0, 256)[:, None]
    palette = np.clip(np.rint(ink[None, :] + t * (paper - ink)[None, :]), 0, 255).astype(np.uint8)
    out = Image.frombuffer("L", (width, height), plane.astype(np.uint8).tobytes(), "raw", "L", 0, 1)
    out = out.convert("P")
    out.putpalette(palette.tobytes(), "RGB")
    return out.convert("RGB")


# ---------------------------------------------------------------- captions

_CLEAN_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {num} written by hand",
    "a photo of the digit {word}",
    "handwritten {num} on paper",
    "a scanned image of a handwritten {word}",
    "the digit {num} drawn in dark ink",
    "a close-up of the number {word} on a light background",
    "{Word}, written with a pen",
    "a small handwritten number {num}",
    "an image showing the digit {word}",
    "the numeral {num}, handwritten",
    "a picture of a hand-drawn {word}",
)

_SPAM_TEMPLATES = (
    "click here for free shipping",
    "IMG_{year}{month:02d}{day:02d}_{num4}.jpg",
    "best deals {year} buy now",
    "DSC_{num4}.JPG",
    "cheap watches online sale 50% off",
    "Untitled-{small}",
    "image",
    "stock photo royalty free download",
    "subscribe for more great content",
    "product image {small} of 8",
    "Screenshot {year}-{month:02d}-{day:02d} at {hour}.{minute:02d}.{second:02d}",
    "thumbnail_{num4}_small.png",
    "Home | About | Contact",
    "loading...",
)


def _randint(rng: Any, lo: int, hi: int) -> int:
    """Uniform int in [lo, hi] from a random.Random or a numpy Generator."""
    if hasattr(rng, "integers"):
        return int(rng.integers(lo, hi + 1))
    return int(rng.randint(lo, hi))


def _pick(rng: Any, seq: tuple | list) -> Any:
    return seq[_randint(rng, 0, len(seq) - 1)]


def caption_for(label: int, rng: Any = None) -> str:
    """A clean caption naming digit `label` (by word or numeral), varied by `rng`.

    `rng` may be a `random.Random`, a numpy `Generator`, or None (a fresh Random(0)).
    """
    if rng is None:
        rng = random.Random(0)
    label = int(label)
    if not 0 <= label <= 9:
        raise ValueError(f"digit label must be 0..9, got {label}")
    word = DIGIT_NAMES[label]
    return _pick(rng, _CLEAN_TEMPLATES).format(word=word, Word=word.capitalize(), num=label)


def noisy_caption_for(label: int, rng: Any = None) -> str:
    """A deliberately bad caption: names a different digit, or is web spam / a file name."""
    if rng is None:
        rng = random.Random(0)
    label = int(label)
    if _randint(rng, 0, 1) == 0:
        other = (label + _randint(rng, 1, 9)) % 10
        return caption_for(other, rng)
    return _pick(rng, _SPAM_TEMPLATES).format(
        year=_randint(rng, 2012, 2024),
        month=_randint(rng, 1, 12),
        day=_randint(rng, 1, 28),
        hour=_randint(rng, 1, 12),
        minute=_randint(rng, 0, 59),
        second=_randint(rng, 0, 59),
        num4=_randint(rng, 1000, 9999),
        small=_randint(rng, 1, 8),
    )
