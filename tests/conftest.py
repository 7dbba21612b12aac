"""Shared fixtures: one local web server, one Ray instance and one MLflow store per session."""

from __future__ import annotations

import os
import uuid

import pytest

from vlm.testbed.s3 import free_port

# The local S3 (moto's server) gets its port now, before anything starts Ray, so the Ray workers of the
# shared instance inherit the same standard AWS variables a user's job would carry.
S3_ENDPOINT = f"http://127.0.0.1:{free_port()}"
os.environ.update(
    AWS_ENDPOINT_URL=S3_ENDPOINT,
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
)
for _var in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
    os.environ.pop(_var, None)


class LocalS3:
    """A real S3-compatible HTTP server on 127.0.0.1 (moto's server mode, its own process)."""

    def __init__(self, endpoint: str):
        from vlm.testbed.s3 import start_moto

        self.endpoint = endpoint
        self.proc = start_moto(int(endpoint.rsplit(":", 1)[1]))

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def bucket(self, name: str | None = None) -> str:
        """A new empty bucket; returns its s3:// URL."""
        name = name or f"vlm-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, url: str) -> list[str]:
        """Every object key under an s3:// URL (bucket or prefix)."""
        bucket, _, prefix = url[len("s3://") :].partition("/")
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def s3():
    """The session's local S3 server; `s3.bucket()` makes a fresh bucket for a test."""
    server = LocalS3(S3_ENDPOINT)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def web():
    """The local test web on 127.0.0.1 (digits + every failure kind)."""
    from vlm.testbed.web import LocalWeb

    with LocalWeb(slow_delay_s=5.0) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """A real SQLite MLflow store for the whole session (MLFLOW_TRACKING_URI points at it)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session. 4 logical CPUs on 2 cores leave room for Ray Data."""
    import ray

    from vlm.runtime import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()


# What other libraries print on every run, which a user's console must not show by default (vlm -v does).
CONSOLE_NOISE = (
    "PreemptionWatcher",
    "RayDeprecationWarning",
    "exclude_resources",
    "Setting accelerator to CPU",
    "No CUDA runtime is found",
    "Attempting to get learning rate from scheduler",
    "Progress bars disabled",
    "Token authentication is enabled",
    "[train] step",  # a worker's log line; the driver draws the bar instead
)


@pytest.fixture
def clean_console():
    """A check of a command's default console output: none of CONSOLE_NOISE, no line printed twice."""

    def check(text: str) -> None:
        lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
        noisy = [line for line in lines if any(n in line for n in CONSOLE_NOISE)]
        assert not noisy, f"library noise on the console: {noisy[:5]}"
        # tqdm redraws its bar on purpose; a table repeats its rules
        plain = [line for line in lines if "%|" not in line and any(c.isalnum() for c in line)]
        twice = sorted({line for line in plain if plain.count(line) > 1})
        assert not twice, f"printed more than once: {twice[:5]}"

    return check


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes gain nothing from intra-op threads, and on a busy 2-core machine they lose a lot.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
