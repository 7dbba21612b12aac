"""Shared fixtures: one local web server, one Ray instance and one MLflow store per session."""

from __future__ import annotations

import os

import pytest


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
