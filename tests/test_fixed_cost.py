"""The fixed cost of a shard stage: the MLflow run opened in a thread while Ray starts.

Speed itself is measured by bench/ingest.py (`--fixed-cost`); these tests check that the
background run behaves as a run opened in line does: it records, ends FINISHED or FAILED, and
a run discarded before the job starts is gone.
"""

from __future__ import annotations

import pytest

from vlm import tracking


def test_background_run_records_and_finishes(mlflow_store):
    import mlflow

    pending = tracking.BackgroundRun("unit-bg", "bg1", tags={"stage": "unit"})
    with pending as run:
        assert run is not None
        run.log_metrics({"samples": 3.0})
    got = mlflow.MlflowClient(mlflow_store).get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.tags["stage"] == "unit"
    assert got.data.metrics["samples"] == 3.0


def test_background_run_failure_marks_failed(mlflow_store):
    import mlflow

    pending = tracking.BackgroundRun("unit-bg", "bg2")
    with pytest.raises(ValueError), pending as run:
        raise ValueError("boom")
    assert mlflow.MlflowClient(mlflow_store).get_run(run.run_id).info.status == "FAILED"


def test_discarded_background_run_is_deleted(mlflow_store):
    import mlflow

    pending = tracking.BackgroundRun("unit-bg-discard", "bg3")
    run = pending.__enter__()
    pending.discard()
    client = mlflow.MlflowClient(mlflow_store)
    assert client.get_run(run.run_id).info.lifecycle_stage == "deleted"
    exp = client.get_experiment_by_name("unit-bg-discard")
    assert not client.search_runs([exp.experiment_id])  # active runs only
