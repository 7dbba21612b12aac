"""Global duplicate decisions as distributed Ray jobs whose driver memory does not grow with the data.

Exact duplicates (ingest's URLs): rows are hash-partitioned by digest (`vlm.data.exchange`), and
each partition keeps the first row of every digest in the given order; the same decisions as
one driver walking all rows in order with a set of seen digests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vlm.data import exchange

__all__ = ["first_occurrence"]


def _first_in_partition(table: pa.Table, _p: int, digest: str, order: str) -> pa.Table:
    """Rows of one partition that are not the first of their digest: `order`, `first`."""
    table = table.select([digest, order]).filter(pc.is_valid(table.column(digest)))
    empty = pa.table({order: pa.array([], pa.int64()), "first": pa.array([], pa.int64())})
    if table.num_rows < 2:
        return empty
    firsts = table.group_by(digest).aggregate([(order, "min"), (order, "count")])
    firsts = firsts.filter(pc.greater(firsts.column(f"{order}_count"), 1))
    if firsts.num_rows == 0:
        return empty
    joined = table.join(firsts.select([digest, f"{order}_min"]), keys=digest, join_type="inner")
    dups = joined.filter(pc.not_equal(joined.column(order), joined.column(f"{order}_min")))
    return pa.table(
        {
            order: dups.column(order).cast(pa.int64()),
            "first": dups.column(f"{order}_min").cast(pa.int64()),
        }
    ).sort_by(order)


def first_occurrence(
    blocks: Sequence[Any],
    *,
    digest: str,
    order: str,
    by: str | None = None,
    partitions: int,
    blocks_per_map: int = 1,
    num_cpus: float = 1.0,
) -> list:
    """Every row whose digest already occurred at a smaller `order`, found without a driver set.

    Args:
        blocks: pyarrow Tables (or refs) with columns `digest` (any hashable Arrow type; null:
            never a duplicate), `order` (int64, unique: the position that decides which is first)
            and `by` (uint64, equal for equal digests: what rows are partitioned by; default: the
            digest column itself, which must then be an integer).
    Returns:
        One ObjectRef per partition to a Table (`order`, `first`: the order of the digest's first
        row), sorted by `order`. Nothing is fetched to the driver.
    """
    return exchange.exchange(
        blocks,
        by=by or digest,
        partitions=partitions,
        reduce_fn=_first_in_partition,
        reduce_args=(digest, order),
        blocks_per_map=blocks_per_map,
        num_cpus=num_cpus,
    )


def digest64(values: Sequence[bytes | str | None]) -> np.ndarray:
    """The first 8 bytes of each hex or binary digest as uint64 (0 for None): a partition key."""
    out = np.zeros(len(values), dtype=np.uint64)
    for i, v in enumerate(values):
        if v:
            raw = bytes.fromhex(v[:16]) if isinstance(v, str) else bytes(v[:8])
            out[i] = int.from_bytes(raw.ljust(8, b"\0"), "little")
    return out
