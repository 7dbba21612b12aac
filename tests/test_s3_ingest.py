"""Ingest with s3:// URL lists and an s3:// output, on the real local S3 server (moto, its own process)
and the local test web: the same shards as a local-disk ingest of the same list, resume after a kill,
--retry-failed, globs, and one-line errors for a bucket or endpoint that is not there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.ingest import ingest
from vlm import storage
from vlm.data import shards as sh
from vlm.errors import InputError
from vlm.testbed.url_lists import make_url_rows, write_url_list

# The same fast download settings, config helper and CLI runner as the local-disk ingest tests.
from test_ingest import FAST, ROOT, cfg_for  # isort: skip
from test_ingest import _cli as cli  # isort: skip

pytestmark = pytest.mark.slow

# For lists without deliberately slow URLs: a cold render of a 1024 px PNG on a busy machine can take
# longer than FAST's 1 s, which would make one run's status differ from another's.
PATIENT = "download.timeout_s=10"
SLOW_TIMEOUT = "download.timeout_s=3"  # the local web's slow URLs answer after 5 s: they time out


def upload(local: Path, url: str) -> str:
    storage.write_bytes(url, local.read_bytes())
    return url


def rows_of(out) -> list[tuple]:
    rows = [r for s in sh.complete_shards(out) for r in sh.read_parquet(sh.parquet_path(out, s)).to_pylist()]
    return sorted((r["key"], r["url"], r["caption"], r["status"]) for r in rows)


def samples_of(out, shards: int) -> dict[str, dict[str, bytes]]:
    """Every sample's files; KEY.json less `attempts` (a timeout on a busy machine retries one run's
    fetch and not the other's: how it was fetched, not what it holds)."""
    samples: dict = {}
    for shard in range(shards):
        samples.update(sh.read_tar_samples(sh.tar_path(out, shard)))
    for files in samples.values():
        if "json" in files:
            meta = json.loads(files["json"])
            meta.pop("attempts")
            files["json"] = json.dumps(meta, sort_keys=True).encode()
    return samples


def differing(a: dict, b: dict) -> list:
    """(key, ext) of the sample files that differ between two {key: {ext: bytes}} sets."""
    return sorted(
        (k, e)
        for k in a.keys() | b.keys()
        for e in a.get(k, {}).keys() | b.get(k, {}).keys()
        if a.get(k, {}).get(e) != b.get(k, {}).get(e)
    )


def shard_layout(prefix: str, shards: int) -> set[str]:
    names = {"manifest.json", "_SUCCESS", "config.yaml", "_plan/plan.json"}
    for s in range(shards):
        names |= {f"{s:05d}.tar", f"{s:05d}.parquet", f"{s:05d}_stats.json", f"_plan/inputs/{s:05d}.parquet"}
    return {f"{prefix}/{n}" for n in names}


def objects(s3, url: str) -> set[str]:
    """Object keys under `url`, less the prefix's own directory marker ("raw/", 0 bytes): pyarrow's
    S3 delete_file leaves one behind on purpose (a rerun's write probe), and readers never see it."""
    prefix = url.split("://", 1)[1].split("/", 1)[1]
    return set(s3.keys(url)) - {f"{prefix}/"}


@pytest.fixture(scope="module")
def lists(tmp_path_factory, web, s3, ray_local, mlflow_store):
    """One URL list (40 images, 2 deterministic 404s) as one parquet and as two parts on S3, and a
    local-disk ingest of it to compare with."""
    tmp = tmp_path_factory.mktemp("s3-ingest")
    rows = make_url_rows(web.base_url, 40, seed=21, failures={"404": 2})
    whole = write_url_list(rows, tmp / "all.parquet")
    bucket = s3.bucket()
    upload(whole, f"{bucket}/lists/all.parquet")
    for i, part in enumerate((rows[:25], rows[25:])):
        upload(write_url_list(part, tmp / f"part-{i}.parquet"), f"{bucket}/lists/part-{i}.parquet")
    local = ingest(str(whole), tmp / "local", cfg_for("output.samples_per_shard=12", PATIENT), show_progress=False)
    return {"bucket": bucket, "rows": rows, "local": tmp / "local", "manifest": local}


