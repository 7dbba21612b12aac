"""CLIP training batches from WebDataset shards: pick a caption, decode, augment, tokenize.

`ClipPreprocess` is a Ray Data batch transform (a callable class, so the tokenizer is built
once per worker) that turns raw shard rows (`jpg`/`png`/`webp` bytes, `txt`, `json`) into
`image` uint8 (B, 3, S, S) and `text` int64 (B, context) arrays, on CPU workers, so the
training workers only run the model. Images travel as uint8 and are normalized where the model
runs (`normalize`, on the GPU in a GPU run): a quarter of float32's bytes through Ray's object
store and the host-to-device copy, and 10-15% less CPU in the decoding task (32 px digits,
bench/train_clip.py's setup).

Caption choice (`caption_source`), for shards written by ingest or by the cleaning stages:
- `original`: the sample's `txt` (after CapFilt: the chosen caption), else the url list's caption;
- `synthetic`: a synthetic caption from `KEY.json`'s candidates (falls back to original);
- `random_kept`: a random pick among the kept candidates, new each epoch (what BLIP-2 does
  with CapFilt output).
"""

from __future__ import annotations

import functools
import io
import json
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclass
class PairDataConfig:
    """What every image-text training set (CLIP, BLIP, Flamingo) reads from shards the same way."""

    caption_source: Literal["original", "synthetic", "random_kept"] = "original"  # see pick_caption
    augment: bool = True  # random resized crop (scale crop_scale_min-1) for training
    crop_scale_min: float = 0.8
    shuffle_files: bool = True


@dataclass
class ClipDataConfig(PairDataConfig):
    heldout_fraction: float = 0.0  # fraction of samples (by key hash) kept out of training
    # Rows per decoding call (and Ray Data block): fewer, larger blocks cost less per sample in
    # Ray Data's bookkeeping (all processes: 0.22-0.25 vs 0.26-0.31 CPU-ms/sample at 512 vs 64
    # rows, 32 px digits); uint8 images keep a 512-row block of 224 px images at 77 MB.
    decode_batch_size: int = 512

    def validate(self) -> None:
        if self.decode_batch_size < 1:
            raise ValueError("data.decode_batch_size must be >= 1")


def pick_caption(txt: str | None, meta: dict | None, source: str, rng: random.Random) -> str:
    """Choose the training caption of one sample (see module docstring)."""
    candidates = (meta or {}).get("candidates") or []
    kept = [c for c in candidates if c.get("kept", True)]
    if source == "synthetic":
        synth = [c["text"] for c in kept if c.get("source") == "synthetic"]
        if synth:
            return rng.choice(synth)
    elif source == "random_kept" and kept:
        return rng.choice([c["text"] for c in kept])
    if txt:
        return txt
    return (meta or {}).get("caption") or ""


def to_text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def row_fields(batch: dict, i: int) -> tuple[bytes | None, str | None, dict | None]:
    """(image bytes, txt, parsed json) of row `i` of a raw WebDataset batch; None where absent."""
    image = next((batch[e][i] for e in IMAGE_EXTS if e in batch and batch[e][i] is not None), None)
    meta = json.loads(to_text(batch["json"][i])) if "json" in batch and batch["json"][i] is not None else None
    txt = to_text(batch["txt"][i]) if "txt" in batch else None
    return image, txt, meta


def load_rgb(data: bytes, size: int, augment: bool, rng: random.Random, scale_min: float = 0.8):
    """Decode to RGB, random-resized-crop (train) or resize + center-crop (eval) to size x size."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (size, size))
    img = img.convert("RGB")
    w, h = img.size
    if augment:
        scale = rng.uniform(scale_min, 1.0)
        side = max(1, int(min(w, h) * scale**0.5))
        x = rng.randint(0, w - side)
        y = rng.randint(0, h - side)
        box = (x, y, x + side, y + side)
    else:
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    return img.resize((size, size), Image.BICUBIC, box=box)


def to_uint8_chw(images: list) -> np.ndarray:
    """PIL RGB images -> uint8 (B, 3, S, S), not normalized (see `normalize`)."""
    return np.ascontiguousarray(np.stack([np.asarray(im, dtype=np.uint8) for im in images]).transpose(0, 3, 1, 2))


@functools.lru_cache(maxsize=8)
def _normalize_affine(device):
    """(scale, shift) of `normalize` on `device`, built once per device instead of copied every step."""
    import torch

    scale = torch.from_numpy(1.0 / (255.0 * STD)).to(device).view(1, 3, 1, 1)
    shift = torch.from_numpy(-MEAN / STD).to(device).view(1, 3, 1, 1)
    return scale, shift


def normalize(images, dtype=None):
    """uint8 (B, 3, S, S) torch images -> CLIP-normalized `dtype` (default float32), on their device.
    Computed in float32 and cast after, as the float32 pipeline cast its normalized images."""
    import torch

    scale, shift = _normalize_affine(images.device)
    out = images.float() * scale + shift
    return out if dtype in (None, torch.float32) else out.to(dtype)


def to_chw(images: list) -> np.ndarray:
    """PIL RGB images -> normalized float32 (B, 3, S, S)."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0  # (B, S, S, 3)
    arr = (arr - MEAN) / STD
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


@functools.lru_cache(maxsize=4)
def _tokenizer(preset: str):
    import open_clip

    from vlm.models.clip.build import register_presets

    register_presets()
    return open_clip.get_tokenizer(preset)


class ClipPreprocess:
    """Ray Data `map_batches` transform: raw shard rows -> {"image" uint8, "text"} arrays.

    Passed as an instance (so Ray Data runs it as tasks, not actors); the tokenizer is built
    lazily and cached per worker process. Augmentation draws fresh randomness every epoch. A row
    whose image or json does not decode is left out and reported to `skips` (vlm.data.skips).
    """

    def __init__(self, preset: str, image_size: int, data: ClipDataConfig, skips=None):
        self.preset = preset
        self.size = image_size
        self.cfg = data
        self.skips = skips

    def __call__(self, batch: dict) -> dict:
        from vlm.data.skips import decode_rows

        rng = random.Random()

        def decode(data, txt, meta):
            image = load_rgb(data, self.size, self.cfg.augment, rng, self.cfg.crop_scale_min)
            return image, pick_caption(txt, meta, self.cfg.caption_source, rng)

        rows = decode_rows(batch, decode, self.skips)
        tokens = _tokenizer(self.preset)([caption for _, caption in rows])
        images = (
            to_uint8_chw([image for image, _ in rows]) if rows else np.zeros((0, 3, self.size, self.size), np.uint8)
        )
        return {"image": images, "text": tokens.numpy().astype(np.int64)}
