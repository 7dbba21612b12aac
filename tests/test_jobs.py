"""`vlm submit` / `vlm jobs` against a real two-node Ray cluster started with `ray start`.

The cluster is this machine twice: a head (dashboard on 127.0.0.1, token auth on, its own temp
dir and ports) and a second node carrying a custom resource `stage_node`, each in its own temp dir
as separate machines would be (two nodes sharing one would share `runtime_resources/`, where each
node's agent unpacks the job's working dir). Every `vlm` and `ray` call is a subprocess with an
environment built here, so nothing leaks into the in-process Ray of other tests; teardown ends
only the processes of this cluster's two sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.jobs import EXCLUDES, ROOT, dashboard_address, runtime_env, tail_logs
from vlm.errors import ClusterError

BIN = Path(sys.executable).parent
RAY = shutil.which("ray", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
LEAKY = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Ray addresses/auth or pipeline-run settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in LEAKY and not k.startswith("VLM_MLFLOW_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(extra)
    return env


def _session_pids(sid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
            if int(fields[3]) == sid and fields[0] != "Z":  # zombies are gone already
                pids.append(int(d.name))
    return pids


class LocalCluster:
    """A head + one worker node started by the `ray` CLI, each in a session of its own."""

    def __init__(self, root: Path):
        self.root = root
        self.token_file = root / "token"
        self.token_file.write_text(secrets.token_hex(32))
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        # Cluster processes (and the job drivers they spawn) get token auth with this token.
        self.env = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file))
        self.sessions: list[int] = []
        self.stage_node_id = ""

    def _ray_start(self, *args: str) -> None:
        proc = subprocess.Popen(
            [RAY, "start", "--disable-usage-stats", "--object-store-memory=100000000", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its daemons keep this session id: teardown finds them by it
        )
        self.sessions.append(proc.pid)
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args[:2])} failed:\n{out[-3000:]}")

    def _get(self, path: str) -> dict:
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.token()}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.load(resp)

    def _alive_nodes(self) -> list[dict]:
        nodes = self._get("/api/v0/nodes?limit=100&detail=1")["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def token(self) -> str:
        return self.token_file.read_text().strip()

    def start(self) -> None:
        self._ray_start(
            "--head",
            f"--port={self.gcs_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
            "--num-cpus=3",
            f"--temp-dir={self.root / 'h'}",
        )
        self._ray_start(
            f"--address=127.0.0.1:{self.gcs_port}",
            "--num-cpus=1",
            '--resources={"stage_node": 1}',
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--temp-dir={self.root / 'w'}",
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                nodes = self._alive_nodes()
            except OSError:
                nodes = []
            staged = [n for n in nodes if n.get("resources_total", {}).get("stage_node")]
            if len(nodes) == 2 and staged:
                self.stage_node_id = staged[0]["node_id"]
                return
            time.sleep(1)
        raise RuntimeError(f"the two-node cluster did not come up within 90 s (dashboard {self.url})")

    def _stop_jobs(self) -> None:
        """Stop jobs still running: their drivers live in sessions of their own."""
        try:
            jobs = self._get("/api/jobs/")
        except OSError:
            return
        for job in jobs:
            if job.get("status") in ("PENDING", "RUNNING") and job.get("submission_id"):
                req = urllib.request.Request(
                    f"{self.url}/api/jobs/{job['submission_id']}/stop",
                    method="POST",
                    headers={"Authorization": f"Bearer {self.token()}"},
                )
                try:
                    urllib.request.urlopen(req, timeout=10).close()
                except OSError:
                    pass

    def stop(self) -> None:
        """Stop leftover jobs, then SIGTERM and SIGKILL every process of this cluster's sessions."""
        self._stop_jobs()
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            pids = [p for sid in self.sessions for p in _session_pids(sid)]
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(_session_pids(sid) for sid in self.sessions):
                time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster():
    """A two-node local Ray cluster for this module; the second node has resource `stage_node`."""
    if RAY is None:
        pytest.skip("the `ray` CLI is not installed")
    # A short root: Ray's unix sockets live under the temp dir and paths are capped at 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="vj", dir="/tmp"))
    c = LocalCluster(root)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def _vlm(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "vlm"), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _client_env(cluster: LocalCluster, tmp: Path, **extra: str) -> dict[str, str]:
    """A submitter: finds the token through RAY_AUTH_TOKEN_PATH only (no RAY_AUTH_MODE set)."""
    return _clean_env(
        RAY_AUTH_TOKEN_PATH=str(cluster.token_file), MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}", **extra
    )


PIPELINE = """\
name: tiny
output: {out}
experiment: pipeline-tiny
stages:
  shards:
    kind: digits
    params: {{n: 200, samples_per_shard: 100}}
    resources: {{stage_node: 1}}
  clean:
    kind: clean
    input: "${{shards}}"
    config: configs/clean/default.yaml
    overrides: {{basic.min_image_side: 8, basic.size_source: stored}}
"""


