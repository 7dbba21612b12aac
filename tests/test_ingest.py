"""Ingest end to end: a real local Ray, a real HTTP server on 127.0.0.1, a real MLflow store."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.ingest import IngestConfig, ingest
from vlm.config import load_config
from vlm.data import shards as sh
from vlm.testbed.url_lists import make_url_rows, write_url_list

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

FAST = [
    "download.allow_private_networks=true",
    "download.timeout_s=1",
    "download.retries=1",
    "download.backoff_base_s=0.02",
    "image.image_size=64",
    "tracking.gallery_samples=8",
]


def cfg_for(*overrides: str) -> IngestConfig:
    return load_config(IngestConfig, None, [*FAST, *overrides])


def read_rows(out: Path) -> list[dict]:
    rows = []
    for shard in sh.complete_shards(out):
        rows += pq.read_table(sh.parquet_path(out, shard)).to_pylist()
    return sorted(rows, key=lambda r: r["key"])


@pytest.fixture(scope="module")
def failure_run(tmp_path_factory, web, ray_local, mlflow_store):
    """One ingest over every failure kind (plus duplicates), shared by the checks below."""
    from vlm.testbed.media import bomb_png

    bomb_png()  # built once per process (~0.3 s, several s on a loaded machine): not within the 1 s timeout
    tmp = tmp_path_factory.mktemp("ingest")
    rows = make_url_rows(web.base_url, 70, seed=1, duplicates=3)
    src = write_url_list(rows, tmp / "urls.parquet")
    out = tmp / "out"
    manifest = ingest(str(src), out, cfg_for("output.samples_per_shard=25"), show_progress=False)
    return rows, out, manifest


def test_every_failure_kind_lands_in_its_status(failure_run):
    """Each served failure ends in the status a correct downloader gives it, with an error."""
    rows, out, _ = failure_run
    got = read_rows(out)
    assert len(got) == len(rows)  # one parquet row per input row, failures included
    for expected, row in zip(rows, got):
        assert row["url"] == expected["url"]
        assert row["status"] == expected["expected_status"], (expected["kind"], row["error_message"])
        if row["status"] != "success":
            assert row["error_message"], expected["kind"]
    kinds = {e["kind"]: r for e, r in zip(rows, got)}
    assert "timeout" in kinds["slow"]["error_message"] and kinds["slow"]["retryable"]
    assert "redirect loop" in kinds["loop"]["error_message"]
    assert "decompression bomb" in kinds["bomb"]["error_message"]
    assert "content type text/html" in kinds["wrongtype"]["error_message"]
    assert kinds["ratelimit"]["attempts"] == 2 and kinds["flaky"]["attempts"] == 2


def test_carried_columns_and_hashes(failure_run):
    """Extra input columns are carried into parquet and KEY.json; sha256 is the source bytes'."""
    rows, out, _ = failure_run
    got = read_rows(out)
    ok = [(e, r) for e, r in zip(rows, got) if r["status"] == "success"]
    assert all(r["label"] == e["label"] and r["kind"] == e["kind"] for e, r in ok)
    assert all(len(r["sha256"]) == 64 for _, r in ok)
    assert len({r["sha256"] for _, r in ok}) == len(ok)


def test_shards_read_back_with_webdataset(failure_run):
    """The tars read with the webdataset library and hold exactly what the parquet says."""
    import webdataset as wds
    from PIL import Image

    _, out, manifest = failure_run
    got = {r["key"]: r for r in read_rows(out) if r["status"] == "success"}
    urls = [str(out / name) for name in manifest["shards"]]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        seen[sample["__key__"]] = sample
    assert set(seen) == set(got)
    for key, sample in seen.items():
        row = got[key]
        assert sample["txt"].decode() == row["caption"]
        meta = json.loads(sample["json"])
        assert meta["url"] == row["url"] and meta["sha256"] == row["sha256"]
        img = Image.open(io.BytesIO(sample["jpg"]))
        assert img.size == (row["width"], row["height"]) == (64, 64)


