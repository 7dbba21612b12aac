"""The per-worker training loop behind every `vlm train ...`: DeepSpeed inside Ray Train.

A `TrainTask` says what is trained (model, loss, export, eval); this module says how:
`deepspeed.initialize` with the run's DeepSpeed dict, batches streamed from Ray Data
(`get_dataset_shard(...).iter_torch_batches`), checkpoints through `ray.train.report` (every
rank saves its DeepSpeed shard; Ray merges them into one checkpoint directory), and restore
from `ray.train.get_checkpoint()` after a worker failure or on `--resume`. A checkpoint carries
model, optimizer, scheduler, step, data position and the resolved config. Rank 0 logs to
MLflow through a background queue, so a slow tracking server never stalls training.

The worker body has torchtitan's shape: `setup` (engine, restore), `train_step` (one micro batch),
`train` (the epochs around it, logging and checkpoints), `finish` (export, eval). What a task
reports beyond the loss (CLIP's logit scale, Flamingo's gates) comes through its loss dict.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from vlm import storage
from vlm.train.sched import thread_cpu_wait_s

log = logging.getLogger(__name__)

CKPT_TAG = "state"


class TrainTask(Protocol):
    """What a trainer trains. Built inside each worker from a picklable config."""

    def build_model(self) -> torch.nn.Module: ...

    def loss(self, model: torch.nn.Module, batch: dict, dist: DistInfo) -> dict[str, torch.Tensor]:
        """Returns at least {"loss": scalar}; other entries are averaged over a log window and logged."""

    def export(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        """Rank 0 only: write the final model in its ecosystem's format (scalar parameters
        already have their original shape back; see models/scalars.py)."""

    def evaluate(self, export_dir: Path, run) -> dict[str, float]:
        """Rank 0 only: evaluate the exported model, log plots to `run`; returns metrics."""


@dataclass
class DistInfo:
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype


@dataclass
class LoopSpec:
    """Everything a worker needs besides the task (plain data, pickled to every worker)."""

    deepspeed: dict
    max_steps: int
    micro_batch: int
    log_every: int
    checkpoint_every: int
    seed: int
    torch_threads: int
    output_dir: str
    mlflow_uri: str | None
    mlflow_run_id: str | None
    config: dict = field(default_factory=dict)  # the resolved run config, saved in checkpoints
    dataset: str = "train"
    malloc_keep_mb: int = 0  # see vlm/train/malloc.py
    skips: object | None = None  # the run's vlm.data.skips counter (a Ray actor handle); None: not counted
    max_skipped: int = 0  # corrupt samples skipped beyond this stop the run (train.max_skipped_fraction)
    board: object | None = None  # the driver's vlm.train.progress.StepBoard (a Ray actor handle); None: no bar


def _set_seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _scalar_safe(model: torch.nn.Module) -> None:
    from vlm.models.scalars import reshape_scalar_params

    reshape_scalar_params(model)


def train_worker(task: TrainTask, spec: LoopSpec) -> None:
    """`train_loop_per_worker` body: set up, train to `max_steps`, export + eval on rank 0.

    A run that skipped more corrupt samples than `spec.max_skipped` stops on every rank without an
    export; the driver reads the skip counter and ends it with one line (a data error, not a worker
    failure to retry).
    """
    w = setup(task, spec)
    try:
        if train(w):
            finish(w)
    finally:
        if w.logger:
            w.logger.close()


@dataclass
class Worker:
    """One training worker's state between `setup` and `finish`."""

    task: TrainTask
    spec: LoopSpec
    engine: object  # deepspeed.DeepSpeedEngine
    dist: DistInfo
    state: dict
    logger: object | None  # vlm.tracking.AsyncMetricLogger on rank 0 of a tracked run
    window: _Window = field(default_factory=lambda: _Window())
    last_reported: int = -1  # the step of the latest checkpoint reported to Ray Train


def setup(task: TrainTask, spec: LoopSpec) -> Worker:
    """Build the model and the DeepSpeed engine, and restore the latest checkpoint if Ray has one."""
    from vlm.runtime import deepspeed_extensions_dir

    deepspeed_extensions_dir()  # the CPU comm op built once per environment (make setup), not per run
    import deepspeed
    import ray.train

    from vlm.logs import quiet_libraries, verbose
    from vlm.tracking import AsyncMetricLogger
    from vlm.train.config import param_groups
    from vlm.train.malloc import keep_freed_memory

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING if verbose() else logging.ERROR)
    quiet_libraries()
    torch.set_num_threads(spec.torch_threads)
    keep_freed_memory(spec.malloc_keep_mb)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _record_pid(spec.output_dir, rank)
    _set_seed(spec.seed + rank)

    model = task.build_model()
    _scalar_safe(model)
    groups = param_groups(model, spec.deepspeed["optimizer"]["params"]["weight_decay"])
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=_sized(spec.deepspeed, model))
    tune_engine(engine, world)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32
    dist = DistInfo(rank, world, engine.device, dtype)

    state = {"step": 0, "micro_steps": 0, "epoch": 0, "batches_in_epoch": 0, "samples": 0, "restarts": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag=CKPT_TAG)
        state.update({k: client[k] for k in state if k in client})
        state["restarts"] = int(client.get("restarts", 0)) + 1
        if rank == 0:
            print(f"[train] restored checkpoint at step {state['step']} (epoch {state['epoch']})", flush=True)

    logger = AsyncMetricLogger(spec.mlflow_uri, spec.mlflow_run_id) if rank == 0 and spec.mlflow_run_id else None
    if logger and ckpt is not None:
        logger.log({"resumed_from_step": state["step"]}, step=state["step"])
    return Worker(task, spec, engine, dist, state, logger)


