"""Cleaning steps: basic filters (DataComp), exact + near-duplicate removal, CLIP-score filtering.

Each step is a small class with one contract (`vlm.data.steps`: features per sample on workers,
a decision over all samples on the driver) that answers keep or drop-with-reason and counts its
own stats. Reasons read `"<class>: <details>"`; the class (e.g. `near_duplicate`) is what
metrics count. This module holds basic and dedup and the registry; the CLIP-score step is in
`vlm.data.clipscore` (re-exported here).

- `basic`: DataComp's basic filter (Gadre et al. 2023, "DataComp"): smaller image side >= 200,
  aspect ratio <= 3 (on the original size ingest recorded), caption of more than 5 characters
  and more than 2 words (fastText language id is not included).
- `dedup`: exact (SHA-256 of the stored image bytes, and of the downloaded bytes ingest recorded)
  and near duplicates: a 64-bit DCT perceptual hash (pHash: 32x32 grey, 2-D DCT-II, the 8x8
  lowest frequencies against their median; Zauner 2010) within a Hamming distance, searched with
  multi-index hashing (Norouzi et al. 2012). The first sample in key order is kept.
- `clipscore`: image-text cosine similarity of a CLIP model, by threshold or by keeping the top
  fraction (DataComp's "CLIP score" baselines).
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from vlm.data.clipscore import ClipScoreConfig, ClipScoreFilter, ClipScorer, check_checkpoint, load_clip
from vlm.data.steps import IMAGE_EXTS, PerSampleStep, Sample, Step, StepStats, run_steps, sample_from_files

__all__ = [
    "BasicConfig",
    "BasicFilter",
    "ClipScoreConfig",
    "ClipScoreFilter",
    "ClipScorer",
    "IMAGE_EXTS",
    "PerSampleStep",
    "DedupConfig",
    "Dedup",
    "Sample",
    "Step",
    "StepStats",
    "check_checkpoint",
    "hamming",
    "load_clip",
    "phash",
    "run_steps",
    "sample_from_files",
]


# ----------------------------------------------------------------------------- basic


@dataclass
class BasicConfig:
    min_image_side: int = 200  # smaller side of the image, pixels (DataComp: 200)
    max_aspect_ratio: float = 3.0  # larger side / smaller side (DataComp: 3)
    size_source: Literal["original", "stored"] = "original"  # original: the size ingest downloaded
    min_caption_chars: int = 6  # DataComp: more than 5 characters
    max_caption_chars: int | None = None
    min_caption_words: int = 3  # DataComp: more than 2 words (whitespace-separated)
    max_caption_words: int | None = None

    def validate(self) -> None:
        if self.min_image_side < 0 or self.min_caption_chars < 0 or self.min_caption_words < 0:
            raise ValueError("basic: minimums must be >= 0")
        if self.max_aspect_ratio < 1:
            raise ValueError("basic.max_aspect_ratio must be >= 1")


def _image_size(data: bytes | None) -> tuple[int, int] | None:
    from PIL import Image

    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:  # header only
            return im.size
    except Exception:
        return None


class BasicFilter(PerSampleStep):
    """Image size, aspect ratio and caption length bounds (DataComp's basic filter, no fastText)."""

    name = "basic"

    def __init__(self, cfg: BasicConfig):
        super().__init__()
        self.cfg = cfg

    def features(self, sample: Sample) -> dict:
        size = _image_size(sample.image)
        ow, oh = sample.meta.get("original_width"), sample.meta.get("original_height")
        original = self.cfg.size_source == "original" and isinstance(ow, int) and isinstance(oh, int)
        caption = (sample.caption or "").strip()
        feats: dict[str, Any] = {
            "caption_chars": len(caption),
            "caption_words": len(caption.split()),
            "width": ow if original else (size[0] if size else None),
            "height": oh if original else (size[1] if size else None),
            "size_source": "original" if original else "stored",
            "decodable": size is not None,
        }
        return feats

    def check(self, f: dict) -> str | None:
        c = self.cfg
        if not f["decodable"]:
            return "undecodable_image: no image file or unreadable header"
        w, h = f["width"], f["height"]
        if min(w, h) < c.min_image_side:
            return f"image_too_small: {w}x{h} ({f['size_source']}) < {c.min_image_side}"
        aspect = max(w, h) / max(min(w, h), 1)
        if aspect > c.max_aspect_ratio:
            return f"aspect_ratio: {aspect:.2f} > {c.max_aspect_ratio:g}"
        n, words = f["caption_chars"], f["caption_words"]
        if n < c.min_caption_chars:
            return f"caption_too_short: {n} chars < {c.min_caption_chars}"
        if c.max_caption_chars is not None and n > c.max_caption_chars:
            return f"caption_too_long: {n} chars > {c.max_caption_chars}"
        if words < c.min_caption_words:
            return f"too_few_words: {words} < {c.min_caption_words}"
        if c.max_caption_words is not None and words > c.max_caption_words:
            return f"too_many_words: {words} > {c.max_caption_words}"
        return None


# ----------------------------------------------------------------------------- dedup


def _padding_box(w: int, h: int, ow: int, oh: int) -> tuple[int, int, int, int] | None:
    """Where a `ow x oh` picture sits when fitted and centred in `w x h` (ingest's border mode)."""
    if ow <= 0 or oh <= 0 or abs(ow * h - oh * w) <= max(w, h):  # same shape within a pixel
        return None
    if ow * h > oh * w:
        cw, ch = w, max(1, round(w * oh / ow))
    else:
        cw, ch = max(1, round(h * ow / oh)), h
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return x0, y0, x0 + cw, y0 + ch


def _crop_padding(grey: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Crop to `box` if what lies outside it is flat padding; inset a little so no seam stays."""
    x0, y0, x1, y1 = box
    outside = np.ones(grey.shape, dtype=bool)
    outside[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = False
    if not outside.any() or grey[outside].std() > 8.0:  # content out there: not padding
        return grey
    ix, iy = max(1, round(0.04 * (x1 - x0))), max(1, round(0.04 * (y1 - y0)))
    inner = grey[y0 + iy : y1 - iy, x0 + ix : x1 - ix]
    return inner if inner.size else grey


def phash(image, original_size: tuple[int, int] | None = None) -> int:
    """64-bit DCT perceptual hash of a PIL image (or encoded bytes), as an unsigned int.

    Grey, 32x32 (Lanczos), 2-D DCT-II, the 8x8 lowest-frequency coefficients compared with their
    median; bit 63 is coefficient (0, 0). With `original_size`, letterbox padding that a
    border-mode resize added around a picture of that shape is cropped first, so the hash
    describes the picture rather than the padding.
    """
    from PIL import Image
    from scipy.fft import dct

    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    grey = np.asarray(image.convert("L"), dtype=np.float32)  # (H, W)
    if original_size is not None:
        box = _padding_box(grey.shape[1], grey.shape[0], *original_size)
        if box is not None:
            grey = _crop_padding(grey, box)
    small = np.asarray(Image.fromarray(grey).resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    coeffs = dct(dct(small, axis=0, norm="ortho"), axis=1, norm="ortho")[:8, :8].ravel()  # (64,)
    bits = coeffs > np.median(coeffs)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class _MultiIndex:
    """Hamming-ball search over 64-bit hashes (multi-index hashing, Norouzi et al. 2012).

    The hash is cut into m blocks; two hashes within distance t agree within t // m bits on at
    least one block (pigeonhole), so a query probes, per block, every bucket within that radius
    and verifies only those candidates. m is chosen for the expected size: more blocks probe
    less, fewer blocks give smaller buckets.
    """

    def __init__(self, threshold: int, expected: int = 1_000_000):
        self.threshold = threshold
        m = min(range(1, 17), key=lambda m: self._cost(threshold, m, max(expected, 1)))
        edges = [round(i * 64 / m) for i in range(m + 1)]
        radius = threshold // m
        self._blocks = [
            (lo, (1 << (hi - lo)) - 1, _flip_masks(hi - lo, radius)) for lo, hi in zip(edges[:-1], edges[1:])
        ]
        self._buckets: list[dict[int, list[int]]] = [{} for _ in self._blocks]
        self._arr = np.zeros(0, dtype=np.uint64)  # hashes by position (grown by doubling)
        self._n = 0

    @staticmethod
    def _cost(t: int, m: int, n: int) -> float:
        """Relative work per query: bucket probes plus candidates to verify."""
        width = 64 // m
        probes = m * sum(math.comb(width, i) for i in range(t // m + 1))
        return probes + 0.3 * probes * n / 2.0**width

    def query(self, h: int) -> tuple[int, int] | None:
        """(position, distance) of the earliest added hash within the threshold, or None."""
        cand: set[int] = set()
        for (shift, mask, flips), buckets in zip(self._blocks, self._buckets):
            value = (h >> shift) & mask
            for flip in flips:
                hit = buckets.get(value ^ flip)
                if hit:
                    cand.update(hit)
        if not cand:
            return None
        pos = np.fromiter(sorted(cand), dtype=np.int64, count=len(cand))
        dist = np.bitwise_count(self._arr[pos] ^ np.uint64(h))
        hit = np.flatnonzero(dist <= self.threshold)
        return (int(pos[hit[0]]), int(dist[hit[0]])) if hit.size else None

    def add(self, h: int) -> None:
        if self._n == len(self._arr):
            self._arr = np.concatenate([self._arr, np.zeros(max(1024, self._n), dtype=np.uint64)])
        self._arr[self._n] = h
        for (shift, mask, _), buckets in zip(self._blocks, self._buckets):
            buckets.setdefault((h >> shift) & mask, []).append(self._n)
        self._n += 1


def _flip_masks(width: int, radius: int) -> list[int]:
    """Every `width`-bit mask with at most `radius` bits set (0 first)."""
    from itertools import combinations

    return [sum(1 << b for b in bits) for r in range(radius + 1) for bits in combinations(range(width), r)]


@dataclass
class DedupConfig:
    exact: bool = True  # SHA-256 of the image bytes (stored, and downloaded when ingest recorded it)
    near: bool = True  # perceptual hash within near_threshold
    near_threshold: int = 4  # max Hamming distance of 64-bit pHashes (0: identical hashes only)
    crop_padding: bool = True  # hash the picture without ingest's letterbox border (uses original size)

    def validate(self) -> None:
        if not 0 <= self.near_threshold <= 32:
            raise ValueError("dedup.near_threshold must be in 0..32 (bits of 64)")


class Dedup(Step):
    """Exact and near-duplicate removal across all samples; the first in key order is kept."""

    name = "dedup"

    def __init__(self, cfg: DedupConfig):
        super().__init__()
        self.cfg = cfg

    def features(self, sample: Sample) -> dict:
        feats: dict[str, Any] = {"sha256": hashlib.sha256(sample.image).hexdigest() if sample.image else None}
        source = sample.meta.get("sha256")
        feats["source_sha256"] = source if isinstance(source, str) else None
        if self.cfg.near:
            ow, oh = sample.meta.get("original_width"), sample.meta.get("original_height")
            original = (ow, oh) if self.cfg.crop_padding and isinstance(ow, int) and isinstance(oh, int) else None
            try:
                feats["phash"] = f"{phash(sample.image, original):016x}" if sample.image else None
            except Exception:
                feats["phash"] = None  # undecodable: exact dedup still applies
        return feats

    def decide(self, records: list[dict]) -> list[str | None]:
        index = _MultiIndex(self.cfg.near_threshold, len(records)) if self.cfg.near else None
        return self._walk(records, index)

    def decide_group(self, records: list[dict]) -> list[str | None]:
        """`decide` over one connected group of samples (few hashes: a linear scan, no index to build).

        The distributed dedup (`vlm.data.global_dedup`) calls this once per group of samples
        linked by a shared digest or a pHash within the threshold: no sample outside a group can
        change a decision inside it, so the walk over each group is the walk over everything.
        """
        if not self.cfg.near:
            return self._walk(records, None)
        big = len(records) > 4096  # a large component: the multi-index beats a scan per query
        return self._walk(
            records, _MultiIndex(self.cfg.near_threshold, len(records)) if big else _ScanIndex(self.cfg.near_threshold)
        )

    def _walk(self, records: list[dict], index) -> list[str | None]:
        seen: dict[str, str] = {}  # digest -> first key
        index_keys: list[str] = []
        reasons: list[str | None] = []
        for record in records:
            f = record[self.name]
            reason = None
            if self.cfg.exact:
                for field_name, what in (("sha256", "image bytes"), ("source_sha256", "downloaded bytes")):
                    digest = f.get(field_name)
                    if digest and digest in seen:
                        f["duplicate_of"] = seen[digest]
                        reason = f"exact_duplicate: of {seen[digest]} (sha256 of {what})"
                        break
            if reason is None and index is not None and f.get("phash"):
                h = int(f["phash"], 16)
                hit = index.query(h)
                if hit is not None:
                    f["duplicate_of"], f["distance"] = index_keys[hit[0]], hit[1]
                    reason = f"near_duplicate: of {index_keys[hit[0]]} (phash distance {hit[1]})"
                else:
                    index.add(h)
                    index_keys.append(record["key"])
            if reason is None and self.cfg.exact:
                for field_name in ("sha256", "source_sha256"):
                    if f.get(field_name):
                        seen.setdefault(f[field_name], record["key"])
            reasons.append(reason)
        return reasons


class _ScanIndex:
    """`_MultiIndex`'s interface by a linear scan: cheaper for the few hashes of one group."""

    def __init__(self, threshold: int):
        self.threshold = threshold
        self._arr = np.zeros(64, dtype=np.uint64)
        self._n = 0

    def query(self, h: int) -> tuple[int, int] | None:
        if self._n <= 32:  # a Python loop beats numpy's call overhead here
            for i in range(self._n):
                d = (h ^ int(self._arr[i])).bit_count()
                if d <= self.threshold:
                    return i, d
            return None
        dist = np.bitwise_count(self._arr[: self._n] ^ np.uint64(h))
        hit = np.flatnonzero(dist <= self.threshold)
        return (int(hit[0]), int(dist[hit[0]])) if hit.size else None

    def add(self, h: int) -> None:
        if self._n == len(self._arr):
            self._arr = np.concatenate([self._arr, np.zeros(self._n, dtype=np.uint64)])
        self._arr[self._n] = h
        self._n += 1


# ----------------------------------------------------------------------------- registry

STEPS: dict[str, type[Step]] = {"basic": BasicFilter, "dedup": Dedup, "clipscore": ClipScoreFilter}


def build_steps(names: list[str], configs: dict[str, Any]) -> list[Step]:
    """Steps in the given order, each with its config section (`configs[name]`)."""
    return [STEPS[name](configs[name]) for name in names]


def sample_features(steps: list[Step], sample: Sample) -> dict[str, dict]:
    """Every CPU step's features of one sample (what a worker computes)."""
    return {step.name: step.features(sample) for step in steps if not step.needs_model}
