"""Pairs of 64-bit hashes within a Hamming distance, found by Ray tasks (no process holds all hashes).

Generalised pigeonhole (multi-index hashing, Norouzi et al. 2012): cut the 64 bits into B
blocks; two hashes within t differ in at most t blocks, so they agree exactly on some B - t of
them. Each hash is emitted once per choice of B - t blocks (its key: those blocks' bits), the
rows are exchanged by key (`vlm.data.exchange`), and each key group is compared pairwise,
vectorised. B is chosen for the number of hashes so that groups stay small (t = 4 on 10 M
hashes: B = 6, 15 keys of ~21 bits). Skew: a key shared by very many hashes (near-blank
images) is found on a 1/64 sample first; its rows are split into k chunks and replicated into
the k(k+1)/2 chunk-pair cells, each compared in whichever reduce task it hashes to, so no task
compares a hot group alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from vlm.data import exchange
from vlm.data.components import edges_table

__all__ = ["near_pairs"]

_SAMPLE = 64  # hot keys are looked for on 1 in _SAMPLE hashes
_INDEX_BITS = 24  # a reduce with fewer rows than 2**24 sorts packed keys (40 bits of key: rare merges, verified)
_ROW_BYTES = 40  # an expanded row in the object store, with its share of the split's copy


def _bands(threshold: int, n: int) -> tuple[int, list[int]]:
    """Blocks B and the key masks (one per choice of B - t blocks) with the least expected work."""
    from itertools import combinations

    def cost(b: int) -> float:
        keys = math.comb(b, threshold)
        bits = 64 * (b - threshold) / b
        return keys * (1.0 + 0.05 * max(n, 1) / 2.0**bits)

    b = min((b for b in range(threshold + 1, min(64, threshold + 10) + 1) if math.comb(b, threshold) <= 256), key=cost)
    edges = [round(i * 64 / b) for i in range(b + 1)]
    block_masks = [((1 << (hi - lo)) - 1) << lo for lo, hi in zip(edges[:-1], edges[1:])]
    masks = [sum(block_masks[i] for i in combo) for combo in combinations(range(b), b - threshold)]
    return b, masks


def _keys(ph: np.ndarray, masks: np.ndarray, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(key hash, combination index) of every (hash, mask) pair, hash-major; masks[0] is combination `offset`."""
    combo = np.tile(np.arange(offset, offset + len(masks), dtype=np.uint64), len(ph))
    masked = (ph[:, None] & masks[None, :]).ravel()
    return exchange.mix64(masked ^ exchange.mix64(combo + np.uint64(1))), combo


def _sample_keys(reps: pa.Table, masks: np.ndarray) -> pa.Table:
    ids = reps.column("id").to_numpy()
    pick = exchange.mix64(ids.astype(np.uint64) ^ np.uint64(0x5EED)) % np.uint64(_SAMPLE) == 0
    key, _ = _keys(reps.column("ph").to_numpy()[pick], masks)
    return pa.table({"key": pa.array(key)})


def _hot_keys(table: pa.Table, _p: int, max_group: int) -> pa.Table:
    """Keys whose estimated group (sample count x _SAMPLE) is over max_group, with chunk counts."""
    keys, counts = np.unique(table.column("key").to_numpy(), return_counts=True)
    est = counts * _SAMPLE
    hot = est > max_group
    return pa.table({"key": pa.array(keys[hot]), "k": pa.array(np.ceil(est[hot] / max_group).astype(np.int64))})


def _expand(reps: pa.Table, masks: np.ndarray, offset: int, hot) -> pa.Table:
    """One row per (distinct hash, key); rows of a hot key go to k(k+1)/2 chunk-pair cells."""
    import ray

    hot = ray.get(hot) if isinstance(hot, ray.ObjectRef) else hot
    hot_keys, hot_k = hot.column("key").to_numpy(), hot.column("k").to_numpy()
    ph, ids = reps.column("ph").to_numpy(), reps.column("id").to_numpy()
    key, _ = _keys(ph, masks, offset)
    width = len(masks)
    ph, ids = np.repeat(ph, width), np.repeat(ids, width)
    chunk = np.zeros(len(key), np.int64)
    cell = np.zeros(len(key), np.uint64)
    if len(hot_keys):
        pos = np.clip(np.searchsorted(hot_keys, key), 0, len(hot_keys) - 1)
        is_hot = hot_keys[pos] == key
        if is_hot.any():
            k = hot_k[pos[is_hot]]
            h_ids = ids[is_hot]
            c = (exchange.mix64(h_ids.astype(np.uint64)) % k.astype(np.uint64)).astype(np.int64)
            row = np.repeat(np.arange(len(k)), k)  # each hot row once per chunk j
            j = np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k)
            lo, hi = np.minimum(c[row], j), np.maximum(c[row], j)
            cold = ~is_hot
            key = np.concatenate([key[cold], key[is_hot][row]])
            ph = np.concatenate([ph[cold], ph[is_hot][row]])
            ids = np.concatenate([ids[cold], h_ids[row]])
            chunk = np.concatenate([chunk[cold], c[row]])
            cell = np.concatenate([cell[cold], ((lo.astype(np.uint64) << np.uint64(32)) | hi.astype(np.uint64)) + 1])
    group = np.where(cell == 0, key, exchange.mix64(key ^ exchange.mix64(cell)))
    columns = {"group": pa.array(group), "ph": pa.array(ph), "id": pa.array(ids.astype(np.int64))}
    if len(hot_keys):  # which chunk-pair cell a row is in (none without hot keys: smaller rows)
        cross = (cell != 0) & ((cell - 1) >> np.uint64(32) != (cell - 1) & np.uint64(0xFFFFFFFF))
        columns |= {"chunk": pa.array(chunk.astype(np.int32)), "cross": pa.array(cross)}
    return pa.table(columns)