def train_step(w: Worker, batch: dict) -> dict:
    """One micro batch: forward (the task's loss), backward, and DeepSpeed's step (which updates the
    weights every `gradient_accumulation_steps` micro batches). Returns the task's loss dict."""
    out = w.task.loss(w.engine, batch, w.dist)
    w.engine.backward(out["loss"])
    w.engine.step()
    w.state["batches_in_epoch"] += 1
    w.state["micro_steps"] += 1
    w.state["samples"] += w.spec.micro_batch * w.dist.world
    w.window.add(out)
    return out


def train(w: Worker) -> bool:
    """Epochs over this worker's dataset shard until `max_steps`; False if stopped by corrupt data."""
    import ray.train

    spec, state = w.spec, w.state
    shard = ray.train.get_dataset_shard(spec.dataset)
    accum = w.engine.gradient_accumulation_steps()
    while state["step"] < spec.max_steps:
        batches = shard.iter_torch_batches(
            batch_size=spec.micro_batch,
            drop_last=True,
            local_shuffle_buffer_size=local_shuffle_buffer(spec.micro_batch),
            local_shuffle_seed=spec.seed + state["epoch"],
        )
        iterator = iter(batches)
        skip = state["batches_in_epoch"]
        for _ in range(skip):  # restore the data position within the epoch (by count)
            if next(iterator, None) is None:
                break
        consumed_any = False
        t_fetch = time.perf_counter()
        for batch in iterator:
            consumed_any = True
            t_start = time.perf_counter()
            w.window.wait += t_start - t_fetch
            train_step(w, batch)
            # DeepSpeed steps the optimizer every `accum` micro batches; checkpoints only
            # happen on those boundaries, so its counter and ours agree after a restore.
            if state["micro_steps"] % accum == 0:
                state["step"] += 1
                if not _after_update(w):
                    return False
                if state["step"] >= spec.max_steps:
                    break
            t_fetch = time.perf_counter()
        if state["step"] >= spec.max_steps:
            break
        if not consumed_any and skip == 0:
            if _skipped(w) > spec.max_skipped:  # every rank reads the final count: the epoch is over
                return False
            raise RuntimeError("the training dataset yielded no batch: fewer samples than one batch per worker")
        state["epoch"] += 1
        state["batches_in_epoch"] = 0
    return True


def _after_update(w: Worker) -> bool:
    """After an optimizer step: log, check the skipped samples, checkpoint. False: stop (corrupt data)."""
    spec, state, step = w.spec, w.state, w.state["step"]
    if step % spec.log_every == 0 or step == spec.max_steps:
        skipped = _agreed_skips(w)
        if w.dist.rank == 0:
            metrics = w.window.flush(time.perf_counter(), spec.micro_batch * w.dist.world)
            metrics.update(lr=w.engine.get_lr()[0], epoch=state["epoch"], samples_skipped=skipped)
            if w.logger:
                w.logger.log(metrics, step=step)
            print(_progress_line(step, spec.max_steps, metrics), flush=True)  # the worker log; -v: the console
            if spec.board is not None:
                spec.board.report.remote(step, spec.max_steps, metrics)  # the driver's progress bar
        if skipped > spec.max_skipped:
            return False
    if step % spec.checkpoint_every == 0 or step == spec.max_steps:
        _save(w.engine, state, spec, {"loss": w.window.last_loss})
        w.last_reported = step
    return True


def _skipped(w: Worker) -> int:
    """Samples the data pipeline has skipped so far (all workers' data; 0 without a counter)."""
    if w.spec.skips is None:
        return 0
    import ray

    return int(ray.get(w.spec.skips.total.remote()))


def _agreed_skips(w: Worker) -> int:
    """The skip count as rank 0 read it, on every rank, so all ranks stop at the same step."""
    skipped = _skipped(w) if w.dist.rank == 0 else 0
    if w.dist.world > 1 and w.spec.skips is not None:
        count = torch.tensor([skipped], dtype=torch.int64, device=w.dist.device)
        torch.distributed.broadcast(count, src=0)
        skipped = int(count.item())
    return skipped


