"""A global score quantile (keep the top fraction) as a Ray job whose driver never holds the rows.

The CLIP-score step's "top fraction" mode needs the score of the n-th best row over the whole
data set. Sorting every score on the driver is exact until the driver's memory runs out
(LAION-5B: 5.8 B scores). This module finds the same row by radix select (an MSD radix sort
that only ever descends into the bucket holding the wanted rank, as GPU top-k kernels do):

- Each scored row gets a 128-bit key `(v, u)`: `v` is a uint64 whose ascending order is the
  scores' descending order (float64 bits, -0.0 normalised to 0.0, sign-flipped so the bits sort
  like the floats, then inverted), `u` the row's id as an order-preserving uint64. Ascending key
  order is exactly the order `ClipScoreFilter.decide` keeps rows in: best score first, equal
  scores by ascending id (its stable sort over records in id order).
- Pass k: one Ray task per block returns a 65536-bin histogram of the next 16 bits of the keys
  that match the prefix fixed so far; Ray tasks sum the histograms in a tree (`fan_in` per
  task), so the driver receives one array per pass, never one per block. The driver finds the
  bin holding the n_keep-th row and appends it to the prefix.
- Once that bin holds <= `candidates` rows, one last pass returns just those rows (again merged
  in a tree) and the driver sorts them and takes the exact one. At most 8 passes (128 bits); a
  full-length prefix is the key itself.

Exact, not a sketch: a histogram counts every row, so the rank arithmetic is exact and the
chosen row is the one the driver-side sort would choose. The driver's memory is bounded by one
histogram (65537 int64, 512 KiB) and `candidates` keys, whatever the row count; the data move
only as block refs. `mark_top` then marks every row against the cutoff in one task per block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vlm.data import exchange
from vlm.errors import ConfigError

__all__ = ["Cutoff", "mark_top", "select_top", "top_fraction"]

_BITS = 16  # bits fixed per radix pass
_BINS = 1 << _BITS
_SIGN = np.uint64(1 << 63)


@dataclass(frozen=True)
class Cutoff:
    """The global decision: counts and the last kept row in (score desc, id asc) order."""

    n_reaching: int  # rows reaching the step (null scores included): what the fraction is of
    n_scored: int  # rows with a score
    n_keep: int  # min(round(fraction * n_reaching), n_scored)
    score: float | None  # score of the last kept row (None when nothing is kept)
    id: int | None  # its id: among rows scoring `score`, those with id <= this one are kept


def _columns(block: pa.Table, column: str, id_column: str, mask_column: str | None):
    """(reaching, scored, score float64, id int64), row-aligned; NaN and null scores are unscored."""
    n = block.num_rows
    if mask_column is None:
        reach = np.ones(n, dtype=bool)
    else:  # a null mask value does not reach the step
        reach = pc.fill_null(block.column(mask_column).cast(pa.bool_()), False).to_numpy(zero_copy_only=False)
    score = pc.fill_null(block.column(column).cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    ids = block.column(id_column).cast(pa.int64()).to_numpy(zero_copy_only=False)
    return reach, reach & ~np.isnan(score), score, ids


def _score_key(score: np.ndarray) -> np.ndarray:
    """uint64 whose ascending order is descending score (no NaN in `score`)."""
    bits = np.where(score == 0.0, 0.0, score).astype(np.float64).view(np.uint64)  # -0.0 sorts as 0.0
    ascending = np.where((bits & _SIGN) != 0, ~bits, bits | _SIGN)  # the bits now sort like the floats
    return ~ascending


def _key_score(v: int) -> float:
    """The score a key half `v` was made from (inverse of `_score_key`)."""
    ascending = ~np.uint64(v)
    bits = ascending ^ _SIGN if ascending & _SIGN else ~ascending
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


def _id_key(ids: np.ndarray) -> np.ndarray:
    return ids.astype(np.int64).view(np.uint64) ^ _SIGN  # signed order as unsigned order


def _key_id(u: int) -> int:
    return int(np.array([np.uint64(u) ^ _SIGN], dtype=np.uint64).view(np.int64)[0])


def _keys(block: pa.Table, column: str, id_column: str, mask_column: str | None):
    """(rows reaching the step, v, u) of the block's scored rows."""
    reach, scored, score, ids = _columns(block, column, id_column, mask_column)
    return int(reach.sum()), _score_key(score[scored]), _id_key(ids[scored])


