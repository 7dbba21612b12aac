"""The shard layout of filtering stages (clean, CapFilt): same shards and keys in, kept/dropped out.

A filtering stage reads the shards of the stage before it and writes, per input shard, the same
layout with the dropped samples moved aside (DESIGN.md, "Data contracts"; datatrove's filters
with an `exclusion_writer`):

    OUT/{shard:05d}.tar             kept samples, files unchanged except KEY.json gains
                                    `{stage: meta}` and KEY.txt when the stage sets a caption
    OUT/{shard:05d}.parquet         one row per input sample: key, status (kept/dropped), reason,
                                    reason_class, caption, the input parquet's columns, extra columns
    OUT/_dropped/{shard:05d}.tar    dropped samples (KEY.json carries the reason)
    OUT/_dropped/{shard:05d}.parquet  their rows
    OUT/{shard:05d}_stats.json      written last and atomically: the shard's completion marker

Public API:

    input_shards(in_dir: Path) -> list[int]
        The complete shards of a whole input (`_SUCCESS` present). InputError if the directory,
        its `_SUCCESS` or its shards are missing.
    read_input_shard(in_dir: Path, shard: int) -> list[dict]
        `[{"key": str, "files": {ext: bytes}, "row": dict}]` in key order, from the input tar;
        `row` is the sample's input parquet row without the previous stage's status columns.
    write_filtered_shard(out, shard, samples, *, stage, extra_stats=None, duration_s=0.0) -> dict
        Publishes one output shard (see its docstring) and returns its stats.
    reason_class(reason: str | None) -> str
        The metric-safe class of a reason: its text before the first ":" (`dropped/<class>`).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

from vlm import storage
from vlm.data import shards as sh
from vlm.errors import InputError

__all__ = [
    "DROPPED_DIR",
    "DROPPED",
    "KEPT",
    "input_shards",
    "read_input_shard",
    "reason_class",
    "write_filtered_shard",
]

KEPT = "kept"
DROPPED = "dropped"
DROPPED_DIR = "_dropped"

# Columns of the previous stage's parquet that describe that stage's outcome, not the sample.
_STAGE_COLUMNS = (
    "status",
    "reason",
    "reason_class",
    "dropped_by",
    "error_message",
    "retryable",
    "http_status",
    "attempts",
)


def input_shards(in_dir: str | Path) -> list[int]:
    """The shard numbers of a whole stage output, each complete (its stats file exists).

    Raises:
        InputError: the directory is missing, holds no `_SUCCESS` (the previous stage did not
            finish), holds no shards, or lacks a shard its manifest lists.
    """
    in_dir = sh.location(in_dir)
    if not storage.is_dir(in_dir):
        raise InputError(f"input directory not found: {in_dir}")
    if not storage.is_file(sh.at(in_dir, sh.SUCCESS_FILE)):
        raise InputError(f"input {in_dir} has no {sh.SUCCESS_FILE}: the stage that writes it has not finished")
    shards = sh.complete_shards(in_dir)
    manifest = sh.read_manifest(in_dir) or {}
    expected = manifest.get("num_shards")
    if isinstance(expected, int) and expected != len(shards):
        missing = sorted(set(range(expected)) - set(shards))
        raise InputError(f"input {in_dir} lists {expected} shards but shards {missing[:10]} are incomplete")
    if not shards:
        raise InputError(f"input {in_dir} holds no complete shards ({{shard:05d}}_stats.json)")
    present = set(storage.listdir(in_dir))
    for shard in shards:
        if f"{sh.shard_name(shard)}.tar" not in present:
            raise InputError(f"input shard {sh.tar_path(in_dir, shard)} is missing")
    return shards


def read_input_shard(in_dir: str | Path, shard: int) -> list[dict]:
    """The samples of one input shard in key order: `{"key", "files", "row"}`.

    `files` maps extension to bytes (jpg/png/webp, txt, json); `row` is the sample's parquet row
    (url, caption, width, sha256, carried input columns...) minus the previous stage's status
    columns, or `{}` when the parquet is missing.
    """
    files = sh.read_tar_samples(sh.tar_path(in_dir, shard))
    rows: dict[str, dict] = {}
    parquet = sh.parquet_path(in_dir, shard)
    if storage.is_file(parquet):
        import pyarrow.parquet as pq

        with storage.open_input(parquet) as f:
            table = pq.read_table(f)
        for row in table.to_pylist():
            if row.get("key") in files:
                rows[row["key"]] = {k: v for k, v in row.items() if k not in _STAGE_COLUMNS}
    return [{"key": key, "files": files[key], "row": rows.get(key, {})} for key in sorted(files)]


def reason_class(reason: str | None) -> str:
    """`"near_duplicate: of 000000003 (distance 2)"` -> `"near_duplicate"`; metric-name safe."""
    if not reason:
        return ""
    head = re.split(r"[:(]", reason, maxsplit=1)[0]
    return re.sub(r"[^a-z0-9_.-]+", "_", head.strip().lower()).strip("_")[:60] or "other"


def _member_files(sample: dict, stage: str, meta: dict) -> dict[str, bytes]:
    files = dict(sample["files"])
    if sample.get("caption") is not None:
        files["txt"] = str(sample["caption"]).encode("utf-8")
    try:
        record = json.loads(files["json"]) if "json" in files else {}
    except (ValueError, UnicodeDecodeError):
        record = {}
    if not isinstance(record, dict):
        record = {"previous": record}
    record[stage] = meta
    files["json"] = json.dumps(record, sort_keys=True, default=str).encode()
    return files


def _caption(files: dict[str, bytes]) -> str | None:
    return files["txt"].decode("utf-8", "replace") if "txt" in files else None


def write_filtered_shard(
    out: str | Path,
    shard: int,
    samples: list[dict],
    *,
    stage: str,
    extra_stats: dict | None = None,
    duration_s: float = 0.0,
) -> dict:
    """Publish one output shard of a filtering stage; the stats file is written last, atomically.

    Args:
        out: the stage's output directory (created if missing).
        shard: the input shard's number, kept as the output's.
        samples: one dict per input sample, in key order: `key`, `files` ({ext: bytes}, the input
            tar's members), `keep` (bool), `reason` (str, None when kept), optional `caption`
            (the new KEY.txt when not None), `meta` (dict stored in KEY.json under `stage`;
            a dropped sample's meta gains its `reason`), `row` (dict of extra parquet columns,
            e.g. from `read_input_shard`; never overrides key/status/reason/caption).
        stage: the stage name, the KEY.json entry the stage owns ("clean", "capfilt").
        extra_stats: merged into the stats dict (e.g. counts by step).
        duration_s: time spent deciding, added to the writing time in `duration_s`.

    Returns:
        The stats dict: shard, stage, count, kept, dropped, kept_fraction, status_counts,
        reason_counts (by `reason_class`), bytes, duration_s, plus `extra_stats`.
    """
    dropped_dir = sh.at(out, DROPPED_DIR)
    storage.makedirs(dropped_dir)
    t0 = time.time()
    # Leftovers of an interrupted writer; stats goes first, so the shard reads as incomplete.
    sh.remove_shard(out, shard)
    sh.remove_shard(dropped_dir, shard)
    kept_writer = sh.ShardWriter(out, shard)
    dropped_writer = sh.ShardWriter(dropped_dir, shard, primary=False)
    reasons: Counter = Counter()
    try:
        for sample in samples:
            keep = bool(sample["keep"])
            reason = None if keep else (sample.get("reason") or "dropped")
            meta = dict(sample.get("meta") or {})
            if not keep:
                meta.setdefault("reason", reason)
            files = _member_files(sample, stage, meta)
            row = {
                "key": sample["key"],
                "status": KEPT if keep else DROPPED,
                "reason": reason,
                "reason_class": reason_class(reason) or None,
                "caption": _caption(files),
            }
            for name, value in (sample.get("row") or {}).items():
                row.setdefault(name, value)
            writer = kept_writer if keep else dropped_writer
            writer.write_files(sample["key"], files)
            kept_writer.add_row(row)
            if not keep:
                dropped_writer.add_row(row)
                reasons[row["reason_class"]] += 1
        dropped_writer.close({"stage": stage})
    except BaseException:
        kept_writer.abort()
        dropped_writer.abort()
        raise
    count = len(samples)
    dropped = sum(reasons.values())
    stats_extra = {
        "stage": stage,
        "kept": count - dropped,
        "dropped": dropped,
        "successes": count - dropped,  # samples in the tar, as ingest's `successes`
        "kept_fraction": (count - dropped) / count if count else 0.0,
        "reason_counts": dict(reasons.most_common()),
        "dropped_bytes": dropped_writer.bytes_written,
        "duration_s": round(duration_s + time.time() - t0, 3),
        **(extra_stats or {}),
    }
    return kept_writer.close(stats_extra)
