"""MLflow artifacts on object storage, for real: a `mlflow server` subprocess proxying artifacts to
the local S3 (moto's server), and a SQLite store whose experiments keep their artifacts in a bucket
(MLFLOW_DEFAULT_ARTIFACT_ROOT). Runs are logged through vlm.tracking as stages log them; the objects
are then looked up in the bucket and downloaded back through MLflow's client. A missing bucket
costs one warning, never the job.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from vlm import storage, tracking

pytestmark = pytest.mark.slow

AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite backend and artifacts proxied to `destination`."""

    def __init__(self, root: Path, destination: str):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}"]
        cmd += ["--artifacts-destination", destination]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    def wait(self, timeout_s: float = 120) -> MlflowServer:
        deadline = time.time() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).read()
                return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not start:\n{self.log.read_text()[-2000:]}") from None
                time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def servers(s3, tmp_path_factory):
    """Two tracking servers, started together: one proxying to a fresh bucket, one to a missing one."""
    bucket = s3.bucket()
    good = MlflowServer(tmp_path_factory.mktemp("mlflow-s3"), f"{bucket}/mlartifacts")
    bad = MlflowServer(tmp_path_factory.mktemp("mlflow-nobucket"), f"s3://vlm-missing-{uuid.uuid4().hex[:8]}/a")
    try:
        yield {"bucket": bucket, "good": good.wait(), "bad": bad.wait()}
    finally:
        good.stop()
        bad.stop()


def _log_like_a_stage(experiment: str):
    """What a stage logs: its config, a manifest, an image, a text, metrics. Returns the run."""
    from PIL import Image

    with tracking.start_run(experiment, "stage") as run:
        assert run is not None
        run.log_config({"stage": {"output": "s3://bucket/out", "workers": 2}})
        run.log_dict({"shards": ["00000"], "samples": 3}, "manifest.json")
        run.log_image(Image.new("RGB", (16, 8), (200, 30, 30)), "contact_sheet.png")
        run.log_text("00000\t3\n", "shards.tsv")
        run.log_metrics({"samples": 3.0})
    return run


def _check_downloads(uri: str, run_id: str, dst: Path) -> None:
    """The artifacts come back through MLflow's client with the content logged."""
    import mlflow
    from PIL import Image

    client = mlflow.MlflowClient(uri)
    assert {a.path for a in client.list_artifacts(run_id)} == {
        "config.yaml",
        "manifest.json",
        "contact_sheet.png",
        "shards.tsv",
    }
    manifest = client.download_artifacts(run_id, "manifest.json", str(dst))
    assert json.loads(Path(manifest).read_text()) == {"shards": ["00000"], "samples": 3}
    with Image.open(client.download_artifacts(run_id, "contact_sheet.png", str(dst))) as image:
        assert image.size == (16, 8) and image.getpixel((0, 0)) == (200, 30, 30)
    assert client.get_run(run_id).data.metrics["samples"] == 3.0