def test_stats_manifest_and_mlflow(failure_run, mlflow_store):
    """Stats per shard, _SUCCESS + manifest, and an MLflow run with counts and a contact sheet."""
    import mlflow

    rows, out, manifest = failure_run
    assert (out / "_SUCCESS").exists() and manifest["num_shards"] == 3
    assert manifest["totals"]["count"] == len(rows)
    stats = [sh.read_stats(out, s) for s in range(3)]
    assert sum(s["count"] for s in stats) == len(rows)
    assert (out / "config.yaml").is_file()
    client = mlflow.MlflowClient(mlflow_store)
    run = client.get_run(manifest["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    expected_ok = sum(r["expected_status"] == "success" for r in rows)
    assert run.data.metrics["kept"] == manifest["totals"]["successes"] == expected_ok
    assert run.data.metrics["samples"] == len(rows) and run.data.metrics["dropped"] == len(rows) - expected_ok
    assert run.data.metrics["dropped_failed_to_download"] == manifest["totals"]["status_counts"]["failed_to_download"]
    assert run.data.metrics["images_per_s"] > 0
    assert run.data.params["image.image_size"] == "64"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"contact_sheet.png", "config.yaml", "manifest.json"} <= artifacts


def test_rerun_skips_complete_shards(failure_run, web):
    """A rerun over a complete output downloads nothing and keeps the same result."""
    rows, out, manifest = failure_run
    before = web.hits()
    again = ingest(str(out.parent / "urls.parquet"), out, cfg_for("output.samples_per_shard=25"), show_progress=False)
    assert again["run"]["shards_processed"] == 0
    assert again["totals"] == manifest["totals"]
    assert web.hits() == before


def test_changed_config_on_same_output_is_refused(failure_run):
    """Reusing an output with a config that changes its content fails instead of mixing shards."""
    from vlm.errors import InputError

    _, out, _ = failure_run
    with pytest.raises(InputError, match="different input or config"):
        ingest(str(out.parent / "urls.parquet"), out, cfg_for("output.samples_per_shard=25", "image.image_size=32"))


def test_retry_failed_redoes_only_retryable(tmp_path, web, ray_local, mlflow_store):
    """--retry-failed re-requests only retryable failures and keeps everything else as it was."""
    base = web.base_url
    rows = (
        [{"url": f"{base}/img/{i}.jpg?w=96&h=96&s=77", "caption": f"ok {i}"} for i in range(6)]
        + [{"url": f"{base}/flaky/2/{i}.jpg?s=77", "caption": f"flaky {i}"} for i in range(3)]
        + [{"url": f"{base}/status/404?s=77", "caption": "gone"}]
    )
    src = write_url_list(rows, tmp_path / "urls.jsonl")
    out = tmp_path / "out"
    first = ingest(str(src), out, cfg_for("output.samples_per_shard=4"), show_progress=False)
    assert first["totals"]["status_counts"] == {"failed_to_download": 4, "success": 6}
    tar_before = {s: sh.tar_path(out, s).read_bytes() for s in range(first["num_shards"])}
    img_hits, missing_hits, flaky_hits = web.hits("/img/"), web.hits("/status/404"), web.hits("/flaky/")

    second = ingest(str(src), out, cfg_for("output.samples_per_shard=4"), retry_failed=True, show_progress=False)
    assert second["totals"]["status_counts"] == {"failed_to_download": 1, "success": 9}
    assert web.hits("/img/") == img_hits  # successes were not downloaded again
    assert web.hits("/status/404") == missing_hits  # a 404 is not retryable
    assert web.hits("/flaky/") == flaky_hits + 3
    got = read_rows(out)
    assert [r["key"] for r in got] == [sh.sample_key(i // 4, i % 4) for i in range(10)]
    samples = {}
    for s in range(second["num_shards"]):
        samples.update(sh.read_tar_samples(sh.tar_path(out, s)))
    assert len(samples) == 9
    assert sh.tar_path(out, 0).read_bytes() == tar_before[0]  # a shard with nothing to retry is untouched


def test_private_addresses_refused_end_to_end(tmp_path, web, ray_local, mlflow_store):
    """Without allow_private_networks every 127.0.0.1 URL is refused and nothing is requested."""
    rows = make_url_rows(web.base_url, 12, seed=3, failures=False)
    src = write_url_list(rows, tmp_path / "urls.csv")
    before = web.hits()
    manifest = ingest(str(src), tmp_path / "out", cfg_for("download.allow_private_networks=false"), show_progress=False)
    assert manifest["totals"]["status_counts"] == {"skipped_unsafe_url": 12}
    assert web.hits() == before


def test_bad_utf8_rows_and_long_captions_end_to_end(tmp_path, web, ray_local, mlflow_store):
    """A CSV with one non-UTF-8 row among 150 and one runaway caption ingests the rest, and says so."""
    rows = make_url_rows(web.base_url, 150, seed=4, failures=False)
    src = write_url_list(rows, tmp_path / "urls.csv")
    lines = src.read_bytes().split(b"\n")
    lines[5] = lines[5] + b"\xff"  # a bad byte at the end of data row 5 (line 6)
    src.write_bytes(b"\n".join(lines))
    manifest = ingest(str(src), tmp_path / "out", cfg_for("input.max_caption_chars=8"), show_progress=False)
    totals = manifest["totals"]
    assert totals["count"] == 149
    assert totals["input_rows_skipped"] == 1
    assert totals["captions_truncated"] > 0
    plan = json.loads((tmp_path / "out" / "_plan" / "plan.json").read_text())
    assert plan["skipped_lines"] == [f"{src}:6"]
    stored = read_rows(tmp_path / "out")
    assert all(len(r["caption"] or "") <= 8 for r in stored)
    assert any(r["caption_truncated"] for r in stored)


def _cli(*args: str, env_extra: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "-q", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, web, ray_local, mlflow_store):
    """Kill `vlm ingest` mid-way, rerun it: the final keys and statuses equal an uninterrupted run."""
    # Slow urls make each shard take a couple of seconds, so the kill lands mid-job.
    rows = make_url_rows(web.base_url, 48, seed=5, failures={"slow": 6, "404": 2, "flaky": 2})
    src = write_url_list(rows, tmp_path / "urls.tsv")
    args = [*FAST, "output.samples_per_shard=6", "ray.concurrency=2"]
    address = ray_local.get_runtime_context().gcs_address
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "-q",
            "ingest",
            "--input",
            str(src),
            "--output",
            str(killed),
            "--address",
            address,
            *args,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not sh.complete_shards(killed) and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done_at_kill = sh.complete_shards(killed)
    assert 0 < len(done_at_kill) < 8, (
        "the kill should land after some shards and before all",
        proc.stderr.read()[-3000:],
    )
    assert not (killed / "_SUCCESS").exists()

    resumed = ingest(str(src), killed, cfg_for("output.samples_per_shard=6"), show_progress=False)
    assert 0 < resumed["run"]["shards_processed"] <= 8 - len(done_at_kill)
    ingest(str(src), tmp_path / "clean", cfg_for("output.samples_per_shard=6"), show_progress=False)
    a = [(r["key"], r["url"], r["status"]) for r in read_rows(killed)]
    b = [(r["key"], r["url"], r["status"]) for r in read_rows(tmp_path / "clean")]
    assert a == b and len(a) == len(rows)
    tar_keys = set()
    for s in range(8):
        tar_keys |= set(sh.read_tar_samples(sh.tar_path(killed, s)))
    assert tar_keys == {k for k, _, status in a if status == "success"}  # no duplicates, no loss
    assert not list(killed.glob(".*tmp*"))  # no leftovers of the killed writers


def test_cli_bad_inputs_fail_with_one_line(tmp_path):
    """Bad config keys, wrong types, missing inputs and an unreachable Ray: one line, exit 2, no output."""
    src = write_url_list([{"url": "http://127.0.0.1:9/a.jpg", "caption": "x"}], tmp_path / "u.parquet")
    out = tmp_path / "out"
    cases = [
        (["--input", str(src), "--output", str(out), "download.retires=1"], "unknown config key 'download.retires'"),
        (["--input", str(src), "--output", str(out), "image.image_size=big"], "'image.image_size' must be an integer"),
        (["--input", str(tmp_path / "missing.csv"), "--output", str(out)], "input file not found"),
        (["--input", str(src), "--output", str(out), "--config", str(tmp_path / "nope.yaml")], "config file not found"),
        (["--input", str(src), "--output", str(out), "--address", "127.0.0.1:9"], "cannot reach Ray at 127.0.0.1:9"),
    ]
    for args, message in cases:
        res = _cli("ingest", *args, env_extra={"RAY_ADDRESS": ""})
        assert res.returncode == 2, (args, res.stderr)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], res.stderr
        assert not out.exists()


def test_missing_url_column_is_named(tmp_path):
    """An input without the url column names the column and lists the ones present."""
    src = write_url_list([{"link": "http://x/a.jpg", "caption": "x"}], tmp_path / "u.jsonl")
    res = _cli("ingest", "--input", str(src), "--output", str(tmp_path / "o"), "download.allow_private_networks=true")
    assert res.returncode == 2
    assert "no url column 'url' (columns: link, caption)" in res.stderr
