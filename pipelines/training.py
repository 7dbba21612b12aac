"""The one driver behind every `vlm train ...`: `run(task, cfg, data, output, ...)`.

A trainer module supplies a `Task` (what is trained: its dataset, model, loss, export, eval, and an
optional `prepare`) and its config; this module owns what is the same for all of them, in
torchtitan's parse -> build -> train -> close order: the output and shard checks (before Ray
starts, so bad input costs seconds and leaves nothing written), the DeepSpeed dict, Ray, the
`train_state.json` that makes `--resume` reopen the same Ray run and MLflow run, the MLflow run,
the skipped-sample counter, the `TorchTrainer`, and the result. The per-worker loop is
`vlm.train.loop.train_worker`, run by the one worker function `_worker`.

`data` and `output` may be object-store URLs (s3://bucket/prefix): shards are listed and read through
`vlm.storage` (Ray Data reads them with its pyarrow filesystem), Ray Train's storage is the output URL
(every rank's DeepSpeed shard is uploaded there, and restored from there on a failure or `--resume`),
and the driver's files and the export are published there; nothing needs a shared directory. Output
paths are carried as `str` (a normalized local path or a URL).
"""

from __future__ import annotations

import math
import os
import sys
import time

from vlm import storage
from vlm.errors import ClusterError, InputError

STATE_FILE = "train_state.json"


class Task:
    """A trainer's task: built in the driver from its config, pickled to every worker.

    Driver side: `kind` names Ray runs ("clip" -> clip-20260101-120000), `stage` is the MLflow stage
    tag; `check`, `prepare`, `dataset`, `params`, `files`, `run_name`, `min_samples`. Worker side, the
    `vlm.train.loop.TrainTask` protocol: `build_model`, `loss`, `export`, `evaluate`.
    """

    kind: str = "train"
    stage: str = "train"

    def __init__(self, cfg):
        self.cfg = cfg

    def check(self) -> None:
        """One-line errors for bad input the task can see before Ray starts (checkpoints, configs)."""

    def run_name(self, out: str) -> str:
        """The MLflow run name when `tracking.run_name` is not set."""
        return f"{self.kind}-{storage.basename(out)}"

    def min_samples(self) -> int:
        """Samples the shards must hold for every worker to get a batch (one global batch by default)."""
        return self.cfg.train.global_batch_size

    def prepare(self, shards: list[str], out: str) -> dict:
        """Work before training, in the driver, with Ray up (Flamingo: pretrain its LM); returns metrics."""
        return {}

    def params(self) -> dict:
        """Extra MLflow params of a new run."""
        return {}

    def files(self) -> dict[str, dict]:
        """JSON files written beside config.yaml (and logged with a new run), by name."""
        return {}

    def dataset(self, shards: list[str], skips):
        """The Ray Data training dataset; its preprocessor reports undecodable rows to `skips`."""
        raise NotImplementedError


