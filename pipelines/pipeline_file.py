"""A pipeline file: its stages, their kinds, inputs and dependencies (`vlm pipeline run` reads it).

A pipeline file names its stages; each stage has a `kind` (what runs: `pipelines/stages.py`), an
optional stage `config` file with `overrides`, kind-specific `params`, and inputs written as
`${other-stage}` (that stage's output directory) anywhere in its `input` or `params`:

    name: demo
    output: demo_out                  # a stage's output defaults to {output}/{stage}
    experiment: pipeline-demo
    stages:
      raw:   {kind: ingest, input: "${urls}/urls.parquet", config: configs/ingest/demo.yaml}
      clean: {kind: clean, input: "${raw}", resources: {cpu_pool: 1}}

Loading checks everything a run would trip over later: unknown keys and kinds, references to
unknown stages, dependency cycles, missing config files. `pipelines.runner` runs it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm import storage
from vlm.config import parse_overrides
from vlm.errors import ConfigError, InputError

ROOT = Path(__file__).resolve().parents[1]
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
    """Relative paths: from the working directory, else from the project root (jobs run elsewhere).
    URLs (s3://...) stay as they are, normalized."""
    if storage.is_url(path):
        return storage.normalize(path)
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
            output=_abs(str(spec["output"])) if spec.get("output") else storage.join(output, sname),
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
