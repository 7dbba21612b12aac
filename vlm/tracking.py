"""The one place stages talk to MLflow.

Embedded default: a SQLite store `mlruns.db` and artifacts under `mlartifacts/` in the working
directory; `MLFLOW_TRACKING_URI` points everything at a server instead. Artifacts go to object
storage either through a server (`mlflow server --artifacts-destination s3://...`: the server
proxies them, clients need no storage credentials) or, with a database store the client opens
itself (the embedded SQLite, postgresql://...), to `MLFLOW_DEFAULT_ARTIFACT_ROOT`, the variable
`mlflow server --default-artifact-root` reads: new experiments get `ROOT/<experiment>` as their
artifact location and the client writes there itself (boto3 for s3://, which honours
AWS_ENDPOINT_URL and the other AWS variables). Each stage opens a
`Run`, logs its flattened resolved config as params, metrics as it goes and artifacts at the
end. Tracking must never take a job down: a failing or slow tracking call warns and the job
goes on (the data written is the product; the run is its record).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm.config import flatten, to_dict

log = logging.getLogger(__name__)

DEFAULT_DB = "mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"
ARTIFACT_ROOT_ENV = "MLFLOW_DEFAULT_ARTIFACT_ROOT"  # the name `mlflow server --default-artifact-root` reads


@dataclass
class TrackingConfig:
    """The `tracking:` section every stage and trainer has."""

    experiment: str = "vlm"  # MLflow experiment (a pipeline run puts its stages in its own)
    run_name: str | None = None  # null: the stage's name and output directory
    gallery_samples: int = 24  # images in the run's MLflow gallery / contact sheet (0: none)


@dataclass(frozen=True)
class RunContext:
    """Where a stage's run goes when a caller (the pipeline runner) owns the run above it.

    Passed as an argument to a stage and on to `start_run(context=...)`: the run is created in
    `experiment`, named `run_name`, nested under `parent_run_id`, with `tags` added.
    """

    parent_run_id: str | None = None
    experiment: str | None = None
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


def tracking_defaults(experiment: str) -> Callable[[], TrackingConfig]:
    """A `default_factory` for a stage's `tracking` section with its own experiment name."""
    return lambda: TrackingConfig(experiment=experiment)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the embedded SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def _is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:") and not os.environ.get("MLFLOW_TRACKING_URI")


def _is_server(uri: str) -> bool:
    """A tracking server decides artifact locations itself; a database store is opened by the client."""
    return uri.startswith(("http://", "https://", "databricks"))


def artifact_root(uri: str | None = None) -> str | None:
    """Where new experiments keep their artifacts, for a store the client opens itself:
    MLFLOW_DEFAULT_ARTIFACT_ROOT (any URL MLflow writes to: s3://, gs://, a local path), else
    `mlartifacts/` in the working directory for the embedded store, else MLflow's default (None).
    None for a tracking server: its --artifacts-destination / --default-artifact-root apply."""
    uri = uri or tracking_uri()
    if _is_server(uri):
        return None
    root = os.environ.get(ARTIFACT_ROOT_ENV, "").strip()
    if root:
        return root.rstrip("/") if "://" in root else Path(root).expanduser().resolve().as_uri()
    return (Path.cwd() / DEFAULT_ARTIFACTS).as_uri() if _is_embedded(uri) else None


def _quiet_mlflow() -> None:
    import mlflow  # noqa: F401  (its import configures the loggers we then quiet)

    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="mlflow")