def run(task: Task, cfg, data: str, output, *, resume=False, address=None, parent_run_id=None) -> dict:
    """Train `task` on the shards at `data` into `output`.

    Returns {"eval", "mlflow_run_id", "export", "steps", "checkpoint", "samples_skipped"}.
    """
    from vlm import tracking
    from vlm.config import write_config
    from vlm.data.shard_check import check_shards
    from vlm.data.shards import check_output_dir
    from vlm.data.skips import over_limit_message, skip_counter
    from vlm.logs import progress_enabled, ray_logs_dir, verbose
    from vlm.runtime import init_ray
    from vlm.train.config import deepspeed_config, micro_batch_size
    from vlm.train.progress import TrainProgress, step_board

    out = str(check_output_dir(output))  # a URL: its bucket exists and takes a write (one line otherwise)
    shards = find_shards(data)
    task.check()
    micro = micro_batch_size(cfg.train, cfg.scaling.num_workers)
    previous = previous_run(out, resume)
    counts = check_shards(
        shards, task.min_samples(), f"one global batch (train.global_batch_size={cfg.train.global_batch_size})"
    )
    total = sum(c.samples + c.incomplete for c in counts)
    max_skipped = math.floor(cfg.train.max_skipped_fraction * total)
    ds_config = deepspeed_config(
        cfg.optim, cfg.deepspeed, cfg.train, cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu
    )

    init_ray(address, num_cpus=local_cpus(cfg.scaling))
    check_data_headroom(cfg.scaling)
    storage.makedirs(out)
    prepared = task.prepare(shards, out)
    write_config(cfg, storage.join(out, "config.yaml"))
    files = {**task.files(), "deepspeed.json": ds_config}
    for name, content in files.items():
        storage.write_json(storage.join(out, name), content)
    run_name = ray_run_name(previous, task.kind)

    with tracking.start_run(
        cfg.tracking.experiment,
        cfg.tracking.run_name or task.run_name(out),
        tags={"stage": task.stage, "output": out, "data": data},
        run_id=previous.get("mlflow_run_id") if previous else None,
        parent_run_id=parent_run_id,
    ) as mlrun:
        run_id = mlrun.run_id if mlrun else None
        write_state(out, run_name, run_id, shards)
        if mlrun and not previous:
            setup = {"data.num_shards": len(shards), "data.num_samples": total, "micro_batch_size": micro}
            log_setup(mlrun, cfg, ds_config, {**setup, **task.params()})
            for name, content in task.files().items():
                mlrun.log_dict(content, name)
        if mlrun and prepared:
            mlrun.log_metrics(prepared)

        skips = skip_counter()
        spec = loop_spec(cfg, ds_config, micro, out, run_id)
        spec.skips, spec.max_skipped, spec.board = skips, max_skipped, step_board()
        logs = ray_logs_dir()
        if logs and not verbose():
            print(f"{task.kind}: worker logs in {logs} (vlm -v shows them here)", file=sys.stderr, flush=True)
        with TrainProgress(spec.board, cfg.train.max_steps, desc=task.kind, enabled=progress_enabled()):
            result = fit(_worker, {"task": task, "spec": spec}, cfg, out, run_name, task.dataset(shards, skips))
        message = over_limit_message(skips, max_skipped, total)
        if message:
            raise InputError(message)
        return _result(out, result, mlrun, skips)


def entrypoint(task_class: type[Task], doc: str):
    """`train_<kind>(data, output, cfg, *, resume, address, parent_run_id) -> dict`: `run` of a new task."""

    def train(data: str, output, cfg, *, resume: bool = False, address=None, parent_run_id=None) -> dict:
        task = task_class(cfg)
        return run(task, cfg, data, output, resume=resume, address=address, parent_run_id=parent_run_id)

    train.__doc__ = doc
    return train


def _worker(config: dict) -> None:
    """Ray Train's `train_loop_per_worker` for every task."""
    from vlm.train.loop import train_worker

    train_worker(config["task"], config["spec"])


def _result(out: str, result, mlrun, skips) -> dict:
    import ray

    eval_path = storage.join(out, "eval.json")
    evals = storage.read_json(eval_path) if storage.is_file(eval_path) else {}
    export = storage.join(out, "export")
    if mlrun:  # local paths or URLs (tracking downloads a URL's files first)
        mlrun.log_artifact(export, "model")
        mlrun.log_artifact(storage.join(out, "config.yaml"))
    return {
        "eval": evals,
        "mlflow_run_id": mlrun.run_id if mlrun else None,
        "export": export,
        "steps": evals.get("step"),
        "checkpoint": checkpoint_location(out, result.checkpoint),
        "samples_skipped": int(ray.get(skips.total.remote())),
    }


