"""CapFilt steps (Li et al. 2022, BLIP sec. 3.3): caption every image, keep the captions that match.

`CaptionerStep` adds K synthetic captions per image; `FilterStep` scores the web caption and the
synthetic ones with the ITM filter and applies `choose_captions`. Both are Ray Data style
callable classes (model loaded once in `__init__`, `__call__(batch) -> batch` under
`torch.inference_mode()`), but import no Ray: the capfilt stage maps them with actor pools.

Batch columns (numpy arrays, one row per sample):

    in       key (str), jpg (encoded image bytes), txt (web caption; empty/None if missing)
    Captioner  + synthetic: JSON list of K strings
    Filter     + scores:   JSON {"original": float | null, "synthetic": [float, ...]}
               + decision: JSON of `choose_captions` (keep, reason, candidates, chosen)
               + keep:     bool, decision["keep"] (for a cheap `filter` without JSON parsing)

Images that do not decode get no synthetic captions and are dropped with the reason.
"""

from __future__ import annotations

import io
import json
import math
import zlib
from collections import Counter
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["CaptionerStep", "FilterStep", "choose_captions", "filter_quality"]


LOW_SCORE = "low_itm_score"  # the reason class of a sample no caption of which passed the filter


def filter_quality(q: dict) -> dict:
    """Precision / recall of noise detection from tp/fp/fn/tn counts ({} without labels).

    A positive is "the filter drops the web caption"; the labels say whether it was noisy.
    """
    tp, fp, fn, tn = (q.get(k, 0) for k in ("tp", "fp", "fn", "tn"))
    if tp + fp + fn + tn == 0:
        return {}
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "accuracy": (tp + tn) / (tp + fp + fn + tn),
        "labelled": tp + fp + fn + tn,
    }


def choose_captions(
    original: str | None,
    synthetic: list[str],
    orig_score: float | None,
    syn_scores: list[float],
    threshold: float,
) -> dict[str, Any]:
    """BLIP's filter rule: keep every caption scoring >= threshold; no caption left => drop.

    Args:
        original: the web caption; None or blank when the sample has none.
        synthetic: the captioner's captions.
        orig_score: the original's score (ignored when there is no original).
        syn_scores: one score per synthetic caption.
        threshold: minimum score kept (inclusive).

    Returns:
        {"keep", "reason" (None when kept), "candidates": [{"text", "source", "score", "kept"}],
        "chosen"}: chosen is the highest-scoring kept caption. Ties go to the original, then to
        the earlier synthetic caption. A NaN score is never kept.
    """
    if len(synthetic) != len(syn_scores):
        raise ValueError(f"{len(synthetic)} synthetic captions but {len(syn_scores)} scores")
    has_original = original is not None and original.strip() != ""
    if has_original and orig_score is None:
        raise ValueError("an original caption needs its score")
    candidates = []
    if has_original:
        candidates.append({"text": original, "source": "original", "score": float(orig_score)})
    candidates += [{"text": t, "source": "synthetic", "score": float(s)} for t, s in zip(synthetic, syn_scores)]
    chosen = None
    for c in candidates:
        c["kept"] = not math.isnan(c["score"]) and c["score"] >= threshold
        # Strictly greater: the first of equal scores wins, and the original comes first.
        if c["kept"] and (chosen is None or c["score"] > chosen["score"]):
            chosen = c
    if chosen is None:
        return {
            "keep": False,
            "reason": f"{LOW_SCORE}: no caption scored >= {threshold:g}",
            "candidates": candidates,
            "chosen": None,
        }
    return {"keep": True, "reason": None, "candidates": candidates, "chosen": chosen["text"]}


def _decode(data: Any) -> Image.Image:
    with Image.open(io.BytesIO(bytes(data))) as im:
        return im.convert("RGB")


def _decode_all(column: np.ndarray) -> tuple[list[Image.Image | None], list[str | None]]:
    """(image or None, error or None) per row."""
    images, errors = [], []
    for data in column:
        try:
            images.append(_decode(data))
            errors.append(None)
        except Exception as exc:  # any undecodable bytes: dropped with the reason, not a crashed stage
            images.append(None)
            errors.append(f"image could not be decoded: {type(exc).__name__}: {exc}".splitlines()[0])
    return images, errors


