"""Clean's distributed dedup and its pieces on the shared local Ray, against the driver walk (`Dedup.decide`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from vlm.data import exchange
from vlm.data.cleaning import Dedup, DedupConfig
from vlm.data.components import connected_components, edges_table
from vlm.data.global_dedup import dedup_decisions, hex64
from vlm.data.near_pairs import near_pairs

pytestmark = pytest.mark.slow


def _clustered(seed: int, n: int = 3000, rows: int = 500) -> list[pa.Table]:
    """Hashes around 20 centres (chains of near duplicates), blank images, shared and crossed digests.

    Ids are a permutation (not block order), a tenth of the rows do not reach the step, and
    `source_sha256` of some rows equals another row's `sha256` (the walk matches across fields).
    """
    rng = np.random.default_rng(seed)
    centres = rng.integers(0, 2**63, 20, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    ph = centres[rng.integers(0, 20, n)]
    for _ in range(6):
        flip = rng.random(n) < 0.5
        ph[flip] ^= np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64)[flip]
    ph[rng.random(n) < 0.1] = np.uint64(0)  # blank images: one hash shared by many
    pool = [f"{x:064x}" for x in rng.integers(0, 2**62, 300)]

    def digest(p_pool: float, p_null: float) -> list:
        return [
            None if u < p_null else (pool[i] if u < p_null + p_pool else f"{rng.integers(0, 2**62):064x}")
            for u, i in zip(rng.random(n), rng.integers(0, 300, n))
        ]

    ids = rng.permutation(n)
    columns = {
        "id": ids,
        "key": [f"k{i:06d}" for i in ids],
        "sha256": digest(0.3, 0.0),
        "source_sha256": digest(0.2, 0.4),
        "phash": [None if u < 0.05 else f"{int(h):016x}" for u, h in zip(rng.random(n), ph)],
        "alive": rng.random(n) < 0.9,
    }
    return [pa.table({k: v[lo : lo + rows] for k, v in columns.items()}) for lo in range(0, n, rows)]


def _walk(blocks: list[pa.Table], cfg: DedupConfig) -> dict[int, tuple]:
    """id -> (reason, duplicate_of, distance) of one driver walking the reaching rows in id order."""
    rows = sorted(
        (i, k, s, src, p)
        for b in blocks
        for i, k, s, src, p, alive in zip(
            *(b.column(c).to_pylist() for c in ("id", "key", "sha256", "source_sha256", "phash", "alive"))
        )
        if alive
    )
    records = [{"key": k, "dedup": {"sha256": s, "source_sha256": src, "phash": p}} for _, k, s, src, p in rows]
    reasons = Dedup(cfg).decide(records)
    return {
        row[0]: (reason, r["dedup"].get("duplicate_of"), r["dedup"].get("distance"))
        for row, r, reason in zip(rows, records, reasons)
    }


@pytest.mark.parametrize(
    "cfg,max_group",
    [
        (DedupConfig(), 2048),
        (DedupConfig(), 8),  # every busy key group split into chunk-pair cells
        (DedupConfig(near_threshold=0), 2048),
        (DedupConfig(exact=False, near_threshold=6), 8),
        (DedupConfig(near=False), 2048),
    ],
    ids=["default", "hot-split", "t0", "near-only-t6", "exact-only"],
)
def test_same_decisions_as_the_driver_walk(ray_local, monkeypatch, cfg, max_group):
    blocks = _clustered(seed=max_group)
    if max_group == 8:  # also: few refs allowed, so map tasks take several blocks and align tasks several
        monkeypatch.setattr(exchange, "MAX_REFS", 4)
    out = ray_local.get(
        dedup_decisions(exchange.put_blocks(blocks), cfg, partitions=3, mask="alive", max_group=max_group)
    )
    expected = _walk(blocks, cfg)
    assert sum(v[0] is not None for v in expected.values()) > 300  # the data has duplicates to find
    for block, got in zip(blocks, out):
        assert got.column("id").to_pylist() == block.column("id").to_pylist()  # aligned row for row
        rows = zip(*(got.column(c).to_pylist() for c in ("id", "reason", "duplicate_of", "distance")))
        for (i, reason, of, distance), alive in zip(rows, block.column("alive").to_pylist()):
            assert (reason, of, distance) == (expected[i] if alive else (None, None, None)), i


def test_near_pairs_finds_every_pair_within_the_threshold(ray_local):
    """Against all pairs of 600 hashes around a few centres (with a hot key split across cells)."""
    rng = np.random.default_rng(5)
    ph = np.repeat(rng.integers(0, 2**63, 6, dtype=np.int64).astype(np.uint64), 100)
    for _ in range(5):
        ph ^= np.uint64(1) << rng.integers(0, 64, len(ph)).astype(np.uint64)
    ph = np.unique(ph)
    ids = np.arange(len(ph), dtype=np.int64)
    tables = [pa.table({"id": ids[i::3], "ph": pa.array(ph[i::3])}) for i in range(3)]
    got = set()
    for t in ray_local.get(near_pairs(tables, 4, n_distinct=len(ph), partitions=2, max_group=16)):
        got |= set(zip(t.column("u").to_pylist(), t.column("v").to_pylist()))
    dist = np.bitwise_count(ph[:, None] ^ ph[None, :])
    expected = {(int(a), int(b)) for a, b in zip(*np.nonzero((dist <= 4) & (ids[:, None] > ids[None, :])))}
    assert len(expected) > 100
    assert got == expected


def test_connected_components_label_by_smallest_id(ray_local):
    rng = np.random.default_rng(2)
    n = 2000
    u, v = rng.integers(0, n, 1500), rng.integers(0, n, 1500)  # random sparse graph: many components, long paths
    chain = np.arange(500, 900)
    u, v = np.concatenate([u, chain[:-1]]), np.concatenate([v, chain[1:]])
    refs = exchange.put_blocks([edges_table(u[i::4], v[i::4]) for i in range(4)])
    labels = {}
    for t in ray_local.get(connected_components(refs, partitions=3)):
        labels |= dict(zip(t.column("id").to_pylist(), t.column("label").to_pylist()))
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(u, v):
        ra, rb = find(int(a)), find(int(b))
        parent[max(ra, rb)] = min(ra, rb)
    edge = u != v  # a self loop links nothing
    linked = set(u[edge].tolist()) | set(v[edge].tolist())
    members: dict[int, list[int]] = {}
    for x in linked:
        members.setdefault(find(x), []).append(x)
    expected = {x: min(group) for group in members.values() for x in group}
    assert labels == expected


def test_hex64_reads_hex_prefixes_and_hashes_the_rest():
    values = pa.array(["00000000000000ff" + "0" * 48, None, "", "ABCDEF0123456789", "not a digest"])
    out = hex64(values)
    assert out[:4].tolist() == [255, 0, 0, 0xABCDEF0123456789]
    assert out[4] != 0  # not hex: a hash of the string, stable
    assert hex64(values)[4] == out[4]


def test_driver_memory_does_not_follow_the_data(ray_local):
    """600k feature records (~75 MB) made in Ray tasks: dedup, top fraction and URL dedup leave the driver flat."""
    import threading

    import psutil

    from vlm.data import quantile
    from vlm.data.global_dedup import first_occurrence

    def make(index: int, rows: int) -> pa.Table:
        rng = np.random.default_rng(index)
        ids = np.arange(index * rows, (index + 1) * rows, dtype=np.int64)
        words = rng.integers(0, 2**63, (rows, 4), dtype=np.int64).astype(">u8")
        words[rng.random(rows) < 0.05] = words[0]  # exact duplicates of each block's first row
        ph = rng.integers(0, 2**63, rows, dtype=np.int64).astype(np.uint64)
        near = rng.random(rows) < 0.05
        ph[near] = ph[0] ^ (np.uint64(1) << rng.integers(0, 64, int(near.sum())).astype(np.uint64))
        hexes = words.tobytes().hex()
        sha = [hexes[64 * i : 64 * (i + 1)] for i in range(rows)]
        return pa.table(
            {
                "id": ids,
                "key": [f"{i:010d}" for i in ids],
                "sha256": sha,
                "source_sha256": pa.nulls(rows, pa.string()),
                "phash": [f"{int(h):016x}" for h in ph],
                "clip_score": rng.random(rows),
                "url_digest": pa.array(words[:, 0].astype(np.uint64)),
            }
        )

    blocks = exchange.run_tasks(make, range(6), 100_000)
    ray_local.wait(blocks, num_returns=len(blocks))
    process = psutil.Process()
    base, peak, done = process.memory_info().rss, [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            done.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        decided = ray_local.get(
            exchange.run_tasks(
                lambda t: int(t.column("reason").is_valid().to_numpy(zero_copy_only=False).sum()),
                dedup_decisions(blocks, DedupConfig(), partitions=2),
            )
        )
        kept = ray_local.get(
            exchange.run_tasks(
                lambda t: int(t.column("keep").to_numpy(zero_copy_only=False).sum()),
                quantile.top_fraction(blocks, "clip_score", 0.3),
            )
        )
        later = ray_local.get(
            exchange.run_tasks(
                lambda t: t.num_rows,
                first_occurrence(blocks, digest="url_digest", order="id", partitions=2),
            )
        )
    finally:
        done.set()
        sampler.join()
    stored = sum(b.nbytes for b in ray_local.get(blocks[:1])) * len(blocks)
    assert sum(decided) >= 2 * 6 * 4000  # the planted duplicates were found
    assert sum(kept) == 180_000
    assert sum(later) >= 6 * 4000
    grown = (peak[0] - base) / 2**20
    assert stored > 64 * 2**20
    assert grown < 32, f"driver RSS grew {grown:.0f} MB over {stored / 2**20:.0f} MB of records"


def test_equal_phashes_written_differently_and_no_blocks(ray_local):
    """pHashes compare as numbers (the walk's int(h, 16)): upper and lower case meet even at t = 0."""
    rng = np.random.default_rng(9)
    ph = [f"{int(x):016x}" for x in rng.integers(0, 2**63, 40, dtype=np.int64)]
    ph = ph + [p.upper() for p in ph[:20]]  # the first 20 again, upper case
    blocks = [
        pa.table(
            {"id": np.arange(lo, lo + 30), "key": [f"k{i:03d}" for i in range(lo, lo + 30)], "phash": ph[lo : lo + 30]}
        )
        for lo in (0, 30)
    ]
    blocks = [b.append_column("sha256", pa.nulls(b.num_rows, pa.string())) for b in blocks]
    blocks = [b.append_column("source_sha256", pa.nulls(b.num_rows, pa.string())) for b in blocks]
    blocks = [b.append_column("alive", pa.array([True] * b.num_rows)) for b in blocks]
    for cfg in (DedupConfig(near_threshold=0), DedupConfig()):
        out = ray_local.get(dedup_decisions(exchange.put_blocks(blocks), cfg, partitions=2))
        got = [r for t in out for r in t.column("reason").to_pylist()]
        expected = _walk(blocks, cfg)
        assert got == [expected[i][0] for i in range(60)]
        assert sum(r is not None for r in got) == 20
    assert dedup_decisions([], DedupConfig(), partitions=2) == []
