"""The CLIP throughput benchmark's data and timed loops (bench/train_clip.py describes the variants).

Digit shards, vlm's ClipPreprocess decoded into memory or through a DataLoader / Ray Data, the
plain PyTorch loop and the same loop through a bare DeepSpeed engine, each in a fresh process
(glibc's malloc adapts to what a process has freed before, so no variant may inherit another's).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
from _common import MALLOC_KEEP_MB, MAX_LOGIT_SCALE, PRESET, free_port, in_subprocess, quiet_logs

IMAGE_SIZE = 32
UNIQUE_SAMPLES = 2048  # distinct digit samples rendered; shards are repeated to reach the step count
SAMPLES_PER_SHARD = 512

# ----------------------------------------------------------------------------- data


def make_shards(
    root: Path, samples: int, image_size: int = IMAGE_SIZE, unique_samples: int = UNIQUE_SAMPLES
) -> list[Path]:
    """`unique_samples` distinct digit samples, their shards repeated to hold >= `samples`."""
    from vlm.testbed.digit_shards import write_digit_shards

    unique_dir = root / "unique"
    per_shard = min(SAMPLES_PER_SHARD, unique_samples)
    unique = write_digit_shards(unique_dir, unique_samples, samples_per_shard=per_shard, image_size=image_size)
    data = root / "shards"
    data.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(samples / per_shard)
    tars = []
    for i in range(n_shards):
        dst = data / f"{i:05d}.tar"
        shutil.copyfile(unique[i % len(unique)], dst)
        tars.append(dst)
    return tars


def _raw_batches(tars: list[Path], batch: int):
    """Raw rows as Ray Data's read_webdataset(decoder=None) gives them, `batch` at a time."""
    from vlm.data.shards import read_tar_samples

    rows: dict[str, list] = {"__key__": [], "jpg": [], "txt": [], "json": []}
    for tar in tars:
        for key, sample in read_tar_samples(tar).items():
            rows["__key__"].append(key)
            for ext in ("jpg", "txt", "json"):
                rows[ext].append(sample.get(ext))
            if len(rows["__key__"]) == batch:
                yield rows
                rows = {k: [] for k in rows}


def _preprocess():
    from vlm.data.clip_data import ClipDataConfig, ClipPreprocess

    return ClipPreprocess(PRESET, IMAGE_SIZE, ClipDataConfig())


def predecode(tars: list[Path], samples: int, seed: int):
    """Decode `samples` rows with vlm's ClipPreprocess into memory, shuffled (not timed)."""
    import numpy as np

    pre = _preprocess()
    images, texts, n = [], [], 0
    for rows in _raw_batches(tars, 64):
        out = pre(rows)
        images.append(out["image"])
        texts.append(out["text"])
        n += len(out["image"])
        if n >= samples:
            break
    images = np.concatenate(images)[:samples]
    texts = np.concatenate(texts)[:samples]
    order = np.random.default_rng(seed).permutation(len(images))
    return np.ascontiguousarray(images[order]), np.ascontiguousarray(texts[order])


def memory_batches(images, texts, batch: int):
    images, texts = torch.from_numpy(images), torch.from_numpy(texts)
    for i in range(0, len(images) - batch + 1, batch):
        yield images[i : i + batch], texts[i : i + batch]


class TarBatches(torch.utils.data.IterableDataset):
    """Reads the tars and yields ClipPreprocess'd batches (for a DataLoader with workers)."""

    def __init__(self, tars: list[Path], batch: int, seed: int):
        super().__init__()
        self.tars, self.batch, self.seed = list(tars), batch, seed

    def __iter__(self):
        tars = list(self.tars)
        random.Random(self.seed).shuffle(tars)  # like shuffle_files
        pre = _preprocess()
        for rows in _raw_batches(tars, self.batch):
            out = pre(rows)
            yield torch.from_numpy(out["image"]), torch.from_numpy(out["text"])


def ray_data_batches(data_dir: Path, args):
    """(images, text) batches from the path vlm's worker reads through, in this process; Ray is
    started here and shut down when the batches run out or the consumer stops."""
    import ray

    from pipelines.train_clip import clip_dataset
    from vlm.data.clip_data import ClipDataConfig
    from vlm.runtime import init_ray
    from vlm.train.loop import local_shuffle_buffer

    init_ray(num_cpus=2, dashboard=False)
    try:
        tars = sorted(str(t) for t in Path(data_dir).glob("*.tar"))
        ds = clip_dataset(tars, PRESET, IMAGE_SIZE, ClipDataConfig())
        for b in ds.iter_torch_batches(
            batch_size=args.batch, drop_last=True, local_shuffle_buffer_size=local_shuffle_buffer(args.batch)
        ):
            yield b["image"], b["text"]
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------- timed loops


