"""Connected components of an edge list too large for one process, as rounds of Ray exchanges.

The distributed dedup links samples by edges (a shared digest, two pHashes within the threshold)
and needs, for every linked sample, the smallest id of its group. This is the alternating
large-star / small-star algorithm (Kiveris et al. 2014, "Connected Components in MapReduce and
Beyond"): each round is two hash exchanges of the edges by node, every node only ever looks at
its own neighbours, and after O(log^2 n) rounds every component is a star around its smallest
id. The driver holds object refs and one integer per partition per round (how many nodes are
not yet in star form), never an edge.

Edges are pyarrow Tables with int64 columns `u` and `v` (undirected; duplicates and self loops
are fine). The result is a Table per partition with `id` and `label` (the smallest id of its
component) for every node that has an edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from vlm.data import exchange

__all__ = ["connected_components", "edges_table"]

_MAX_ROUNDS = 200


def edges_table(u: np.ndarray, v: np.ndarray) -> pa.Table:
    return pa.table({"u": pa.array(np.asarray(u, np.int64)), "v": pa.array(np.asarray(v, np.int64))})


def _labels_table(ids: np.ndarray, labels: np.ndarray) -> pa.Table:
    return pa.table({"id": pa.array(np.asarray(ids, np.int64)), "label": pa.array(np.asarray(labels, np.int64))})


def _both_ways(table: pa.Table) -> pa.Table:
    u, v = table.column("u").to_numpy(), table.column("v").to_numpy()
    return edges_table(np.concatenate([u, v]), np.concatenate([v, u]))


def _larger_first(table: pa.Table) -> pa.Table:
    u, v = table.column("u").to_numpy(), table.column("v").to_numpy()
    return edges_table(np.maximum(u, v), np.minimum(u, v))


def _grouped(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (u, v) pairs without self loops sorted by u then v, and each group's start."""
    u, v = table.column("u").to_numpy(), table.column("v").to_numpy()
    keep = u != v
    pairs = np.unique(np.stack([u[keep], v[keep]], axis=1), axis=0) if keep.any() else np.zeros((0, 2), np.int64)
    u, v = pairs[:, 0], pairs[:, 1]
    starts = np.flatnonzero(np.concatenate([[True], u[1:] != u[:-1]])) if len(u) else np.zeros(0, np.int64)
    return u, v, starts


def _large_star(table: pa.Table, _p: int) -> tuple[pa.Table, int, pa.Table]:
    """Link every larger neighbour of u to the smallest of u's closed neighbourhood.

    Also returns how many nodes are not yet in star form (a smaller neighbour and a larger one,
    or two smaller ones) and, for when that is 0 everywhere, every node's label.
    """
    u, v, starts = _grouped(table)
    if not len(u):
        empty = np.zeros(0, np.int64)
        return edges_table(empty, empty), 0, _labels_table(empty, empty)
    group = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(u))))
    nodes = u[starts]
    smallest = np.minimum(nodes, np.minimum.reduceat(v, starts))  # v is sorted in each group
    smaller = np.add.reduceat((v < u).astype(np.int64), starts)
    larger = np.add.reduceat((v > u).astype(np.int64), starts)
    bad = int(((smaller > 0) & (larger > 0)).sum() + (smaller > 1).sum())
    up = v > u
    m = smallest[group[up]]
    new_u, new_v = v[up], m
    return edges_table(new_u, new_v), bad, _labels_table(nodes, smallest)


def _small_star(table: pa.Table, _p: int) -> pa.Table:
    """Link u and each of its smaller neighbours to the smallest of them (edges come larger first)."""
    u, v, starts = _grouped(table)
    if not len(u):
        return edges_table(np.zeros(0, np.int64), np.zeros(0, np.int64))
    group = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(u))))
    smallest = v[starts]  # v is sorted within each u, and every v < u
    m = smallest[group]
    rest = v != m
    return edges_table(np.concatenate([v[rest], u[starts]]), np.concatenate([m[rest], smallest]))


def connected_components(edges: Sequence[Any], *, partitions: int, num_cpus: float = 1.0) -> list:
    """Refs of Tables (`id`, `label`: smallest id in the component), one per partition.

    Args:
        edges: Tables (or refs) with int64 columns `u`, `v`.
    """
    import ray

    if not edges:
        return []
    current = list(edges)
    for _ in range(_MAX_ROUNDS):
        out = exchange.exchange(
            current,
            by="u",
            partitions=partitions,
            map_fn=_both_ways,
            reduce_fn=_large_star,
            num_returns=3,
            num_cpus=num_cpus,
        )
        if sum(ray.get([o[1] for o in out])) == 0:  # the input was already stars around their minimum
            return [o[2] for o in out]
        current = exchange.exchange(
            [o[0] for o in out],
            by="u",
            partitions=partitions,
            map_fn=_larger_first,
            reduce_fn=_small_star,
            num_cpus=num_cpus,
        )
    raise RuntimeError(f"connected components did not converge in {_MAX_ROUNDS} rounds")