def _safe(fn):
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except Exception as exc:  # tracking must not kill the job
            log.warning("mlflow %s failed: %s", fn.__name__, str(exc).splitlines()[0] if str(exc) else exc)
            return None

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class Run:
    """A live MLflow run. Methods never raise for tracking errors."""

    def __init__(self, run_id: str, experiment: str, uri: str):
        self.run_id = run_id
        self.experiment = experiment
        self.uri = uri
        import mlflow

        self._client = mlflow.MlflowClient(tracking_uri=uri)
        # Set when the artifact store failed once: MLflow has already retried that call for minutes
        # (a proxied upload to a missing bucket: ~4 min), so later artifacts are skipped, not retried.
        self.artifacts_off: str | None = None

    def _artifacts_failed(self, problem: str) -> None:
        if self.artifacts_off is None:
            log.warning(
                "mlflow artifacts of run %s are not logged (params and metrics still are): %s", self.run_id, problem
            )
        self.artifacts_off = problem

    def _log_artifact_call(self, call: Callable[[], Any]) -> None:
        if self.artifacts_off is not None:
            return
        try:
            call()
        except Exception as exc:  # tracking must not kill the job
            self._artifacts_failed(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    @_safe
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_config(self, cfg: Any, prefix: str = "") -> None:
        """Log a resolved config dataclass as flattened params, and as a YAML artifact."""
        data = to_dict(cfg) if not isinstance(cfg, dict) else cfg
        self.log_params(flatten(data, prefix))
        import yaml

        self.log_text(yaml.safe_dump(data, sort_keys=False), f"{prefix or 'config'}.yaml")

    @_safe
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 500):
            self._client.log_batch(self.run_id, metrics=items[i : i + 500])

    @_safe
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or directory, local or at a storage URL (s3://...: downloaded first)."""
        from vlm import storage

        if not storage.is_url(path):
            self._log_artifact_call(lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))
            return
        with tempfile.TemporaryDirectory(prefix="vlm-artifact-") as tmp:
            local = storage.download(path, tmp)
            self._log_artifact_call(lambda: self._client.log_artifact(self.run_id, str(local), artifact_path))

    @_safe
    def log_text(self, text: str, name: str) -> None:
        self._log_artifact_call(lambda: self._client.log_text(self.run_id, text, name))

    @_safe
    def log_dict(self, data: dict, name: str) -> None:
        self._log_artifact_call(lambda: self._client.log_dict(self.run_id, data, name))

    @_safe
    def log_image(self, image, name: str) -> None:
        """Log a PIL image as a PNG artifact."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            image.save(path)
            self._log_artifact_call(lambda: self._client.log_artifact(self.run_id, str(path)))

    @_safe
    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, str(v))


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


# MLflow 3's UI opens an experiment without a kind on its GenAI overview (traces, token usage);
# these tags make ours open on the runs table, with a line on what the experiment holds.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
DESCRIPTION_TAG = "mlflow.note.content"
_DESCRIPTIONS = {
    "ingest": "vlm ingest runs: URL lists downloaded into webdataset shards (statuses, throughput, contact sheet).",
    "clean": "vlm clean runs: shard filtering and dedup (kept/dropped per reason, score histograms, dropped examples).",
    "capfilt": "vlm capfilt runs: BLIP captioner + ITM filter over shards (caption choices, filter scores, gallery).",
    "train-clip": "vlm train clip runs: contrastive CLIP pretraining with DeepSpeed (loss curves, zero-shot eval).",
    "train-blip": "vlm train blip runs: BLIP captioner / ITM filter training (loss curves, caption and filter eval).",
    "train-flamingo": "vlm train flamingo runs: resampler + gated cross-attention on a frozen LM (k-shot eval).",
}


def experiment_tags(name: str) -> dict[str, str]:
    """The tags every experiment this project creates carries: its kind and a description."""
    what = _DESCRIPTIONS.get(name) or (
        f"vlm runs of '{name}': pipeline runs with one nested run per stage (data stages and training), "
        "each with its resolved config, metrics and pictures."
    )
    return {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, DESCRIPTION_TAG: what}


def _experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    root = artifact_root(uri)
    if exp is None:
        location = _location(root, name) if root else None
        try:
            return client.create_experiment(name, artifact_location=location, tags=experiment_tags(name))
        except Exception:  # created concurrently by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):  # made before these tags existed, or by hand
        try:
            for key, value in experiment_tags(name).items():
                client.set_experiment_tag(exp.experiment_id, key, value)
        except Exception as exc:
            log.warning("mlflow could not tag experiment %s: %s", name, str(exc).splitlines()[0] if str(exc) else exc)
    if os.environ.get(ARTIFACT_ROOT_ENV) and root and not (exp.artifact_location or "").startswith(root):
        log.warning(
            "mlflow experiment %s keeps its artifact location %s (%s applies to new experiments only)",
            name,
            exp.artifact_location,
            ARTIFACT_ROOT_ENV,
        )
    return exp.experiment_id


def _location(root: str, experiment: str) -> str:
    if root.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return (Path(unquote(urlparse(root).path)) / experiment).as_uri()
    return f"{root}/{experiment}"


def artifact_store_problem(artifact_uri: str) -> str | None:
    """None if a run's artifact store answers a listing, else the problem in one line.

    One cheap read before a stage logs anything: a missing bucket or unreachable endpoint then
    costs one warning, not minutes of MLflow's retries on every artifact. A server-proxied store
    (mlflow-artifacts:/) is asked once, without retries; any other URI through MLflow's own
    artifact repository (boto3 for s3://), the code that will write the artifacts.
    """
    try:
        if artifact_uri.startswith("mlflow-artifacts:"):
            from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository
            from mlflow.utils.credentials import get_default_host_creds
            from mlflow.utils.request_utils import augmented_raise_for_status
            from mlflow.utils.rest_utils import http_request

            resolved = MlflowArtifactsRepository.resolve_uri(artifact_uri, tracking_uri())
            base, tail = resolved.split("/mlflow-artifacts/artifacts", 1)
            resp = http_request(
                get_default_host_creds(base),
                "/mlflow-artifacts/artifacts",
                "GET",
                params={"path": tail.lstrip("/")},
                max_retries=0,
                timeout=30,
            )
            augmented_raise_for_status(resp)
        else:
            from mlflow.artifacts import list_artifacts

            list_artifacts(artifact_uri=artifact_uri)
    except Exception as exc:
        return f"{artifact_uri}: {_problem(exc)}"
    return None


def _problem(exc: BaseException) -> str:
    text = str(exc)
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return "bucket does not exist"
    if "500" in text and "mlflow-artifacts" in text:
        return "the tracking server cannot reach its artifact store (a missing bucket? see the server's log)"
    return text.splitlines()[0][:300] if text else type(exc).__name__


@contextmanager
def start_run(
    experiment: str,
    run_name: str | None = None,
    *,
    tags: dict[str, Any] | None = None,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    context: RunContext | None = None,
) -> Iterator[Run | None]:
    """Open (or, with `run_id`, reopen) a run; ends it FINISHED, or FAILED on an exception.

    With a `context` (a stage inside a pipeline) a new run goes to the context's experiment,
    nested under its parent run and named after the stage; its fields override `experiment`,
    `run_name` and `parent_run_id` where set. Yields None (and the job goes on untracked) if
    the tracking store cannot be reached.
    """
    _quiet_mlflow()
    uri = tracking_uri()
    if context is not None and run_id is None:
        experiment = context.experiment or experiment
        run_name = context.run_name or run_name
        parent_run_id = context.parent_run_id or parent_run_id
        tags = {**(tags or {}), **context.tags}
    try:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=uri)
        if run_id is None:
            exp_id = _experiment_id(client, experiment, uri)
            all_tags = {k: str(v) for k, v in (tags or {}).items()}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            if run_name:
                all_tags["mlflow.runName"] = run_name
            run_id = client.create_run(exp_id, tags=all_tags, run_name=run_name).info.run_id
        else:
            client.update_run(run_id, status="RUNNING")
        run = Run(run_id, experiment, uri)
        problem = artifact_store_problem(client.get_run(run_id).info.artifact_uri)
        if problem:
            run._artifacts_failed(problem)
    except Exception as exc:
        log.warning("mlflow unavailable at %s (%s); continuing without tracking", uri, str(exc).splitlines()[0])
        yield None
        return
    status = "FINISHED"
    try:
        yield run
    except BaseException:
        status = "FAILED"
        raise
    finally:
        try:
            client.set_terminated(run_id, status=status)
        except Exception as exc:
            log.warning("mlflow set_terminated failed: %s", exc)


class BackgroundRun:
    """`start_run(...)` begun now in a thread, so the MLflow store (SQLite file, migrations, the
    experiment lookup: 1-2 s) opens while the caller starts Ray; `with` waits for it and yields
    what `start_run` yields (the run, or None when tracking is unavailable).

    A caller that fails before the `with` calls `discard()`: the run is ended and deleted, so a
    job that never started leaves no run behind.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        import threading

        self._cm = start_run(*args, **kwargs)
        self._opened: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._open, name="mlflow-start", daemon=True)
        self._thread.start()

    def _open(self) -> None:
        try:
            self._opened["run"] = self._cm.__enter__()
        except BaseException as exc:  # re-raised in the caller's thread by __enter__
            self._opened["error"] = exc

    def __enter__(self) -> Run | None:
        self._thread.join()
        if "error" in self._opened:
            raise self._opened["error"]
        return self._opened.get("run")

    def __exit__(self, *exc: Any) -> bool | None:
        return self._cm.__exit__(*exc)

    def discard(self) -> None:
        """End the run unused and delete it (never raises)."""
        try:
            run = self.__enter__()
            self._cm.__exit__(None, None, None)
            if run is not None:
                import mlflow

                mlflow.MlflowClient(tracking_uri=run.uri).delete_run(run.run_id)
        except Exception as exc:  # tracking must not mask the caller's own error
            log.warning("mlflow could not discard an unused run: %s", str(exc).splitlines()[0] if str(exc) else exc)


