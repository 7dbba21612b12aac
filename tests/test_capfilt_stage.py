"""The CapFilt stage for real: Ray Data actor pools on a local Ray, tiny BLIP models, real MLflow."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.capfilt import CapfiltConfig, capfilt, filter_quality
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


def _all_keys(out: Path) -> list[str]:
    keys = []
    for where in (out, out / "_dropped"):
        for s in sh.complete_shards(out):
            keys += list(sh.read_tar_samples(sh.tar_path(where, s)))
    return keys


def test_stage_writes_chosen_captions_candidates_and_dropped_reasons(noisy_shards, tmp_path, ray_local, mlflow_store):
    """Kept samples carry the chosen caption and every scored candidate; dropped ones a reason."""
    import mlflow

    out = tmp_path / "out"
    manifest = capfilt(noisy_shards, out, cfg_for("blip.itm_threshold=0.5"), show_progress=False)
    assert (out / "_SUCCESS").is_file() and manifest["num_shards"] == 3
    keys = _all_keys(out)
    assert len(keys) == len(set(keys)) == 60
    totals = manifest["totals"]
    assert totals["kept"] + totals["dropped"] == 60
    for s in range(3):
        for files in sh.read_tar_samples(sh.tar_path(out, s)).values():
            meta = json.loads(files["json"])["capfilt"]
            assert files["txt"].decode() == meta["chosen"]
            sources = [c["source"] for c in meta["candidates"]]
            assert sources == ["original", "synthetic"]
            assert all(0.0 <= c["score"] <= 1.0 for c in meta["candidates"])
            assert max(c["score"] for c in meta["candidates"] if c["kept"]) >= 0.5
        for files in sh.read_tar_samples(sh.tar_path(out / "_dropped", s)).values():
            meta = json.loads(files["json"])["capfilt"]
            assert meta["reason"] == "no caption scored >= 0.5"
            assert all(c["score"] < 0.5 for c in meta["candidates"])
        rows = pq.read_table(sh.parquet_path(out, s)).to_pylist()
        assert len(rows) == 20 and {r["status"] for r in rows} <= {"kept", "dropped"}
        assert all("noisy" in r and r["original_score"] is not None for r in rows)
    # The known noise labels give the filter's precision/recall.
    assert manifest["quality"]["labelled"] == 60
    run = mlflow.MlflowClient(mlflow_store).get_run(manifest["mlflow_run_id"])
    assert run.data.metrics["kept"] == totals["kept"]
    assert "filter_precision" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient(mlflow_store).list_artifacts(run.info.run_id)}
    assert {"score_histogram.png", "gallery.png", "manifest.json"} <= artifacts


def test_rerun_redoes_only_incomplete_shards(noisy_shards, tmp_path, ray_local, mlflow_store):
    """A shard whose stats file is missing is redone; complete shards are not touched."""
    out = tmp_path / "out"
    cfg = cfg_for("blip.itm_threshold=0.0")
    capfilt(noisy_shards, out, cfg, show_progress=False)
    before = {s: sh.tar_path(out, s).stat().st_mtime_ns for s in range(3)}
    sh.stats_path(out, 1).unlink()  # as if killed while writing shard 1
    (out / "_SUCCESS").unlink()
    manifest = capfilt(noisy_shards, out, cfg, show_progress=False)
    after = {s: sh.tar_path(out, s).stat().st_mtime_ns for s in range(3)}
    assert after[0] == before[0] and after[2] == before[2] and after[1] != before[1]
    assert manifest["totals"]["kept"] == 60  # threshold 0 keeps everything
    assert sorted(_all_keys(out)) == sorted(set(_all_keys(out)))


def test_refuses_output_of_another_config(noisy_shards, tmp_path, ray_local, mlflow_store):
    """Reusing an output directory with a different filter config is a clear error, not a mix."""
    out = tmp_path / "out"
    (out).mkdir()
    (out / "_capfilt_plan.json").write_text(json.dumps({"config_hash": "other", "input": str(noisy_shards)}))
    with pytest.raises(InputError, match="another config"):
        capfilt(noisy_shards, out, cfg_for(), show_progress=False)


def test_missing_model_dir_is_a_one_line_error(noisy_shards, tmp_path):
    """A captioner path that does not exist fails before any work, naming the key."""
    with pytest.raises(InputError, match="blip.pretrained"):
        capfilt(noisy_shards, tmp_path / "o", cfg_for("blip.pretrained=/nonexistent/blip"), show_progress=False)
    assert not (tmp_path / "o").exists()


def test_filter_quality_counts():
    """Precision/recall of noise detection from confusion counts."""
    q = filter_quality({"tp": 8, "fp": 2, "fn": 2, "tn": 88})
    assert q["precision"] == pytest.approx(0.8) and q["recall"] == pytest.approx(0.8)
    assert filter_quality({}) == {}


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