def _near_pairs(table: pa.Table, _p: int, threshold: int) -> pa.Table:
    """Pairs within the threshold inside each key group (a cross cell: only pairs across its chunks)."""
    empty = edges_table(np.zeros(0, np.int64), np.zeros(0, np.int64))
    if table.num_rows < 2:
        return empty
    group = table.column("group").to_numpy()
    n = len(group)
    if n < 1 << _INDEX_BITS:  # sort (top bits of the key | row) as one uint64: half the time of an argsort
        low = np.uint64((1 << _INDEX_BITS) - 1)
        packed = np.sort((group & ~low) | np.arange(n, dtype=np.uint64))
        order, group = (packed & low).astype(np.int64), packed >> np.uint64(_INDEX_BITS)
    else:
        order = np.argsort(group)
        group = group[order]
    # Only rows in groups of two or more are compared (few: keys are ~21 bits of a 64-bit hash).
    same = group[1:] == group[:-1]
    paired = np.zeros(n, dtype=bool)
    paired[1:] |= same
    paired[:-1] |= same
    order, group = order[paired], group[paired]
    ph, ids = table.column("ph").to_numpy()[order], table.column("id").to_numpy()[order]
    if "chunk" in table.column_names:
        chunk = table.column("chunk").to_numpy()[order]
        cross = table.column("cross").to_numpy(zero_copy_only=False)[order]
    else:
        chunk, cross = np.zeros(len(group), np.int32), np.zeros(len(group), bool)
    if len(group) < 2:
        return empty
    starts = np.flatnonzero(np.concatenate([[True], group[1:] != group[:-1]]))
    sizes = np.diff(np.append(starts, len(group)))
    left = np.repeat(starts + sizes, sizes) - np.arange(len(group)) - 1  # rows after each in its group
    active = np.flatnonzero(left > 0)
    us, vs = [], []
    d = 1
    while active.size:
        j = active + d
        ok = np.bitwise_count(ph[active] ^ ph[j]) <= threshold
        ok &= ~cross[active] | (chunk[active] != chunk[j])
        us.append(ids[active[ok]])
        vs.append(ids[j[ok]])
        d += 1
        active = active[left[active] >= d]
    if not us:
        return empty
    u, v = np.concatenate(us), np.concatenate(vs)
    pairs = np.unique(np.stack([np.maximum(u, v), np.minimum(u, v)], axis=1), axis=0)
    return edges_table(pairs[:, 0], pairs[:, 1])


def near_pairs(
    hashes: Sequence[Any],
    threshold: int,
    *,
    n_distinct: int,
    partitions: int,
    max_group: int = 2048,
    num_cpus: float = 1.0,
) -> list:
    """Refs of edge Tables (`u`, `v`: ids) of every pair of rows whose hashes are within `threshold`.

    Args:
        hashes: Tables (or refs) with `id` (int64) and `ph` (uint64), one row per distinct hash.
        n_distinct: about how many rows there are (chooses the blocks).
        max_group: key groups estimated larger than this are split into chunk-pair cells.
    """
    import ray

    if max_group < 1:
        raise ValueError("max_group must be >= 1")
    if not hashes:
        return []
    _, mask_list = _bands(threshold, n_distinct)
    masks = np.array(mask_list, dtype=np.uint64)
    hot = ray.get(
        exchange.exchange(
            hashes,
            by="key",
            partitions=partitions,
            map_fn=_sample_keys,
            map_args=(masks,),
            reduce_fn=_hot_keys,
            reduce_args=(max_group,),
            num_cpus=num_cpus,
        )
    )
    hot = ray.put(exchange.concat(hot).sort_by("key"))  # once, not with every map task
    # Waves of key choices, so the expanded rows in the object store at once stay a fraction of it.
    store = ray.cluster_resources().get("object_store_memory", 2e9)
    per_wave = max(1, int(store / 4 / _ROW_BYTES / max(n_distinct, 1)))
    edges = []
    for lo in range(0, len(masks), per_wave):
        wave = exchange.exchange(
            hashes,
            by="group",
            partitions=partitions,
            map_fn=_expand,
            map_args=(masks[lo : lo + per_wave], lo, hot),
            reduce_fn=_near_pairs,
            reduce_args=(threshold,),
            num_cpus=num_cpus,
        )
        ray.wait(wave, num_returns=len(wave), fetch_local=False)
        edges += wave
    return edges
