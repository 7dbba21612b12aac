"""BLIP captioner / filter training rows from WebDataset shards (what `vlm train blip` feeds its workers).

`BlipPreprocess` is a Ray Data batch transform: raw shard rows (image bytes, `txt`, `json`) -> fixed-shape
arrays, tokenized with the processor of the model being trained (built once per process), so the
training workers only run the model. The captioner's rows carry LM labels (prompt and padding -100);
the filter's carry a group id (`data.group_key`) that keeps matching pairs from being drawn as ITM
negatives of each other.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

from vlm.data.clip_data import PairDataConfig
from vlm.models.blip.config import BlipConfig

Task = Literal["captioner", "filter"]
IGNORE = -100  # label of positions without loss


@dataclass
class BlipDataConfig(PairDataConfig):
    # Filter only: a KEY.json field; samples with equal values are positives of each other (their
    # captions match each other's images), never drawn as ITM negatives. BLIP uses the COCO image id
    # this way; for the digits it is `label`. null: only identical captions count as matches.
    group_key: str | None = None
    # Passes over the shards per loop epoch. A small clean set (BLIP fine-tunes on ~100k COCO pairs, the
    # demo on ~1k digits) ends an epoch every few seconds, and each epoch restarts Ray Data's streaming
    # execution; several passes per epoch (each freshly augmented) keep the workers fed.
    repeat: int = 1
    # Preprocessing tasks in flight; null: as many as Ray Data likes. Each task process imports torch and
    # transformers once (seconds); on a 2-core machine one process keeps up with a tiny model and starts
    # faster than four competing for the cores.
    concurrency: int | None = None

    def validate(self) -> None:
        if self.repeat < 1:
            raise ValueError(f"data.repeat must be >= 1, got {self.repeat}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"data.concurrency must be >= 1 or null, got {self.concurrency}")


def checkpoint_of(task: Task, blip: BlipConfig) -> str | None:
    """The checkpoint training starts from (None: the preset, randomly initialised)."""
    return blip.pretrained if task == "captioner" else blip.filter_pretrained


_PROCESSORS: dict = {}


def training_processor(task: Task, blip: BlipConfig):
    """The processor of the model being trained, built once per process."""
    from vlm.models.blip.build import build_processor

    key = (task, blip.backend, blip.preset, blip.image_size, checkpoint_of(task, blip))
    if key not in _PROCESSORS:
        _PROCESSORS[key] = build_processor(blip, task)
    return _PROCESSORS[key]


def processor_image_size(processor) -> int:
    size = processor.image_processor.size  # a dict or transformers' SizeDict
    return int(size["height"] if isinstance(size, dict) else getattr(size, "height", size))


def text_length(processor, blip: BlipConfig) -> int:
    """Token columns of a training row: the text budget plus a BLIP-2 processor's image tokens."""
    return blip.max_text_length + (getattr(processor, "num_query_tokens", 0) or 0)


def group_id(value) -> int:
    """A `group_key` value as a non-negative int64 id (strings hashed); -1 when missing."""
    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, int):
        return zlib.crc32(str(value).encode()) & 0x7FFFFFFF
    return int(value) & 0x7FFFFFFFFFFFFFFF


class BlipPreprocess:
    """Ray Data `map_batches` transform: raw shard rows -> fixed-shape training arrays.

    pixel_values float32 (B, 3, S, S); input_ids, attention_mask int64 (B, L), right-padded to
    L = blip.max_text_length (+ BLIP-2 image tokens), so rows from any batch stack; captioner: labels
    int64 (B, L) (prompt and padding -100); filter: group int64 (B,). Rows without an image are dropped.
    Passed as an instance (Ray Data runs it as tasks); the processor is cached per worker process.
    """

    def __init__(self, task: Task, blip: BlipConfig, data: BlipDataConfig, skips=None):
        self.task = task
        self.blip = blip
        self.cfg = data
        self.skips = skips  # vlm.data.skips counter: rows that do not decode are left out and reported

    def __call__(self, batch: dict) -> dict:
        from vlm.data.clip_data import load_rgb, pick_caption
        from vlm.data.skips import decode_rows
        from vlm.models.blip.losses import collate_blip

        processor = training_processor(self.task, self.blip)
        size = processor_image_size(processor)
        rng = random.Random()

        def decode(data, txt, meta):
            image = load_rgb(data, size, self.cfg.augment, rng, self.cfg.crop_scale_min)
            group = group_id((meta or {}).get(self.cfg.group_key)) if self.cfg.group_key else -1
            return {"image": image, "text": pick_caption(txt, meta, self.cfg.caption_source, rng)}, group

        rows = decode_rows(batch, decode, self.skips)
        samples, groups = [s for s, _ in rows], [g for _, g in rows]
        length = text_length(processor, self.blip)
        if not samples:
            return _empty(self.task, size, length)
        kind = "caption" if self.task == "captioner" else "filter"
        out = collate_blip(samples, processor, kind, prompt=self.blip.prompt, max_length=self.blip.max_text_length)
        pad = processor.tokenizer.pad_token_id
        arrays = {
            "pixel_values": out["pixel_values"].numpy().astype(np.float32),
            "input_ids": _pad(out["input_ids"].numpy(), length, pad),
            "attention_mask": _pad(out["attention_mask"].numpy(), length, 0),
        }
        if self.task == "captioner":
            arrays["labels"] = _pad(out["labels"].numpy(), length, IGNORE)
        else:
            arrays["group"] = np.asarray(groups, dtype=np.int64)
        return arrays


def _pad(x: np.ndarray, length: int, value: int) -> np.ndarray:
    """(B, T) int -> (B, length) int64, right-padded with `value` (T <= length after truncation)."""
    out = np.full((x.shape[0], length), value, dtype=np.int64)
    out[:, : x.shape[1]] = x[:, :length]
    return out


def _empty(task: Task, size: int, length: int) -> dict:
    """The arrays of a batch whose rows all lacked an image."""
    arrays = {
        "pixel_values": np.zeros((0, 3, size, size), np.float32),
        "input_ids": np.zeros((0, length), np.int64),
        "attention_mask": np.zeros((0, length), np.int64),
    }
    if task == "captioner":
        arrays["labels"] = np.zeros((0, length), np.int64)
    else:
        arrays["group"] = np.zeros((0,), np.int64)
    return arrays
