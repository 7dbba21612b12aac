"""Clean's plan as Ray jobs: every step's decisions over blocks of feature rows that stay in the object store.

The clean stage's feature tasks leave one row per sample in Ray's object store (`id`, `shard`,
`key`, the CPU steps' `features` as JSON, and `clip_score` when a model scored them). The
steps then decide in their YAML order, each over the samples no earlier step dropped:
- a step whose decision is the sample's own (`basic`, `clipscore` by threshold) runs its
  `decide` in one task per block;
- `dedup` runs `vlm.data.global_dedup.dedup_decisions`, `clipscore` by top fraction runs the
  exact selection of `vlm.data.quantile`; both return decisions aligned with the blocks.
Each step's outcome is columns of the block (`dropped_by`, `reason`, `meta:<step>`: the
features and results the step recorded), so the blocks carry the whole plan. `write_plan`
exchanges them by shard and writes `_plan/{shard}.parquet` from the reduce tasks. The driver
holds block refs and per-task counts, never a row.

The order of the walk is the sample id: `shard << 32 | rank of the key within its shard`,
i.e. keys in (shard, key) order, the order in which ingest wrote them. The driver walk
(`vlm.data.steps.run_steps`) is the oracle the tests compare with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vlm.data import exchange
from vlm.data import shards as sh
from vlm.data.steps import Step, StepStats

__all__ = ["HIST_BINS", "plan_blocks", "read_plan_shard", "sample_id", "write_plan", "write_plan_shard"]

PLAN_DIR = sh.PLAN_DIR
HIST_BINS = 2000  # CLIP score histogram bins over [-1, 1] (cosine), summed across tasks


def sample_id(shard: int, rank: int) -> int:
    """The walk's order: shard major, then the key's rank in its shard."""
    return (shard << 32) | rank


# ----------------------------------------------------------------------------- per-block tasks


def _initial(*blocks: Any) -> pa.Table:
    """Feature blocks as one block with the plan's columns (nothing dropped yet)."""
    table = exchange.concat(
        [b if isinstance(b, pa.Table) else pa.Table.from_pandas(b, preserve_index=False) for b in blocks]
    )
    n = table.num_rows
    columns = {
        "id": table.column("id").cast(pa.int64()),
        "shard": table.column("shard").cast(pa.int64()),
        "key": table.column("key").cast(pa.string()),
        "features": table.column("features").cast(pa.string()),
        "clip_score": table.column("clip_score").cast(pa.float64())
        if "clip_score" in table.column_names
        else pa.nulls(n, pa.float64()),
        "dropped_by": pa.nulls(n, pa.string()),
        "reason": pa.nulls(n, pa.string()),
    }
    return pa.table(columns)


def _alive(block: pa.Table) -> np.ndarray:
    return block.column("dropped_by").is_null().to_numpy(zero_copy_only=False)


def _step_features(step: Step, features: str, clip_score: float | None) -> dict:
    if step.needs_model:  # the one model step: its features are the scorer's output
        from vlm.data.clipscore import ClipScoreFilter

        return ClipScoreFilter.score_features(clip_score)
    return json.loads(features).get(step.name, {})


def _records(block: pa.Table, step: Step, alive: np.ndarray) -> list[dict]:
    rows = np.flatnonzero(alive)
    keys, features = block.column("key").to_pylist(), block.column("features").to_pylist()
    clip = block.column("clip_score").to_pylist()
    return [{"key": keys[i], step.name: _step_features(step, features[i], clip[i])} for i in rows]


def _with_outcome(
    block: pa.Table, step: Step, alive: np.ndarray, records: list[dict], reasons: list[str | None]
) -> tuple[pa.Table, dict]:
    """The block with the step's columns filled for the rows it saw, and the step's counts."""
    stats = StepStats()
    n = block.num_rows
    meta: list[str | None] = [None] * n
    dropped_by = block.column("dropped_by").to_pylist()
    reason_col = block.column("reason").to_pylist()
    for i, record, reason in zip(np.flatnonzero(alive), records, reasons, strict=True):
        stats.add(reason)
        meta[i] = json.dumps(record[step.name], sort_keys=True)
        if reason is not None:
            dropped_by[i], reason_col[i] = step.name, reason
    block = block.set_column(block.column_names.index("dropped_by"), "dropped_by", pa.array(dropped_by, pa.string()))
    block = block.set_column(block.column_names.index("reason"), "reason", pa.array(reason_col, pa.string()))
    return block.append_column(f"meta:{step.name}", pa.array(meta, pa.string())), stats.to_dict()


