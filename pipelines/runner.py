"""`vlm pipeline run`: a pipeline of stages from one YAML, ordered by their data dependencies.

The file format and its checks are in `pipelines.pipeline_file`. Skipping is by fingerprint: a
stage's `_stage.json` records the digest of its kind, resolved config (its params applied),
params and inputs (an upstream stage contributes its own fingerprint, a plain path its
content digest); a stage whose output holds `_SUCCESS` and a matching fingerprint is done. A stage
that was interrupted with the same fingerprint resumes (shard stages skip complete shards,
trainers continue from their last checkpoint); with a different fingerprint its output is cleared
first. A failed stage stops its dependents, not its independent siblings, and the run exits
non-zero naming it; rerunning the same command continues from there.

MLflow: one parent run per invocation in the pipeline's experiment, and each stage's own run is
nested under it (named after the stage) through the `tracking.RunContext` the runner passes to
the stage; lineage (inputs with their digests, outputs, node) is logged to the stage run. A stage
with `resources` runs as a Ray task that needs them, so it lands on a node that has them (e.g. a GPU
pool or a custom resource).
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
import traceback
from typing import Any

from pipelines.pipeline_file import _REF, Pipeline, Stage, _abs, load_pipeline
from vlm import storage
from vlm.errors import ConfigError, InputError, VlmError

__all__ = ["Pipeline", "Stage", "load_pipeline", "run_pipeline", "summary_table"]

STAGE_FILE = "_stage.json"

# ---------------------------------------------------------------------------------- fingerprints


def _resolve(value: Any, outputs: dict[str, str]) -> Any:
    """Replace ${stage} with that stage's output directory, recursively."""
    if isinstance(value, str):
        return _REF.sub(lambda m: outputs[m.group(1)], value)
    if isinstance(value, list):
        return [_resolve(v, outputs) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, outputs) for k, v in value.items()}
    return value


def path_digest(path: str) -> str:
    """Digest of an input: a stage output's fingerprint, a shard dir's manifest, a file's bytes."""
    h = hashlib.sha256()
    if storage.is_file(storage.join(path, STAGE_FILE)):
        return storage.read_json(storage.join(path, STAGE_FILE)).get("fingerprint", "")
    if storage.is_file(storage.join(path, "manifest.json")):
        h.update(storage.read_bytes(storage.join(path, "manifest.json")))
    elif storage.is_file(path):
        with storage.open_input(path) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    elif storage.is_dir(path):
        for rel, size in storage.walk_sizes(path):
            h.update(f"{rel}:{size}\n".encode())
    else:
        return "missing"
    return h.hexdigest()[:16]


def _read_stage_file(out: str) -> dict | None:
    f = storage.join(out, STAGE_FILE)
    try:
        return storage.read_json(f) if storage.is_file(f) else None
    except (json.JSONDecodeError, FileNotFoundError):
        return None


def is_done(stage: Stage, fingerprint: str) -> bool:
    info = _read_stage_file(stage.output)
    return (
        info is not None
        and info.get("status") == "succeeded"
        and info.get("fingerprint") == fingerprint
        and storage.is_file(storage.join(stage.output, "_SUCCESS"))
    )


# ------------------------------------------------------------------------------------ execution


def _execute(kind: str, args: dict, context) -> dict:
    """Runs one stage in this process (the driver, or a Ray task placed by its resources)."""
    import ray

    from pipelines.stages import KINDS

    k = KINDS[kind]
    cfg = k.load(args["config"], args["overrides"], args["params"], kind)
    params = k.parse_params(args["params"], kind)
    t0 = time.time()
    result = k.run(args["input"], args["output"], cfg, params, args["address"], context) or {}
    result["duration_s"] = time.time() - t0
    result["node_id"] = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    result["hostname"] = socket.gethostname()
    return result


