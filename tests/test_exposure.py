"""What a laptop run exposes: a real `vlm ingest` in a subprocess, its process tree watched.

The local Ray every command starts must listen on loopback only (GCS, raylet, workers, the
dashboard and runtime-env agents), and the Ray auth token must not reach the MLflow store, the
output or the console.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from vlm.testbed.url_lists import make_url_rows, write_url_list
from vlm.testbed.web import LocalWeb

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

VLM = Path(sys.executable).parent / "vlm"


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _listening(root: psutil.Process) -> set[tuple[str, int, str]]:
    """(ip, port, process name) of every listening TCP socket in `root`'s process tree."""
    found = set()
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for proc in procs:
        try:
            name = proc.name()
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port, name))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory):
    """One `vlm ingest` with the embedded defaults (MLflow store in its cwd), sockets sampled."""
    tmp = tmp_path_factory.mktemp("exposure")
    with LocalWeb(slow_delay_s=6.0) as web:
        rows = make_url_rows(web.base_url, 24, seed=5, failures={"slow": 2})
        src = write_url_list(rows, tmp / "urls.csv")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        proc = subprocess.Popen(
            [str(VLM), "ingest", "--input", str(src), "--output", str(tmp / "out"),
             "download.allow_private_networks=true", "download.timeout_s=4", "download.retries=0"],
            cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        root = psutil.Process(proc.pid)
        sockets: set[tuple[str, int, str]] = set()
        deadline = time.monotonic() + 200
        while proc.poll() is None and time.monotonic() < deadline:
            sockets |= _listening(root)
            time.sleep(0.3)
        out, err = proc.communicate(timeout=30)
    return tmp, proc.returncode, out + err, sockets


def test_default_console_is_ours_only(watched_run, clean_console):
    _, rc, console, _ = watched_run
    assert rc == 0, console[-2000:]
    clean_console(console)


def test_local_ray_listens_on_loopback_only(watched_run):
    _, rc, console, sockets = watched_run
    assert rc == 0, console[-2000:]
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names, f"the watch saw no Ray servers: {sorted(sockets)}"
    exposed = sorted(s for s in sockets if not _loopback(s[0]))
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_auth_token_is_nowhere_in_the_run_record(watched_run):
    tmp, rc, console, _ = watched_run
    assert rc == 0, console[-2000:]
    token_file = Path.home() / ".ray" / "auth_token"
    token = (os.environ.get("RAY_AUTH_TOKEN") or (token_file.read_text() if token_file.is_file() else "")).strip()
    if not token:
        pytest.skip("Ray token auth is off on this machine: no token to leak")
    assert (tmp / "mlruns.db").is_file() and (tmp / "mlartifacts").is_dir(), "the run logged nothing to MLflow"
    assert token not in console
    needle = token.encode()
    leaked = [p for p in tmp.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert not leaked, f"the Ray auth token is in {leaked}"