def checkpoint_location(out: str, checkpoint) -> str | None:
    """Ray Train's checkpoint path as a user spells it: local, or a URL of the output's scheme
    (Ray reports a path inside its storage filesystem, `bucket/...`)."""
    if checkpoint is None:
        return None
    if storage.is_url(out):
        return f"{storage.scheme(out)}://{checkpoint.path}"
    return checkpoint.path


def find_shards(spec: str) -> list[str]:
    """Tar shards from a directory, a glob, or a comma-separated list of those; local paths or URLs
    (all on one filesystem). In a URL directory whose shards carry `{shard}_stats.json` (our stages'
    and img2dataset's layout), a tar without its stats object is not complete yet and is left out:
    object storage has no rename, so the stats object, written last, marks a shard whole."""
    paths: list[str] = []
    for part in [p for p in str(spec).split(",") if p]:
        if storage.is_url(part):
            storage.check_readable(part.rsplit("/", 1)[0] if any(c in part for c in "*?[") else part)
        if storage.is_dir(part):
            names = storage.listdir(part)  # one listing, not a request per shard
            found = [storage.join(part, n) for n in names if n.endswith(".tar")]
            stats = {n[: -len("_stats.json")] for n in names if n.endswith("_stats.json")}
            if storage.is_url(part) and stats:
                found = [p for p in found if storage.basename(p)[: -len(".tar")] in stats]
        else:
            found = storage.expand(part)
        paths += [storage.normalize(p) for p in sorted(found) if p.endswith(".tar")]
    if not paths:
        raise InputError(f"no WebDataset shards (*.tar) found at {spec}")
    schemes = {storage.scheme(p) for p in paths}
    if len(schemes) > 1:
        raise InputError(f"--data {spec} mixes storage ({', '.join(sorted(schemes))}); keep the shards on one")
    return paths


def read_shards(shards: list[str], shuffle_files: bool):
    """Ray Data's raw WebDataset rows of `shards` (local or on object storage, through its filesystem)."""
    import ray.data

    return ray.data.read_webdataset(
        [storage.fs_path(p) for p in shards],
        filesystem=storage.filesystem(shards[0]),
        decoder=None,
        shuffle="files" if shuffle_files else None,
    )


def previous_run(out: str, resume: bool) -> dict | None:
    """The run state in `out` (for --resume), or None for a new run; refuses the mismatches."""
    state_file = storage.join(out, STATE_FILE)
    previous = storage.read_json(state_file) if storage.is_file(state_file) else None
    if resume and previous is None:
        raise InputError(f"nothing to resume: {out} holds no training run (no {STATE_FILE})")
    if not resume and previous is not None:
        raise InputError(f"{out} already holds a training run; pass --resume to continue it, or use a new --output")
    return previous


def ray_run_name(previous: dict | None, kind: str) -> str:
    return previous["ray_run_name"] if previous else f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_state(out: str, run_name: str, run_id: str | None, shards: list[str]) -> None:
    storage.write_json(
        storage.join(out, STATE_FILE), {"ray_run_name": run_name, "mlflow_run_id": run_id, "data": shards}
    )


def local_cpus(scaling) -> int:
    """Logical CPUs for a local Ray: twice the cores plus what the training workers hold."""
    return 2 * (os.cpu_count() or 2) + int(scaling.num_workers * scaling.cpus_per_worker + 0.999)