UI_PORT = 5000


def ui_hint(run_id: str | None = None) -> str:
    """The command that opens the MLflow UI on the current store, and the page of `run_id`'s
    experiment to open: its runs table (nested stage runs under the pipeline run).

    The link carries `workflowType=machine_learning`: MLflow 3's UI keeps one workflow type per
    browser, GenAI by default, and then opens every experiment on an (empty) traces overview.
    """
    uri = tracking_uri()
    embedded = uri.startswith("sqlite:")  # a local store (the default, or MLFLOW_TRACKING_URI): serve it
    base = f"http://127.0.0.1:{UI_PORT}" if embedded else uri.rstrip("/")
    cmd = f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port {UI_PORT}" if embedded else ""
    page = ""
    if run_id and (embedded or uri.startswith(("http://", "https://"))):
        try:
            import mlflow

            _quiet_mlflow()
            exp_id = mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id
            page = f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
        except Exception:  # a hint must never fail a command
            page = ""
    if cmd:
        return f"{cmd}, then open {page}" if page else cmd
    return f"open {page or uri} (MLFLOW_TRACKING_URI)"


class AsyncMetricLogger:
    """Logs metrics to an existing run from a background thread with a bounded queue.

    Training calls `log` and moves on; if the tracking server is slow or down the queue fills
    and the oldest points are dropped (counted, and reported at close) instead of blocking.
    """

    def __init__(self, uri: str | None, run_id: str, max_queue: int = 10_000):
        import queue
        import threading

        self.run_id = run_id
        self.uri = uri or tracking_uri()
        self.dropped = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.run = None
        try:
            _quiet_mlflow()
            self.run = Run(run_id, "", self.uri)
        except Exception as exc:
            log.warning("mlflow unavailable at %s (%s); metrics are not logged", self.uri, exc)
        self._thread = threading.Thread(target=self._drain, name="mlflow-logger", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        import queue

        try:
            self._queue.put_nowait((dict(metrics), step))
        except queue.Full:
            self.dropped += 1

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            metrics, step = item
            if self.run is not None:
                self.run.log_metrics(metrics, step=step)

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush what is queued (bounded by `timeout_s`) and stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout=timeout_s)
        if self.dropped:
            log.warning("dropped %d metric points while the tracking store was slow", self.dropped)