def _matching(v: np.ndarray, u: np.ndarray, prefix: tuple[int, int, int]) -> np.ndarray:
    """Which keys start with `prefix` = (top bits of v, top bits of u, bits fixed)."""
    hi, lo, depth = prefix
    if depth == 0:
        return np.ones(len(v), dtype=bool)
    if depth <= 64:
        return (v >> np.uint64(64 - depth)) == np.uint64(hi)
    return (v == np.uint64(hi)) & ((u >> np.uint64(128 - depth)) == np.uint64(lo))


def _digit(v: np.ndarray, u: np.ndarray, depth: int) -> np.ndarray:
    """The 16 key bits after the first `depth`."""
    half, shift = (v, 48 - depth) if depth < 64 else (u, 112 - depth)
    return ((half >> np.uint64(shift)) & np.uint64(_BINS - 1)).astype(np.int64)


def _histogram_task(block, column, id_column, mask_column, prefix) -> np.ndarray:
    """The next digit's histogram of the block's keys under `prefix`; the last slot counts the
    rows reaching the step (the first pass's total is n_reaching)."""
    n_reaching, v, u = _keys(block, column, id_column, mask_column)
    match = _matching(v, u, prefix)
    out = np.zeros(_BINS + 1, dtype=np.int64)
    out[:_BINS] = np.bincount(_digit(v[match], u[match], prefix[2]), minlength=_BINS)
    out[_BINS] = n_reaching
    return out


def _candidates_task(block, column, id_column, mask_column, prefix) -> np.ndarray:
    """The keys under `prefix`, as a (2, n) uint64 array of (v, u)."""
    _, v, u = _keys(block, column, id_column, mask_column)
    match = _matching(v, u, prefix)
    return np.stack([v[match], u[match]])


def _add(*parts: np.ndarray) -> np.ndarray:
    return np.sum(parts, axis=0)


