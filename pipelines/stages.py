"""The stage kinds a pipeline file can name, each a thin adapter onto the stage's own entry point.

Every kind takes the same arguments from the runner: `input` (a path, a list of paths, or None),
`output` (the stage's directory), `config` (a stage config file or None), `overrides` (dotted
key=value for that config), `params` (kind-specific, with ${stage} references already resolved to
directories) and `address`. It returns {"mlflow_run_id", "metrics"}. The runner writes `_SUCCESS`
and `_stage.json`; a kind only has to leave its output whole when it returns.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm.config import load_config, to_dict
from vlm.errors import ConfigError, InputError


@dataclass(frozen=True)
class Kind:
    run: Callable[..., dict]
    config_cls: str | None = None  # "module:Class" of the stage config, loaded lazily
    params: tuple[str, ...] = ()  # allowed params keys

    def config_class(self):
        if self.config_cls is None:
            return None
        module, _, name = self.config_cls.partition(":")
        return getattr(importlib.import_module(module), name)

    def load(self, config: str | None, overrides: list[str]):
        cls = self.config_class()
        if cls is None:
            if config or overrides:
                raise ConfigError("this stage kind takes params, not a config file or overrides")
            return None
        return load_config(cls, config, overrides)

    def resolve_config(self, config: str | None, overrides: list[str]) -> dict:
        cfg = self.load(config, overrides)
        return {} if cfg is None else to_dict(cfg)


def _one_input(value: Any, kind: str) -> str:
    if isinstance(value, list):
        if len(value) != 1:
            raise ConfigError(f"a {kind} stage takes one input, got {len(value)}")
        value = value[0]
    if not value:
        raise ConfigError(f"a {kind} stage needs an input")
    return str(value)


def _check_params(kind: str, params: dict, allowed: tuple[str, ...]) -> None:
    bad = sorted(set(params) - set(allowed))
    if bad:
        raise ConfigError(f"{kind} stage: unknown param {bad[0]!r} (allowed: {', '.join(allowed) or 'none'})")


def _numbers(d: dict, prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ----------------------------------------------------------------------------------- data stages

URLS_PARAMS = ("n", "noisy_fraction", "seed", "port", "duplicates", "failures")


def run_urls(input, output, config, overrides, params, address) -> dict:
    """A URL list for the local test web (digits with known noise labels) -> OUTPUT/urls.parquet."""
    from vlm.testbed.url_lists import make_url_rows, write_url_list

    _check_params("urls", params, URLS_PARAMS)
    port = int(params.get("port", 8731))
    rows = make_url_rows(
        f"http://127.0.0.1:{port}",
        int(params.get("n", 1000)),
        seed=int(params.get("seed", 0)),
        failures=bool(params.get("failures", True)),
        noisy_fraction=float(params.get("noisy_fraction", 0.0)),
        duplicates=int(params.get("duplicates", 0)),
    )
    write_url_list(rows, Path(output) / "urls.parquet")
    noisy = sum(bool(r["noisy"]) for r in rows)
    return {"metrics": {"urls": len(rows), "noisy_captions": noisy}}


DIGITS_PARAMS = ("n", "samples_per_shard", "image_size", "noisy_fraction", "seed")


def run_digits(input, output, config, overrides, params, address) -> dict:
    """Digit shards written directly (no HTTP): a clean annotated set, or test data."""
    from vlm.testbed.digit_shards import write_digit_shards

    _check_params("digits", params, DIGITS_PARAMS)
    n = int(params.get("n", 500))
    write_digit_shards(
        output,
        n,
        samples_per_shard=int(params.get("samples_per_shard", 256)),
        image_size=int(params.get("image_size", 64)),
        noisy_fraction=float(params.get("noisy_fraction", 0.0)),
        seed=int(params.get("seed", 0)),
    )
    return {"metrics": {"samples": n}}


def run_ingest(input, output, config, overrides, params, address) -> dict:
    """`vlm ingest`; with params.local_web_port, serves the local test web while it downloads."""
    import contextlib

    from pipelines.ingest import IngestConfig, ingest

    _check_params("ingest", params, ("local_web_port", "local_web_seed"))
    cfg = load_config(IngestConfig, config, overrides)
    web = contextlib.nullcontext()
    if params.get("local_web_port"):
        from vlm.testbed.web import LocalWeb

        web = LocalWeb(port=int(params["local_web_port"]), seed=int(params.get("local_web_seed", 0)), slow_delay_s=30)
    with web:
        manifest = ingest(_one_input(input, "ingest"), output, cfg, address=address, show_progress=False)
    totals = manifest["totals"]
    return {
        "mlflow_run_id": manifest.get("mlflow_run_id"),
        "metrics": {
            "samples": totals["count"],
            "successes": totals["successes"],
            "success_rate": totals["success_rate"],
        },
    }


def run_clean(input, output, config, overrides, params, address) -> dict:
    """`vlm clean` (basic filters, dedup, CLIP score); params.clip: a CLIP export for clipscore."""
    from pipelines.clean import CleanConfig, clean

    _check_params("clean", params, ("clip",))
    if params.get("clip"):
        overrides = [*overrides, f"clipscore.checkpoint={params['clip']}"]
    cfg = load_config(CleanConfig, config, overrides)
    manifest = clean(_one_input(input, "clean"), output, cfg, address=address, show_progress=False)
    return {"mlflow_run_id": manifest.get("mlflow_run_id"), "metrics": _kept_metrics(manifest)}


def _kept_metrics(manifest: dict) -> dict:
    totals = manifest.get("totals", {})
    return _numbers({k: totals[k] for k in ("kept", "dropped", "kept_fraction") if k in totals})


def run_capfilt(input, output, config, overrides, params, address) -> dict:
    """`vlm capfilt`; params.captioner / params.filter: exports of `train-blip` stages."""
    from pipelines.capfilt import CapfiltConfig, capfilt

    _check_params("capfilt", params, ("captioner", "filter"))
    extra = []
    if params.get("captioner"):
        extra.append(f"blip.pretrained={params['captioner']}")
    if params.get("filter"):
        extra.append(f"blip.filter_pretrained={params['filter']}")
    cfg = load_config(CapfiltConfig, config, [*overrides, *extra])
    manifest = capfilt(_one_input(input, "capfilt"), output, cfg, address=address, show_progress=False)
    metrics = _kept_metrics(manifest)
    metrics.update(_numbers(manifest.get("quality", {}), "filter_"))
    return {"mlflow_run_id": manifest.get("mlflow_run_id"), "metrics": metrics}


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
    return (Path(output) / "train_state.json").is_file()


def run_train_clip(input, output, config, overrides, params, address) -> dict:
    from pipelines.train_clip import TrainClipConfig, train_clip

    _check_params("train-clip", params, ())
    cfg = load_config(TrainClipConfig, config, overrides)
    return _train_result(train_clip(_data(input, "train-clip"), output, cfg, resume=_resume(output), address=address))


def run_train_blip(input, output, config, overrides, params, address) -> dict:
    """`vlm train blip`; params.task (captioner / filter) overrides the config's `task`."""
    from pipelines.train_blip import TrainBlipConfig, train_blip

    _check_params("train-blip", params, ("task",))
    if params.get("task"):
        overrides = [*overrides, f"task={params['task']}"]
    cfg = load_config(TrainBlipConfig, config, overrides)
    return _train_result(train_blip(_data(input, "train-blip"), output, cfg, resume=_resume(output), address=address))