def finish(w: Worker) -> None:
    """Checkpoint the last step if it is not yet, gather the weights, export and evaluate on rank 0."""
    engine, state, dist = w.engine, w.state, w.dist
    if w.last_reported != state["step"]:
        _save(engine, state, w.spec, {"loss": w.window.last_loss})
    state_dict = gathered_state_dict(engine)
    if dist.rank != 0:
        return
    from vlm.models.scalars import SCALARS_ATTR, restore_scalar_state_dict

    out = w.spec.output_dir
    restore_scalar_state_dict(state_dict, getattr(engine.module, SCALARS_ATTR, ()))
    with export_location(out) as export_dir:
        w.task.export(state_dict, export_dir)
        state_dict = None  # the eval loads the export; a large model's copy must not stay beside it
        publish_export(export_dir, out)
        run = w.logger.run if w.logger else None
        metrics = w.task.evaluate(export_dir, run)
    final = {
        **{f"eval/{k}": v for k, v in metrics.items()},
        "final_step": state["step"],
        "restarts": state["restarts"],
        "samples_skipped": _skipped(w),
    }
    if w.logger:
        w.logger.log(final, step=state["step"])
    storage.write_json(storage.join(out, "eval.json"), {"step": state["step"], **metrics})  # last: the run is done


@contextmanager
def export_location(out: str) -> Iterator[Path]:
    """Where rank 0 writes the export: OUTPUT/export, or for a URL output a local temp dir that
    `publish_export` uploads (the export writers and evaluators need files on disk)."""
    if not storage.is_url(out):
        yield Path(storage.join(out, "export"))
        return
    with tempfile.TemporaryDirectory(prefix="vlm-export-") as tmp:
        yield Path(tmp) / "export"


def publish_export(export_dir: Path, out: str) -> None:
    """Upload a URL output's export (every file, before eval.json says the run is done)."""
    if storage.is_url(out):
        target = storage.join(out, "export")
        storage.rmtree(target)  # a resumed run's earlier export: no stale file stays beside the new ones
        storage.copy_dir(export_dir, target)


def local_shuffle_buffer(micro_batch: int) -> int:
    """Rows a worker shuffles among on top of Ray Data's file shuffle."""
    return micro_batch * 4


def tune_engine(engine, world: int) -> list[str]:
    """Per-step savings on a DeepSpeed engine that change no result; returns the ones applied."""
    applied = []
    if world == 1 and engine.zero_optimization_stage() == 0:
        # One rank: DeepSpeed would still flatten every gradient and all-reduce it with itself
        # (~15% of a tiny model's step on CPU, measured by bench/train_clip.py). Only without
        # ZeRO: stages 1-2 move gradients into their partitions in that reduce (skipping it
        # fails in the optimizer step with KeyError: 0).
        engine.enable_backward_allreduce = False
        applied.append("no_self_allreduce")
    if use_fused_fp32_clip(engine):
        applied.append("fused_fp32_clip")
    return applied


def use_fused_fp32_clip(engine) -> bool:
    """Without ZeRO, in fp32, clip with torch's fused (foreach) `clip_grad_norm_`; True if it applies.

    DeepSpeed's own fp32 clip takes each parameter's norm in a Python loop and then all-reduces the
    total norm, averaging it over ranks (for MoE experts, whose gradients differ per rank). With
    no model parallelism and dense parameters, every rank holds the same all-reduced gradients at
    that point, so the local norm is the global one and the result is the same; the fused clip is
    ~4% of a tiny model's CPU step faster (bench/train_clip.py). ZeRO, fp16 and bf16 clip inside
    their optimizers and are left alone.
    """
    if (
        engine.zero_optimization_stage() != 0
        or engine.fp16_enabled()
        or engine.bfloat16_enabled()
        or engine.gradient_clipping() <= 0
        or engine.mpu is not None
        or engine.has_moe_layers
    ):
        return False
    params = [p for p in engine.module.parameters() if p.requires_grad]
    max_norm = engine.gradient_clipping()

    def clip_fp32_gradients():
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    engine.clip_fp32_gradients = clip_fp32_gradients  # called by DeepSpeedEngine._take_model_step
    return True