class StepTimer:
    """End-of-step times and data waits; rates between the end of step W and of step S."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.ends: list[float] = []
        self.waits: list[float] = []
        self.losses: list[float] = []
        # The loop thread's time runnable but waiting for a CPU (Linux schedstat), cumulative at
        # t0 and at each step end: what vlm's worker logs as cpu_wait_fraction. Empty where the
        # kernel does not expose it (the summary then says None, not 0).
        self.cpu_waits: list[float] = []

    def start(self, now: float) -> None:
        from vlm.train.sched import thread_cpu_wait_s

        self._cpu_wait = thread_cpu_wait_s
        self.t0 = now
        first = thread_cpu_wait_s()
        self.cpu_waits = [] if first is None else [first]

    def end_step(self, now: float) -> None:
        self.ends.append(now)
        if self.cpu_waits:
            self.cpu_waits.append(self._cpu_wait())

    def save(self, path) -> None:
        data = {"t0": self.t0, "ends": self.ends, "waits": self.waits, "losses": self.losses, "cpu": self.cpu_waits}
        Path(path).write_text(json.dumps(data))

    @classmethod
    def load(cls, path) -> StepTimer:
        data = json.loads(Path(path).read_text())
        timer = cls()
        timer.t0, timer.ends, timer.waits, timer.losses = data["t0"], data["ends"], data["waits"], data["losses"]
        timer.cpu_waits = data["cpu"]
        return timer

    def summary(self, batch: int, warmup_steps: int, log_every: int) -> dict:
        ends = [self.t0, *self.ends]
        steps = len(self.ends)
        w = min(warmup_steps, steps - 1)
        span = ends[steps] - ends[w]
        wait = sum(self.waits[w:steps])
        cpu = self.cpu_waits[steps] - self.cpu_waits[w] if len(self.cpu_waits) > steps else None
        windows = []
        for a in range(0, steps - log_every + 1, log_every):
            dt = ends[a + log_every] - ends[a]
            windows.append(round(log_every * batch / dt, 1))
        return {
            "steps": steps,
            "measured_steps": steps - w,
            "warmup_steps": w,
            "samples_per_s": (steps - w) * batch / span,
            "data_wait_fraction": wait / span,
            "cpu_wait_fraction": None if cpu is None else cpu / span,
            "step_ms": 1e3 * span / (steps - w),
            "window_samples_per_s": windows,
            "first_loss": self.losses[0] if self.losses else None,
            "last_window_loss": sum(self.losses[-log_every:]) / len(self.losses[-log_every:]) if self.losses else None,
        }


def _schedule(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """DeepSpeed WarmupCosineLR (linear warmup from 0, cosine to min_ratio), as a multiplier."""
    warmup = min(warmup, max(total - 1, 0))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def run_plain(batches, steps: int, threads: int, seed: int) -> StepTimer:
    """The plain single-process PyTorch loop (no Ray, no DeepSpeed)."""
    from vlm.data.clip_data import normalize
    from vlm.models.clip.build import CLIPModelConfig, build_clip
    from vlm.models.clip.loss import clip_loss
    from vlm.models.scalars import reshape_scalar_params
    from vlm.train.config import OptimConfig, param_groups

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_clip(CLIPModelConfig(preset=PRESET))[0]
    reshape_scalar_params(model)  # as vlm does; changes no number
    model.train()
    oc = OptimConfig()
    opt = torch.optim.AdamW(param_groups(model, oc.weight_decay), lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps, oc.warmup_steps, oc.min_lr_ratio))
    params = [p for p in model.parameters() if p.requires_grad]
    timer = StepTimer()
    it = iter(batches)
    t_fetch = time.perf_counter()
    timer.start(t_fetch)
    for _ in range(steps):
        item = next(it, None)
        if item is None:
            raise RuntimeError("ran out of data: make the data set bigger")
        images, text = item
        t_start = time.perf_counter()
        timer.waits.append(t_start - t_fetch)
        image_f, text_f, scale = model(normalize(images), text)
        out = clip_loss(image_f.float(), text_f.float(), scale.clamp(max=MAX_LOGIT_SCALE).float())
        out["loss"].backward()
        if oc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, oc.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        timer.losses.append(float(out["loss"].detach()))
        float(out["acc"])  # vlm reads both back every step
        t_fetch = time.perf_counter()
        timer.end_step(t_fetch)
    return timer


def _deepspeed_child(
    arrays: str, steps: int, batch: int, threads: int, seed: int, stage: int, port: int, result: str
) -> None:
    """The same loop through a DeepSpeed engine (vlm's deepspeed_config), world 1, no Ray."""
    quiet_logs()
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1"
    )
    import deepspeed
    import numpy as np

    from vlm.data.clip_data import normalize
    from vlm.models.clip.build import CLIPModelConfig, build_clip
    from vlm.models.clip.loss import clip_loss
    from vlm.models.scalars import reshape_scalar_params
    from vlm.train.config import DeepSpeedConfig, LoopConfig, OptimConfig, deepspeed_config, param_groups
    from vlm.train.loop import tune_engine
    from vlm.train.malloc import keep_freed_memory

    deepspeed.utils.logger.setLevel(40)
    torch.set_num_threads(threads)
    keep_freed_memory(MALLOC_KEEP_MB)  # what vlm's worker does (vlm/train/malloc.py)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(seed)
    model = build_clip(CLIPModelConfig(preset=PRESET))[0]
    reshape_scalar_params(model)
    oc = OptimConfig()
    cfg = deepspeed_config(
        oc, DeepSpeedConfig(zero_stage=stage), LoopConfig(global_batch_size=batch, max_steps=steps), 1
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, oc.weight_decay), config=cfg
    )
    tune_engine(engine, world=1)  # what vlm's loop does to its engine
    data = np.load(arrays)
    batches = memory_batches(data["images"], data["texts"], batch)
    timer = StepTimer()
    it = iter(batches)
    t_fetch = time.perf_counter()
    timer.start(t_fetch)
    for _ in range(steps):
        images, text = next(it)
        t_start = time.perf_counter()
        timer.waits.append(t_start - t_fetch)
        image_f, text_f, scale = engine(normalize(images), text)
        out = clip_loss(image_f.float(), text_f.float(), scale.clamp(max=MAX_LOGIT_SCALE).float())
        engine.backward(out["loss"])
        engine.step()
        timer.losses.append(float(out["loss"].detach()))
        float(out["acc"])
        t_fetch = time.perf_counter()
        timer.end_step(t_fetch)
    timer.save(result)
    torch.distributed.destroy_process_group()