def run_train_flamingo(input, output, config, overrides, params, address) -> dict:
    from pipelines.train_flamingo import TrainFlamingoConfig, train_flamingo

    _check_params("train-flamingo", params, ("clip",))
    if params.get("clip"):
        overrides = [*overrides, f"vision_checkpoint={params['clip']}"]
    cfg = load_config(TrainFlamingoConfig, config, overrides)
    result = train_flamingo(_data(input, "train-flamingo"), output, cfg, resume=_resume(output), address=address)
    return _train_result(result)


# ---------------------------------------------------------------------------------- evaluation


def run_compare(input, output, config, overrides, params, address) -> dict:
    """Side-by-side table + overlaid loss curves of other stages' runs (`vlm runs compare`)."""
    from pipelines.compare import compare_runs

    _check_params("compare", params, ("stages",))
    dirs = params.get("stages") or []
    if len(dirs) < 2:
        raise ConfigError("compare stage: params.stages lists at least two stages, as ${name}")
    run_ids = []
    for d in dirs:
        info_path = Path(d) / "_stage.json"
        if not info_path.is_file():
            raise InputError(f"compare stage: {d} is not a finished stage output")
        run_id = json.loads(info_path.read_text()).get("mlflow_run_id")
        if not run_id:
            raise InputError(f"compare stage: {d} has no MLflow run to compare")
        run_ids.append(run_id)
    report = compare_runs(run_ids, output=Path(output) / "report.html")
    print(report["table"])
    return {"metrics": {}}


KINDS: dict[str, Kind] = {
    "urls": Kind(run_urls, None, URLS_PARAMS),
    "digits": Kind(run_digits, None, DIGITS_PARAMS),
    "ingest": Kind(run_ingest, "pipelines.ingest:IngestConfig"),
    "clean": Kind(run_clean, "pipelines.clean:CleanConfig"),
    "clipscore": Kind(run_clean, "pipelines.clean:CleanConfig"),
    "capfilt": Kind(run_capfilt, "pipelines.capfilt:CapfiltConfig"),
    "train-blip": Kind(run_train_blip, "pipelines.train_blip:TrainBlipConfig"),
    "train-clip": Kind(run_train_clip, "pipelines.train_clip:TrainClipConfig"),
    "train-flamingo": Kind(run_train_flamingo, "pipelines.train_flamingo:TrainFlamingoConfig"),
    "compare": Kind(run_compare),
}
