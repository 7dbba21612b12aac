"""The shard-stage driver: output checks before Ray, totals, and one set of MLflow metric names
across ingest, clean and capfilt (a real local Ray, a real HTTP server, a real MLflow store)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipelines import shard_stage
from pipelines.capfilt import CapfiltConfig, capfilt
from pipelines.clean import CleanConfig, clean
from pipelines.ingest import IngestConfig, ingest
from vlm.config import load_config
from vlm.errors import InputError
from vlm.testbed.digit_shards import write_digit_shards
from vlm.testbed.url_lists import make_url_rows, write_url_list

ROOT = Path(__file__).resolve().parents[1]
COMMON = {"samples", "kept", "dropped", "kept_fraction", "images_per_s", "duration_s", "shards", "shards_processed"}


def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot write into (a 0o500 dir; as root, a read-only system dir)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    for candidate in (locked, Path("/sys"), Path("/proc")):
        try:
            fd, name = tempfile.mkstemp(dir=candidate)
        except OSError:
            return candidate
        os.close(fd)
        os.unlink(name)
    pytest.skip("no directory here refuses writes")


def test_aggregate_sums_counts_and_merges_dicts():
    """Numbers add up, dicts of numbers merge by key; shard ids, stage names and durations do not."""
    totals = shard_stage.aggregate(
        [
            {"shard": 0, "stage": "x", "count": 3, "kept": 2, "reason_counts": {"a": 1}, "duration_s": 1.0},
            {"shard": 1, "stage": "x", "count": 4, "kept": 1, "reason_counts": {"a": 2, "b": 1}, "duration_s": 2.0},
        ]
    )
    assert totals == {"count": 7, "kept": 3, "reason_counts": {"a": 3, "b": 1}}


@pytest.mark.parametrize("stage", ["ingest", "clean", "capfilt"])
def test_output_that_is_a_file_or_unwritable_fails_before_ray(stage, tmp_path):
    """An output path that is a file, or under an unwritable directory, is one InputError naming it."""
    import ray

    if stage == "ingest":
        src = write_url_list([{"url": "http://127.0.0.1:9/a.jpg", "caption": "x"}], tmp_path / "u.parquet")

        def run(out):
            return ingest(str(src), out, IngestConfig(), show_progress=False)
    else:
        src = tmp_path / "in"
        write_digit_shards(src, 4, samples_per_shard=4, image_size=32)
        fn, cls = (clean, CleanConfig) if stage == "clean" else (capfilt, CapfiltConfig)

        def run(out):
            return fn(src, out, cls(), show_progress=False)

    started = ray.is_initialized()
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    with pytest.raises(InputError, match=re.escape(f"output {a_file} is a file, not a directory")):
        run(a_file)
    with pytest.raises(InputError, match=re.escape(f"cannot create output {a_file / 'sub'}: {a_file} is a file")):
        run(a_file / "sub")
    locked = _unwritable_dir(tmp_path)
    with pytest.raises(InputError, match=re.escape(f"cannot write output {locked / 'out'}: {locked} is not writable")):
        run(locked / "out")
    assert ray.is_initialized() == started  # refused before Ray was started


def test_cli_output_that_is_a_file_exits_2_with_one_line(tmp_path):
    """`vlm ingest --output FILE`: one line naming the path, exit 2, in well under Ray's start-up time."""
    src = write_url_list([{"url": "http://127.0.0.1:9/a.jpg", "caption": "x"}], tmp_path / "u.parquet")
    a_file = tmp_path / "out.txt"
    a_file.write_text("keep me")
    res = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "-q", "ingest", "--input", str(src), "--output", str(a_file)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines == [f"vlm ingest: error: output {a_file} is a file, not a directory"], res.stderr
    assert a_file.read_text() == "keep me"


@pytest.mark.slow
def test_three_stages_log_the_same_metric_names(tmp_path, web, ray_local, mlflow_store):
    """ingest -> clean -> capfilt, each logs the common names, and its drops as dropped_<reason>."""
    import mlflow

    rows = make_url_rows(web.base_url, 30, seed=2, failures={"404": 3}, noisy_fraction=0.3)
    src = write_url_list(rows, tmp_path / "urls.parquet")
    fast = ["download.allow_private_networks=true", "download.timeout_s=5", "output.samples_per_shard=10"]
    raw = ingest(str(src), tmp_path / "raw", load_config(IngestConfig, None, fast), show_progress=False)
    cleaned = clean(
        tmp_path / "raw", tmp_path / "clean", load_config(CleanConfig, None, ["steps=[dedup]"]), show_progress=False
    )
    capfilt_cfg = load_config(
        CapfiltConfig, None, ["captioner.batch_size=8", "filter.batch_size=8", "blip.max_length=6", "blip.min_length=1"]
    )
    capfilted = capfilt(tmp_path / "clean", tmp_path / "capfilt", capfilt_cfg, show_progress=False)
    client = mlflow.MlflowClient(mlflow_store)
    names = {}
    for manifest in (raw, cleaned, capfilted):
        metrics = client.get_run(manifest["mlflow_run_id"]).data.metrics
        names[manifest["stage"]] = set(metrics)
        assert COMMON <= set(metrics), (manifest["stage"], sorted(COMMON - set(metrics)))
        assert metrics["samples"] == manifest["totals"]["count"] > 0
        assert metrics["kept"] + metrics["dropped"] == metrics["samples"]
        assert sum(v for k, v in metrics.items() if k.startswith("dropped_")) == metrics["dropped"]
    assert names["ingest"] & names["clean"] & names["capfilt"] >= COMMON
    assert "dropped_failed_to_download" in names["ingest"]
    assert {"success_rate", "bytes"} <= names["ingest"] and "step_dedup_dropped" in names["clean"]
    assert "filter_precision" in names["capfilt"]


@pytest.mark.parametrize("stage", ["clean", "capfilt"])
def test_a_broken_input_shard_fails_before_ray_naming_it(stage, tmp_path):
    """A truncated input tar or one of foreign files: one InputError naming the shard, nothing written."""
    src = tmp_path / "in"
    write_digit_shards(src, 30, samples_per_shard=10, image_size=16)
    shards = sorted(src.glob("*.tar"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    run, cfg = (clean, CleanConfig()) if stage == "clean" else (capfilt, CapfiltConfig())
    with pytest.raises(InputError, match=rf"shard {re.escape(str(shards[1]))} is truncated"):
        run(str(src), tmp_path / "out", cfg, show_progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