def check_data_headroom(scaling) -> None:
    """Training workers must leave Ray Data at least one CPU, or the job waits forever."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    taken = scaling.num_workers * scaling.cpus_per_worker
    if total - taken < 1:
        raise ClusterError(
            f"Ray has {total:g} CPUs and the {scaling.num_workers} training workers take {taken:g}, leaving none "
            "for Ray Data; lower scaling.cpus_per_worker (fractions work) or add CPUs"
        )


def data_cpu_limit(scaling) -> float | None:
    """CPUs Ray Data may use for a training run: `scaling.data_cpus`, or on a Ray this process
    started locally the cores the training workers leave free (at least 1), or None (no cap).

    A local Ray advertises twice the cores (init_ray), so uncapped Ray Data would run several
    decoding tasks on the core(s) beside the workers and preempt them: on 2 cores with 1 worker,
    4 decoders kept the training thread waiting for a CPU 8-27% of the time.
    """
    from vlm.runtime import local_cores

    if scaling.data_cpus is not None:
        return float(scaling.data_cpus)
    cores = local_cores()
    if cores is None:
        return None
    return max(1.0, cores - scaling.num_workers * scaling.cpus_per_worker)


def flat_ds(ds: dict, prefix: str = "") -> dict:
    """DeepSpeed's nested dict as dotted keys, for MLflow params."""
    flat = {}
    for k, v in ds.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flat_ds(v, name + "."))
        else:
            flat[name] = v
    return flat


def log_setup(run, cfg, ds_config: dict, params: dict) -> None:
    """A new MLflow run's setup: the resolved config, DeepSpeed's config (as params and as a file), `params`."""
    run.log_config(cfg)
    run.log_params({f"ds.{k}": v for k, v in flat_ds(ds_config).items()})
    run.log_params(params)
    run.log_dict(ds_config, "deepspeed.json")


def loop_spec(cfg, ds_config: dict, micro: int, out: str, run_id: str | None):
    """The workers' `LoopSpec` from a trainer config's common sections (train, scaling)."""
    from vlm import tracking
    from vlm.config import to_dict
    from vlm.train.loop import LoopSpec

    return LoopSpec(
        deepspeed=ds_config,
        max_steps=cfg.train.max_steps,
        micro_batch=micro,
        log_every=cfg.train.log_every,
        checkpoint_every=cfg.train.checkpoint_every,
        seed=cfg.train.seed,
        torch_threads=cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)),
        malloc_keep_mb=cfg.scaling.malloc_keep_mb,
        output_dir=out,
        mlflow_uri=tracking.tracking_uri(),
        mlflow_run_id=run_id,
        config=to_dict(cfg),
    )


def single_rank_zero_note(cfg) -> str | None:
    """A one-line note when ZeRO partitions over one worker: nothing is split, the cost stays.

    bench/train_clip.py, bare DeepSpeed on one rank (2-core VM): ZeRO-2 637 vs ZeRO-0 858
    samples/s. Stage 3 with parameter offload, or any stage with optimizer offload, saves memory
    even on one rank, so those get no note.
    """
    ds, scaling = cfg.deepspeed, cfg.scaling
    if scaling.num_workers != 1 or ds.zero_stage == 0 or ds.offload_optimizer or ds.offload_params:
        return None
    return (
        f"note: deepspeed.zero_stage={ds.zero_stage} with scaling.num_workers=1 partitions nothing and "
        "still pays for it (~25% of a step in bench/train_clip.py); deepspeed.zero_stage=0 trains faster on one worker"
    )


def fit(worker_fn, loop_config: dict, cfg, out: str, run_name: str, dataset):
    """Build the TorchTrainer from `cfg.scaling`/`cfg.train`, fit it; returns Ray Train's Result."""
    import ray.train
    from ray.train.torch import TorchTrainer

    scaling = cfg.scaling
    note = single_rank_zero_note(cfg)
    if note:
        print(note, file=sys.stderr, flush=True)
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    data_config = None
    data_cpus = data_cpu_limit(scaling)
    if data_cpus is not None:
        from ray.data import ExecutionResources

        options = ray.train.DataConfig.default_ingest_options()
        options.resource_limits = ExecutionResources.for_limits(cpu=data_cpus)
        data_config = ray.train.DataConfig(execution_options=options)
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            # A URL: Ray Train's own filesystem argument, with the path spelled without its scheme.
            storage_path=storage.fs_path(storage.join(out, "ray")),
            storage_filesystem=storage.filesystem(out) if storage.is_url(out) else None,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        ),
        datasets={"train": dataset},
        dataset_config=data_config,
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result
