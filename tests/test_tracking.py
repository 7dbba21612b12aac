"""The MLflow module: a real SQLite store, and a logger that never blocks training."""

from __future__ import annotations

import time

from vlm import tracking


def test_run_logs_params_metrics_and_artifacts(mlflow_store):
    """A run records flattened config params, metrics by step and a text artifact."""
    import mlflow

    from pipelines.ingest import IngestConfig

    with tracking.start_run("unit", "r1", tags={"stage": "unit"}) as run:
        run.log_config(IngestConfig())
        run.log_metrics({"loss": 2.0}, step=1)
        run.log_metrics({"loss": 1.0}, step=2)
    client = mlflow.MlflowClient(mlflow_store)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.tags["stage"] == "unit"
    assert got.data.params["download.retries"] == "2"
    assert [m.value for m in client.get_metric_history(run.run_id, "loss")] == [2.0, 1.0]
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.run_id)}


def test_failed_block_marks_run_failed(mlflow_store):
    """An exception inside the run ends it FAILED and propagates."""
    import mlflow

    run_id = None
    try:
        with tracking.start_run("unit", "r2") as run:
            run_id = run.run_id
            raise ValueError("boom")
    except ValueError:
        pass
    assert mlflow.MlflowClient(mlflow_store).get_run(run_id).info.status == "FAILED"


def test_async_logger_does_not_block_on_a_dead_server(monkeypatch):
    """Against an unreachable tracking server, log() returns at once and close() is bounded."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    logger = tracking.AsyncMetricLogger("http://127.0.0.1:9", "0" * 32, max_queue=50)
    t0 = time.perf_counter()
    for step in range(200):
        logger.log({"loss": 1.0 / (step + 1)}, step=step)
    assert time.perf_counter() - t0 < 0.5
    t1 = time.perf_counter()
    logger.close(timeout_s=2.0)
    assert time.perf_counter() - t1 < 3.0
    assert logger.dropped > 0  # the bounded queue overflowed instead of blocking