def _sized(ds_config: dict, model: torch.nn.Module) -> dict:
    """Cap ZeRO's communication buckets at the trainable size: the 5e7-element default is a
    ~190 MiB fp32 buffer per rank, 15x a tiny model (measured by bench/train_clip.py)."""
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage", 0) == 0:
        return ds_config
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cap = -(-max(int(1e6), trainable) // 64) * 64  # rounded up: DeepSpeed asserts alignment
    sized = {**ds_config, "zero_optimization": dict(zero)}
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        sized["zero_optimization"][key] = int(min(zero.get(key, 5e8), cap))
    return sized


class _Window:
    """Accumulates losses and timings between two log lines.

    `cpu_wait_fraction`: the part of the window the training thread was ready to run but waited
    for a CPU (other processes on its cores: data decoding, Ray's daemons). Not data wait: that
    is waiting for a batch. Logged only where Linux's schedstat is available.
    """

    def __init__(self):
        self.t0 = time.perf_counter()
        self.cpu_wait0 = thread_cpu_wait_s()
        self.wait = 0.0
        self.values: dict[str, list[float]] = {}
        self.n = 0
        self.last_loss = float("nan")

    def add(self, out: dict) -> None:
        self.n += 1
        for k, v in out.items():
            val = float(v.detach().float().mean()) if torch.is_tensor(v) else float(v)
            self.values.setdefault(k, []).append(val)
        self.last_loss = self.values["loss"][-1]

    def flush(self, now: float, samples_per_batch: int) -> dict:
        elapsed = max(now - self.t0, 1e-9)
        metrics = {k: sum(v) / len(v) for k, v in self.values.items()}
        metrics["samples_per_s"] = self.n * samples_per_batch / elapsed
        metrics["data_wait_fraction"] = min(1.0, self.wait / elapsed)
        cpu_wait = thread_cpu_wait_s()
        if cpu_wait is not None and self.cpu_wait0 is not None:
            metrics["cpu_wait_fraction"] = min(1.0, max(0.0, cpu_wait - self.cpu_wait0) / elapsed)
        self.t0, self.cpu_wait0, self.wait, self.values, self.n = now, cpu_wait, 0.0, {}, 0
        return metrics


def _progress_line(step: int, max_steps: int, metrics: dict) -> str:
    shown = " ".join(
        f"{k} {metrics[k]:.4g}"
        for k in ("loss", "acc", "lr", "samples_per_s", "data_wait_fraction", "cpu_wait_fraction")
        if k in metrics
    )
    return f"[train] step {step}/{max_steps} {shown}"


def _record_pid(out: str, rank: int) -> None:
    """Each worker writes its pid (operators and the failure test find workers by it; on a URL
    output one tiny object per worker start, so nothing needs a local output directory)."""
    d = storage.join(out, "_workers")
    storage.makedirs(d)
    storage.write_text(storage.join(d, f"rank{rank}.pid"), str(os.getpid()))


def _save(engine, state: dict, spec: LoopSpec, metrics: dict) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="vlm-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state={**state, "config": spec.config})
        if engine.global_rank == 0:
            (Path(tmp) / "train_state.json").write_text(json.dumps(state))
        ray.train.report(
            {**metrics, "step": state["step"]},
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"step_{state['step']:08d}",
        )


def gathered_state_dict(engine, chunk_numel: int = 50_000_000) -> dict[str, torch.Tensor] | None:
    """The full fp32 state dict on rank 0 (all ranks must call: ZeRO-3 gathers partitions).

    Parameters are gathered a chunk of about `chunk_numel` elements at a time, so no rank ever
    holds the whole gathered model beside its partitions: rank 0 keeps one fp32 copy, the others
    only the chunk in flight (a 1B-parameter model gathered at once is 4 GB more on every rank).
    """
    import deepspeed

    rank0 = engine.global_rank == 0
    layout = engine.module.state_dict(keep_vars=True)  # names; under ZeRO-3 the params are empty partitions
    owners: dict[int, tuple[torch.nn.Parameter, list[str]]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in layout.items():
        if isinstance(value, torch.nn.Parameter):
            owners.setdefault(id(value), (value, []))[1].append(key)
        elif rank0:  # buffers are not partitioned
            out[key] = value.detach().float().cpu().clone()

    def take(chunk: list[tuple[torch.nn.Parameter, list[str]]]) -> None:
        with deepspeed.zero.GatheredParameters([p for p, _ in chunk], modifier_rank=None):
            if rank0:
                for param, keys in chunk:
                    first = param.detach().float().cpu().clone()
                    out.update({k: first if i == 0 else first.clone() for i, k in enumerate(keys)})  # tied: own copies

    chunk, numel = [], 0
    for param, keys in owners.values():
        chunk.append((param, keys))
        numel += getattr(param, "ds_numel", param.numel())
        if numel >= chunk_numel:
            take(chunk)
            chunk, numel = [], 0
    if chunk:
        take(chunk)
    return {k: out[k] for k in layout} if rank0 else None


def consolidate_zero_checkpoint(checkpoint_dir: str | Path, out_file: str | Path) -> Path:
    """Turn a (ZeRO-3 or any stage) DeepSpeed checkpoint into one fp32 safetensors file."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    sd = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=CKPT_TAG)
    sd = {k: v.contiguous() for k, v in sd.items()}
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out_file))
    return out_file