def test_s3_list_to_s3_output_matches_local_disk(lists, s3, web):
    """s3:// list -> s3:// shards: the published layout, and tars equal to a local-disk ingest."""
    bucket, local = lists["bucket"], lists["local"]
    out = f"{bucket}/raw"
    manifest = ingest(
        f"{bucket}/lists/all.parquet", out, cfg_for("output.samples_per_shard=12", PATIENT), show_progress=False
    )
    assert manifest["num_shards"] == 4 and manifest["totals"] == lists["manifest"]["totals"]
    assert manifest["totals"]["status_counts"] == {"failed_to_download": 2, "success": 38}
    assert manifest["inputs"][0]["path"] == f"{bucket}/lists/all.parquet"
    # The input's digest is its content's: the same as the local copy's.
    assert manifest["inputs"][0]["digest"] == lists["manifest"]["inputs"][0]["digest"]
    keys = objects(s3, out)
    assert keys == shard_layout("raw", 4), sorted(keys ^ shard_layout("raw", 4))
    assert sh.read_manifest(out)["shards"] == [f"{s:05d}.tar" for s in range(4)]
    assert rows_of(out) == rows_of(local)
    assert not differing(samples_of(out, 4), samples_of(local, 4))  # byte for byte: images, captions, metadata

    before = web.hits()
    again = ingest(
        f"{bucket}/lists/all.parquet", out, cfg_for("output.samples_per_shard=12", PATIENT), show_progress=False
    )
    assert again["run"]["shards_processed"] == 0 and web.hits() == before
    assert objects(s3, out) == keys

    storage.delete(sh.stats_path(out, 2))  # shard 2 loses its completion marker: only it is redone
    redo = ingest(
        f"{bucket}/lists/all.parquet", out, cfg_for("output.samples_per_shard=12", PATIENT), show_progress=False
    )
    assert redo["run"]["shards_processed"] == 1 and samples_of(out, 4) == samples_of(local, 4)
    assert objects(s3, out) == keys

    with pytest.raises(InputError, match="different input or config"):
        ingest(
            f"{bucket}/lists/all.parquet", out, cfg_for("output.samples_per_shard=12", PATIENT, "image.image_size=32")
        )