def run_deepspeed(arrays: Path, steps: int, batch: int, threads: int, seed: int, stage: int, tmp: Path) -> StepTimer:
    result = tmp / f"deepspeed_loop_zero{stage}.json"
    in_subprocess(_deepspeed_child, (str(arrays), steps, batch, threads, seed, stage, free_port(), str(result)))
    return StepTimer.load(result)


def _plain_child(kind: str, tmp: str, args: argparse.Namespace, malloc: bool, result: str) -> None:
    """One plain variant in a fresh process, so that no variant inherits another's allocator state."""
    import numpy as np

    quiet_logs()
    tmp = Path(tmp)
    if malloc:
        from vlm.train.malloc import keep_freed_memory

        keep_freed_memory(MALLOC_KEEP_MB)
    if kind == "memory":
        data = np.load(tmp / "batches.npz")
        batches = memory_batches(data["images"], data["texts"], args.batch)
    elif kind == "dataloader":
        tars = sorted((tmp / "shards").glob("*.tar"))
        batches = torch.utils.data.DataLoader(
            TarBatches(tars, args.batch, args.seed), batch_size=None, num_workers=1, prefetch_factor=4
        )
    elif kind == "raydata":
        batches = ray_data_batches(tmp / "shards", args)
    else:
        raise ValueError(kind)
    timer = run_plain(batches, args.steps, args.threads, args.seed)
    if kind == "raydata":
        batches.close()  # shuts Ray down
    timer.save(result)


def run_plain_variant(kind: str, tmp: Path, args: argparse.Namespace, malloc: bool = False) -> StepTimer:
    result = tmp / f"plain_{kind}_{'malloc' if malloc else 'default'}.json"
    in_subprocess(_plain_child, (kind, str(tmp), args, malloc, str(result)))
    return StepTimer.load(result)
