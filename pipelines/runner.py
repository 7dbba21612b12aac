"""`vlm pipeline run`: a pipeline of stages from one YAML, ordered by their data dependencies.

A pipeline file names its stages; each stage has a `kind` (what runs: `pipelines/stages.py`), an
optional stage `config` file with `overrides`, kind-specific `params`, and inputs written as
`${other-stage}` (that stage's output directory) anywhere in its `input` or `params`:

    name: demo
    output: demo_out                  # a stage's output defaults to {output}/{stage}
    experiment: pipeline-demo
    stages:
      raw:   {kind: ingest, input: "${urls}/urls.parquet", config: configs/ingest/demo.yaml}
      clean: {kind: clean, input: "${raw}", resources: {cpu_pool: 1}}

Skipping is by fingerprint: a stage's `_stage.json` records the digest of its kind, resolved
config, params and inputs (an upstream stage contributes its own fingerprint, a plain path its
content digest); a stage whose output holds `_SUCCESS` and a matching fingerprint is done. A stage
that was interrupted with the same fingerprint resumes (shard stages skip complete shards,
trainers continue from their last checkpoint); with a different fingerprint its output is cleared
first. A failed stage stops its dependents, not its independent siblings, and the run exits
non-zero naming it; rerunning the same command continues from there.

MLflow: one parent run per invocation in the pipeline's experiment, and each stage's own run is
nested under it (named after the stage) through `tracking.stage_env`; lineage (inputs with their
digests, outputs, node) is logged to the stage run. A stage with `resources` runs as a Ray task
that needs them, so it lands on a node that has them (e.g. a GPU pool or a custom resource).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm.config import parse_overrides
from vlm.errors import ConfigError, InputError, VlmError

ROOT = Path(__file__).resolve().parents[1]
STAGE_FILE = "_stage.json"
_REF = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
_STAGE_KEYS = {"kind", "input", "config", "overrides", "params", "output", "resources", "after"}
_PIPELINE_KEYS = {"name", "output", "experiment", "stages", "description"}


@dataclass
class Stage:
    name: str
    kind: str
    input: Any = None  # str | list[str] | None, may hold ${stage} references
    config: str | None = None
    overrides: list[str] = field(default_factory=list)  # dotted key=value for the stage config
    params: dict = field(default_factory=dict)
    output: str = ""
    resources: dict | None = None  # run as a Ray task needing these (custom resources, GPU, CPU)
    after: list[str] = field(default_factory=list)  # extra ordering without data

    @property
    def deps(self) -> list[str]:
        refs = _REF.findall(json.dumps([self.input, self.params]))
        return list(dict.fromkeys(refs + list(self.after)))


@dataclass
class Pipeline:
    name: str
    output: str
    experiment: str
    stages: dict[str, Stage]
    path: str = ""

    def order(self) -> list[str]:
        """Stage names in dependency order (YAML order among independent stages)."""
        done: list[str] = []
        pending = list(self.stages)
        while pending:
            for name in pending:
                if all(d in done for d in self.stages[name].deps):
                    done.append(name)
                    pending.remove(name)
                    break
            else:
                raise ConfigError(f"pipeline stages have a dependency cycle among: {', '.join(pending)}")
        return done

    def downstream(self, name: str) -> set[str]:
        """`name` and every stage that depends on it, directly or not."""
        found = {name}
        for s in self.order():
            if any(d in found for d in self.stages[s].deps):
                found.add(s)
        return found


# ------------------------------------------------------------------------------------- loading


def _abs(path: str) -> str:
    """Relative paths: from the working directory, else from the project root (jobs run elsewhere)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or not (ROOT / p).exists():
        return str(p.resolve())
    return str((ROOT / p).resolve())


