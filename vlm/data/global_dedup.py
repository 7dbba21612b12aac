"""Global duplicate decisions as distributed Ray jobs whose driver memory does not grow with the data.

Exact duplicates (ingest's URLs): rows are hash-partitioned by digest (`vlm.data.exchange`), and
each partition keeps the first row of every digest in the given order; the same decisions as
one driver walking all rows in order with a set of seen digests.

Clean's dedup (`dedup_decisions`: SHA-256 of stored and downloaded bytes, and 64-bit pHashes
within a Hamming distance t) makes exactly the decisions of `cleaning.Dedup.decide`, the walk in
id order that keeps a sample unless it shares a digest with, or lies within t of, an earlier
kept one. That walk is sequential, but a sample's decision depends only on the samples it is
linked to by a shared digest or a close pHash, so:
1. Digests and pHashes are exchanged by value: every sample sharing one is linked to its first
   holder (a star), and each distinct pHash goes on once (blank images collapse here).
2. Distinct pHashes within t are paired by `vlm.data.near_pairs` (generalised pigeonhole over
   key groups, hot groups split across tasks).
3. Connected components of those links (`vlm.data.components`), labelled by their smallest id.
4. Linked samples are exchanged by label and `Dedup.decide_group` walks each component in id
   order; the decisions go back to the input block each sample came from.
Nothing but refs and per-partition counts reaches the driver; one component (all samples linked
to one another) is walked by one task, which bounds the work of a task, not of the driver.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vlm.data import exchange
from vlm.data.components import connected_components, edges_table
from vlm.data.near_pairs import near_pairs

if TYPE_CHECKING:
    from vlm.data.cleaning import DedupConfig

__all__ = ["dedup_decisions", "first_occurrence", "hex64"]


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
    if not blocks:
        return []
    return exchange.exchange(
        blocks,
        by=by or digest,
        partitions=partitions,
        reduce_fn=_first_in_partition,
        reduce_args=(digest, order),
        blocks_per_map=blocks_per_map,
        num_cpus=num_cpus,
    )


_NIBBLE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _NIBBLE[_c] = 10 + _i


def hex64(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The first 16 hex digits of each string as uint64 (vectorised); null or empty: 0.

    A string that is not hex (a digest from elsewhere) gets a 64-bit hash of itself instead,
    which is all a partition key needs.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_integer(column.type):
        return column.fill_null(0).to_numpy().astype(np.uint64)
    n = len(column)
    if n == 0:
        return np.zeros(0, np.uint64)
    filled = pc.utf8_slice_codeunits(pc.fill_null(column.cast(pa.string()), "0" * 16), 0, 16)
    filled = pc.if_else(pc.equal(pc.utf8_length(filled), 0), "0" * 16, filled)
    lengths = pc.utf8_length(filled).to_numpy(zero_copy_only=False)
    if (lengths == 16).all():
        offsets = np.frombuffer(filled.buffers()[1], np.int32, n + 1, filled.offset * 4)
        data = np.frombuffer(filled.buffers()[2], np.uint8)[offsets[0] : offsets[0] + 16 * n]
        nibbles = _NIBBLE[data].reshape(n, 16)
        if (nibbles != 255).all():
            out = np.zeros(n, np.uint64)
            for i in range(16):
                out = (out << np.uint64(4)) | nibbles[:, i].astype(np.uint64)
            return out
    return _hash64_slow(column.to_pylist())


def _hex16(values: np.ndarray) -> pa.Array:
    """uint64 values as 16 lowercase hex digits each (what `Dedup.features` writes), without a Python loop."""
    n = len(values)
    data = np.ascontiguousarray(values, dtype=np.uint64).astype(">u8").tobytes().hex().encode()
    offsets = np.arange(0, 16 * (n + 1), 16, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


def _hash64_slow(values: list) -> np.ndarray:
    import hashlib

    out = np.zeros(len(values), np.uint64)
    for i, v in enumerate(values):
        if not v:
            continue
        try:
            out[i] = int(v[:16], 16)
        except ValueError:
            out[i] = int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little")
    return out


# ----------------------------------------------------------------------------- clean's dedup

_EXACT_FIELDS = ("sha256", "source_sha256")
_NS_EXACT, _NS_PHASH = 0, 1


def _reaching(block: pa.Table, mask: str | None) -> pa.Table:
    if mask is None or mask not in block.column_names:
        return block
    return block.filter(pc.fill_null(block.column(mask), False))


def _digest_rows(block: pa.Table, exact: bool, near: bool, mask: str | None) -> pa.Table:
    """One row per (sample, digest): exact digests share one namespace (fields cross-match)."""
    block = _reaching(block, mask)
    ids = block.column("id").combine_chunks()
    parts = []
    fields = [(f, _NS_EXACT) for f in _EXACT_FIELDS if exact and f in block.column_names]
    fields += [("phash", _NS_PHASH)] if near and "phash" in block.column_names else []
    for name, ns in fields:
        col = block.column(name).combine_chunks()
        if pa.types.is_integer(col.type):
            ok = col.is_valid()
            value = pc.cast(col, pa.string())
        else:
            col = col.cast(pa.string())
            ok = pc.and_(col.is_valid(), pc.greater(pc.utf8_length(col), 0))
            value = col
        ok = pc.fill_null(ok, False)
        sel_ids, sel_col, sel_value = ids.filter(ok), col.filter(ok), value.filter(ok)
        h = hex64(sel_col)
        if ns == _NS_PHASH:  # equal hashes meet as equal values, however they were written (case, int/hex)
            sel_value = _hex16(h)
        parts.append(
            pa.table(
                {
                    "by": pa.array(h),
                    "ns": pa.array(np.full(len(sel_ids), ns, np.int8)),
                    "value": sel_value,
                    "id": sel_ids.cast(pa.int64()),
                    "ph": pa.array(h if ns == _NS_PHASH else np.zeros(len(sel_ids), np.uint64)),
                }
            )
        )
    if not parts:
        return pa.table(
            {
                "by": pa.array([], pa.uint64()),
                "ns": pa.array([], pa.int8()),
                "value": pa.array([], pa.string()),
                "id": pa.array([], pa.int64()),
                "ph": pa.array([], pa.uint64()),
            }
        )
    return exchange.concat(parts)


def _digest_reduce(table: pa.Table, _p: int) -> tuple[pa.Table, pa.Table, int]:
    """Star links to each digest's first holder, and each distinct pHash once (its first holder's id)."""
    if table.num_rows == 0:
        empty = np.zeros(0, np.int64)
        return edges_table(empty, empty), pa.table({"id": pa.array(empty), "ph": pa.array([], pa.uint64())}), 0
    # Only rows whose (namespace, 64-bit prefix) repeats can share a digest: the string work
    # (group by the whole digest, exact) is done on those few, the rest pass as they are.
    by, ns = table.column("by").to_numpy(), table.column("ns").to_numpy()
    order = np.lexsort((ns, by))
    same = (by[order][1:] == by[order][:-1]) & (ns[order][1:] == ns[order][:-1])
    repeated = np.zeros(len(by), dtype=bool)
    repeated[order[1:][same]] = True
    repeated[order[:-1][same]] = True
    single = table.filter(pa.array(~repeated))
    multi = table.filter(pa.array(repeated))
    firsts = multi.group_by(["ns", "value"]).aggregate([("id", "min")])
    joined = multi.join(firsts, keys=["ns", "value"], join_type="inner")
    ids, first = joined.column("id").to_numpy(), joined.column("id_min").to_numpy()
    later = ids != first
    reps = exchange.concat(
        [
            single.filter(pc.equal(single.column("ns"), _NS_PHASH)).select(["id", "ph"]),
            joined.filter(pc.and_(pc.equal(joined.column("ns"), _NS_PHASH), pa.array(~later))).select(["id", "ph"]),
        ]
    )
    return edges_table(ids[later], first[later]), reps, reps.num_rows


def _record_rows(block: pa.Table, index: int, mask: str | None) -> pa.Table:
    """What the walk needs of each sample reaching the step, with the input block it came from."""
    block = _reaching(block, mask)
    columns = {"id": block.column("id").cast(pa.int64()), "key": block.column("key").cast(pa.string())}
    for name in (*_EXACT_FIELDS, "phash"):
        if name in block.column_names:
            col = block.column(name)
            if pa.types.is_integer(col.type):  # the walk reads pHashes as hex
                col = pa.array([None if x is None else f"{x & 0xFFFFFFFFFFFFFFFF:016x}" for x in col.to_pylist()])
            columns[name] = col.cast(pa.string())
        else:
            columns[name] = pa.nulls(block.num_rows, pa.string())
    columns["block"] = pa.array(np.full(block.num_rows, index, np.int64))
    return pa.table(columns)


def _attach_labels(n_records: int, *parts: pa.Table) -> pa.Table:
    records = exchange.concat(list(parts[:n_records]))
    labels = exchange.concat(list(parts[n_records:]))
    return records.join(labels, keys="id", join_type="inner")


def _decide_components(table: pa.Table, _p: int, cfg: dict) -> pa.Table:
    """Walk each component in id order (`Dedup.decide_group`); the dropped samples' decisions."""
    from vlm.data.cleaning import Dedup, DedupConfig

    step = Dedup(DedupConfig(**cfg))
    out: dict[str, list] = {"block": [], "id": [], "reason": [], "duplicate_of": [], "distance": []}
    if table.num_rows:
        table = table.sort_by([("label", "ascending"), ("id", "ascending")])
        label = table.column("label").to_numpy()
        starts = np.flatnonzero(np.concatenate([[True], label[1:] != label[:-1]]))
        cols = {c: table.column(c).to_pylist() for c in ("id", "key", "block", *_EXACT_FIELDS, "phash")}
        for lo, hi in zip(starts, np.append(starts[1:], len(label))):
            records = [
                {"key": cols["key"][i], "dedup": {f: cols[f][i] for f in (*_EXACT_FIELDS, "phash")}}
                for i in range(lo, hi)
            ]
            for i, record, reason in zip(range(lo, hi), records, step.decide_group(records)):
                if reason is not None:
                    out["block"].append(cols["block"][i])
                    out["id"].append(cols["id"][i])
                    out["reason"].append(reason)
                    out["duplicate_of"].append(record["dedup"].get("duplicate_of"))
                    out["distance"].append(record["dedup"].get("distance"))
    return _decisions_table(out)


