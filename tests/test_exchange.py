"""The hash exchange and distributed first-occurrence dedup on the shared local Ray, against a Python walk."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from vlm.data import exchange
from vlm.data.global_dedup import first_occurrence, hex64

pytestmark = pytest.mark.slow


def _blocks(rng, n_blocks: int, rows: int, distinct: int) -> list[pa.Table]:
    blocks, order = [], 0
    for _ in range(n_blocks):
        digests = rng.integers(0, distinct, rows).astype(np.uint64)
        nulls = rng.random(rows) < 0.05
        blocks.append(
            pa.table(
                {
                    "digest": pa.array(digests, pa.uint64(), mask=nulls),
                    "order": pa.array(np.arange(order, order + rows), pa.int64()),
                }
            )
        )
        order += rows
    return blocks


def _walk(blocks: list[pa.Table]) -> dict[int, int]:
    """What one driver with a dict of seen digests decides: order -> order of the digest's first row."""
    first, dups = {}, {}
    for b in blocks:
        for d, o in zip(b.column("digest").to_pylist(), b.column("order").to_pylist()):
            if d is None:
                continue
            if d in first:
                dups[o] = first[d]
            else:
                first[d] = o
    return dups


def test_exchange_puts_equal_values_in_one_partition(ray_local):
    """Every row reaches exactly one reduce task, and rows with one value share a partition."""
    rng = np.random.default_rng(0)
    blocks = exchange.put_blocks(_blocks(rng, 3, 500, 50))

    def reduce_fn(table, p):
        values = table.column("digest").drop_null().to_pylist()
        return p, table.num_rows, sorted(set(values))

    out = ray_local.get(exchange.exchange(blocks, by="digest", partitions=4, reduce_fn=reduce_fn, blocks_per_map=2))
    assert [p for p, _, _ in out] == [0, 1, 2, 3]
    assert sum(n for _, n, _ in out) == 1500
    seen = [v for _, _, values in out for v in values]
    assert len(seen) == len(set(seen)) > 0  # no value in two partitions


@pytest.mark.parametrize("partitions", [1, 3])
def test_first_occurrence_matches_a_driver_walk(ray_local, partitions):
    """Distributed exact dedup marks the same rows, with the same first occurrence, as a set walk."""
    rng = np.random.default_rng(partitions)
    tables = _blocks(rng, 4, 400, 300)
    refs = first_occurrence(exchange.put_blocks(tables), digest="digest", order="order", partitions=partitions)
    found = {}
    for t in ray_local.get(refs):
        found.update(zip(t.column("order").to_pylist(), t.column("first").to_pylist()))
    expected = _walk(tables)
    assert len(expected) > 100 and found == expected


def test_first_occurrence_on_binary_digests_partitioned_by_prefix(ray_local):
    """Full digests decide (a shared 8-byte prefix alone is no duplicate); the prefix only partitions."""
    a, b = "aa" * 8 + "01" * 24, "aa" * 8 + "02" * 24  # same first 8 bytes, different digests
    digests = [a, b, a, None, b, "cc" * 32]
    table = pa.table(
        {
            "digest": pa.array([bytes.fromhex(d) if d else None for d in digests], pa.binary()),
            "order": pa.array(range(6), pa.int64()),
            "by": pa.array(hex64(pa.array(digests, pa.string())), pa.uint64()),
        }
    )
    refs = first_occurrence([table], digest="digest", order="order", by="by", partitions=2)
    rows = [r for t in ray_local.get(refs) for r in t.to_pylist()]
    assert sorted((r["order"], r["first"]) for r in rows) == [(2, 0), (4, 1)]
