"""The `vlm clean` stage end to end on a real local Ray and a real MLflow store."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.clean import CleanConfig, clean
from pipelines.shard_stage import PLAN_DIR, PLAN_FILE
from vlm.config import load_config
from vlm.data import filtered_shards as fs
from vlm.data import shards as sh
from vlm.errors import ConfigError, InputError
from vlm.testbed.digit_shards import write_digit_shards

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[1] / "configs" / "clean" / "demo.yaml"
# Digit shards store 64 px images and no original size: judge the stored size.
BASE = ["basic.min_image_side=32", "basic.size_source=stored", "dedup.near_threshold=2"]


def _reencode(data: bytes, quality: int = 70) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _rewrite_with(in_dir, shard: int, extra: list[tuple[str, dict, dict]]) -> None:
    """Rewrite an input shard with extra samples (key, files, parquet row) appended."""
    files = sh.read_tar_samples(sh.tar_path(in_dir, shard))
    rows = pq.read_table(sh.parquet_path(in_dir, shard)).to_pylist()
    writer = sh.ShardWriter(in_dir, shard)
    for key in sorted(files):
        writer.write_files(key, files[key])
    for key, f, _ in extra:
        writer.write_files(key, f)
    for row in rows + [r for _, _, r in extra]:
        writer.add_row(row)
    writer.close()


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """3 digit shards of 20 (30% noisy captions) with planted duplicates across shards.

    - 000020020: exact copy of 000000003's files (dropped, names 000000003);
    - 000000020: re-encoded copy of 000020005 (earlier in key order: kept, 000020005 dropped).
    """
    out = tmp_path_factory.mktemp("raw")
    write_digit_shards(out, 60, samples_per_shard=20, noisy_fraction=0.3, seed=1)
    s0 = sh.read_tar_samples(sh.tar_path(out, 0))
    s2 = sh.read_tar_samples(sh.tar_path(out, 2))
    row0 = pq.read_table(sh.parquet_path(out, 0)).to_pylist()[3]
    row2 = pq.read_table(sh.parquet_path(out, 2)).to_pylist()[5]
    near = dict(s2["000020005"], jpg=_reencode(s2["000020005"]["jpg"]), txt=b"a handwritten digit, re-encoded copy")
    _rewrite_with(out, 0, [("000000020", near, dict(row2, key="000000020"))])
    _rewrite_with(out, 2, [("000020020", s0["000000003"], dict(row0, key="000020020"))])
    return out


@pytest.fixture(scope="module")
def cleaned(raw, tmp_path_factory, ray_local, mlflow_store):
    out = tmp_path_factory.mktemp("clean") / "out"
    cfg = load_config(CleanConfig, DEMO, BASE + ["tracking.experiment=clean"])
    manifest = clean(raw, out, cfg, show_progress=False)
    return out, manifest, cfg


def test_layout_and_reasons(raw, cleaned):
    """Same shards and keys; planted duplicates dropped naming the first key; _dropped holds reasons."""
    out, manifest, _ = cleaned
    assert sh.read_manifest(out)["num_shards"] == 3 and fs.input_shards(out) == [0, 1, 2]
    rows = {r["key"]: r for s in (0, 1, 2) for r in pq.read_table(sh.parquet_path(out, s)).to_pylist()}
    inputs = {k for s in (0, 1, 2) for k in sh.read_tar_samples(sh.tar_path(raw, s))}
    assert set(rows) == inputs and len(rows) == 62
    assert rows["000020020"]["reason"] == "exact_duplicate: of 000000003 (sha256 of image bytes)"
    assert rows["000020005"]["reason"].startswith("near_duplicate: of 000000020 (phash distance")
    assert rows["000000020"]["status"] == "kept" and rows["000000003"]["status"] == "kept"
    dup = {k for k, r in rows.items() if r["dropped_by"] == "dedup"}
    assert dup == {"000020020", "000020005"}, "no false near-duplicates among distinct digits"
    for key, r in rows.items():  # basic drops exactly the captions DataComp's bounds reject
        short = len(r["caption"].strip()) < 6 or len(r["caption"].split()) < 3
        assert (r["dropped_by"] == "basic") == short, key

    for s in (0, 1, 2):
        kept = sh.read_tar_samples(sh.tar_path(out, s))
        dropped = sh.read_tar_samples(sh.tar_path(out / fs.DROPPED_DIR, s))
        assert set(kept) == {k for k, r in rows.items() if k[:5] == f"{s:05d}" and r["status"] == "kept"}
        assert set(dropped) == {k for k, r in rows.items() if k[:5] == f"{s:05d}" and r["status"] == "dropped"}
        original = sh.read_tar_samples(sh.tar_path(raw, s))
        for key, files in kept.items():
            assert files["jpg"] == original[key]["jpg"] and files["txt"] == original[key]["txt"]
            assert set(json.loads(files["json"])["clean"]) == {"basic", "dedup"}
        for key, files in dropped.items():
            assert json.loads(files["json"])["clean"]["reason"] == rows[key]["reason"]
        stats = sh.read_stats(out, s)
        assert stats["kept"] + stats["dropped"] == stats["count"] and stats["stage"] == "clean"

    totals = manifest["totals"]
    assert totals["reason_counts"]["exact_duplicate"] == 1 and totals["reason_counts"]["near_duplicate"] == 1
    assert totals["kept_fraction"] == pytest.approx(totals["kept"] / 62)
    assert manifest["inputs"] == [{"path": str(raw.resolve()), "digest": manifest["inputs"][0]["digest"]}]
    assert len(manifest["inputs"][0]["digest"]) == 64 and manifest["config_hash"] and manifest["content_hash"]


def test_mlflow_run(cleaned):
    """The run is in experiment `clean` with kept/dropped counts by reason and the dropped-examples sheet."""
    import mlflow

    _, manifest, _ = cleaned
    client = mlflow.MlflowClient()
    run = client.get_run(manifest["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "clean"
    m = run.data.metrics
    assert m["kept_fraction"] == pytest.approx(manifest["totals"]["kept_fraction"])
    assert m["dropped_exact_duplicate"] == 1 and m["dropped_near_duplicate"] == 1
    assert m["kept"] + m["dropped"] == m["samples"] == 62 and m["step_dedup_dropped"] == 2
    assert m["shards"] == 3 and m["shards_processed"] == 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"manifest.json", "dropped_examples.png", "config.yaml"} <= artifacts


def test_resume_skips_complete_shards(raw, cleaned):
    """A rerun rewrites only incomplete shards, from the persisted plan, with the same result."""
    out, manifest, cfg = cleaned
    plan_mtime = (out / PLAN_DIR / PLAN_FILE).stat().st_mtime_ns
    before = pq.read_table(sh.parquet_path(out, 1)).to_pylist()
    stats0 = sh.stats_path(out, 0).stat().st_mtime_ns
    sh.stats_path(out, 1).unlink()  # shard 1 reads as interrupted
    again = clean(raw, out, cfg, show_progress=False)
    assert again["run"]["shards_processed"] == 1 and again["run"]["planned"] is False
    assert sh.stats_path(out, 0).stat().st_mtime_ns == stats0
    assert (out / PLAN_DIR / PLAN_FILE).stat().st_mtime_ns == plan_mtime
    assert pq.read_table(sh.parquet_path(out, 1)).to_pylist() == before
    assert again["totals"] == manifest["totals"]
    third = clean(raw, out, cfg, show_progress=False)
    assert third["run"]["shards_processed"] == 0


def test_changed_config_on_same_output_is_refused(raw, cleaned):
    """Another config into an output holding shards is a one-line InputError, not a mix."""
    out, _, _ = cleaned
    cfg = load_config(CleanConfig, DEMO, BASE + ["dedup.near_threshold=6"])
    with pytest.raises(InputError, match="different input or config"):
        clean(raw, out, cfg, show_progress=False)


def test_bad_inputs_and_config(tmp_path, ray_local):
    """No _SUCCESS in the input, an unknown step, or clipscore without a checkpoint fail before any work."""
    from pipelines.cli import main

    (tmp_path / "in").mkdir()
    with pytest.raises(InputError, match="_SUCCESS"):
        clean(tmp_path / "in", tmp_path / "out", CleanConfig(), show_progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="unknown clean step 'dedupe'"):
        load_config(CleanConfig, None, ["steps=[basic,dedupe]"])
    with pytest.raises(ConfigError, match="clipscore.checkpoint"):
        load_config(CleanConfig, None, ["steps=[clipscore]"])
    assert main(["clean", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")]) == 2


def test_clipscore_top_fraction_stage(raw, tmp_path, ray_local, mlflow_store):
    """clipscore runs as an actor pool: KEY.json gets scores, the top half of basic's survivors is kept,
    and the score histogram is logged."""
    import mlflow
    import open_clip
    import torch

    from vlm.models.clip.build import export_clip, model_config

    torch.manual_seed(0)
    mcfg = model_config("vlm-clip-tiny")
    export_clip(open_clip.CLIP(**mcfg).state_dict(), mcfg, tmp_path / "clip", "vlm-clip-tiny")
    overrides = BASE + [
        "steps=[basic,clipscore]",
        f"clipscore.checkpoint={tmp_path / 'clip'}",
        "clipscore.mode=top_fraction",
        "clipscore.top_fraction=0.5",
        "clipscore.batch_size=16",
        "clipscore.num_cpus=0.5",
    ]
    cfg = load_config(CleanConfig, DEMO, overrides)
    manifest = clean(raw, tmp_path / "out", cfg, show_progress=False)
    stats = manifest["totals"]["step_stats"]
    assert stats["clipscore"]["kept"] == round(0.5 * stats["basic"]["kept"])
    kept = sh.read_tar_samples(sh.tar_path(tmp_path / "out", 0))
    scores = [json.loads(f["json"])["clean"]["clipscore"]["score"] for f in kept.values()]
    assert scores and all(-1.0 <= s <= 1.0 for s in scores)
    cutoff = json.loads(next(iter(kept.values()))["json"])["clean"]["clipscore"]["cutoff"]
    assert min(scores) >= cutoff
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(manifest["mlflow_run_id"])}
    assert "clipscore_histogram.png" in artifacts