def test_cli_glob_of_s3_parts(lists, s3, ray_local):
    """`vlm ingest --input s3://b/lists/part-*.parquet --output s3://...` (a CLI process on the shared
    Ray): the two parts, in order, make the same shards as the one list (all.parquet is not matched)."""
    bucket, local = lists["bucket"], lists["local"]
    out = f"{bucket}/from-parts"
    address = ray_local.get_runtime_context().gcs_address
    res = cli(
        "ingest",
        "--input",
        f"{bucket}/lists/part-*.parquet",
        "--output",
        out,
        "--address",
        address,
        *FAST,
        "output.samples_per_shard=12",
        PATIENT,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"output: {out}  (4 shard(s), _SUCCESS written)" in res.stdout
    manifest = sh.read_manifest(out)
    assert [i["path"] for i in manifest["inputs"]] == [f"{bucket}/lists/part-{i}.parquet" for i in range(2)]
    assert objects(s3, out) == shard_layout("from-parts", 4)
    assert rows_of(out) == rows_of(local)
    assert not differing(samples_of(out, 4), samples_of(local, 4))


def test_retry_failed_on_s3(tmp_path, s3, web, ray_local, mlflow_store):
    """--retry-failed with an s3:// output re-requests only retryable failures; a shard with nothing
    to retry is left as it was."""
    base = web.base_url
    rows = (
        [{"url": f"{base}/img/{i}.jpg?w=96&h=96&s=515", "caption": f"ok {i}"} for i in range(6)]
        + [{"url": f"{base}/flaky/2/{i}.jpg?s=515", "caption": f"flaky {i}"} for i in range(3)]
        + [{"url": f"{base}/status/404?s=515", "caption": "gone"}]
    )
    bucket = s3.bucket()
    src = upload(write_url_list(rows, tmp_path / "urls.jsonl"), f"{bucket}/urls.jsonl")
    out = f"{bucket}/out"
    cfg = cfg_for("output.samples_per_shard=4", PATIENT)
    first = ingest(src, out, cfg, show_progress=False)
    assert first["totals"]["status_counts"] == {"failed_to_download": 4, "success": 6}
    tar0 = storage.read_bytes(sh.tar_path(out, 0))
    keys = objects(s3, out)
    img_hits, flaky_hits = web.hits("/img/"), web.hits("/flaky/")
    second = ingest(src, out, cfg, retry_failed=True, show_progress=False)
    assert second["totals"]["status_counts"] == {"failed_to_download": 1, "success": 9}
    assert web.hits("/img/") == img_hits and web.hits("/flaky/") == flaky_hits + 3
    assert len(samples_of(out, 3)) == 9
    assert storage.read_bytes(sh.tar_path(out, 0)) == tar0
    assert objects(s3, out) == keys  # republished in place: nothing extra, no temp objects


def test_resume_after_kill_on_s3_matches_uninterrupted_run(tmp_path, s3, web, ray_local, mlflow_store):
    """SIGKILL `vlm ingest ... --output s3://...` mid-way, rerun it: the same objects and shards as an
    uninterrupted run, nothing duplicated, no temp objects."""
    # Slow urls make each shard take a couple of seconds, so the kill lands mid-job.
    rows = make_url_rows(web.base_url, 48, seed=25, failures={"slow": 6, "404": 2})
    bucket = s3.bucket()
    src = upload(write_url_list(rows, tmp_path / "urls.tsv"), f"{bucket}/urls.tsv")
    killed, clean = f"{bucket}/killed", f"{bucket}/clean"
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "pipelines.cli", "-q", "ingest", "--input", src, "--output", killed]
    cmd += ["--address", address, *FAST, SLOW_TIMEOUT, "output.samples_per_shard=6", "ray.concurrency=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not sh.complete_shards(killed) and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done_at_kill = sh.complete_shards(killed)
    assert 0 < len(done_at_kill) < 8, ("the kill should land after some shards and before all", proc.stderr.read())
    assert not storage.exists(f"{killed}/_SUCCESS")

    resumed = ingest(src, killed, cfg_for("output.samples_per_shard=6", SLOW_TIMEOUT), show_progress=False)
    assert 0 < resumed["run"]["shards_processed"] <= 8 - len(done_at_kill)
    ingest(src, clean, cfg_for("output.samples_per_shard=6", SLOW_TIMEOUT), show_progress=False)
    assert rows_of(killed) == rows_of(clean) and len(rows_of(killed)) == len(rows)
    assert {k.split("/", 1)[1] for k in objects(s3, killed)} == {k.split("/", 1)[1] for k in objects(s3, clean)}
    assert objects(s3, killed) == shard_layout("killed", 8)  # no temp or duplicate objects
    assert set(samples_of(killed, 8)) == {r[0] for r in rows_of(clean) if r[3] == "success"}


def test_missing_bucket_or_endpoint_is_one_line_before_any_work(lists, s3, tmp_path, monkeypatch):
    """A bucket that is not there (as output or as input) or an unreachable endpoint: one line naming
    the URL, before Ray or any write; the CLI exits 2."""
    bucket = lists["bucket"]
    src = f"{bucket}/lists/all.parquet"
    cfg = cfg_for()
    with pytest.raises(InputError, match=r"^s3://no-such-bucket-vlm/raw: bucket no-such-bucket-vlm does not exist$"):
        ingest(src, "s3://no-such-bucket-vlm/raw", cfg, show_progress=False)
    empty = s3.bucket()
    with pytest.raises(InputError, match=r"^input s3://no-such-bucket-vlm/l\.parquet: bucket no-such-bucket-vlm does"):
        ingest("s3://no-such-bucket-vlm/l.parquet", f"{empty}/out", cfg, show_progress=False)
    with pytest.raises(InputError, match=r"^input s3://no-such-bucket-vlm/part-\*\.parquet: bucket no-such-bucket"):
        ingest("s3://no-such-bucket-vlm/part-*.parquet", f"{empty}/out", cfg, show_progress=False)
    with pytest.raises(InputError, match=rf"^input file not found: {bucket}/lists/missing\.parquet$"):
        ingest(f"{bucket}/lists/missing.parquet", f"{empty}/out", cfg, show_progress=False)
    with pytest.raises(InputError, match=rf"^no input files match {bucket}/lists/nothing-\*\.csv$"):
        ingest(f"{bucket}/lists/nothing-*.csv", f"{empty}/out", cfg, show_progress=False)
    assert s3.keys(empty) == []  # nothing written for a refused run

    res = cli("ingest", "--input", "s3://no-such-bucket-vlm/l.parquet", "--output", f"{empty}/out", *FAST)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "input s3://no-such-bucket-vlm/l.parquet: bucket no-such-bucket-vlm does not exist" in lines[0]
    assert s3.keys(empty) == []

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(InputError, match=r"^s3://.*/all\.parquet: cannot reach the storage endpoint http://127"):
        ingest(src, tmp_path / "out", cfg, show_progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl", "txt"])
def test_url_list_formats_read_from_s3_as_from_disk(fmt, tmp_path, s3):
    """Every URL-list format streams from s3:// to the same rows (and the same digest) as from disk;
    a prefix expands to the list files in it."""
    from vlm.data.urls import InputConfig, expand_inputs, file_digest, iter_rows

    rows = [{"url": f"http://example.test/{i}.jpg", "caption": f"caption {i}", "label": i} for i in range(7)]
    local = write_url_list(rows, tmp_path / f"urls.{fmt}")
    bucket = s3.bucket()
    url = upload(local, f"{bucket}/lists/urls.{fmt}")
    storage.write_bytes(f"{bucket}/lists/README.md", b"not a list")
    assert expand_inputs(f"{bucket}/lists") == expand_inputs(f"{bucket}/lists/") == [url]
    cfg = InputConfig(caption_col=None if fmt == "txt" else "caption", batch_rows=3)
    got = [r for b in iter_rows(expand_inputs(url), cfg) for r in b]
    assert got == [r for b in iter_rows([local], cfg) for r in b] and len(got) == 7
    assert file_digest(url)["sha256"] == file_digest(local)["sha256"]
    assert file_digest(url)["size"] == local.stat().st_size and file_digest(url)["path"] == url