def _local_step(block: pa.Table, step: Step) -> tuple[pa.Table, dict]:
    """A step whose decision is each sample's own: its `decide` over the block's reaching rows."""
    alive = _alive(block)
    records = _records(block, step, alive)
    return _with_outcome(block, step, alive, records, step.decide(records))


def _dedup_view(block: pa.Table) -> pa.Table:
    """What `dedup_decisions` reads of a block, aligned with its rows."""
    feats = [json.loads(f).get("dedup", {}) for f in block.column("features").to_pylist()]
    return pa.table(
        {
            "id": block.column("id"),
            "key": block.column("key"),
            **{c: pa.array([f.get(c) for f in feats], pa.string()) for c in ("sha256", "source_sha256", "phash")},
            "alive": pa.array(_alive(block)),
        }
    )


def _apply_dedup(block: pa.Table, decided: pa.Table, step: Step) -> tuple[pa.Table, dict]:
    alive = _alive(block)
    records = _records(block, step, alive)
    rows = np.flatnonzero(alive)
    reason, of, distance = (decided.column(c).to_pylist() for c in ("reason", "duplicate_of", "distance"))
    for i, record in zip(rows, records):
        if of[i] is not None:
            record[step.name]["duplicate_of"] = of[i]
        if distance[i] is not None:
            record[step.name]["distance"] = distance[i]
    return _with_outcome(block, step, alive, records, [reason[i] for i in rows])


def _score_view(block: pa.Table) -> pa.Table:
    from vlm.data.clipscore import ClipScoreFilter

    scores = [ClipScoreFilter.score_features(s)["score"] for s in block.column("clip_score").to_pylist()]
    return pa.table(
        {"id": block.column("id"), "score": pa.array(scores, pa.float64()), "alive": pa.array(_alive(block))}
    )


def _apply_top(block: pa.Table, marked: pa.Table, step: Step, cutoff: float | None) -> tuple[pa.Table, dict]:
    alive = _alive(block)
    records = _records(block, step, alive)
    keep = marked.column("keep").to_numpy(zero_copy_only=False)[alive].tolist()
    return _with_outcome(block, step, alive, records, step.explain(records, keep, cutoff))


# ----------------------------------------------------------------------------- the steps


def _merge(stats: list[dict]) -> StepStats:
    total = StepStats()
    for st in stats:
        total.seen += st["seen"]
        total.kept += st["kept"]
        total.dropped += st["dropped"]
        total.reasons.update(st["reasons"])
    return total


def _coalesce(blocks: Sequence[Any], sizes: Sequence[int] | None, target_rows: int) -> list[list]:
    """Consecutive blocks in groups of about `target_rows` rows (Ray Data makes many small ones)."""
    if sizes is None:
        return [[b] for b in blocks]
    groups, rows = [[]], 0
    for block, n in zip(blocks, sizes, strict=True):
        if n == 0:  # an empty shard's block may have no columns at all
            continue
        if groups[-1] and rows + n > target_rows:
            groups.append([])
            rows = 0
        groups[-1].append(block)
        rows += n
    return [g for g in groups if g]


def plan_blocks(
    blocks: Sequence[Any],
    steps: list[Step],
    *,
    partitions: int,
    sizes: Sequence[int] | None = None,
    target_rows: int = 500_000,
    num_cpus: float = 1.0,
) -> list:
    """Run the steps in order over feature blocks; refs of the blocks with every step's outcome.

    Each step's `stats` are filled in (counts summed from the tasks). `blocks`: Tables (or refs,
    or pandas frames from Ray Data) with `id`, `shard`, `key`, `features` and `clip_score`; with
    their row counts (`sizes`), small blocks are merged to about `target_rows` rows first.
    """
    import ray

    task = ray.remote(_initial).options(num_cpus=num_cpus)
    state = [task.remote(*group) for group in _coalesce(blocks, sizes, target_rows)]
    for step in steps:
        if not step.is_global:
            out = exchange.run_tasks(_local_step, state, step, num_cpus=num_cpus, num_returns=2)
        elif step.name == "dedup":
            from vlm.data.global_dedup import dedup_decisions

            views = exchange.run_tasks(_dedup_view, state, num_cpus=num_cpus)
            decided = dedup_decisions(views, step.cfg, partitions=partitions, mask="alive", num_cpus=num_cpus)
            task = ray.remote(_apply_dedup).options(num_cpus=num_cpus, num_returns=2)
            out = [task.remote(b, d, step) for b, d in zip(state, decided)]
        elif step.name == "clipscore":
            from vlm.data import quantile

            views = exchange.run_tasks(_score_view, state, num_cpus=num_cpus)
            cutoff = quantile.select_top(views, "score", step.cfg.top_fraction, mask_column="alive")
            marked = quantile.mark_top(views, cutoff, "score", mask_column="alive")
            step.cutoff = cutoff.score  # the plan file and the histogram show it
            task = ray.remote(_apply_top).options(num_cpus=num_cpus, num_returns=2)
            out = [task.remote(b, m, step, cutoff.score) for b, m in zip(state, marked)]
        else:
            raise ValueError(f"no distributed decision for global step {step.name!r}")
        state = [o[0] for o in out]
        step.stats = _merge(ray.get([o[1] for o in out]))
    return state


