"""Hash exchange over Ray tasks: the shuffle behind every global data decision.

Global decisions (duplicate URLs, duplicate images, a score quantile) need rows that share a
value to meet in one place. Collecting every row on the driver does that until the driver's
memory runs out (LAION-5B: 5.8 B rows). Here the rows never leave the object store: a map task
splits each input block by the hash of an integer column into `partitions` parts (one Ray
return value each), and reduce task `p` gets part `p` of every map task. The driver holds only
object refs (map tasks x partitions), never a row, so its memory does not grow with the data.
This is Ray's own "simple shuffle" pattern (Ray Data's push-based shuffle refines it), kept at
this level so each decision can use vectorised numpy/pyarrow inside its reduce.

Blocks are pyarrow Tables (or ObjectRefs to them). Partition columns are integers: callers
derive them from what they group by (a digest prefix, a band value, a record id).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["MAX_REFS", "concat", "exchange", "mix64", "partition_of", "put_blocks", "run_tasks", "scatter"]

MAX_REFS = 250_000  # map tasks x partitions the driver may hold (object refs, ~1 KiB each with their owner entry)

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: well-spread 64-bit hashes of integers (ids, band values)."""
    x = np.asarray(values).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return x


def partition_of(values: np.ndarray, partitions: int, salt: int = 0) -> np.ndarray:
    """The partition (0..partitions-1) of every value; `salt` gives an independent assignment."""
    h = mix64(np.asarray(values).astype(np.uint64) ^ np.uint64(salt & 0xFFFFFFFFFFFFFFFF))
    return (h % np.uint64(partitions)).astype(np.int64)


def concat(tables: Sequence[pa.Table]) -> pa.Table:
    """One table from parts that share a schema (empty parts are fine)."""
    tables = [t for t in tables if t is not None]
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="default")


def _split(table: pa.Table, by: str, partitions: int, salt: int, hashed: bool = True) -> list[pa.Table]:
    column = table.column(by).to_numpy(zero_copy_only=False) if table.num_rows else np.zeros(0, np.uint64)
    if hashed:
        part = partition_of(column, partitions, salt)
    else:  # the column already names the partition (an input block's index)
        part = np.asarray(column).astype(np.int64) % partitions
    small = np.uint16 if partitions <= 1 << 16 else np.int64  # 16-bit keys: numpy's stable sort is a radix sort
    order = np.argsort(part.astype(small), kind="stable")
    counts = np.bincount(part, minlength=partitions)
    ordered = table.take(pa.array(order)) if table.num_rows else table
    edges = np.concatenate([[0], np.cumsum(counts)])
    return [ordered.slice(int(edges[i]), int(counts[i])) for i in range(partitions)]


def _map_task(map_fn, map_args, by, partitions, salt, hashed, start, *blocks):
    if map_fn is None:
        tables = list(blocks)
    elif start is None:
        tables = [map_fn(b, *map_args) for b in blocks]
    else:  # map_fn wants the input block's index
        tables = [map_fn(b, start + i, *map_args) for i, b in enumerate(blocks)]
    parts = _split(concat(tables), by, partitions, salt, hashed)
    return parts[0] if partitions == 1 else tuple(parts)


def _reduce_task(reduce_fn, reduce_args, p, *parts):
    return reduce_fn(concat(list(parts)), p, *reduce_args)


def put_blocks(tables: Sequence[pa.Table]) -> list:
    """Object refs of local tables (tests and benchmarks build their input this way)."""
    import ray

    return [ray.put(t) for t in tables]


def scatter(
    blocks: Sequence[Any],
    *,
    by: str,
    partitions: int,
    map_fn: Callable[..., pa.Table] | None = None,
    map_args: tuple = (),
    with_index: bool = False,
    blocks_per_map: int = 1,
    salt: int = 0,
    hashed: bool = True,
    num_cpus: float = 1.0,
) -> list[list]:
    """The map half of `exchange`: `parts[p]` lists the refs of every map task's part `p`.

    `with_index`: `map_fn(block, block_index, *map_args)` (the block's position in `blocks`).
    `hashed=False`: the `by` column already holds the partition (taken modulo `partitions`).
    Map tasks take `blocks_per_map` blocks each, or more when map tasks x partitions would pass
    `MAX_REFS`.
    """
    import ray

    if partitions < 1:
        raise ValueError("partitions must be >= 1")
    mapper = ray.remote(_map_task).options(num_returns=partitions, num_cpus=num_cpus)
    # More blocks per map task once maps x partitions would pass MAX_REFS: the refs the driver holds
    # stay bounded however many blocks the data set has (the tasks get bigger instead).
    step = max(1, blocks_per_map, -(-len(blocks) * partitions // MAX_REFS))
    mapped = []
    for i in range(0, len(blocks), step):
        start = i if with_index else None
        refs = mapper.remote(map_fn, map_args, by, partitions, salt, hashed, start, *blocks[i : i + step])
        mapped.append([refs] if partitions == 1 else list(refs))
    return [[m[p] for m in mapped] for p in range(partitions)]


def exchange(
    blocks: Sequence[Any],
    *,
    by: str,
    partitions: int,
    reduce_fn: Callable[..., Any],
    reduce_args: tuple = (),
    map_fn: Callable[..., pa.Table] | None = None,
    map_args: tuple = (),
    with_index: bool = False,
    blocks_per_map: int = 1,
    salt: int = 0,
    hashed: bool = True,
    num_cpus: float = 1.0,
    num_returns: int = 1,
) -> list:
    """Group rows by `hash(by) % partitions` and reduce each partition in its own Ray task.

    Args:
        blocks: pyarrow Tables or ObjectRefs to them.
        by: the integer column rows are partitioned by (after `map_fn`).
        partitions: number of reduce tasks; rows per partition are about rows / partitions.
        reduce_fn: `reduce_fn(table, partition_index, *reduce_args)`, runs in a Ray task; what it
            returns is the task's result (or `num_returns` results).
        map_fn: `map_fn(block, *map_args) -> Table`, applied in the map task before the split
            (an expansion such as one row per band, so the expanded rows never exist elsewhere).
        with_index, hashed: as in `scatter`.
        blocks_per_map: input blocks per map task at least (fewer map tasks: fewer refs on the
            driver, which holds map tasks x partitions of them; raised to keep that <= MAX_REFS).
        salt: changes the hash, for a second independent partitioning.
    Returns:
        One ObjectRef per partition (a list of `num_returns` refs each when num_returns > 1),
        in partition order. Nothing is fetched to the driver.
    """
    import ray

    parts = scatter(
        blocks,
        by=by,
        partitions=partitions,
        map_fn=map_fn,
        map_args=map_args,
        with_index=with_index,
        blocks_per_map=blocks_per_map,
        salt=salt,
        hashed=hashed,
        num_cpus=num_cpus,
    )
    reducer = ray.remote(_reduce_task).options(num_returns=num_returns, num_cpus=num_cpus)
    return [reducer.remote(reduce_fn, reduce_args, p, *parts[p]) for p in range(partitions)]


def run_tasks(fn: Callable[..., Any], items: Sequence[Any], *args, num_cpus: float = 1.0, num_returns: int = 1) -> list:
    """`fn(item, *args)` as one Ray task per item (items may be ObjectRefs); refs in item order."""
    import ray

    task = ray.remote(fn).options(num_cpus=num_cpus, num_returns=num_returns)
    return [task.remote(item, *args) for item in items]
