"""URL lists for the local web: each row carries the status a correct downloader should report.

`make_url_rows` builds rows over a `LocalWeb` base URL (good images in several formats and
variants, every failure kind, duplicates, noisy captions); `write_url_list` writes them as
parquet, csv, tsv, jsonl or txt.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Iterable
from pathlib import Path

from vlm.testbed.digits import caption_for, load_digit_images, noisy_caption_for, train_indices
from vlm.testbed.media import FAILURE_KINDS, FORMATS, SKIPPED_DUPLICATE, SUCCESS, URL_COLUMNS, VARIANTS, norm_ext

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- URL lists


def _failure_counts(failures: bool | dict[str, int], n: int) -> dict[str, int]:
    if failures is False or failures is None:
        return {}
    if failures is True:
        per_kind = max(1, n // 200)
        return {kind: per_kind for kind in FAILURE_KINDS}
    if isinstance(failures, dict):
        unknown = sorted(set(failures) - set(FAILURE_KINDS))
        if unknown:
            raise ValueError(f"unknown failure kinds {unknown}; expected some of {list(FAILURE_KINDS)}")
        bad = {k: v for k, v in failures.items() if int(v) < 0}
        if bad:
            raise ValueError(f"failure counts must be >= 0, got {bad}")
        return {kind: int(failures[kind]) for kind in FAILURE_KINDS if int(failures.get(kind, 0)) > 0}
    raise TypeError(f"failures must be a bool or a dict of kind -> count, got {type(failures).__name__}")


def _round_robin(counts: dict[str, int]) -> list[str]:
    """kind_a, kind_b, ..., kind_a, kind_b, ... so truncating keeps every kind longest."""
    out: list[str] = []
    left = dict(counts)
    while any(left.values()):
        for kind in counts:
            if left[kind] > 0:
                out.append(kind)
                left[kind] -= 1
    return out


def _failure_path(kind: str, idx: int, q: str, k: int) -> str:
    if kind in ("404", "500", "403"):
        return f"/status/{kind}?id={k}"
    if kind == "flaky":
        return f"/flaky/1/{idx}.jpg?{q}"
    if kind == "ratelimit":
        return f"/ratelimit/1/{idx}.jpg?after=1&{q}"
    if kind == "redirect":
        return f"/redirect/{1 + k % 3}/{idx}.jpg?{q}"
    if kind == "loop":
        return f"/loop/a/{idx}?{q}"
    if kind == "bomb":
        return f"/bomb/{idx}.png?s={k}"
    if kind.startswith("optout_"):
        return f"/optout/{kind[len('optout_') :]}/{idx}.jpg?{q}"
    return f"/{kind}/{idx}.jpg?{q}"  # slow, reset, wrongtype, truncated, corrupt, empty, oversized


def make_url_rows(
    base_url: str,
    n: int,
    *,
    seed: int = 0,
    failures: bool | dict[str, int] = True,
    noisy_fraction: float = 0.0,
    indices: Iterable[int] | None = None,
    sizes: Iterable[tuple[int, int]] = ((256, 256), (512, 384), (1024, 768), (300, 900)),
    formats: Iterable[str] = ("jpg", "png"),
    variants: bool = True,
    duplicates: int = 0,
) -> list[dict]:
    """`n` URL rows for a LocalWeb at `base_url` (+ `duplicates` repeated URLs at the end).

    Each row: url, caption, label, noisy, expected_status, kind, index. failures=True adds
    max(1, n // 200) rows of every FAILURE_KINDS kind (a dict gives counts per kind); the
    rest are ok images in mixed `sizes` / `formats`, some in each of VARIANTS when
    `variants`. Images cycle through `indices` (default: the non-held-out digits) in a
    seed-shuffled order; every URL is distinct (a per-row `s=` query). Deterministic.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= noisy_fraction <= 1.0:
        raise ValueError(f"noisy_fraction must be in [0, 1], got {noisy_fraction}")
    if duplicates < 0:
        raise ValueError(f"duplicates must be >= 0, got {duplicates}")
    base = base_url.rstrip("/")
    sizes = [(int(w), int(h)) for w, h in sizes]
    formats = [norm_ext(f) for f in formats]
    if not sizes or not formats:
        raise ValueError("sizes and formats must be non-empty")
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"unknown format {f!r}; expected some of {FORMATS}")
    order = [int(i) for i in (train_indices() if indices is None else indices)]
    if not order:
        raise ValueError("indices is empty")
    labels = load_digit_images()[1]
    n_images = len(labels)
    bad = [i for i in order if not 0 <= i < n_images]
    if bad:
        raise ValueError(f"indices out of range 0..{n_images - 1}: {bad[:5]}")

    rng = random.Random(f"vlm-localweb-{seed}")
    rng.shuffle(order)

    fail_kinds = _round_robin(_failure_counts(failures, n))[:n]
    n_ok = n - len(fail_kinds)
    variant_kinds: list[str] = []
    if variants and n_ok > 0:
        per_variant = max(1, n_ok // 50)
        variant_kinds = _round_robin({v: per_variant for v in VARIANTS})[: n_ok // 2]
    kinds = fail_kinds + variant_kinds + ["ok"] * (n_ok - len(variant_kinds))
    rng.shuffle(kinds)

    ok_positions = [k for k, kind in enumerate(kinds) if kind == "ok" or kind in VARIANTS]
    noisy_positions = set(rng.sample(ok_positions, int(round(noisy_fraction * len(ok_positions)))))

    rows: list[dict] = []
    for k, kind in enumerate(kinds):
        idx = order[k % len(order)]
        label = int(labels[idx])
        w, h = sizes[rng.randrange(len(sizes))]
        q = f"w={w}&h={h}&s={k}"
        noisy = k in noisy_positions
        caption = noisy_caption_for(label, rng) if noisy else caption_for(label, rng)
        if kind == "ok":
            path = f"/img/{idx}.{formats[rng.randrange(len(formats))]}?{q}"
            expected = SUCCESS
        elif kind in VARIANTS:
            ext = VARIANTS[kind] or formats[rng.randrange(len(formats))]
            path = f"/img/{idx}.{ext}?{q}&v={kind}"
            expected = SUCCESS
        else:
            path = _failure_path(kind, idx, q, k)
            expected = FAILURE_KINDS[kind]
        rows.append(
            {
                "url": base + path,
                "caption": caption,
                "label": label,
                "noisy": noisy,
                "expected_status": expected,
                "kind": kind,
                "index": idx,
            }
        )

    if duplicates and rows:
        candidates = (
            [r for r in rows if r["kind"] == "ok"] or [r for r in rows if r["expected_status"] == SUCCESS] or rows
        )
        if duplicates <= len(candidates):
            originals = rng.sample(candidates, duplicates)
        else:
            originals = [rng.choice(candidates) for _ in range(duplicates)]
        rows.extend(dict(r, expected_status=SKIPPED_DUPLICATE, kind="duplicate") for r in originals)
    return rows


def _columns(rows: list[dict]) -> list[str]:
    cols = list(URL_COLUMNS) if not rows else []
    seen = set(cols)
    for row in rows:
        for key in row:
            if key not in seen:
                seen.add(key)
                cols.append(key)
    return cols


def write_url_list(rows: list[dict], path: str | Path) -> Path:
    """Write `rows` to `path`; the format follows the suffix.

    .parquet, .csv, .tsv, .jsonl (all columns) or .txt (one url per line, nothing else).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv", ".tsv", ".jsonl", ".txt"):
        raise ValueError(f"unknown URL list format {path.suffix!r}; use .parquet, .csv, .tsv, .jsonl or .txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = _columns(rows)
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        if rows:
            table = pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows])
        else:
            schema = pa.schema(
                [
                    ("url", pa.string()),
                    ("caption", pa.string()),
                    ("label", pa.int64()),
                    ("noisy", pa.bool_()),
                    ("expected_status", pa.string()),
                    ("kind", pa.string()),
                    ("index", pa.int64()),
                ]
            )
            table = schema.empty_table()
        pq.write_table(table, path)
    elif suffix in (".csv", ".tsv"):
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(
                fh,
                fieldnames=cols,
                delimiter="\t" if suffix == ".tsv" else ",",
                lineterminator="\n",
                extrasaction="ignore",
            )
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps({c: row.get(c) for c in cols}, ensure_ascii=False) + "\n")
    else:
        with path.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(f"{row['url']}\n")
    return path