# ----------------------------------------------------------------------------- plan shards


def write_plan_shard(out: Path | str, shard: int, table: pa.Table) -> None:
    """`out/_plan/{shard}.parquet`: `key`, `keep`, `reason`, `dropped_by`, `meta` (JSON) per sample."""
    sh.write_parquet(sh.at(sh.at(out, PLAN_DIR), f"{sh.shard_name(shard)}.parquet"), table)


def read_plan_shard(out: Path | str, shard: int) -> dict[str, dict]:
    """`{key: {"keep", "reason", "dropped_by", "meta"}}` of one shard's planned decisions."""
    rows = sh.read_parquet(sh.at(sh.at(out, PLAN_DIR), f"{sh.shard_name(shard)}.parquet")).to_pylist()
    return {r["key"]: r | {"meta": json.loads(r["meta"])} for r in rows}


def _plan_table(rows: pa.Table, steps: list[str]) -> pa.Table:
    rows = rows.sort_by("id")
    dropped_by = rows.column("dropped_by").to_pylist()
    metas = [rows.column(f"meta:{s}").to_pylist() if f"meta:{s}" in rows.column_names else None for s in steps]
    meta = []
    for i, by in enumerate(dropped_by):
        m = {s: json.loads(col[i]) for s, col in zip(steps, metas) if col is not None and col[i] is not None}
        if by is not None:
            m["dropped_by"] = by
        meta.append(json.dumps(m, sort_keys=True))
    return pa.table(
        {
            "key": rows.column("key"),
            "keep": pc.is_null(rows.column("dropped_by")),
            "reason": rows.column("reason"),
            "dropped_by": rows.column("dropped_by"),
            "meta": pa.array(meta, pa.string()),
        }
    )


def _write_part(rows: pa.Table, _p: int, out: Path | str, steps: list[str]) -> dict:
    """Write the plan shards of one partition; its counts and CLIP score histogram."""
    written, kept = [], 0
    hist = np.zeros(HIST_BINS, np.int64)
    if rows.num_rows:
        if "meta:clipscore" in rows.column_names:
            seen = [json.loads(m) for m in rows.column("meta:clipscore").drop_null().to_pylist()]
            scores = np.array([m["score"] for m in seen if m.get("score") is not None], np.float64)
            hist = np.histogram(np.clip(scores, -1, 1), bins=HIST_BINS, range=(-1.0, 1.0))[0]
        shard = rows.column("shard").to_numpy()
        for s in np.unique(shard):
            table = _plan_table(rows.filter(pa.array(shard == s)), steps)
            write_plan_shard(out, int(s), table)
            written.append(int(s))
            kept += int(pc.sum(table.column("keep").cast(pa.int64())).as_py() or 0)
    return {"shards": written, "count": rows.num_rows, "kept": kept, "hist": hist}


def write_plan(state: Sequence[Any], out: Path | str, shards: list[int], steps: list[str], *, partitions: int) -> dict:
    """Every shard's plan file (an empty one for a shard without samples); counts and the score histogram."""
    import ray

    from vlm import storage

    storage.makedirs(sh.at(out, PLAN_DIR))
    parts = (
        []
        if not state
        else ray.get(
            exchange.exchange(
                state,
                by="shard",
                partitions=max(1, min(partitions, len(shards))),
                reduce_fn=_write_part,
                reduce_args=(out, steps),
            )
        )
    )
    done = {s for p in parts for s in p["shards"]}
    empty = _plan_table(
        pa.table(
            {
                "id": pa.array([], pa.int64()),
                "key": pa.array([], pa.string()),
                "dropped_by": pa.array([], pa.string()),
                "reason": pa.array([], pa.string()),
            }
        ),
        [],
    )
    for s in shards:
        if s not in done:
            write_plan_shard(out, s, empty)
    return {
        "count": sum(p["count"] for p in parts),
        "kept": sum(p["kept"] for p in parts),
        "hist": np.sum([p["hist"] for p in parts], axis=0) if parts else np.zeros(HIST_BINS, np.int64),
    }
