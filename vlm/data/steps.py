"""The cleaning-step contract (datatrove's `BaseFilter`): a sample, a step, its stats, and the
loop that runs the steps in order over every sample.

A step answers keep or drop-with-reason for every sample that reaches it, and counts its own
stats, in two halves so the stage can run the expensive half in parallel and the global half once:

    features(sample) -> dict          per sample, pure, on CPU workers (decode header, hash...)
    decide(records) -> [reason|None]  on the driver, over every sample that reached the step,
                                      in key order (dedup and top-fraction need all of them)

Reasons read `"<class>: <details>"`; the class (e.g. `near_duplicate`) is what metrics count.
The steps themselves are in `vlm.data.cleaning` (basic, dedup) and `vlm.data.clipscore`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

from vlm.data.filtered_shards import reason_class

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

__all__ = ["IMAGE_EXTS", "PerSampleStep", "Sample", "Step", "StepStats", "run_steps", "sample_from_files"]


# ----------------------------------------------------------------------------- samples


@dataclass
class Sample:
    """What a step sees of one sample: encoded image, caption, and KEY.json (ingest's row)."""

    key: str
    image: bytes | None
    caption: str | None
    meta: dict = field(default_factory=dict)


def sample_from_files(key: str, files: dict[str, bytes]) -> Sample:
    """A Sample from a shard's tar members `{ext: bytes}`."""
    image = next((files[e] for e in IMAGE_EXTS if e in files), None)
    caption = files["txt"].decode("utf-8", "replace") if "txt" in files else None
    try:
        meta = json.loads(files["json"]) if "json" in files else {}
    except (ValueError, UnicodeDecodeError):
        meta = {}
    return Sample(key, image, caption, meta if isinstance(meta, dict) else {})


@dataclass
class StepStats:
    """Counts a step keeps of the samples that reached it."""

    seen: int = 0
    kept: int = 0
    dropped: int = 0
    reasons: Counter = field(default_factory=Counter)  # by reason class

    def add(self, reason: str | None) -> None:
        self.seen += 1
        if reason is None:
            self.kept += 1
        else:
            self.dropped += 1
            self.reasons[reason_class(reason)] += 1

    def to_dict(self) -> dict:
        return {"seen": self.seen, "kept": self.kept, "dropped": self.dropped, "reasons": dict(self.reasons)}


class Step:
    """Base: `features` per sample (workers), `decide` over all samples reaching it (driver)."""

    name: ClassVar[str]
    needs_model: ClassVar[bool] = False  # features come from a model (an actor pool), not `features`

    def __init__(self) -> None:
        self.stats = StepStats()

    @property
    def is_global(self) -> bool:
        """Whether a decision depends on other samples (dedup, a top fraction), not only on its own."""
        return True

    def features(self, sample: Sample) -> dict:
        return {}

    def decide(self, records: list[dict]) -> list[str | None]:
        """One reason (None: keep) per record; records are `{"key", <step name>: features}`."""
        raise NotImplementedError


class PerSampleStep(Step):
    """A step whose decision needs only the sample's own features."""

    is_global = False

    def check(self, feats: dict) -> str | None:
        raise NotImplementedError

    def decide(self, records: list[dict]) -> list[str | None]:
        return [self.check(r[self.name]) for r in records]


def run_steps(steps: list[Step], records: list[dict]) -> dict[str, dict]:
    """Apply steps in order; a sample dropped by one step is not seen by the next.

    Args:
        records: one per sample (walked in (shard, key) order): `{"key": str, <step name>: features dict, ...}`.
    Returns:
        `{key: {"keep", "reason", "dropped_by", "meta"}}`; meta holds the features/results of
        the steps that saw the sample (what KEY.json's `clean` entry records).
    """
    records = sorted(records, key=lambda r: (r.get("shard", 0), r["key"]))
    decisions = {r["key"]: {"keep": True, "reason": None, "dropped_by": None, "meta": {}} for r in records}
    alive = records
    for step in steps:
        reasons = step.decide(alive)
        survivors = []
        for record, reason in zip(alive, reasons, strict=True):
            step.stats.add(reason)
            decision = decisions[record["key"]]
            decision["meta"][step.name] = record.get(step.name, {})
            if reason is None:
                survivors.append(record)
            else:
                decision.update(keep=False, reason=reason, dropped_by=step.name)
                decision["meta"]["dropped_by"] = step.name
        alive = survivors
    return decisions
