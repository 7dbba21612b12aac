"""The MLflow UI, started as README says (`mlflow ui` on 127.0.0.1), serves the runs vlm logs."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from vlm import tracking

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _chromium(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no headless Chromium on this machine (.ci/run installs the Debian package)")
    base = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900"]
    return subprocess.run([browser, *base, "--virtual-time-budget=20000", *args], capture_output=True, timeout=timeout)


def _check_in_browser(hint: str, port: int, tmp_path: Path) -> None:
    """The page the CLI's hint names, rendered by a real browser: the runs table, not GenAI's overview."""
    from PIL import Image, ImageStat

    assert "then open http://127.0.0.1:5000/#/experiments/" in hint, hint
    url = hint.rsplit("then open ", 1)[1].replace(":5000/", f":{port}/")
    dom = _chromium("--dump-dom", url).stdout.decode("utf-8", "replace")
    assert "pipeline" in dom and "matching runs" in dom, "the runs table did not render"
    assert "No data available" not in dom and "Detect Issues" not in dom, "opened on the GenAI overview"
    shot = tmp_path / "experiment_page.png"
    _chromium(f"--screenshot={shot}", url)
    image = Image.open(shot).convert("L")
    assert image.size == (1400, 900)
    assert ImageStat.Stat(image).stddev[0] > 10, "the screenshot is blank"


def test_mlflow_ui_serves_nested_pipeline_runs(tmp_path, monkeypatch):
    """A parent run with a nested stage run, read back over HTTP from a real `mlflow ui`."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with tracking.start_run("ui-check", "pipeline") as parent:
        with tracking.start_run("ui-check", "clip-raw", parent_run_id=parent.run_id) as child:
            child.log_metrics({"zeroshot_top1": 0.5})
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    port = _free_port()
    proc = subprocess.Popen(
        [mlflow_bin, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, "mlflow ui exited"
            assert time.time() < deadline, "mlflow ui did not come up in 90 s"
            time.sleep(1)
        with urllib.request.urlopen(f"{base}/", timeout=10) as resp:
            assert resp.status == 200 and b"<html" in resp.read(2000).lower()
        exp = _post(f"{base}/api/2.0/mlflow/experiments/search", {"max_results": 100})
        exp_id = next(e["experiment_id"] for e in exp["experiments"] if e["name"] == "ui-check")
        runs = _post(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})["runs"]
        by_name = {r["info"]["run_name"]: r for r in runs}
        assert set(by_name) == {"pipeline", "clip-raw"}
        tags = {t["key"]: t["value"] for t in by_name["clip-raw"]["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == parent.run_id
        assert by_name["clip-raw"]["data"]["metrics"][0]["value"] == 0.5
        ui_exp = next(e for e in exp["experiments"] if e["name"] == "ui-check")
        exp_tags = {t["key"]: t["value"] for t in ui_exp["tags"]}
        assert exp_tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND
        assert exp_tags[tracking.DESCRIPTION_TAG].startswith("vlm runs")
        _check_in_browser(tracking.ui_hint(parent.run_id), port, tmp_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