def test_server_proxies_artifacts_to_s3(servers, s3, monkeypatch, tmp_path):
    """Through `mlflow server --artifacts-destination s3://...` a run's artifacts land in the bucket;
    the client holds no AWS credentials at all."""
    server = servers["good"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    with monkeypatch.context() as client_env:
        for var in AWS_VARS:
            client_env.delenv(var, raising=False)
        run = _log_like_a_stage("s3-proxied")
    assert run.artifacts_off is None
    import mlflow

    info = mlflow.MlflowClient(server.uri).get_run(run.run_id).info
    assert info.artifact_uri.startswith("mlflow-artifacts:")
    keys = s3.keys(servers["bucket"])
    prefix = f"mlartifacts/{info.experiment_id}/{run.run_id}/artifacts/"
    assert {f"{prefix}{n}" for n in ("config.yaml", "manifest.json", "contact_sheet.png", "shards.tsv")} <= set(keys)
    _check_downloads(server.uri, run.run_id, tmp_path)


def test_sqlite_store_writes_artifacts_to_the_bucket(s3, monkeypatch, tmp_path):
    """With MLFLOW_DEFAULT_ARTIFACT_ROOT=s3://..., a SQLite store's new experiment keeps its artifacts
    in the bucket, written by the client itself (boto3 through AWS_ENDPOINT_URL)."""
    import mlflow

    bucket = s3.bucket()
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DEFAULT_ARTIFACT_ROOT", f"{bucket}/mlflow/")
    run = _log_like_a_stage("s3-direct")
    assert run.artifacts_off is None
    client = mlflow.MlflowClient(uri)
    assert client.get_experiment_by_name("s3-direct").artifact_location == f"{bucket}/mlflow/s3-direct"
    assert client.get_run(run.run_id).info.artifact_uri == f"{bucket}/mlflow/s3-direct/{run.run_id}/artifacts"
    prefix = f"mlflow/s3-direct/{run.run_id}/artifacts/"
    assert sorted(s3.keys(bucket)) == sorted(
        f"{prefix}{n}" for n in ("config.yaml", "manifest.json", "contact_sheet.png", "shards.tsv")
    )
    _check_downloads(uri, run.run_id, tmp_path / "down")


def test_artifact_at_a_url_is_logged(s3, monkeypatch, tmp_path):
    """`log_artifact` of an s3:// directory (a stage's export written to a bucket) logs its files."""
    import mlflow

    bucket = s3.bucket()
    storage.write_text(f"{bucket}/run/export/config.json", '{"dim": 8}')
    storage.write_bytes(f"{bucket}/run/export/weights/model.bin", b"\x00\x01\x02")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_DEFAULT_ARTIFACT_ROOT", raising=False)
    with tracking.start_run("url-artifact", "r") as run:
        run.log_artifact(f"{bucket}/run/export", "model")
        run.log_artifact(f"{bucket}/run/export/config.json")
    client = mlflow.MlflowClient(uri)
    got = client.download_artifacts(run.run_id, "model/export", str(tmp_path / "down"))
    assert (Path(got) / "config.json").read_text() == '{"dim": 8}'
    assert (Path(got) / "weights" / "model.bin").read_bytes() == b"\x00\x01\x02"
    assert "config.json" in {a.path for a in client.list_artifacts(run.run_id)}


def _missing_bucket_run(caplog, experiment: str):
    """A stage's logging against an artifact store whose bucket is missing: bounded, warned once."""
    caplog.set_level(logging.WARNING, logger="vlm.tracking")
    t0 = time.perf_counter()
    run = _log_like_a_stage(experiment)
    elapsed = time.perf_counter() - t0
    warnings = [r.getMessage() for r in caplog.records if "are not logged" in r.getMessage()]
    return run, elapsed, warnings


def test_missing_bucket_behind_a_server_warns_once(servers, monkeypatch, caplog):
    """A server proxying to a missing bucket: the stage goes on with params and metrics, one warning,
    and no artifact call is retried for minutes (MLflow's own retries take ~4 min per call)."""
    import mlflow

    server = servers["bad"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    run, elapsed, warnings = _missing_bucket_run(caplog, "s3-proxied-missing")
    assert elapsed < 60, f"logging took {elapsed:.0f} s against a missing bucket"
    assert len(warnings) == 1 and run.run_id in warnings[0] and "bucket does not exist" in warnings[0], warnings
    got = mlflow.MlflowClient(server.uri).get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.metrics["samples"] == 3.0
    assert got.data.params["stage.workers"] == "2"


def test_missing_bucket_of_the_artifact_root_warns_once(s3, monkeypatch, tmp_path, caplog):
    """MLFLOW_DEFAULT_ARTIFACT_ROOT naming a missing bucket: one warning naming it, the run is kept."""
    import mlflow

    missing = f"s3://vlm-missing-{uuid.uuid4().hex[:8]}"
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DEFAULT_ARTIFACT_ROOT", f"{missing}/mlflow")
    run, elapsed, warnings = _missing_bucket_run(caplog, "s3-direct-missing")
    assert elapsed < 60
    assert len(warnings) == 1 and missing in warnings[0] and "bucket does not exist" in warnings[0], warnings
    got = mlflow.MlflowClient(uri).get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.metrics["samples"] == 3.0


def test_existing_experiment_keeps_its_location(monkeypatch, tmp_path, caplog):
    """Setting the artifact root later does not move an existing experiment; a warning says so."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DEFAULT_ARTIFACT_ROOT", str(tmp_path / "first"))
    with tracking.start_run("moved", "r1"):
        pass
    monkeypatch.setenv("MLFLOW_DEFAULT_ARTIFACT_ROOT", str(tmp_path / "second"))
    caplog.set_level(logging.WARNING, logger="vlm.tracking")
    with tracking.start_run("moved", "r2") as run:
        run.log_text("x", "x.txt")
    assert (tmp_path / "first" / "moved").is_dir() and not (tmp_path / "second").exists()
    assert any("keeps its artifact location" in r.getMessage() for r in caplog.records)
