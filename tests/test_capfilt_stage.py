"""The CapFilt stage for real: Ray Data actor pools on a local Ray, tiny BLIP models, real MLflow."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.capfilt import CapfiltConfig, CapfiltStage, capfilt
from vlm.config import load_config
from vlm.data import shards as sh
from vlm.errors import InputError
from vlm.testbed.digit_shards import write_digit_shards

pytestmark = pytest.mark.slow

FAST = ["captioner.batch_size=8", "filter.batch_size=8", "blip.max_length=6", "blip.min_length=1"]


def cfg_for(*overrides: str) -> CapfiltConfig:
    return load_config(CapfiltConfig, None, [*FAST, *overrides])


@pytest.fixture(scope="module")
def noisy_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("capfilt-in")
    write_digit_shards(out, 60, samples_per_shard=20, noisy_fraction=0.3, seed=1)
    return out


@pytest.fixture(scope="module")
def kept_all(noisy_shards, tmp_path_factory, ray_local, mlflow_store):
    """CapFilt at threshold 0 (everything kept, every score recorded), and the median best score:
    a threshold that splits these tiny untrained models' scores into kept and dropped halves."""
    out = tmp_path_factory.mktemp("capfilt-all") / "out"
    manifest = capfilt(noisy_shards, out, cfg_for("blip.itm_threshold=0.0"), show_progress=False)
    rows = [r for s in range(3) for r in pq.read_table(sh.parquet_path(out, s)).to_pylist()]
    best = sorted(max(r["original_score"], r["synthetic_score"] or 0.0) for r in rows)
    assert best[0] < best[-1], "the scores must differ for a threshold to split them"
    return out, manifest, (best[len(best) // 2 - 1] + best[len(best) // 2]) / 2


def _all_keys(out: Path) -> list[str]:
    keys = []
    for where in (out, out / "_dropped"):
        for s in sh.complete_shards(out):
            keys += list(sh.read_tar_samples(sh.tar_path(where, s)))
    return keys


def test_stage_writes_chosen_captions_candidates_and_dropped_reasons(noisy_shards, kept_all, tmp_path, mlflow_store):
    """Kept samples carry the chosen caption and every scored candidate; dropped ones a reason."""
    import mlflow

    out, threshold = tmp_path / "out", kept_all[2]
    manifest = capfilt(noisy_shards, out, cfg_for(f"blip.itm_threshold={threshold!r}"), show_progress=False)
    assert (out / "_SUCCESS").is_file() and manifest["num_shards"] == 3
    keys = _all_keys(out)
    assert len(keys) == len(set(keys)) == 60
    totals = manifest["totals"]
    assert totals["kept"] + totals["dropped"] == 60
    kept_files = [f for s in range(3) for f in sh.read_tar_samples(sh.tar_path(out, s)).values()]
    dropped_files = [f for s in range(3) for f in sh.read_tar_samples(sh.tar_path(out / "_dropped", s)).values()]
    # Both sides non-empty, or the checks below on each side assert nothing.
    assert kept_files and dropped_files, (len(kept_files), len(dropped_files))
    assert (len(kept_files), len(dropped_files)) == (totals["kept"], totals["dropped"])
    for s in range(3):
        for files in sh.read_tar_samples(sh.tar_path(out, s)).values():
            meta = json.loads(files["json"])["capfilt"]
            assert files["txt"].decode() == meta["chosen"]
            sources = [c["source"] for c in meta["candidates"]]
            assert sources == ["original", "synthetic"]
            assert all(0.0 <= c["score"] <= 1.0 for c in meta["candidates"])
            assert max(c["score"] for c in meta["candidates"] if c["kept"]) >= threshold
        for files in sh.read_tar_samples(sh.tar_path(out / "_dropped", s)).values():
            meta = json.loads(files["json"])["capfilt"]
            assert meta["reason"] == f"low_itm_score: no caption scored >= {threshold:g}"
            assert all(c["score"] < threshold for c in meta["candidates"])
        rows = pq.read_table(sh.parquet_path(out, s)).to_pylist()
        assert len(rows) == 20 and {r["status"] for r in rows} <= {"kept", "dropped"}
        assert all("noisy" in r and r["original_score"] is not None for r in rows)
    # The known noise labels give the filter's precision/recall.
    assert totals["quality"]["labelled"] == 60
    assert manifest["inputs"] == [{"path": str(noisy_shards.resolve()), "digest": manifest["inputs"][0]["digest"]}]
    assert len(manifest["inputs"][0]["digest"]) == 64
    run = mlflow.MlflowClient(mlflow_store).get_run(manifest["mlflow_run_id"])
    assert run.data.metrics["kept"] == totals["kept"] and run.data.metrics["dropped"] == totals["dropped"]
    assert run.data.metrics["dropped_low_itm_score"] == totals["dropped"]
    assert "filter_precision" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient(mlflow_store).list_artifacts(run.info.run_id)}
    assert {"score_histogram.png", "gallery.png", "manifest.json"} <= artifacts


def test_rerun_redoes_only_incomplete_shards(noisy_shards, kept_all, tmp_path, mlflow_store):
    """A shard whose stats file is missing is redone; complete shards are not touched."""
    out = tmp_path / "out"
    shutil.copytree(kept_all[0], out)
    cfg = cfg_for("blip.itm_threshold=0.0")
    before = {s: sh.tar_path(out, s).stat().st_mtime_ns for s in range(3)}
    sh.stats_path(out, 1).unlink()  # as if killed while writing shard 1
    (out / "_SUCCESS").unlink()
    manifest = capfilt(noisy_shards, out, cfg, show_progress=False)
    after = {s: sh.tar_path(out, s).stat().st_mtime_ns for s in range(3)}
    assert after[0] == before[0] and after[2] == before[2] and after[1] != before[1]
    assert manifest["totals"]["kept"] == 60  # threshold 0 keeps everything
    assert sorted(_all_keys(out)) == sorted(set(_all_keys(out)))


def test_refuses_output_of_another_config(noisy_shards, kept_all, tmp_path):
    """Reusing an output directory with a different filter config is a clear error, not a mix."""
    out = tmp_path / "out"
    shutil.copytree(kept_all[0], out)
    with pytest.raises(InputError, match="different input or config"):
        capfilt(noisy_shards, out, cfg_for("blip.itm_threshold=0.6"), show_progress=False)
    assert sh.read_manifest(out) == sh.read_manifest(kept_all[0])  # nothing touched


def test_missing_model_dir_is_a_one_line_error(noisy_shards, tmp_path):
    """A captioner path that does not exist fails before any work, naming the key."""
    with pytest.raises(InputError, match="blip.pretrained"):
        capfilt(noisy_shards, tmp_path / "o", cfg_for("blip.pretrained=/nonexistent/blip"), show_progress=False)
    assert not (tmp_path / "o").exists()


def test_process_shard_without_ray_matches_the_stage(noisy_shards, kept_all, tmp_path):
    """The per-shard function, called in-process, writes the same samples the actor pools wrote."""
    out, cfg = kept_all[0], cfg_for("blip.itm_threshold=0.0")
    alone = tmp_path / "alone"
    stats = CapfiltStage(cfg, noisy_shards, alone).process_shard(1)
    assert stats["count"] == stats["kept"] == 20 and sh.is_complete(alone, 1)
    # Captions are seeded per batch, and Ray cuts batches its own way: compare samples, not captions.
    keys = [r["key"] for r in pq.read_table(sh.parquet_path(alone, 1)).to_pylist()]
    assert keys == [r["key"] for r in pq.read_table(sh.parquet_path(out, 1)).to_pylist()]


def _kill_one_captioner(stop: threading.Event, killed: list) -> None:
    # GCS actor table (not the dashboard's State API: other Ray instances on the machine would
    # make its address ambiguous).
    from ray._private import state

    while not stop.is_set() and not killed:
        for a in state.actors().values():
            if "CaptionerStep" in a["ActorClassName"] and a["State"] == "ALIVE" and a.get("Pid"):
                time.sleep(2.0)  # let it take batches first
                os.kill(a["Pid"], signal.SIGKILL)
                killed.append(a["Pid"])
                return
        time.sleep(0.5)


def test_survives_a_killed_actor(tmp_path, ray_local, mlflow_store):
    """SIGKILL of a captioner actor mid-run: Ray restarts it; no sample is lost or duplicated."""
    src = tmp_path / "in"
    write_digit_shards(src, 160, samples_per_shard=20, noisy_fraction=0.3, seed=2)
    out = tmp_path / "out"
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_one_captioner, args=(stop, killed), daemon=True)
    killer.start()
    try:
        manifest = capfilt(src, out, cfg_for("captioner.batch_size=4", "blip.itm_threshold=0.5"), show_progress=False)
    finally:
        stop.set()
        killer.join(timeout=10)
    assert killed, "the captioner actor was never seen alive"
    keys = _all_keys(out)
    assert len(keys) == len(set(keys)) == 160
    assert manifest["totals"]["count"] == 160