def _caption_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _object_column(values: list) -> np.ndarray:
    col = np.empty(len(values), dtype=object)
    col[:] = values
    return col


def _load_config(cfg_dict: dict | None):
    from vlm.config import from_dict
    from vlm.models.blip.config import BlipConfig

    return from_dict(BlipConfig, cfg_dict)


class CaptionerStep:
    """Adds `synthetic` (JSON list of K captions) to a batch. `stats` counts what it did."""

    def __init__(self, cfg_dict: dict | None = None):
        from vlm.models.blip.build import build_captioner
        from vlm.models.blip.captioner import Captioner

        self.cfg = _load_config(cfg_dict)
        model, processor = build_captioner(self.cfg)
        self.captioner = Captioner(model, processor, self.cfg)
        self.stats: Counter[str] = Counter()

    def _seed(self, keys: list[str]) -> int:
        # Same config seed + same batch => same captions, so a rerun of a shard reproduces it.
        return zlib.crc32("\n".join([str(self.cfg.seed), *keys]).encode())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        keys = [str(k) for k in batch["key"]]
        images, errors = _decode_all(batch["jpg"])
        ok = [i for i, im in enumerate(images) if im is not None]
        captions: list[list[str]] = [[] for _ in images]
        with torch.inference_mode():
            generated = self.captioner.caption([images[i] for i in ok], seed=self._seed(keys))
        for i, caps in zip(ok, generated):
            captions[i] = caps
        self.stats.update(
            batches=1,
            images=len(images),
            undecodable=sum(e is not None for e in errors),
            captions=sum(len(c) for c in captions),
        )
        return {**batch, "synthetic": _object_column([json.dumps(c) for c in captions])}


class FilterStep:
    """Adds `scores`, `decision` (JSON) and `keep` to a batch. `stats` counts what it did."""

    def __init__(self, cfg_dict: dict | None = None):
        from vlm.models.blip.build import build_filter
        from vlm.models.blip.captioner import Filter

        self.cfg = _load_config(cfg_dict)
        model, processor = build_filter(self.cfg)
        self.filter = Filter(model, processor, self.cfg)
        self.stats: Counter[str] = Counter()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        n = len(batch["key"])
        images, errors = _decode_all(batch["jpg"])
        originals = [_caption_or_none(t) for t in batch["txt"]] if "txt" in batch else [None] * n
        synthetic = [json.loads(s) for s in batch["synthetic"]] if "synthetic" in batch else [[] for _ in range(n)]
        ok = [i for i, im in enumerate(images) if im is not None]
        texts = [([originals[i]] if originals[i] is not None else []) + synthetic[i] for i in ok]
        with torch.inference_mode():
            score_sets = self.filter.score_sets([images[i] for i in ok], texts)

        scores: list[dict] = [{"original": None, "synthetic": []} for _ in range(n)]
        decisions: list[dict] = [
            {"keep": False, "reason": errors[i], "candidates": [], "chosen": None} for i in range(n)
        ]
        for i, s in zip(ok, score_sets):
            s = [float(x) for x in s]
            orig = s.pop(0) if originals[i] is not None else None
            scores[i] = {"original": orig, "synthetic": s}
            decisions[i] = choose_captions(originals[i], synthetic[i], orig, s, self.cfg.itm_threshold)
        self._count(decisions, errors)
        return {
            **batch,
            "scores": _object_column([json.dumps(s) for s in scores]),
            "decision": _object_column([json.dumps(d) for d in decisions]),
            "keep": np.array([d["keep"] for d in decisions], dtype=bool),
        }

    def _count(self, decisions: list[dict], errors: list[str | None]) -> None:
        self.stats.update(batches=1, images=len(decisions), undecodable=sum(e is not None for e in errors))
        for d in decisions:
            self.stats["kept" if d["keep"] else "dropped"] += 1
            for c in d["candidates"]:
                self.stats[f"{c['source']}_{'kept' if c['kept'] else 'dropped'}"] += 1
            if d["keep"]:
                source = next(c["source"] for c in d["candidates"] if c["kept"] and c["text"] == d["chosen"])
                self.stats[f"chosen_{source}"] += 1