def _decisions_table(columns: dict[str, list]) -> pa.Table:
    return pa.table(
        {
            "block": pa.array(columns["block"], pa.int64()),
            "id": pa.array(columns["id"], pa.int64()),
            "reason": pa.array(columns["reason"], pa.string()),
            "duplicate_of": pa.array(columns["duplicate_of"], pa.string()),
            "distance": pa.array(columns["distance"], pa.int32()),
        }
    )


def _block_group(decided: pa.Table, per: int) -> pa.Table:
    return decided.append_column("group", pc.divide(decided.column("block"), pa.scalar(per, pa.int64())))


def _align_group(first: int, n: int, *blocks_and_parts):
    """`_align` for the blocks first..first+n-1, from the decisions routed to their group."""
    blocks, parts = blocks_and_parts[:n], blocks_and_parts[n:]
    decided = exchange.concat(list(parts)) if parts else None
    block_of = decided.column("block").to_numpy() if decided is not None else np.zeros(0, np.int64)
    out = [
        _align(b, *([decided.filter(pa.array(block_of == first + i))] if decided is not None else []))
        for i, b in enumerate(blocks)
    ]
    return out[0] if n == 1 else tuple(out)


def _align(block: pa.Table, *parts: pa.Table) -> pa.Table:
    """The decisions of one input block, row for row (null reason: kept or not reaching the step)."""
    decided = (
        exchange.concat(list(parts))
        if parts
        else _decisions_table(dict.fromkeys(("block", "id", "reason", "duplicate_of", "distance"), []))
    )
    ids = block.column("id").to_numpy()
    n = len(ids)
    order = np.argsort(ids, kind="stable")
    pos = (
        order[np.searchsorted(ids[order], decided.column("id").to_numpy())]
        if decided.num_rows
        else np.zeros(0, np.int64)
    )
    take = np.full(n, -1, np.int64)
    take[pos] = np.arange(len(pos))
    idx = pa.array(take, mask=take < 0)
    return pa.table(
        {
            "id": block.column("id"),
            "reason": decided.column("reason").take(idx),
            "duplicate_of": decided.column("duplicate_of").take(idx),
            "distance": decided.column("distance").take(idx),
        }
    )


