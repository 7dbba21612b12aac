"""The pipeline runner: dependency order, skip-by-fingerprint, --from/--only/--force, failures,
resume after a kill, and nested MLflow runs with lineage — on a real local Ray and MLflow store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines.runner import load_pipeline, run_pipeline
from vlm.data import shards as sh
from vlm.errors import ConfigError, InputError

ROOT = Path(__file__).resolve().parents[1]


def write_pipeline(tmp_path: Path, stages: dict, name: str = "t") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "output": str(tmp_path / "out"), "stages": stages}))
    return path


SMALL = {
    "b": {"kind": "digits", "params": {"n": 30, "samples_per_shard": 10}, "after": ["a"]},
    "a": {"kind": "urls", "params": {"n": 20, "noisy_fraction": 0.5}},
    "c": {"kind": "digits", "params": {"n": 20, "samples_per_shard": 10}},
}


def quiet(*_):
    pass


def test_order_follows_references_then_yaml_order(tmp_path):
    """${stage} references order stages; independent stages keep their YAML order."""
    p = load_pipeline(write_pipeline(tmp_path, SMALL))
    assert p.order() == ["a", "b", "c"]
    assert p.downstream("a") == {"a", "b"}


def test_config_errors_name_the_problem(tmp_path):
    """Unknown keys, kinds, stage references and cycles are one-line config errors."""
    with pytest.raises(ConfigError, match="unknown key 'inputs'"):
        load_pipeline(write_pipeline(tmp_path, {"a": {"kind": "digits", "inputs": "x"}}))
    with pytest.raises(ConfigError, match="kind must be one of"):
        load_pipeline(write_pipeline(tmp_path, {"a": {"kind": "nope"}}))
    with pytest.raises(ConfigError, match="unknown stage 'zz'"):
        load_pipeline(write_pipeline(tmp_path, {"a": {"kind": "clean", "input": "${zz}"}}))
    with pytest.raises(ConfigError, match="cycle"):
        load_pipeline(
            write_pipeline(tmp_path, {"a": {"kind": "clean", "input": "${b}"}, "b": {"kind": "clean", "input": "${a}"}})
        )
    with pytest.raises(InputError, match="pipeline file not found"):
        load_pipeline(tmp_path / "missing.yaml")


def test_second_run_skips_and_changes_rerun_downstream(tmp_path, ray_local, mlflow_store):
    """Done stages are skipped; a changed param reruns that stage and its dependents only."""
    path = write_pipeline(tmp_path, SMALL)
    first = run_pipeline(load_pipeline(path), log=quiet)
    assert [s["status"] for s in first["stages"].values()] == ["ran", "ran", "ran"]
    assert sh.complete_shards(tmp_path / "out" / "b") == [0, 1, 2]
    again = run_pipeline(load_pipeline(path), log=quiet)
    assert {s["status"] for s in again["stages"].values()} == {"skipped"}
    changed = run_pipeline(load_pipeline(path, ["a.params.n=25"]), log=quiet)
    assert [changed["stages"][n]["status"] for n in "abc"] == ["ran", "ran", "skipped"]
    only = run_pipeline(load_pipeline(path, ["a.params.n=25"]), only="c", log=quiet)
    assert list(only["stages"]) == ["c"] and only["stages"]["c"]["status"] == "ran"
    frm = run_pipeline(load_pipeline(path, ["a.params.n=25"]), from_stage="b", log=quiet)
    assert [frm["stages"][n]["status"] for n in "abc"] == ["skipped", "ran", "skipped"]
    forced = run_pipeline(load_pipeline(path, ["a.params.n=25"]), force=True, log=quiet)
    assert {s["status"] for s in forced["stages"].values()} == {"ran"}


def test_failed_stage_blocks_dependents_and_rerun_continues(tmp_path, ray_local, mlflow_store):
    """A failing stage stops what depends on it; fixing it and rerunning skips what was done."""
    stages = {
        "a": {"kind": "digits", "params": {"n": 10, "samples_per_shard": 10}},
        "b": {"kind": "ingest", "input": str(tmp_path / "no-such-urls.parquet")},
        "c": {"kind": "digits", "params": {"n": 10, "samples_per_shard": 10}, "after": ["b"]},
    }
    path = write_pipeline(tmp_path, stages)
    result = run_pipeline(load_pipeline(path), log=quiet)
    assert result["failed"] == ["b"]
    assert result["stages"]["a"]["status"] == "ran"
    assert "no-such-urls.parquet" in result["stages"]["b"]["error"]
    assert result["stages"]["c"] == {"status": "blocked", "by": "b"}
    info = json.loads((tmp_path / "out" / "b" / "_stage.json").read_text())
    assert info["status"] == "failed" and not (tmp_path / "out" / "b" / "_SUCCESS").exists()


def test_nested_runs_with_lineage_and_pinned_resources(tmp_path, ray_local, mlflow_store):
    """One parent run, a nested run per stage with its inputs' digests; a stage with
    resources runs as a Ray task and records the node it ran on."""
    import mlflow
    import ray

    stages = {
        "a": {"kind": "urls", "params": {"n": 10}},
        "b": {"kind": "digits", "params": {"n": 10}, "after": ["a"], "resources": {"CPU": 1}},
    }
    result = run_pipeline(load_pipeline(write_pipeline(tmp_path, stages, name="lin")), log=quiet)
    client = mlflow.MlflowClient(mlflow_store)
    parent = client.get_run(result["mlflow_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(r.info.run_name for r in children) == ["a", "b"]
    b_run = next(r for r in children if r.info.run_name == "b")
    info = json.loads((tmp_path / "out" / "b" / "_stage.json").read_text())
    assert b_run.data.tags["vlm.input.a"] == info["inputs"]["a"]["digest"] != ""
    assert info["node_id"] == ray.get_runtime_context().get_node_id()  # the only node here
    lineage = client.download_artifacts(b_run.info.run_id, "lineage.json", str(tmp_path))
    assert json.loads(Path(lineage).read_text())["inputs"]["a"]["path"] == str(tmp_path / "out" / "a")


@pytest.mark.slow
def test_killed_pipeline_resumes_from_the_interrupted_stage(tmp_path, mlflow_store):
    """SIGKILL of `vlm pipeline run` mid-CapFilt; the rerun skips the finished stage and CapFilt
    redoes only the shards it had not finished."""
    stages = {
        "shards": {"kind": "digits", "params": {"n": 120, "samples_per_shard": 20}},
        "capfilt": {
            "kind": "capfilt",
            "input": "${shards}",
            "overrides": {"captioner.batch_size": 4, "filter.batch_size": 4, "blip.max_length": 6},
        },
    }
    path = write_pipeline(tmp_path, stages, name="kill")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pipelines.cli", "-q", "pipeline", "run", str(path)]
    first = subprocess.run([*cmd, "--only", "shards"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    # The run hangs once CapFilt has published 2 shards, so the kill lands part-way however fast
    # the machine is.
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**env, sh.HANG_AFTER_SHARDS_ENV: "2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    out = tmp_path / "out" / "capfilt"
    deadline = time.time() + 240
    while time.time() < deadline and not (out.exists() and len(sh.complete_shards(out)) >= 2):
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        time.sleep(0.2)
    time.sleep(1.0)  # a third shard would show up now if the hang did not hold
    done_before = sh.complete_shards(out)
    assert len(done_before) == 2, "kill the run while CapFilt is part-way"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    mtimes = {s: sh.stats_path(out, s).stat().st_mtime_ns for s in done_before}
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "shards (digits): done already" in rerun.stdout
    assert "capfilt (capfilt): resuming" in rerun.stdout
    assert sh.complete_shards(out) == list(range(6))
    assert all(sh.stats_path(out, s).stat().st_mtime_ns == t for s, t in mtimes.items())


def test_params_are_typed_and_applied_before_the_config_resolves(tmp_path):
    """A params key sets its config key before validation (clean's clip -> clipscore.checkpoint);
    unknown params and wrong types are one-line config errors."""
    from pipelines.stages import KINDS

    clean = KINDS["clean"]
    cfg = clean.resolve_config(None, ["steps=[basic,clipscore]"], {"clip": str(tmp_path / "clip")})
    assert cfg["clipscore"]["checkpoint"] == str(tmp_path / "clip")
    with pytest.raises(ConfigError, match="clipscore.checkpoint"):
        clean.resolve_config(None, ["steps=[basic,clipscore]"], {})
    with pytest.raises(ConfigError, match="unknown param 'clp'"):
        clean.resolve_config(None, [], {"clp": "x"})
    with pytest.raises(ConfigError, match="'n' must be an integer"):
        KINDS["digits"].parse_params({"n": "many"}, "digits")
    assert KINDS["capfilt"].resolve_config(None, [], {"captioner": "a", "filter": "b"})["blip"]["pretrained"] == "a"


@pytest.mark.slow
def test_clean_stage_with_clip_checkpoint_from_params(tmp_path, ray_local, mlflow_store):
    """A clean stage whose clipscore checkpoint comes from params runs, and its fingerprint covers it."""
    import open_clip
    import torch

    from vlm.models.clip.build import export_clip, model_config

    torch.manual_seed(0)
    mcfg = model_config("vlm-clip-tiny")
    export_clip(open_clip.CLIP(**mcfg).state_dict(), mcfg, tmp_path / "clip", "vlm-clip-tiny")
    stages = {
        "shards": {"kind": "digits", "params": {"n": 20, "samples_per_shard": 10, "image_size": 32}},
        "clip": {
            "kind": "clean",
            "input": "${shards}",
            "params": {"clip": str(tmp_path / "clip")},
            "overrides": {"steps": "[clipscore]", "clipscore.threshold": -1.0, "clipscore.num_cpus": 0.5},
        },
    }
    path = write_pipeline(tmp_path, stages, name="clipparams")
    result = run_pipeline(load_pipeline(path), log=quiet)
    assert result["failed"] == [], result["stages"]
    manifest = sh.read_manifest(tmp_path / "out" / "clip")
    assert manifest["totals"]["count"] == 20 and manifest["totals"]["step_stats"]["clipscore"]["seen"] == 20
    first = json.loads((tmp_path / "out" / "clip" / "_stage.json").read_text())["fingerprint"]
    export_clip(open_clip.CLIP(**mcfg).state_dict(), mcfg, tmp_path / "clip2", "vlm-clip-tiny")
    again = load_pipeline(path, [f"clip.params.clip={tmp_path / 'clip2'}"])
    assert run_pipeline(again, log=quiet)["stages"]["clip"]["status"] == "ran"
    assert json.loads((tmp_path / "out" / "clip" / "_stage.json").read_text())["fingerprint"] != first


def test_compare_stage_logs_its_report_to_mlflow(tmp_path, ray_local, mlflow_store):
    """The compare stage's report (HTML, table) is an artifact of its own nested run, with lineage."""
    import mlflow

    stages = {
        "a": {"kind": "digits", "params": {"n": 10}},
        "b": {"kind": "digits", "params": {"n": 12}},
        "cmp": {"kind": "compare", "params": {"stages": ["${a}", "${b}"]}},
    }
    result = run_pipeline(load_pipeline(write_pipeline(tmp_path, stages, name="cmp")), log=quiet)
    assert not result["failed"], result
    client = mlflow.MlflowClient(mlflow_store)
    run_id = result["stages"]["cmp"]["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.data.tags["mlflow.parentRunId"] == result["mlflow_run_id"] and run.info.run_name == "cmp"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"report.html", "comparison.txt", "lineage.json"} <= artifacts
    assert (tmp_path / "out" / "cmp" / "report.html").is_file()
