"""The stage kinds a pipeline file can name, each a thin adapter onto the stage's own entry point.

A kind has a typed `params` schema (a dataclass: unknown keys and wrong types are config errors)
and, for stages with a config, a config class. Params that set config keys (`clean`'s `clip`
sets `clipscore.checkpoint`) are applied as overrides before the config resolves, so the
runner's fingerprint covers them and the config validates with them. Every kind's `run` takes
the same arguments from the runner: `input` (a path, a list of paths, or None), `output` (the
stage's directory), `cfg` (the resolved config, or None), `params` (the typed params, ${stage}
references already resolved to directories), `address`, and `context` (a
`vlm.tracking.RunContext` nesting the stage's MLflow run under the pipeline's). It returns
{"mlflow_run_id", "metrics"}. The runner writes `_SUCCESS` and `_stage.json`; a kind only has to
leave its output whole when it returns.
"""

from __future__ import annotations

import dataclasses
import importlib
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm import storage
from vlm.config import from_dict, load_config, to_dict
from vlm.errors import ConfigError, InputError


@dataclass
class NoParams:
    """A kind that takes no params."""

    def overrides(self) -> list[str]:
        """Config overrides these params stand for."""
        return []


@dataclass(frozen=True)
class Kind:
    run: Callable[..., dict]
    config_cls: str | None = None  # "module:Class" of the stage config, loaded lazily
    params_cls: type = NoParams  # the params schema (a dataclass with `overrides()`)

    def config_class(self):
        if self.config_cls is None:
            return None
        module, _, name = self.config_cls.partition(":")
        return getattr(importlib.import_module(module), name)

    def parse_params(self, params: dict | None, kind: str = "") -> Any:
        allowed = [f.name for f in dataclasses.fields(self.params_cls)]
        bad = sorted(set(params or {}) - set(allowed))
        if bad:
            raise ConfigError(f"{kind} stage: unknown param {bad[0]!r} (allowed: {', '.join(allowed) or 'none'})")
        try:
            return from_dict(self.params_cls, params or {})
        except ConfigError as exc:
            raise ConfigError(f"{kind} stage params: {exc}") from None

    def load(self, config: str | None, overrides: list[str], params: dict | None = None, kind: str = ""):
        """The stage config: defaults <- file <- overrides <- what the params set."""
        typed = self.parse_params(params, kind)
        cls = self.config_class()
        if cls is None:
            if config or overrides:
                raise ConfigError("this stage kind takes params, not a config file or overrides")
            return None
        return load_config(cls, config, [*overrides, *typed.overrides()])

    def resolve_config(self, config: str | None, overrides: list[str], params: dict | None = None) -> dict:
        cfg = self.load(config, overrides, params)
        return {} if cfg is None else to_dict(cfg)


def _one_input(value: Any, kind: str) -> str:
    if isinstance(value, list):
        if len(value) != 1:
            raise ConfigError(f"a {kind} stage takes one input, got {len(value)}")
        value = value[0]
    if not value:
        raise ConfigError(f"a {kind} stage needs an input")
    return str(value)