def dedup_decisions(
    blocks: Sequence[Any],
    cfg: DedupConfig,
    *,
    partitions: int,
    mask: str | None = None,
    max_group: int = 2048,
    num_cpus: float = 1.0,
) -> list:
    """`cleaning.Dedup.decide` over every block's samples in id order, as a distributed Ray job.

    Args:
        blocks: Tables (or refs) with `id` (int64, unique: the order of the walk), `key` (what a
            drop names as its first), `sha256`, `source_sha256` (hex strings, null: none) and
            `phash` (16 hex digits or uint64; null: none); a missing column counts as all null.
        cfg: the dedup step's config (exact, near, near_threshold).
        partitions: reduce tasks per exchange.
        mask: a boolean column; rows where it is false do not reach the step.
        max_group: pHash key groups estimated larger than this are split across tasks.
    Returns:
        One ref per input block to a Table aligned with the block's rows: `id`, `reason` (null:
        kept or not reaching), `duplicate_of` (the key of the kept sample) and `distance`
        (pHash distance of a near duplicate).
    """
    import ray

    if max_group < 1:
        raise ValueError("max_group must be >= 1")
    if not blocks:
        return []
    if not cfg.exact and not cfg.near:
        return exchange.run_tasks(_align, blocks)
    stage1 = exchange.exchange(
        blocks,
        by="by",
        partitions=partitions,
        map_fn=_digest_rows,
        map_args=(cfg.exact, cfg.near, mask),
        reduce_fn=_digest_reduce,
        num_returns=3,
        num_cpus=num_cpus,
    )
    edges = [s[0] for s in stage1]
    if cfg.near and cfg.near_threshold > 0:
        n_distinct = sum(ray.get([s[2] for s in stage1]))
        edges += near_pairs(
            [s[1] for s in stage1],
            cfg.near_threshold,
            n_distinct=n_distinct,
            partitions=partitions,
            max_group=max_group,
            num_cpus=num_cpus,
        )
    labels = connected_components(edges, partitions=partitions, num_cpus=num_cpus)
    records = exchange.scatter(
        blocks,
        by="id",
        partitions=partitions,
        map_fn=_record_rows,
        map_args=(mask,),
        with_index=True,
        num_cpus=num_cpus,
    )
    label_parts = exchange.scatter(labels, by="id", partitions=partitions, num_cpus=num_cpus)
    attach = ray.remote(_attach_labels).options(num_cpus=num_cpus)
    labelled = [attach.remote(len(records[p]), *records[p], *label_parts[p]) for p in range(partitions)]
    cfg_dict = {"exact": cfg.exact, "near": cfg.near, "near_threshold": cfg.near_threshold}
    decided = exchange.exchange(
        labelled,
        by="label",
        partitions=partitions,
        reduce_fn=_decide_components,
        reduce_args=(cfg_dict,),
        num_cpus=num_cpus,
    )
    # Back to the input blocks, `per` blocks to a task so that tasks x partitions stays bounded.
    per = max(1, -(-len(blocks) * partitions // exchange.MAX_REFS))
    groups = -(-len(blocks) // per)
    back = exchange.scatter(
        decided, by="group", partitions=groups, map_fn=_block_group, map_args=(per,), hashed=False, num_cpus=num_cpus
    )
    out = []
    for g in range(groups):
        mine = list(blocks[g * per : (g + 1) * per])
        task = ray.remote(_align_group).options(num_cpus=num_cpus, num_returns=len(mine))
        refs = task.remote(g * per, len(mine), *mine, *back[g])
        out += [refs] if len(mine) == 1 else list(refs)
    return out
