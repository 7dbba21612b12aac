"""The CLIP-score cleaning step (DataComp's "CLIP score" baselines, Gadre et al. 2023).

Image-text cosine similarity of a CLIP model, kept by threshold or by the top fraction. The
model-bearing half is a callable class (`ClipScorer`: model loaded in `__init__`,
`__call__(batch) -> batch` under `torch.inference_mode()`) that the clean stage maps with a
Ray Data actor pool; its scores become `ClipScoreFilter`'s features. Nothing here imports Ray.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from vlm.data.steps import Step

__all__ = ["ClipScoreConfig", "ClipScoreFilter", "ClipScorer", "check_checkpoint", "load_clip"]


@dataclass
class ClipScoreConfig:
    checkpoint: str | None = None  # open_clip export dir (`vlm train clip` OUTPUT/export) or weights file
    preset: str | None = None  # open_clip model name, needed only when checkpoint is a weights file
    mode: Literal["threshold", "top_fraction"] = "threshold"
    threshold: float = 0.3  # keep cosine >= threshold (DataComp ViT-B/32: 0.3)
    top_fraction: float = 0.3  # keep this fraction of the samples reaching the step, best first
    batch_size: int = 256  # images per model call (Ray Data map_batches)
    concurrency: int = 1  # actors in the pool
    num_gpus: float = 0.0  # GPUs per actor (0: CPU)
    num_cpus: float = 1.0  # CPUs per actor

    def validate(self) -> None:
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError("clipscore.top_fraction must be in (0, 1]")
        if self.batch_size < 1 or self.concurrency < 1:
            raise ValueError("clipscore.batch_size and clipscore.concurrency must be >= 1")


class ClipScorer:
    """Ray Data callable: CLIP image-text cosine per row (`image` bytes, `caption`) -> `clip_score`.

    Rows whose image does not decode or whose caption is empty score NaN.
    """

    def __init__(self, checkpoint: str, preset: str | None = None, device: str | None = None):
        from open_clip.transform import image_transform

        from vlm.devices import auto_device

        self.device = device or auto_device()  # a GPU only where Ray gave this actor one
        self.model, self.tokenizer = load_clip(checkpoint, preset)
        self.model = self.model.to(self.device).eval()
        size = self.model.visual.image_size
        self.preprocess = image_transform(size[0] if isinstance(size, tuple) else size, is_train=False)

    @classmethod
    def bound(cls, checkpoint: str, preset: str | None = None, device: str | None = None) -> type[ClipScorer]:
        """A subclass with the arguments built in, for `map_batches` without constructor arguments
        (Ray keeps those in the object store and warns that a restarted actor may lose them)."""

        def __init__(self) -> None:
            cls.__init__(self, checkpoint, preset, device)

        return type(cls.__name__, (cls,), {"__init__": __init__})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        from PIL import Image

        n = len(batch["key"])
        scores = np.full(n, np.nan, dtype=np.float32)
        pixels, texts, rows = [], [], []
        for i in range(n):
            data, caption = batch["image"][i], batch["caption"][i]
            if not data or not caption or not str(caption).strip():
                continue
            try:
                pixels.append(self.preprocess(Image.open(io.BytesIO(data)).convert("RGB")))
            except Exception:
                continue
            texts.append(str(caption))
            rows.append(i)
        if rows:
            with torch.inference_mode():
                img = self.model.encode_image(torch.stack(pixels).to(self.device), normalize=True)  # (B, D)
                txt = self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True)  # (B, D)
                scores[rows] = (img * txt).sum(-1).float().cpu().numpy()
        batch["clip_score"] = scores
        return batch


def check_checkpoint(checkpoint: str | None, preset: str | None = None) -> str:
    """ "export" or "weights": what `checkpoint` is; ConfigError if it is neither or lacks its preset."""
    from vlm import storage
    from vlm.errors import ConfigError
    from vlm.models.clip.build import EXPORT_CONFIG

    if checkpoint and storage.is_file(storage.join(checkpoint, EXPORT_CONFIG)):  # a local dir or a URL prefix
        return "export"
    if checkpoint and storage.is_file(checkpoint):
        if not preset:
            raise ConfigError(f"clipscore.checkpoint {checkpoint} is a weights file: set clipscore.preset too")
        return "weights"
    raise ConfigError(f"clipscore.checkpoint not found (an open_clip export dir or weights file): {checkpoint}")


def load_clip(checkpoint: str, preset: str | None = None):
    """(model, tokenizer) from an open_clip export dir, or a weights file with its preset."""
    from vlm.models.clip.build import CLIPModelConfig, build_clip, load_export

    if check_checkpoint(checkpoint, preset) == "export":
        return load_export(checkpoint)
    model, tokenizer, _ = build_clip(CLIPModelConfig(preset=preset, checkpoint=str(checkpoint)))
    return model.eval(), tokenizer


class ClipScoreFilter(Step):
    """Keep samples whose CLIP score passes a threshold, or the top fraction by score."""

    name = "clipscore"
    needs_model = True

    def __init__(self, cfg: ClipScoreConfig):
        super().__init__()
        self.cfg = cfg

    @staticmethod
    def score_features(score: float) -> dict:
        """The step's features from a scorer output (NaN: no score)."""
        return {"score": None if score is None or math.isnan(score) else round(float(score), 5)}

    @property
    def is_global(self) -> bool:
        return self.cfg.mode == "top_fraction"

    def decide(self, records: list[dict]) -> list[str | None]:
        scores = [r[self.name].get("score") for r in records]
        if self.cfg.mode == "threshold":
            cutoff = self.cfg.threshold
            keep = [s is not None and s >= cutoff for s in scores]
        else:
            order = sorted((i for i, s in enumerate(scores) if s is not None), key=lambda i: -scores[i])  # stable
            n_keep = min(round(self.cfg.top_fraction * len(records)), len(order))
            top = set(order[:n_keep])
            keep = [i in top for i in range(len(records))]
            cutoff = scores[order[n_keep - 1]] if n_keep else None
        return self.explain(records, keep, cutoff)

    def explain(self, records: list[dict], keep: list[bool], cutoff: float | None) -> list[str | None]:
        """Reasons (and each record's `cutoff`) once the kept set is known; shared with the distributed plan."""
        why = "threshold" if self.cfg.mode == "threshold" else f"top {100 * self.cfg.top_fraction:g}%"
        reasons: list[str | None] = []
        for record, kept in zip(records, keep, strict=True):
            score = record[self.name].get("score")
            record[self.name]["cutoff"] = cutoff
            if kept:
                reasons.append(None)
            elif score is None:
                reasons.append("no_clip_score: undecodable image or empty caption")
            elif cutoff is None:
                reasons.append(f"low_clip_score: {score:.4f}, none kept ({why})")
            else:
                reasons.append(f"low_clip_score: {score:.4f} < {cutoff:.4f} ({why})")
        return reasons