def _stack(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate(parts, axis=1)


def _tree(refs: list, combine: Callable[..., np.ndarray], fan_in: int) -> np.ndarray:
    """`combine` of all results, merged `fan_in` at a time in Ray tasks; the driver gets one."""
    import ray

    task = ray.remote(combine)
    while len(refs) > 1:
        refs = [task.remote(*refs[i : i + fan_in]) for i in range(0, len(refs), fan_in)]
    return ray.get(refs[0])


def _stored(blocks: Sequence[Any]) -> list:
    """Refs of the blocks: every pass reads every block, so local tables are put once, not per pass."""
    import ray

    return [b if isinstance(b, ray.ObjectRef) else ray.put(b) for b in blocks]


def _extend(prefix: tuple[int, int, int], digit: int) -> tuple[int, int, int]:
    hi, lo, depth = prefix
    if depth < 64:
        return (hi << _BITS) | digit, lo, depth + _BITS
    return hi, (lo << _BITS) | digit, depth + _BITS


def _radix_select(
    blocks: Sequence[Any],
    column: str,
    fraction: float,
    id_column: str,
    mask_column: str | None,
    fan_in: int,
    candidates: int,
) -> tuple[Cutoff, int, int]:
    """(cutoff, radix passes run, candidate keys fetched to the driver)."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"top fraction must be in [0, 1], got {fraction}")
    if fan_in < 2 or candidates < 0:
        raise ValueError("fan_in must be >= 2 and candidates >= 0")
    if not blocks:
        return Cutoff(0, 0, 0, None, None), 0, 0
    blocks = _stored(blocks)
    args = (column, id_column, mask_column)
    prefix, passes = (0, 0, 0), 0
    rank = -1  # 0-based rank of the last kept row among the keys under `prefix`
    while True:
        hist = _tree(exchange.run_tasks(_histogram_task, blocks, *args, prefix), _add, fan_in)
        passes += 1
        if passes == 1:
            n_reaching, n_scored = int(hist[_BINS]), int(hist[:_BINS].sum())
            n_keep = min(round(fraction * n_reaching), n_scored)
            if n_keep == 0:
                return Cutoff(n_reaching, n_scored, 0, None, None), passes, 0
            rank = n_keep - 1
        cum = np.cumsum(hist[:_BINS])
        digit = int(np.searchsorted(cum, rank, side="right"))
        rank -= int(cum[digit - 1]) if digit else 0
        prefix = _extend(prefix, digit)
        if prefix[2] == 128:  # the prefix is the whole key
            v, u, fetched = prefix[0], prefix[1], 0
            break
        if hist[digit] <= candidates:
            keys = _tree(exchange.run_tasks(_candidates_task, blocks, *args, prefix), _stack, fan_in)
            keys = keys[:, np.lexsort((keys[1], keys[0]))]
            v, u, fetched = int(keys[0, rank]), int(keys[1, rank]), keys.shape[1]
            break
    cutoff = Cutoff(n_reaching, n_scored, n_keep, _key_score(v), _key_id(u))
    return cutoff, passes, fetched


def select_top(
    blocks: Sequence[Any],
    column: str,
    fraction: float,
    *,
    id_column: str = "id",
    mask_column: str | None = None,
    fan_in: int = 64,
    candidates: int = 4096,
) -> Cutoff:
    """The cutoff of keeping the best `fraction` of the rows reaching the step, found exactly.

    Same decision as `ClipScoreFilter.decide` (mode top_fraction) over the rows in `id_column`
    order: n_keep = min(round(fraction * rows reaching), rows scored), best score first, equal
    scores by ascending id.

    Args:
        blocks: pyarrow Tables or ObjectRefs to them.
        column: the score column (float32/float64; null or NaN: not scored, still reaching).
        fraction: in [0, 1].
        id_column: integer row id, unique over all blocks: the tie order.
        mask_column: bool column; rows where it is false or null do not reach the step at all.
        fan_in: histograms (or candidate lists) merged per Ray task.
        candidates: most keys the driver receives in the last pass.
    """
    cutoff, _, _ = _radix_select(blocks, column, fraction, id_column, mask_column, fan_in, candidates)
    return cutoff


def _mark_task(block, cutoff: Cutoff, column, id_column, mask_column) -> pa.Table:
    _, scored, score, ids = _columns(block, column, id_column, mask_column)
    if cutoff.n_keep == 0:
        keep = np.zeros(block.num_rows, dtype=bool)
    else:
        with np.errstate(invalid="ignore"):  # NaN scores compare false and are masked anyway
            better = (score > cutoff.score) | ((score == cutoff.score) & (ids <= cutoff.id))
        keep = scored & better
    return pa.table({"keep": pa.array(keep, pa.bool_())})


def mark_top(
    blocks: Sequence[Any],
    cutoff: Cutoff,
    column: str,
    *,
    id_column: str = "id",
    mask_column: str | None = None,
) -> list:
    """One ObjectRef per block to a Table with a bool `keep` column, aligned with the block's rows:
    reaching, scored and at or above `cutoff` in (score desc, id asc) order. Nothing is fetched."""
    return exchange.run_tasks(_mark_task, blocks, cutoff, column, id_column, mask_column)


def top_fraction(
    blocks: Sequence[Any],
    column: str,
    fraction: float,
    *,
    partitions: int | None = None,
    id_column: str = "id",
    mask_column: str | None = None,
) -> list:
    """`select_top` then `mark_top`: one `keep` Table ref per block.

    `partitions` is accepted for symmetry with the exchange-based decisions (dedup) and unused:
    radix select reads the blocks where they are and needs no shuffle.
    """
    del partitions
    blocks = _stored(blocks)
    cutoff = select_top(blocks, column, fraction, id_column=id_column, mask_column=mask_column)
    return mark_top(blocks, cutoff, column, id_column=id_column, mask_column=mask_column)