@pytest.mark.slow
def test_submitted_pipeline_runs_its_pinned_stage_on_the_second_node(cluster, tmp_path):
    """`vlm submit -- vlm pipeline run` succeeds; the stage pinned to `stage_node` ran on that node."""
    out = tmp_path / "out"
    spec = tmp_path / "tiny.yaml"
    spec.write_text(PIPELINE.format(out=out))
    env = _client_env(cluster, tmp_path)
    res = _vlm("submit", "--address", cluster.url, "--", "vlm", "pipeline", "run", str(spec), env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "SUCCEEDED" in res.stderr and "[2/2] clean (clean): done" in res.stdout  # logs were tailed
    for stage in ("shards", "clean"):
        assert (out / stage / "_SUCCESS").is_file()
    shards = json.loads((out / "shards" / "_stage.json").read_text())
    clean = json.loads((out / "clean" / "_stage.json").read_text())
    assert shards["node_id"] == cluster.stage_node_id
    assert clean["node_id"] != cluster.stage_node_id  # unpinned: the driver on the head
    assert clean["metrics"]["kept"] > 0 and clean["inputs"]["shards"]["digest"] == shards["fingerprint"]
    # MLflow went where the submitter pointed it: a pipeline run with the two stages nested.
    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    child = client.get_run(clean["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == clean["pipeline_run_id"]


@pytest.mark.slow
def test_submitted_pipeline_writes_only_to_s3_from_both_nodes(cluster, tmp_path, s3):
    """No shared directory: the same pipeline with `output=s3://...`; both nodes write their stage to the
    local S3 (the nodes carry the AWS variables, as a cluster's instance profile or env would)."""
    url = s3.bucket() + "/tiny"
    spec = tmp_path / "tiny.yaml"
    spec.write_text(PIPELINE.format(out=url))
    env = _client_env(cluster, tmp_path)
    res = _vlm("submit", "--address", cluster.url, "--", "vlm", "pipeline", "run", str(spec), env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    keys = s3.keys(url)
    for stage in ("shards", "clean"):
        assert f"tiny/{stage}/_SUCCESS" in keys and f"tiny/{stage}/_stage.json" in keys
        assert f"tiny/{stage}/00000.tar" in keys and f"tiny/{stage}/00001_stats.json" in keys
    from vlm import storage

    shards = storage.read_json(f"{url}/shards/_stage.json")
    clean = storage.read_json(f"{url}/clean/_stage.json")
    assert shards["node_id"] == cluster.stage_node_id and clean["node_id"] != cluster.stage_node_id
    assert clean["metrics"]["kept"] > 0 and clean["inputs"]["shards"]["digest"] == shards["fingerprint"]
    assert not list(tmp_path.glob("**/*.tar"))  # nothing landed on a local disk


@pytest.mark.slow
def test_failed_job_is_failed_and_its_logs_are_reachable(cluster, tmp_path):
    """A job whose command fails ends FAILED; `vlm jobs logs/status/list` show it (RAY_ADDRESS as host:port)."""
    env = _client_env(cluster, tmp_path, RAY_ADDRESS=f"127.0.0.1:{cluster.dashboard_port}")
    missing = tmp_path / "no-such-urls.parquet"
    res = _vlm("submit", "--no-wait", "--", "vlm", "ingest", "--input", str(missing), "--output", "x", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    job_id = res.stdout.strip().splitlines()[-1]
    logs = _vlm("jobs", "logs", job_id, "--follow", env=env)
    assert logs.returncode == 1 and f"job {job_id} FAILED" in logs.stderr
    assert f"input file not found: {missing}" in logs.stdout
    again = _vlm("jobs", "logs", job_id, env=env)
    assert f"input file not found: {missing}" in again.stdout
    status = _vlm("jobs", "status", job_id, env=env)
    assert "FAILED" in status.stdout and "exit code 2" in status.stdout
    listing = _vlm("jobs", "list", env=env)
    assert job_id in listing.stdout and "FAILED" in listing.stdout


@pytest.mark.slow
def test_jobs_stop_stops_a_running_job(cluster, tmp_path):
    """`vlm jobs stop` ends a running job as STOPPED."""
    env = _client_env(cluster, tmp_path)
    sleeper = [sys.executable, "-c", "import time; print('sleeping', flush=True); time.sleep(120)"]
    res = _vlm("submit", "--address", cluster.url, "--no-wait", "--", *sleeper, env=env)
    job_id = res.stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + 60
    while "RUNNING" not in _vlm("jobs", "status", job_id, "--address", cluster.url, env=env).stdout:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(1)
    stop = _vlm("jobs", "stop", job_id, "--address", cluster.url, env=env)
    assert stop.returncode == 0 and f"job {job_id} STOPPED" in stop.stdout, stop.stderr


@pytest.mark.slow
def test_plain_ray_job_submit_runs_vlm(cluster, tmp_path, monkeypatch):
    """The stock `ray job submit -- vlm ...` works too, with RAY_AUTH_MODE=token + RAY_AUTH_TOKEN."""
    from vlm import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for lr in ("0.001", "0.003"):
        with tracking.start_run("plain", f"lr-{lr}") as run:
            run.log_params({"train.lr": lr, "model.preset": "vlm-clip-tiny"})
    env = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.token())
    renv = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": uri}})
    cmd = [RAY, "job", "submit", "--address", cluster.url, "--working-dir", str(ROOT), "--runtime-env-json", renv]
    cmd += ["--", "vlm", "runs", "compare", "--experiment", "plain"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "train.lr" in res.stdout and "0.003" in res.stdout and "succeeded" in res.stdout + res.stderr


@pytest.mark.slow
def test_token_is_found_in_home_and_required(cluster, tmp_path):
    """With no RAY_AUTH_* set the token comes from ~/.ray/auth_token; without one: a one-line error."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(cluster.token() + "\n")
    ok = _vlm("jobs", "list", "--address", cluster.url, env=_clean_env(HOME=str(home)))
    assert ok.returncode == 0, ok.stderr
    empty = tmp_path / "empty-home"
    empty.mkdir()
    denied = _vlm("jobs", "list", "--address", cluster.url, env=_clean_env(HOME=str(empty)))
    assert denied.returncode == 2 and "requires its auth token" in denied.stderr
    assert len(denied.stderr.strip().splitlines()) == 1
    wrong = _vlm("jobs", "list", "--address", cluster.url, env=_clean_env(RAY_AUTH_TOKEN="0" * 64))
    assert wrong.returncode == 2 and "rejected the auth token from RAY_AUTH_TOKEN" in wrong.stderr


# ------------------------------------------------------------------------- no cluster needed


def test_unreachable_address_is_a_one_line_error(capsys, monkeypatch):
    """An address where nothing listens: exit 2 and one line naming it, no traceback."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = _free_port()
    assert main(["jobs", "list", "--address", f"127.0.0.1:{port}"]) == 2
    assert main(["submit", "--address", f"127.0.0.1:{port}", "--", "vlm", "plan", "flamingo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(f"cannot reach the Ray dashboard at http://127.0.0.1:{port}" in e for e in err)


@contextlib.contextmanager
def _silent_server():
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte; yields its port."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.1)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:  # the 0.1 s accept timeout: look at `stop` again
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in conns:
            conn.close()
        srv.close()


def test_dashboard_that_never_answers_times_out(capsys, monkeypatch):
    """An address that accepts connections and never answers: `jobs list` and `submit` exit 2 in seconds, one line."""
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("VLM_DASHBOARD_TIMEOUT_S", "1")
    with _silent_server() as port:
        t0 = time.monotonic()
        assert main(["jobs", "list", "--address", f"127.0.0.1:{port}"]) == 2
        assert main(["submit", "--address", f"127.0.0.1:{port}", "--", "vlm", "plan", "flamingo"]) == 2
        elapsed = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert elapsed < 10 and len(err) == 2, (elapsed, err)
    assert all(f"the Ray dashboard at http://127.0.0.1:{port} timed out" in e for e in err), err


def test_log_tail_that_never_answers_times_out():
    """Following logs from a dashboard that never completes the websocket handshake fails with ClusterError."""

    async def follow(port: int) -> None:
        async for _ in tail_logs(f"http://127.0.0.1:{port}", "raysubmit_x", timeouts=(1.0, 1.0)):
            pass

    with _silent_server() as port:
        t0 = time.monotonic()
        with pytest.raises(ClusterError, match=f"http://127.0.0.1:{port} timed out: no answer to GET /api/jobs/"):
            asyncio.run(follow(port))
        assert time.monotonic() - t0 < 5


def test_address_forms(monkeypatch):
    """--address beats RAY_ADDRESS beats the default; host:port, ray:// and GCS ports map to the dashboard."""
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert dashboard_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:8265")
    assert dashboard_address() == "http://10.0.0.5:8265"
    assert dashboard_address("https://ray.example.com:443/") == "https://ray.example.com:443"
    assert dashboard_address("ray://head:10001") == "http://head:8265"
    assert dashboard_address("head:6379") == "http://head:8265"
    assert dashboard_address("auto") == "http://127.0.0.1:8265"


def test_runtime_env_ships_the_project_and_points_mlflow(monkeypatch, tmp_path):
    """The job gets the project root with excludes, an absolute MLflow URI, and --env values."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel/mlruns.db")
    renv = runtime_env(env=["A=1", "B=x=y"], pip=["tqdm"])
    assert renv["working_dir"] == str(ROOT) and renv["excludes"] == EXCLUDES
    assert {".venv", ".git", "outputs", "demo_out", "mlruns", "*.db"} <= set(EXCLUDES)
    assert renv["env_vars"]["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'rel' / 'mlruns.db'}"
    assert renv["env_vars"]["A"] == "1" and renv["env_vars"]["B"] == "x=y" and renv["pip"] == ["tqdm"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert runtime_env()["env_vars"]["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'mlruns.db'}"


def test_bad_submit_arguments_are_one_line_errors(capsys):
    """No command after --, or a malformed --env: exit 2 with one line."""
    assert main(["submit", "--"]) == 2
    assert main(["submit", "--env", "NOEQUALS", "--", "vlm", "plan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "nothing to run" in err[0] and "--env expects KEY=VALUE" in err[1]