def _numbers(d: dict, prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _set(overrides: list[tuple[str, Any]]) -> list[str]:
    return [f"{key}={value}" for key, value in overrides if value]


# ----------------------------------------------------------------------------------- data stages


@dataclass
class UrlsParams(NoParams):
    n: int = 1000  # URLs in the list
    noisy_fraction: float = 0.0  # captions deliberately wrong (labelled `noisy`)
    seed: int = 0
    port: int = 8731  # where the local test web will serve them
    duplicates: int = 0  # repeated URLs
    failures: bool = True  # include every failure kind the local web serves


@contextmanager
def _local_output(output: str) -> Iterator[Path]:
    """A local directory for writers that need disk: `output` itself, or a temp dir whose files are
    uploaded to the URL `output` when the block ends without error."""
    if not storage.is_url(output):
        Path(output).mkdir(parents=True, exist_ok=True)
        yield Path(output)
        return
    with tempfile.TemporaryDirectory(prefix="vlm-stage-") as tmp:
        yield Path(tmp)
        storage.copy_dir(tmp, output)


def run_urls(input, output, cfg, params: UrlsParams, address, context) -> dict:
    """A URL list for the local test web (digits with known noise labels) -> OUTPUT/urls.parquet."""
    from vlm.testbed.url_lists import make_url_rows, write_url_list

    rows = make_url_rows(
        f"http://127.0.0.1:{params.port}",
        params.n,
        seed=params.seed,
        failures=params.failures,
        noisy_fraction=params.noisy_fraction,
        duplicates=params.duplicates,
    )
    with _local_output(output) as local:
        write_url_list(rows, local / "urls.parquet")
    noisy = sum(bool(r["noisy"]) for r in rows)
    return {"metrics": {"urls": len(rows), "noisy_captions": noisy}}


@dataclass
class DigitsParams(NoParams):
    n: int = 500
    samples_per_shard: int = 256
    image_size: int = 64
    noisy_fraction: float = 0.0
    seed: int = 0


def run_digits(input, output, cfg, params: DigitsParams, address, context) -> dict:
    """Digit shards written directly (no HTTP): a clean annotated set, or test data."""
    from vlm.testbed.digit_shards import write_digit_shards

    with _local_output(output) as local:
        write_digit_shards(
            local,
            params.n,
            samples_per_shard=params.samples_per_shard,
            image_size=params.image_size,
            noisy_fraction=params.noisy_fraction,
            seed=params.seed,
        )
    return {"metrics": {"samples": params.n}}


@dataclass
class IngestParams(NoParams):
    local_web_port: int | None = None  # serve the local test web on this port while downloading
    local_web_seed: int = 0


def run_ingest(input, output, cfg, params: IngestParams, address, context) -> dict:
    """`vlm ingest`; with params.local_web_port, serves the local test web while it downloads."""
    import contextlib

    from pipelines.ingest import ingest

    web = contextlib.nullcontext()
    if params.local_web_port:
        from vlm.testbed.web import LocalWeb

        web = LocalWeb(port=params.local_web_port, seed=params.local_web_seed, slow_delay_s=30)
    with web:
        manifest = ingest(
            _one_input(input, "ingest"), output, cfg, address=address, show_progress=False, context=context
        )
    return _shard_result(manifest, "successes", "success_rate")


@dataclass
class CleanParams(NoParams):
    clip: str | None = None  # a CLIP export (e.g. ${train-clip}/export) for the clipscore step

    def overrides(self) -> list[str]:
        return _set([("clipscore.checkpoint", self.clip)])


def run_clean(input, output, cfg, params: CleanParams, address, context) -> dict:
    """`vlm clean` (basic filters, dedup, CLIP score)."""
    from pipelines.clean import clean

    manifest = clean(_one_input(input, "clean"), output, cfg, address=address, show_progress=False, context=context)
    return _shard_result(manifest)


def _shard_result(manifest: dict, *extra: str) -> dict:
    totals = manifest.get("totals", {})
    keys = ("samples", "kept", "dropped", "kept_fraction", *extra)
    metrics = _numbers({k: totals.get("count" if k == "samples" else k) for k in keys})
    return {"mlflow_run_id": manifest.get("mlflow_run_id"), "metrics": metrics}


@dataclass
class CapfiltParams(NoParams):
    captioner: str | None = None  # a `train-blip` captioner export: blip.pretrained
    filter: str | None = None  # a `train-blip` filter export: blip.filter_pretrained

    def overrides(self) -> list[str]:
        return _set([("blip.pretrained", self.captioner), ("blip.filter_pretrained", self.filter)])


def run_capfilt(input, output, cfg, params: CapfiltParams, address, context) -> dict:
    """`vlm capfilt`."""
    from pipelines.capfilt import capfilt

    manifest = capfilt(_one_input(input, "capfilt"), output, cfg, address=address, show_progress=False, context=context)
    result = _shard_result(manifest)
    result["metrics"].update(_numbers(manifest["totals"].get("quality", {}), "filter_"))
    return result


# ------------------------------------------------------------------------------------- training


def _train_result(result: dict) -> dict:
    return {"mlflow_run_id": result.get("mlflow_run_id"), "metrics": _numbers(result.get("eval", {}))}


def _data(input, kind: str) -> str:
    items = input if isinstance(input, list) else [input]
    if not items or not all(items):
        raise ConfigError(f"a {kind} stage needs shard directories as input")
    return ",".join(str(i) for i in items)


def _resume(output: str) -> bool:
    # The runner clears an output whose fingerprint changed, so a run state left here is this
    # stage's own interrupted run: continue it from its last checkpoint.
    return storage.is_file(storage.join(output, "train_state.json"))


def _trainer_context(cfg, context) -> dict:
    """The run context for a trainer: its run goes where the context says, nested under the parent.

    Trainers take `parent_run_id` (not yet a `RunContext`), so the context's experiment and
    run name are set on the trainer's tracking config; the runner tags the run afterwards.
    """
    if context is None:
        return {}
    if context.experiment:
        cfg.tracking.experiment = context.experiment
    if context.run_name:
        cfg.tracking.run_name = context.run_name
    return {"parent_run_id": context.parent_run_id}


def _trainer(entry: str, kind: str) -> Callable[..., dict]:
    """The `run` of a trainer kind: `entry` ("module:function") on the stage's shard directories,
    continuing its own interrupted run."""

    def run(input, output, cfg, params, address, context) -> dict:
        module, _, name = entry.partition(":")
        train = getattr(importlib.import_module(module), name)
        kw = _trainer_context(cfg, context)
        return _train_result(train(_data(input, kind), output, cfg, resume=_resume(output), address=address, **kw))

    return run


@dataclass
class TrainBlipParams(NoParams):
    task: str | None = None  # captioner / filter: sets the config's `task`

    def overrides(self) -> list[str]:
        return _set([("task", self.task)])


@dataclass
class TrainFlamingoParams(NoParams):
    clip: str | None = None  # a CLIP export for the frozen vision encoder: vision_checkpoint

    def overrides(self) -> list[str]:
        return _set([("vision_checkpoint", self.clip)])


# ---------------------------------------------------------------------------------- evaluation


@dataclass
class CompareParams(NoParams):
    stages: list[str] = field(default_factory=list)  # stage outputs to compare, as ${name}


def run_compare(input, output, cfg, params: CompareParams, address, context) -> dict:
    """Side-by-side table + overlaid loss curves of other stages' runs (`vlm runs compare`)."""
    from pipelines.compare import compare_runs

    dirs = params.stages
    if len(dirs) < 2:
        raise ConfigError("compare stage: params.stages lists at least two stages, as ${name}")
    run_ids = []
    for d in dirs:
        info_path = storage.join(d, "_stage.json")
        if not storage.is_file(info_path):
            raise InputError(f"compare stage: {d} is not a finished stage output")
        run_id = storage.read_json(info_path).get("mlflow_run_id")
        if not run_id:
            raise InputError(f"compare stage: {d} has no MLflow run to compare")
        run_ids.append(run_id)
    from vlm import tracking

    with _local_output(output) as local:
        report = compare_runs(run_ids, output=local / "report.html")
        print(report["table"])
        # The report belongs where runs are compared: in MLflow, as artifacts of this stage's run.
        tags = {"vlm.compared": ",".join(run_ids)}
        with tracking.start_run("compare", "compare", tags=tags, context=context) as run:
            if run:
                run.log_text(report["table"], "comparison.txt")
                for path in (report["html"], report["png"]):
                    if path is not None:
                        run.log_artifact(path)
                run.log_metrics({"runs_compared": len(run_ids)})
    return {"metrics": {"runs_compared": len(run_ids)}, "mlflow_run_id": run.run_id if run else None}


KINDS: dict[str, Kind] = {
    "urls": Kind(run_urls, None, UrlsParams),
    "digits": Kind(run_digits, None, DigitsParams),
    "ingest": Kind(run_ingest, "pipelines.ingest:IngestConfig", IngestParams),
    "clean": Kind(run_clean, "pipelines.clean:CleanConfig", CleanParams),
    "clipscore": Kind(run_clean, "pipelines.clean:CleanConfig", CleanParams),
    "capfilt": Kind(run_capfilt, "pipelines.capfilt:CapfiltConfig", CapfiltParams),
    "train-blip": Kind(
        _trainer("pipelines.train_blip:train_blip", "train-blip"),
        "pipelines.train_blip:TrainBlipConfig",
        TrainBlipParams,
    ),
    "train-clip": Kind(
        _trainer("pipelines.train_clip:train_clip", "train-clip"), "pipelines.train_clip:TrainClipConfig"
    ),
    "train-flamingo": Kind(
        _trainer("pipelines.train_flamingo:train_flamingo", "train-flamingo"),
        "pipelines.train_flamingo:TrainFlamingoConfig",
        TrainFlamingoParams,
    ),
    "compare": Kind(run_compare, None, CompareParams),
}
