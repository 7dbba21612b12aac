"""Clean's distributed plan (`vlm.data.clean_plan`) against the driver walk (`run_steps`), step orders and modes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from vlm.data import clean_plan as cp
from vlm.data import cleaning as cl
from vlm.data import exchange

pytestmark = pytest.mark.slow


def _feature_blocks(seed: int, shards: int = 6, per_shard: int = 300) -> tuple[list[pa.Table], list[dict]]:
    """Feature rows as the clean stage's feature tasks make them, blocks cutting across shards.

    Shard 3 has no samples (its plan file must still be written). Keys within a shard are
    written out of order (the walk sorts them), and so are the blocks.
    """
    rng = np.random.default_rng(seed)
    pool = [f"{x:064x}" for x in rng.integers(0, 2**62, 80)]
    base = rng.integers(0, 2**63, 40, dtype=np.int64).astype(np.uint64)
    rows, records = [], []
    for shard in range(shards):
        if shard == 3:
            continue
        keys = sorted(f"{shard:05d}{i:04d}" for i in range(per_shard))
        for rank, key in enumerate(keys):
            ph = base[rng.integers(0, 40)] ^ (np.uint64(1) << np.uint64(rng.integers(0, 64)))
            feats = {
                "basic": {
                    "caption_chars": int(rng.integers(0, 40)),
                    "caption_words": int(rng.integers(0, 8)),
                    "width": int(rng.integers(100, 400)),
                    "height": int(rng.integers(100, 400)),
                    "size_source": "original",
                    "decodable": bool(rng.random() > 0.02),
                },
                "dedup": {
                    "sha256": pool[rng.integers(0, 80)] if rng.random() < 0.2 else f"{rng.integers(0, 2**62):064x}",
                    "source_sha256": pool[rng.integers(0, 80)] if rng.random() < 0.1 else None,
                    "phash": None if rng.random() < 0.03 else f"{int(ph):016x}",
                },
            }
            score = float("nan") if rng.random() < 0.05 else float(np.float32(round(rng.random() * 0.5, 2)))
            rows.append(
                {
                    "id": cp.sample_id(shard, rank),
                    "shard": shard,
                    "key": key,
                    "features": json.dumps(feats),
                    "clip_score": score,
                }
            )
            records.append({"key": key, "shard": shard, **feats, "clipscore": cl.ClipScoreFilter.score_features(score)})
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    blocks = [pa.Table.from_pylist(rows[lo : lo + 250]) for lo in range(0, len(rows), 250)]
    return blocks, records


def _steps(names: list[str], mode: str) -> list[cl.Step]:
    configs = {
        "basic": cl.BasicConfig(min_image_side=150),
        "dedup": cl.DedupConfig(near_threshold=3),
        "clipscore": cl.ClipScoreConfig(mode=mode, top_fraction=0.5, threshold=0.2),
    }
    return cl.build_steps(names, configs)


@pytest.mark.parametrize(
    "names,mode",
    [
        (["basic", "dedup", "clipscore"], "top_fraction"),
        (["clipscore", "dedup"], "top_fraction"),
        (["dedup", "basic", "clipscore"], "threshold"),
    ],
    ids=["basic-dedup-top", "top-dedup", "dedup-basic-threshold"],
)
def test_plan_equals_the_driver_walk(ray_local, tmp_path, names, mode):
    blocks, records = _feature_blocks(seed=len(names))
    steps = _steps(names, mode)
    sizes = [b.num_rows for b in blocks] if mode == "threshold" else None  # merged into ~600-row blocks
    state = cp.plan_blocks(exchange.put_blocks(blocks), steps, partitions=3, sizes=sizes, target_rows=600)
    written = cp.write_plan(state, tmp_path, list(range(6)), names, partitions=3)
    oracle_steps = _steps(names, mode)
    expected = cl.run_steps(oracle_steps, records)
    got = {}
    for shard in range(6):
        plan = cp.read_plan_shard(tmp_path, shard)
        assert list(plan) == sorted(plan)  # plan rows in key order
        got |= plan
    assert len(got) == len(expected) == written["count"]
    fields = ("keep", "reason", "dropped_by", "meta")
    for key, d in expected.items():
        assert [got[key][f] for f in fields] == [d[f] for f in fields], key
    assert written["kept"] == sum(d["keep"] for d in expected.values())
    for mine, theirs in zip(steps, oracle_steps):
        assert mine.stats.to_dict() == theirs.stats.to_dict()
        assert mine.stats.dropped > 0  # every step had something to drop
    if "clipscore" in names:
        reached = sum(1 for d in expected.values() if d["meta"].get("clipscore", {}).get("score") is not None)
        assert int(written["hist"].sum()) == reached


def test_no_samples_at_all_gives_empty_plans(ray_local, tmp_path):
    """Input shards without one sample: every shard still gets its (empty) plan file."""
    steps = _steps(["basic", "dedup", "clipscore"], "top_fraction")
    state = cp.plan_blocks([], steps, partitions=2, sizes=[])
    written = cp.write_plan(state, tmp_path, [0, 1], ["basic", "dedup", "clipscore"], partitions=2)
    assert written["count"] == written["kept"] == 0
    assert cp.read_plan_shard(tmp_path, 0) == cp.read_plan_shard(tmp_path, 1) == {}
    assert all(step.stats.seen == 0 for step in steps)