def _flat_overrides(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return list(value)
    raise ConfigError(f"{where}: overrides must be a mapping of dotted keys or a list of key=value")


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """Read a pipeline YAML. Overrides: `output=DIR`, `experiment=X`, `STAGE.params.K=V`,
    `STAGE.input=PATH`, and `STAGE.some.config.key=V` (appended to that stage's config overrides)."""
    import yaml

    from pipelines.stages import KINDS

    path = Path(path)
    if not path.is_file():
        raise InputError(f"pipeline file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a pipeline is a mapping with name, output, stages")
    stage_overrides: dict[str, list[str]] = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        head, _, rest = key.partition(".")
        if head in _PIPELINE_KEYS - {"stages"} and not rest:
            raw[head] = value
        elif head in (raw.get("stages") or {}) and rest:
            sub, _, leaf = rest.partition(".")
            spec = raw["stages"][head]
            if sub == "params" and leaf:
                spec.setdefault("params", {})
                _set_dotted(spec["params"], leaf, parse_overrides([f"x={value}"])["x"])
            elif sub in ("input", "config", "output") and not leaf:
                spec[sub] = value
            else:
                stage_overrides.setdefault(head, []).append(f"{rest}={value}")
        else:
            raise ConfigError(f"unknown pipeline override {key!r}: use output=, experiment=, or STAGE.key=value")
    unknown = set(raw) - _PIPELINE_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown pipeline key {sorted(unknown)[0]!r}")
    name = str(raw.get("name") or path.stem)
    output = _abs(str(raw.get("output") or f"outputs/{name}"))
    stages: dict[str, Stage] = {}
    for sname, spec in (raw.get("stages") or {}).items():
        where = f"{path}: stage {sname!r}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where} must be a mapping")
        bad = set(spec) - _STAGE_KEYS
        if bad:
            raise ConfigError(f"{where}: unknown key {sorted(bad)[0]!r} (allowed: {', '.join(sorted(_STAGE_KEYS))})")
        kind = spec.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"{where}: kind must be one of {', '.join(sorted(KINDS))}, got {kind!r}")
        config = spec.get("config")
        if config is not None:
            config = _abs(str(config))
            if not Path(config).is_file():
                raise InputError(f"{where}: config file not found: {spec['config']}")
        stages[sname] = Stage(
            name=sname,
            kind=kind,
            input=spec.get("input"),
            config=config,
            overrides=_flat_overrides(spec.get("overrides"), where) + stage_overrides.pop(sname, []),
            params=dict(spec.get("params") or {}),
            output=_abs(str(spec["output"])) if spec.get("output") else str(Path(output) / sname),
            resources=dict(spec["resources"]) if spec.get("resources") else None,
            after=list(spec.get("after") or []),
        )
    if not stages:
        raise ConfigError(f"{path}: the pipeline has no stages")
    for s in stages.values():
        missing = [d for d in s.deps if d not in stages]
        if missing:
            raise ConfigError(f"{path}: stage {s.name!r} refers to unknown stage {missing[0]!r}")
    pipeline = Pipeline(name, output, str(raw.get("experiment") or f"pipeline-{name}"), stages, str(path.resolve()))
    pipeline.order()  # cycles are a config error now, not halfway through a run
    return pipeline


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


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
    p = Path(path)
    h = hashlib.sha256()
    if (p / STAGE_FILE).is_file():
        return json.loads((p / STAGE_FILE).read_text()).get("fingerprint", "")
    if (p / "manifest.json").is_file():
        h.update((p / "manifest.json").read_bytes())
    elif p.is_file():
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    elif p.is_dir():
        for f in sorted(p.rglob("*")):
            if f.is_file():
                h.update(f"{f.relative_to(p)}:{f.stat().st_size}\n".encode())
    else:
        return "missing"
    return h.hexdigest()[:16]


def _read_stage_file(out: str) -> dict | None:
    f = Path(out) / STAGE_FILE
    try:
        return json.loads(f.read_text()) if f.is_file() else None
    except json.JSONDecodeError:
        return None


def is_done(stage: Stage, fingerprint: str) -> bool:
    info = _read_stage_file(stage.output)
    return (
        info is not None
        and info.get("status") == "succeeded"
        and info.get("fingerprint") == fingerprint
        and (Path(stage.output) / "_SUCCESS").is_file()
    )


# ------------------------------------------------------------------------------------ execution


def _execute(kind: str, args: dict, env: dict[str, str]) -> dict:
    """Runs one stage in this process (the driver, or a Ray task placed by its resources)."""
    import ray

    from pipelines.stages import KINDS

    os.environ.update(env)
    try:
        t0 = time.time()
        result = KINDS[kind].run(**args) or {}
        result["duration_s"] = time.time() - t0
    finally:
        for k in env:
            os.environ.pop(k, None)
    result["node_id"] = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    result["hostname"] = socket.gethostname()
    return result


def _run_stage(stage: Stage, args: dict, env: dict[str, str]) -> dict:
    if not stage.resources:
        return _execute(stage.kind, args, env)
    import ray

    res = dict(stage.resources)
    opts = {"num_cpus": res.pop("CPU", 0), "num_gpus": res.pop("GPU", 0), "resources": res, "max_retries": 0}
    return ray.get(ray.remote(_execute).options(**opts).remote(stage.kind, args, env))


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
    Path(pipeline.output).mkdir(parents=True, exist_ok=True)
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
                if not (Path(stage.output) / "_SUCCESS").is_file() and name in _ancestors(pipeline, only):
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
                resolved_cfg = kind.resolve_config(stage.config, stage.overrides)
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
            if Path(stage.output).exists() and (
                name in forced or not previous or previous["fingerprint"] != fingerprint
            ):
                why = "forced" if name in forced else "its config or inputs changed"
                if Path(stage.output).exists() and any(Path(stage.output).iterdir()):
                    log(f"{head}: clearing {stage.output} ({why})")
                shutil.rmtree(stage.output)
            elif previous:
                log(f"{head}: resuming an interrupted run with the same fingerprint")
            Path(stage.output).mkdir(parents=True, exist_ok=True)
            (Path(stage.output) / "_SUCCESS").unlink(missing_ok=True)
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
            env = (
                tracking.stage_env(
                    parent.run_id,
                    pipeline.experiment,
                    name,
                    {"vlm.stage": name, "vlm.kind": stage.kind, "vlm.fingerprint": fingerprint},
                )
                if parent
                else {}
            )
            log(f"{head}: running" + (f" on a node with {stage.resources}" if stage.resources else ""))
            t0 = time.time()
            try:
                result = _run_stage(stage, args, env)
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
            (Path(stage.output) / "_SUCCESS").touch()
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
    path = Path(out) / STAGE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)


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
