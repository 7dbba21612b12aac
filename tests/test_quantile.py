"""Distributed top-fraction selection (radix select) on the shared local Ray, against ClipScoreFilter.decide."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from vlm.data import quantile
from vlm.data.clipscore import ClipScoreConfig, ClipScoreFilter

pytestmark = pytest.mark.slow


def _rows(rng, n: int, *, decimals: int | None = None, nulls: float = 0.1, dtype=np.float64) -> list[tuple]:
    """(id, score or None, reaches) rows in a random order; ids unique, some negative."""
    ids = rng.permutation(n) * 3 - n
    scores = rng.normal(0.1, 0.3, n).astype(dtype)  # both signs, like cosines
    if decimals is not None:
        scores = np.round(scores, decimals)  # many ties, and some -0.0 beside 0.0
    null = rng.random(n) < nulls
    reach = rng.random(n) < 0.8
    return [(int(i), None if z else float(s), bool(r)) for i, s, z, r in zip(ids, scores, null, reach)]


def _blocks(rows: list[tuple], cuts: int, dtype=np.float64) -> list[pa.Table]:
    """Uneven blocks (one of them empty) of the rows in their random order."""
    edges = [0, 0, *sorted(np.random.default_rng(cuts).integers(0, len(rows) + 1, cuts)), len(rows)]
    score_type = pa.float32() if dtype == np.float32 else pa.float64()
    blocks = []
    for a, b in zip(edges, edges[1:]):
        part = rows[a:b]
        blocks.append(
            pa.table(
                {
                    "id": pa.array([r[0] for r in part], pa.int64()),
                    "score": pa.array([r[1] for r in part], score_type),
                    "reach": pa.array([r[2] for r in part], pa.bool_()),
                }
            )
        )
    return blocks


def _oracle(rows: list[tuple], fraction: float, masked: bool = False) -> tuple[set[int], float | None]:
    """(kept ids, cutoff) of ClipScoreFilter.decide over the rows reaching the step in id order."""
    reaching = sorted(r for r in rows if r[2] or not masked)
    records = [{"key": str(i), "clipscore": {"score": s}} for i, s, _ in reaching]
    reasons = ClipScoreFilter(ClipScoreConfig(mode="top_fraction", top_fraction=fraction)).decide(records)
    kept = {r[0] for r, why in zip(reaching, reasons) if why is None}
    return kept, records[0]["clipscore"]["cutoff"] if records else None


def _kept(ray, blocks: list[pa.Table], refs: list) -> set[int]:
    kept = set()
    for block, marks in zip(blocks, ray.get(refs)):
        assert marks.num_rows == block.num_rows
        kept.update(i for i, k in zip(block.column("id").to_pylist(), marks.column("keep").to_pylist()) if k)
    return kept


@pytest.mark.parametrize("fraction", [0.0001, 0.3, 1.0])
@pytest.mark.parametrize(
    "decimals, dtype", [(None, np.float64), (2, np.float64), (None, np.float32)], ids=["f64", "ties", "f32"]
)
def test_top_fraction_keeps_what_clipscore_decide_keeps(ray_local, fraction, decimals, dtype):
    """Same kept rows and cutoff as the driver sort, with nulls, ties (ids decide) and float32 scores."""
    rows = _rows(np.random.default_rng(7), 3000, decimals=decimals, dtype=dtype)
    blocks = _blocks(rows, 6, dtype)
    cutoff = quantile.select_top(blocks, "score", fraction)
    kept, expected = _oracle(rows, fraction)
    n_scored = sum(r[1] is not None for r in rows)
    assert (cutoff.n_reaching, cutoff.n_scored, cutoff.n_keep) == (3000, n_scored, len(kept))
    assert cutoff.score == expected
    assert _kept(ray_local, blocks, quantile.top_fraction(blocks, "score", fraction)) == kept
    assert len(kept) == min(round(fraction * 3000), n_scored)


@pytest.mark.parametrize("fraction", [0.0003, 0.0005, 0.5])
def test_mask_column_rows_do_not_reach_the_step(ray_local, fraction):
    """Masked-out rows count nowhere: n_keep rounds (banker's) a fraction of the reaching rows only."""
    rows = _rows(np.random.default_rng(11), 5000, decimals=3)
    blocks = _blocks(rows, 5)
    cutoff = quantile.select_top(blocks, "score", fraction, mask_column="reach")
    kept, expected = _oracle(rows, fraction, masked=True)
    assert cutoff.n_reaching == sum(r[2] for r in rows) and cutoff.score == expected
    refs = quantile.mark_top(blocks, cutoff, "score", mask_column="reach")
    assert _kept(ray_local, blocks, refs) == kept


def test_negative_zero_ties_with_zero(ray_local):
    """-0.0 == 0.0 for the oracle's sort: such rows tie and ids decide, as for any equal scores."""
    rows = [(i, [0.0, -0.0, 1.0, -1.0][i % 4], True) for i in range(400)]
    rows = [rows[i] for i in np.random.default_rng(2).permutation(400)]
    blocks = _blocks(rows, 3)
    kept, expected = _oracle(rows, 0.4)
    cutoff = quantile.select_top(blocks, "score", 0.4)
    zeros = [i for i in range(400) if i % 4 < 2]  # after the 100 rows scoring 1.0, 60 zeros by id
    assert cutoff.score == expected == 0.0 and cutoff.id == zeros[59]
    assert _kept(ray_local, blocks, quantile.mark_top(blocks, cutoff, "score")) == kept


def test_nothing_to_keep(ray_local):
    """No blocks, empty blocks, all-null scores and a fraction rounding to 0 keep nothing."""
    assert quantile.select_top([], "score", 0.5) == quantile.Cutoff(0, 0, 0, None, None)
    empty = _blocks([], 2)
    assert quantile.select_top(empty, "score", 0.5) == quantile.Cutoff(0, 0, 0, None, None)
    nulls = _blocks([(i, None, True) for i in range(300)], 3)
    assert quantile.select_top(nulls, "score", 1.0) == quantile.Cutoff(300, 0, 0, None, None)
    assert _kept(ray_local, nulls, quantile.top_fraction(nulls, "score", 1.0)) == set()
    few = _blocks(_rows(np.random.default_rng(3), 1000), 3)
    assert quantile.select_top(few, "score", 0.0001).n_keep == 0  # round(0.1) == 0
    assert quantile.select_top(few, "score", 0.0).n_keep == 0


@pytest.mark.parametrize("candidates", [16, 0])
def test_driver_gets_at_most_candidates_keys(ray_local, candidates):
    """A small candidate budget takes more radix passes (down into the id bits) and stays exact."""
    rows = _rows(np.random.default_rng(5), 3000, decimals=1)  # ~30 distinct scores: ties of ~100 rows
    blocks = _blocks(rows, 6)
    for fraction in (0.1, 0.3, 0.77):
        cutoff, passes, fetched = quantile._radix_select(blocks, "score", fraction, "id", None, 2, candidates)
        kept, expected = _oracle(rows, fraction)
        assert cutoff.n_keep == len(kept) and cutoff.score == expected
        assert passes > 4 and fetched <= candidates  # the tie bucket is split on the id half of the key
        assert _kept(ray_local, blocks, quantile.mark_top(blocks, cutoff, "score")) == kept


def test_fraction_out_of_range_is_a_config_error():
    """A fraction outside [0, 1] is the user's error, named in one line."""
    from vlm.errors import ConfigError

    with pytest.raises(ConfigError, match="top fraction"):
        quantile.select_top([], "score", 1.5)
