"""`vlm runs compare` against a real SQLite MLflow store: selection, table, report, errors."""

from __future__ import annotations

import uuid

import pytest

from pipelines.cli import main
from pipelines.compare import compare_runs
from vlm import tracking


def _log_run(experiment: str, name: str, params: dict, losses: list[float], top1: float, **kw) -> str:
    with tracking.start_run(experiment, name, **kw) as run:
        run.log_params(params)
        for step, loss in enumerate(losses, start=1):
            run.log_metrics({"loss": loss, "samples_per_s": 100.0 + step}, step=step)
        run.log_metrics({"eval/zeroshot_top1": top1}, step=len(losses))
    return run.run_id


@pytest.fixture()
def three_runs(mlflow_store):
    """Three CLIP-like runs in a fresh experiment: only lr and zero.stage vary."""
    exp = f"cmp-{uuid.uuid4().hex[:8]}"
    base = {"model.preset": "vlm-clip-tiny", "train.steps": "50", "train.lr": "0.001", "deepspeed.zero_stage": "2"}
    ids = [
        _log_run(exp, "a", base, [2.3, 1.9, 1.5], 0.61),
        _log_run(exp, "b", {**base, "train.lr": "0.003"}, [2.3, 1.7, 1.2], 0.72),
        _log_run(exp, "c", {**base, "deepspeed.zero_stage": "3"}, [2.3, 2.0, 1.8], 0.55),
    ]
    return exp, ids


def test_table_shows_only_differing_params_and_key_metrics(three_runs):
    """Params equal in every run are hidden; differing ones and latest metric values are shown."""
    exp, ids = three_runs
    comp = compare_runs(experiments=[exp])["comparison"]
    assert [r.info.run_id for r in comp.runs] == ids[::-1]  # newest first
    params = dict(comp.param_rows)
    assert set(params) == {"train.lr", "deepspeed.zero_stage"}
    assert params["train.lr"] == ["0.001", "0.003", "0.001"][::-1]
    assert comp.same_params == 2
    metrics = dict(comp.metric_rows)
    assert metrics["loss"] == [1.8, 1.2, 1.5]
    assert metrics["zeroshot_top1"] == [0.55, 0.72, 0.61]
    assert metrics["samples_per_s"] == [103.0, 103.0, 103.0]
    assert "kept_fraction" not in metrics  # no run logged it: no empty row


def test_cli_prints_table_and_writes_html_and_png(three_runs, tmp_path, capsys):
    """The CLI prints the side-by-side table and writes an HTML report with the loss plot beside it."""
    exp, ids = three_runs
    out = tmp_path / "report" / "cmp.html"
    assert main(["runs", "compare", "--experiment", exp, "--last", "2", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "train.lr" in text and "deepspeed.zero_stage" in text and "model.preset" not in text
    assert "zeroshot_top1" in text and "0.55" in text and "0.72" in text and "0.61" not in text  # --last 2
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = out.read_text()
    assert "data:image/png;base64," in page and "train.lr" in page and ids[2] in page and ids[0] not in page


def test_run_ids_and_parent_select_runs(mlflow_store):
    """Explicit run ids keep their order; --parent picks the nested stage runs of a pipeline run."""
    exp = f"pipe-{uuid.uuid4().hex[:8]}"
    with tracking.start_run(exp, "pipeline") as parent:
        kids = [
            _log_run(exp, stage, {"stage": stage, "n": str(n)}, [1.0 / n], 0.5, parent_run_id=parent.run_id)
            for n, stage in enumerate(["shards", "clean"], start=1)
        ]
    comp = compare_runs(parent=parent.run_id)["comparison"]
    assert sorted(r.info.run_id for r in comp.runs) == sorted(kids)
    assert dict(comp.info_rows)["run name"] == ["clean", "shards"]
    comp = compare_runs(run_ids=[kids[0], parent.run_id])["comparison"]
    assert [r.info.run_id for r in comp.runs] == [kids[0], parent.run_id]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["0123456789abcdef0123456789abcdef"], "no MLflow run with id '0123456789abcdef0123456789abcdef'"),
        (["--experiment", "no-such-experiment-xyz"], "no MLflow experiment named 'no-such-experiment-xyz'"),
        (["--experiment", "EMPTY"], "has no runs"),
        (["--parent", "PARENT"], "has no child runs"),
    ],
)
def test_missing_runs_are_one_line_errors(mlflow_store, capsys, argv, message):
    """A missing run id, unknown or empty experiment, or childless parent: one line on stderr, exit 2."""
    import mlflow

    client = mlflow.MlflowClient(mlflow_store)
    if "EMPTY" in argv:
        empty = f"empty-{uuid.uuid4().hex[:8]}"
        client.create_experiment(empty)
        argv = [empty if a == "EMPTY" else a for a in argv]
    if "PARENT" in argv:
        with tracking.start_run(f"lonely-{uuid.uuid4().hex[:8]}", "alone") as run:
            pass
        argv = [run.run_id if a == "PARENT" else a for a in argv]
    assert main(["runs", "compare", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("vlm runs: error:")