def _run_stage(stage: Stage, args: dict, context) -> dict:
    if not stage.resources:
        return _execute(stage.kind, args, context)
    import ray

    res = dict(stage.resources)
    opts = {"num_cpus": res.pop("CPU", 0), "num_gpus": res.pop("GPU", 0), "resources": res, "max_retries": 0}
    return ray.get(ray.remote(_execute).options(**opts).remote(stage.kind, args, context))


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, VlmError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def run_pipeline(
    pipeline: Pipeline,
    *,
    from_stage: str | None = None,
    only: str | None = None,
    force: bool = False,
    address: str | None = None,
    log=print,
) -> dict:
    """Run the stages that are not done. Returns {"stages": {name: status dict}, "failed": [...]}."""
    from pipelines.stages import KINDS
    from vlm import tracking
    from vlm.runtime import init_ray

    for flag, value in (("--from", from_stage), ("--only", only)):
        if value and value not in pipeline.stages:
            raise ConfigError(f"{flag}: no stage {value!r} in {pipeline.name} ({', '.join(pipeline.stages)})")
    order = pipeline.order()
    forced = set(order) if force else set()
    if from_stage:
        forced |= pipeline.downstream(from_stage)
    if only:
        forced.add(only)
    init_ray(address)
    outputs = {n: s.output for n, s in pipeline.stages.items()}
    if storage.is_url(pipeline.output):
        storage.check_writable(pipeline.output)
    storage.makedirs(pipeline.output)
    statuses: dict[str, dict] = {}
    fingerprints: dict[str, str] = {}
    failed: list[str] = []
    t_start = time.time()
    with tracking.start_run(
        pipeline.experiment,
        pipeline.name,
        tags={"vlm.kind": "pipeline", "vlm.pipeline_file": pipeline.path, "vlm.output": pipeline.output},
    ) as parent:
        if parent:
            parent.log_params({"pipeline": pipeline.name, "stages": ",".join(order), "output": pipeline.output})
        for i, name in enumerate(order, 1):
            stage = pipeline.stages[name]
            kind = KINDS[stage.kind]
            head = f"[{i}/{len(order)}] {name} ({stage.kind})"
            if only and name != only:
                if not storage.is_file(storage.join(stage.output, "_SUCCESS")) and name in _ancestors(pipeline, only):
                    raise InputError(f"--only {only}: its input stage {name!r} has not completed; run it first")
                fingerprints[name] = (_read_stage_file(stage.output) or {}).get("fingerprint", "")
                continue
            blocked = [d for d in stage.deps if d in failed or statuses.get(d, {}).get("status") == "blocked"]
            if blocked:
                statuses[name] = {"status": "blocked", "by": blocked[0]}
                log(f"{head}: not run, its input stage {blocked[0]!r} failed")
                continue
            args = {
                "input": _resolve(stage.input, outputs),
                "output": stage.output,
                "config": stage.config,
                "overrides": list(stage.overrides),
                "params": _resolve(stage.params, outputs),
                "address": None,
            }
            try:
                resolved_cfg = kind.resolve_config(stage.config, stage.overrides, args["params"])
            except VlmError as exc:
                raise ConfigError(f"stage {name!r}: {exc}") from None
            inputs = {d: fingerprints.get(d, "") for d in stage.deps}
            for p in _literal_paths(stage):
                inputs[p] = path_digest(p)
            fingerprint = hashlib.sha256(
                json.dumps(
                    {"kind": stage.kind, "config": resolved_cfg, "params": args["params"], "inputs": inputs},
                    sort_keys=True,
                    default=str,
                ).encode()
            ).hexdigest()[:16]
            fingerprints[name] = fingerprint
            if name not in forced and is_done(stage, fingerprint):
                info = _read_stage_file(stage.output)
                statuses[name] = {"status": "skipped", "mlflow_run_id": info.get("mlflow_run_id"), **_keep(info)}
                log(f"{head}: done already (fingerprint {fingerprint}), skipped")
                continue
            previous = _read_stage_file(stage.output)
            if storage.exists(stage.output) and (
                name in forced or not previous or previous["fingerprint"] != fingerprint
            ):
                why = "forced" if name in forced else "its config or inputs changed"
                if storage.listdir(stage.output):
                    log(f"{head}: clearing {stage.output} ({why})")
                storage.rmtree(stage.output)
            elif previous:
                log(f"{head}: resuming an interrupted run with the same fingerprint")
            storage.makedirs(stage.output)
            storage.delete(storage.join(stage.output, "_SUCCESS"))
            record = {
                "stage": name,
                "kind": stage.kind,
                "status": "running",
                "fingerprint": fingerprint,
                "config_hash": hashlib.sha256(
                    json.dumps(resolved_cfg, sort_keys=True, default=str).encode()
                ).hexdigest()[:16],
                "inputs": {k: {"digest": v, "path": outputs.get(k, k)} for k, v in inputs.items()},
                "params": args["params"],
                "pipeline": pipeline.name,
                "pipeline_run_id": parent.run_id if parent else None,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            _write_stage_file(stage.output, record)
            context = (
                tracking.RunContext(
                    parent_run_id=parent.run_id,
                    experiment=pipeline.experiment,
                    run_name=name,
                    tags={"vlm.stage": name, "vlm.kind": stage.kind, "vlm.fingerprint": fingerprint},
                )
                if parent
                else None
            )
            log(f"{head}: running" + (f" on a node with {stage.resources}" if stage.resources else ""))
            t0 = time.time()
            try:
                result = _run_stage(stage, args, context)
            except BaseException as exc:
                err = _error_line(_unwrap(exc))
                record.update(status="failed", error=err, duration_s=time.time() - t0)
                _write_stage_file(stage.output, record)
                statuses[name] = {"status": "failed", "error": err}
                failed.append(name)
                log(f"{head}: FAILED after {time.time() - t0:.0f}s: {err}")
                if not isinstance(_unwrap(exc), VlmError):
                    log("".join(traceback.format_exception(_unwrap(exc))).rstrip())
                if isinstance(exc, KeyboardInterrupt):
                    raise
                continue
            run_id = result.get("mlflow_run_id") or _stage_run(parent, pipeline, name, stage, fingerprint)
            record.update(
                status="succeeded",
                duration_s=result["duration_s"],
                node_id=result.get("node_id"),
                hostname=result.get("hostname"),
                mlflow_run_id=run_id,
                metrics=result.get("metrics", {}),
                finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
            )
            _log_lineage(run_id, record)
            _write_stage_file(stage.output, record)
            storage.write_bytes(storage.join(stage.output, "_SUCCESS"), b"")
            statuses[name] = {"status": "ran", "mlflow_run_id": run_id, **_keep(record)}
            log(f"{head}: done in {result['duration_s']:.0f}s" + _metric_text(record["metrics"]))
        total = time.time() - t_start
        if parent:
            parent.log_metrics(
                {f"stage_duration_s/{n}": s["duration_s"] for n, s in statuses.items() if s.get("duration_s")}
                | {"duration_s": total, "stages_failed": len(failed)}
            )
            parent.log_dict(statuses, "stages.json")
            parent.set_tags({"vlm.status": "failed" if failed else "succeeded"})
    return {
        "stages": statuses,
        "failed": failed,
        "duration_s": total,
        "mlflow_run_id": parent.run_id if parent else None,
    }


def _unwrap(exc: BaseException) -> BaseException:
    """The user's exception from inside a Ray task error, where there is one."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _keep(info: dict) -> dict:
    return {k: info[k] for k in ("duration_s", "metrics", "node_id") if k in info}


def _ancestors(pipeline: Pipeline, name: str) -> set[str]:
    found: set[str] = set()
    todo = list(pipeline.stages[name].deps)
    while todo:
        d = todo.pop()
        if d not in found:
            found.add(d)
            todo += pipeline.stages[d].deps
    return found


def _literal_paths(stage: Stage) -> list[str]:
    """Inputs given as plain paths (not ${stage}); their content digest joins the fingerprint."""
    items = stage.input if isinstance(stage.input, list) else [stage.input]
    return [_abs(str(p)) for p in items if isinstance(p, str) and p and not _REF.search(p)]


def _write_stage_file(out: str, record: dict) -> None:
    storage.write_text(storage.join(out, STAGE_FILE), json.dumps(record, indent=2, default=str))


def _stage_run(parent, pipeline: Pipeline, name: str, stage: Stage, fingerprint: str) -> str | None:
    """A nested run for a stage kind that opens none of its own."""
    if parent is None:
        return None
    from vlm import tracking

    with tracking.start_run(
        pipeline.experiment,
        name,
        tags={"vlm.stage": name, "vlm.kind": stage.kind, "vlm.fingerprint": fingerprint},
        parent_run_id=parent.run_id,
    ) as run:
        if run:
            run.log_params({f"param.{k}": v for k, v in stage.params.items()})
        return run.run_id if run else None


def _log_lineage(run_id: str | None, record: dict) -> None:
    if not run_id:
        return
    from vlm import tracking

    with tracking.start_run("", run_id=run_id) as run:
        if run:
            run.log_dict(record, "lineage.json")
            run.set_tags(
                {"vlm.stage": record["stage"], "vlm.kind": record["kind"], "vlm.fingerprint": record["fingerprint"]}
                | {f"vlm.input.{k}": v["digest"] for k, v in record["inputs"].items()}
            )


def _metric_text(metrics: dict) -> str:
    shown = [f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"][:4]
    return f"  ({', '.join(shown)})" if shown else ""


def summary_table(result: dict) -> str:
    rows = [("stage", "status", "time", "key figures")]
    for name, s in result["stages"].items():
        t = f"{s['duration_s']:.0f}s" if s.get("duration_s") else ""
        figures = _metric_text(s.get("metrics") or {}).strip(" ()")
        status = s["status"] + (f": {s['error']}" if s.get("error") else "")
        rows.append((name, status[:70], t, figures))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows)
