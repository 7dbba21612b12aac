"""A shortened demo pipeline with `output=s3://...` end to end on the local S3 server (moto, its own
process): URL list -> ingest -> clean -> CLIP on raw and on clean shards -> compare, then a rerun that
skips every stage and `vlm runs compare` over the two CLIP runs. No stage writes to a local disk."""

from __future__ import annotations

import socket

import pytest
import yaml

from pipelines.cli import main
from pipelines.runner import load_pipeline, run_pipeline
from vlm import storage
from vlm.data import shards as sh

pytestmark = pytest.mark.slow

CLIP = {
    "train.max_steps": 4,
    "train.global_batch_size": 16,
    "train.log_every": 2,
    "train.checkpoint_every": 4,
    "eval.limit": 20,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pipeline(tmp_path, port: int) -> str:
    spec = {
        "name": "s3demo",
        "output": "outputs/unused",  # replaced by output=s3://... on the command line
        "experiment": "s3demo",
        "stages": {
            "urls": {"kind": "urls", "params": {"n": 120, "noisy_fraction": 0.3, "port": port, "duplicates": 4}},
            "raw": {
                "kind": "ingest",
                "input": "${urls}/urls.parquet",
                "config": "configs/ingest/demo.yaml",
                "overrides": {"output.samples_per_shard": 40},
                "params": {"local_web_port": port},
            },
            "clean": {"kind": "clean", "input": "${raw}", "config": "configs/clean/demo.yaml"},
            "clip-raw": {
                "kind": "train-clip",
                "input": "${raw}",
                "config": "configs/train/clip-tiny-digits.yaml",
                "overrides": CLIP,
            },
            "clip-clean": {
                "kind": "train-clip",
                "input": "${clean}",
                "config": "configs/train/clip-tiny-digits.yaml",
                "overrides": CLIP,
            },
            "compare": {"kind": "compare", "params": {"stages": ["${clip-raw}", "${clip-clean}"]}},
        },
    }
    path = tmp_path / "s3demo.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.mark.timeout(1200)
def test_demo_pipeline_on_s3_end_to_end(tmp_path, s3, ray_local, mlflow_store, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written relative to the working directory would show here
    url = s3.bucket() + "/demo"
    path = _pipeline(tmp_path, _free_port())
    result = run_pipeline(load_pipeline(path, [f"output={url}"]), log=print)
    assert result["failed"] == [], result["stages"]
    keys = s3.keys(url)
    for stage in ("urls", "raw", "clean", "clip-raw", "clip-clean", "compare"):
        assert f"demo/{stage}/_SUCCESS" in keys and f"demo/{stage}/_stage.json" in keys, stage
    manifest = sh.read_manifest(f"{url}/raw")
    urls = result["stages"]["urls"]["metrics"]["urls"]  # 120 + the planted duplicate rows
    assert manifest["totals"]["count"] == urls and manifest["num_shards"] == -(-urls // 40)
    assert sh.read_manifest(f"{url}/clean")["inputs"][0]["path"] == f"{url}/raw"
    for stage in ("clip-raw", "clip-clean"):
        assert any(k.startswith(f"demo/{stage}/export/") for k in keys), stage
        assert storage.read_json(f"{url}/{stage}/_stage.json")["metrics"]
    assert "demo/compare/report.html" in keys
    assert not [k for k in keys if ".tmp" in k], keys
    assert not list(tmp_path.glob("outputs")) and not list(tmp_path.glob("**/*.tar"))

    again = run_pipeline(load_pipeline(path, [f"output={url}"]), log=print)
    assert {s["status"] for s in again["stages"].values()} == {"skipped"}, again["stages"]

    runs = [storage.read_json(f"{url}/{s}/_stage.json")["mlflow_run_id"] for s in ("clip-raw", "clip-clean")]
    capsys.readouterr()
    assert main(["runs", "compare", *runs, "--output", f"{url}/report"]) == 0
    table = capsys.readouterr().out
    assert "loss" in table and f"report: {url}/report.html" in table
    assert {"demo/report.html", "demo/report.png"} <= set(s3.keys(url))
    page = storage.read_text(f"{url}/report.html")
    assert all(run in page for run in runs) and "data:image/png;base64," in page
