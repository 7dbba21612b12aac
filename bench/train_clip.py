"""CLIP training throughput and ZeRO memory: `vlm train clip` against a plain PyTorch loop.

Part 1, throughput. The same model (`vlm-clip-tiny`), global batch, optimizer (torch AdamW,
same groups, lr, betas, eps, weight decay), warmup+cosine schedule, gradient clipping and
intra-op thread count, trained for the same number of steps on the same digit shards by

* plain   - one process, no Ray, no DeepSpeed: `model(...)`, `clip_loss`, `backward`,
            `clip_grad_norm_`, `AdamW.step`. Data are decoded with vlm's own `ClipPreprocess`
            from the tars into memory *before* timing, so this is the compute-only upper bound
            (uint8 images, normalized in the step with vlm's `normalize`, as vlm's step does).
            It runs before the first vlm run and after each; the mean is the reference.
* plain+malloc - the same, with glibc malloc set as vlm's training workers set it
            (`scaling.malloc_keep_mb`, vlm/train/malloc.py: freed memory is kept instead of being
            returned to the OS every step, which saves ~6k page faults a step here). Against it,
            vlm's ratio is what Ray, Ray Data and DeepSpeed cost beyond the allocator.
* plain+DataLoader - the same loop fed by a `torch.utils.data.DataLoader` (1 worker process)
            that reads the tars and decodes with `ClipPreprocess` while training runs.
* plain+DataLoader+malloc - the same with vlm's malloc setting: the fair comparison for vlm's
            step, which also shares the machine with decoding.
* plain+Ray Data - the same loop fed in-process by Ray Data exactly as vlm's worker is fed
            (`read_webdataset` -> `ClipPreprocess` map_batches -> `iter_torch_batches` with
            vlm's local shuffle buffer), no Ray Train, no DeepSpeed: what the iterator costs.
* deepspeed ZeRO-0 / ZeRO-2 - the same in-memory batches through a DeepSpeed engine built
            from vlm's own `deepspeed_config` (world size 1, gloo) and tuned as vlm's loop tunes it
            (fused clip, malloc setting), no Ray: isolates what the DeepSpeed engine costs
            (compare with plain+malloc; ZeRO-2 is vlm's default stage).
* vlm     - `pipelines.train_clip.train_clip` with 1 Ray Train worker (Ray Data decoding,
            DeepSpeed ZeRO-0), the path behind `vlm train clip`.

Every variant except vlm runs in a fresh process (multiprocessing spawn): glibc's malloc adapts its
thresholds to what a process has freed before, so a loop run after other work in the same process
can fault in thousands more pages a step than the same loop in a fresh one.

Every variant measures the same thing: samples/s between the end of step W and the end of step
S (wall clock, including waiting for data, the forward/backward, clipping, optimizer step and
the per-step loss read-back), where W = warmup windows x log_every steps are discarded as
warm-up. For vlm this comes from the `samples_per_s` / `data_wait_fraction` metrics its worker
logs to MLflow every `log_every` steps (measured inside the worker between log lines; the
first window(s) include Ray Data's pipeline start and are discarded). "data wait" is the part
of that time spent waiting for the next batch. The data set is large enough that no variant
crosses an epoch boundary, and vlm checkpoints only after the last measured step.

Part 2, ZeRO memory. Two processes (multiprocessing spawn, gloo, DeepSpeed's CPU accelerator)
build the model (`vlm-clip-tiny`, 3.4M parameters, 93% of them in the token embedding; and
open_clip's `ViT-S-32-alt`, 43M), apply `reshape_scalar_params`, call `deepspeed.initialize`
with vlm's `param_groups` and `deepspeed_config` for ZeRO stage 0/1/2/3, train 2 steps on
random batches, and after the last `engine.backward` (before `engine.step`: gradients,
parameters and optimizer state are all alive) take a census of every tensor storage the
model (`p.data`, `p.ds_tensor`, `p.grad`) and `engine.optimizer` (its attributes,
recursively, incl. the inner torch AdamW's `state`) reference, each storage counted once at
its allocated size, classified as parameters, gradients, Adam state (m, v), DeepSpeed's fp32
master copy of the rank's partition (`single_partition_of_fp32_groups`,
`fp32_partitioned_groups_flat`), and reduce-bucket buffers (`ipg_buckets`). A second census
runs inside the last backward, just before ZeRO's gradient-partitioning epilogue. Compared
with the ZeRO formulas for fp32 training (Psi = trainable parameters, N = ranks; no fp16
copy, so no fp16/fp32-master split in the formula): params 4Psi + grads 4Psi + Adam m,v 8Psi
= 16Psi, i.e. stage 0: 16Psi, stage 1: 4Psi + 4Psi + 8Psi/N, stage 2: 4Psi + (4Psi + 8Psi)/N,
stage 3: 16Psi/N.

    python bench/train_clip.py                           # the whole benchmark (~7-8 min on 2 cores)
    python bench/train_clip.py --steps 40 --log-every 10 --skip-zero   # a quick look

Prints tables and writes `bench/results/train_clip.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_JSON = REPO / "bench" / "results" / "train_clip.json"
PRESET = "vlm-clip-tiny"
IMAGE_SIZE = 32
UNIQUE_SAMPLES = 2048  # distinct digit samples rendered; shards are repeated to reach the step count
SAMPLES_PER_SHARD = 512
MAX_LOGIT_SCALE = 100.0  # ClipLossConfig.max_logit_scale
MALLOC_KEEP_MB = 1024  # ScalingConfig.malloc_keep_mb, vlm's default
EXPERIMENT = "bench-train-clip"

# ----------------------------------------------------------------------------- small helpers


def _machine_busy_s() -> float | None:
    """CPU-seconds the whole machine has spent busy (all processes), from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _self_cpu_s() -> float:
    """CPU-seconds of this process and of its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def others_busy_cores(probe_s: float = 2.0) -> float | None:
    """Cores other processes keep busy, sampled while this process sleeps."""
    m0 = _machine_busy_s()
    time.sleep(probe_s)
    m1 = _machine_busy_s()
    return None if m0 is None or m1 is None else (m1 - m0) / probe_s


class QuietWait:
    """Waits for other processes to go quiet (< threshold cores) before a timed variant, from one
    budget of seconds for the whole benchmark, so a busy machine cannot stretch it without bound."""

    def __init__(self, budget_s: float, threshold: float = 0.3):
        self.left = budget_s
        self.threshold = threshold

    def __call__(self) -> float | None:
        start = time.monotonic()
        busy = others_busy_cores()
        while busy is not None and busy >= self.threshold and time.monotonic() - start < self.left:
            print(f"  (other processes busy: {busy:.2f} cores; waiting)", flush=True)
            time.sleep(8)
            busy = others_busy_cores()
        self.left = max(0.0, self.left - (time.monotonic() - start))
        return busy


class Phase:
    """Wall time, CPU time of this process (+ waited-for children) and the machine's busy CPU time."""

    def __init__(self, name: str, quiet: QuietWait | None = None):
        self.name = name
        self.quiet = quiet
        self.info: dict = {}

    def __enter__(self) -> Phase:
        self.others_before = self.quiet() if self.quiet is not None else None
        self.t0, self.c0, self.m0 = time.perf_counter(), _self_cpu_s(), _machine_busy_s()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        m1 = _machine_busy_s()
        cpu = _self_cpu_s() - self.c0
        busy = None if m1 is None or self.m0 is None else (m1 - self.m0) / wall
        self.info = {
            "wall_s": round(wall, 2),
            "others_busy_cores_before": None if self.others_before is None else round(self.others_before, 2),
            "own_cores": round(cpu / wall, 2),
            "machine_busy_cores": None if busy is None else round(busy, 2),
            # Only meaningful where all our work runs in this process or waited-for children (not Ray).
            "others_busy_cores": None if busy is None else round(max(0.0, busy - cpu / wall), 2),
        }


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("torch", "deepspeed", "ray", "open_clip_torch", "mlflow", "numpy", "pillow"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gib = None
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def _quiet() -> None:
    import logging
    import warnings

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


# ----------------------------------------------------------------------------- data


def make_shards(root: Path, samples: int) -> list[Path]:
    """UNIQUE_SAMPLES distinct digit samples, their shards repeated to hold >= `samples`."""
    from vlm.testbed.digit_shards import write_digit_shards

    unique_dir = root / "unique"
    unique = write_digit_shards(unique_dir, UNIQUE_SAMPLES, samples_per_shard=SAMPLES_PER_SHARD, image_size=IMAGE_SIZE)
    data = root / "shards"
    data.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(samples / SAMPLES_PER_SHARD)
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
    _quiet()
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
    _in_subprocess(_deepspeed_child, (str(arrays), steps, batch, threads, seed, stage, _free_port(), str(result)))
    return StepTimer.load(result)


def _plain_child(kind: str, tmp: str, args: argparse.Namespace, malloc: bool, result: str) -> None:
    """One plain variant in a fresh process, so that no variant inherits another's allocator state."""
    import numpy as np

    _quiet()
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
    _in_subprocess(_plain_child, (kind, str(tmp), args, malloc, str(result)))
    return StepTimer.load(result)


def _in_subprocess(target, args: tuple) -> None:
    import multiprocessing as mp

    proc = mp.get_context("spawn").Process(target=target, args=args)
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"the {target.__name__} subprocess failed (exit {proc.exitcode})")


def run_vlm(data_dir: Path, out_dir: Path, tmp: Path, args) -> dict:
    """`train_clip` with 1 worker; its logged samples_per_s / data_wait_fraction from MLflow."""
    import mlflow
    import ray

    from pipelines.train_clip import TrainClipConfig, train_clip
    from vlm.config import load_config

    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("RAY_ADDRESS", None)
    client = mlflow.MlflowClient(uri)
    if client.get_experiment_by_name(EXPERIMENT) is None:  # artifacts into the temp dir, not ./mlruns
        client.create_experiment(EXPERIMENT, artifact_location=(tmp / "mlartifacts").as_uri())
    overrides = vlm_overrides(args)
    cfg = load_config(TrainClipConfig, None, overrides)
    try:
        result = train_clip(str(data_dir), out_dir, cfg)
    finally:
        ray.shutdown()
    run_id = result["mlflow_run_id"]

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    rates, waits, losses = history("samples_per_s"), history("data_wait_fraction"), history("loss")
    steady = [(s, r) for s, r in rates if s > args.warmup_windows * args.log_every]
    if not steady:
        raise RuntimeError("no log window left after warm-up: raise --steps or lower --log-every")
    # Equal samples per window: overall rate = windows / sum(1 / rate); waits weighted by time.
    times = {s: args.log_every * args.batch / r for s, r in steady}
    total = sum(times.values())
    wait = sum(times[s] * w for s, w in waits if s in times)
    cpu_waits = history("cpu_wait_fraction")
    cpu = sum(times[s] * w for s, w in cpu_waits if s in times) if cpu_waits else None
    return {
        "overrides": overrides,
        "mlflow_run_id": run_id,
        "steps": max(s for s, _ in rates),
        "measured_steps": len(steady) * args.log_every,
        "warmup_steps": args.warmup_windows * args.log_every,
        "samples_per_s": len(steady) * args.log_every * args.batch / total,
        "data_wait_fraction": wait / total,
        "cpu_wait_fraction": None if cpu is None else cpu / total,
        "step_ms": 1e3 * total / (len(steady) * args.log_every),
        "window_samples_per_s": [round(r, 1) for _, r in rates],
        "window_data_wait_fraction": [round(w, 3) for _, w in waits],
        "window_cpu_wait_fraction": [round(w, 3) for _, w in cpu_waits],
        "first_loss": losses[0][1] if losses else None,
        "last_window_loss": losses[-1][1] if losses else None,
    }


def vlm_overrides(args) -> list[str]:
    return [
        "scaling.num_workers=1",
        f"scaling.cpus_per_worker={args.cpus_per_worker}",
        f"scaling.torch_threads={args.threads}",
        f"train.global_batch_size={args.batch}",
        f"train.max_steps={args.steps}",
        f"train.log_every={args.log_every}",
        f"train.checkpoint_every={args.steps}",  # only the final checkpoint, after the last log window
        f"train.seed={args.seed}",
        "deepspeed.zero_stage=0",
        "deepspeed.precision=fp32",
        f"model.preset={PRESET}",
        "eval.digits=false",
        f"tracking.experiment={EXPERIMENT}",
    ]


def _pct(x: float | None, width: int = 6) -> str:
    return "-" if x is None else f"{x:{width}.1%}"


def throughput(args, tmp: Path) -> dict:
    import numpy as np

    samples = (args.steps + 2) * args.batch
    phases: dict = {}
    with Phase("shards") as ph:
        tars = make_shards(tmp, samples)
    phases["write_shards"] = ph.info
    print(
        f"  {len(tars)} shards, {len(tars) * SAMPLES_PER_SHARD} samples ({UNIQUE_SAMPLES} distinct) "
        f"in {ph.info['wall_s']:.0f}s",
        flush=True,
    )
    with Phase("predecode") as ph:
        images, texts = predecode(tars, args.steps * args.batch, args.seed)
        arrays = tmp / "batches.npz"
        np.savez(arrays, images=images, texts=texts)
    phases["predecode"] = ph.info
    print(
        f"  pre-decoded {len(images)} samples ({images.nbytes / 2**20:.0f} MiB) in {ph.info['wall_s']:.0f}s", flush=True
    )

    warm = args.warmup_windows * args.log_every
    runs: dict = {}
    quiet = QuietWait(args.quiet_wait)

    def record(name: str, timer: StepTimer, ph: Phase) -> None:
        res = timer.summary(args.batch, warm, args.log_every)
        res["phase"] = ph.info
        runs[name] = res
        print(
            f"  {name:<22} {res['samples_per_s']:8.1f} samples/s  data wait {res['data_wait_fraction']:6.1%}  "
            f"cpu wait {_pct(res['cpu_wait_fraction'])}  "
            f"(own {ph.info['own_cores']} cores, others {ph.info['others_busy_cores']} cores)",
            flush=True,
        )

    def plain(name: str, kind: str = "memory", malloc: bool = False) -> None:
        with Phase(name, quiet) as ph:
            timer = run_plain_variant(kind, tmp, args, malloc)
        record(name, timer, ph)

    plain("plain (before)")
    plain("plain+malloc (before)", malloc=True)
    if not args.skip_variants:
        plain("plain+DataLoader", "dataloader")
        plain("plain+DataLoader+malloc", "dataloader", malloc=True)
        plain("plain+Ray Data", "raydata")
        for stage in (0, 2):
            name = f"deepspeed ZeRO-{stage} (no Ray)"
            with Phase(name, quiet) as ph:
                timer = run_deepspeed(arrays, args.steps, args.batch, args.threads, args.seed, stage, tmp)
            record(name, timer, ph)

    # vlm and plain alternate, so each vlm run is compared with the plain runs just before and after
    # it: this machine's speed drifts by ~10% over minutes, more than the 5% being measured.
    plains, tuned = ["plain (before)"], ["plain+malloc (before)"]
    ratios, tuned_ratios = [], []
    for r in range(1, args.rounds + 1):
        name = "vlm train clip" if args.rounds == 1 else f"vlm train clip (round {r})"
        with Phase("vlm", quiet) as ph:
            res = run_vlm(tmp / "shards", tmp / f"vlm_run{r}", tmp, args)
        res["phase"] = ph.info
        runs[name] = res
        print(
            f"  {name:<22} {res['samples_per_s']:8.1f} samples/s  data wait "
            f"{res['data_wait_fraction']:6.1%}  cpu wait {_pct(res['cpu_wait_fraction'])}  "
            f"(whole command {ph.info['wall_s']:.0f}s, "
            f"machine busy {ph.info['machine_busy_cores']} cores)",
            flush=True,
        )
        suffix = "(after)" if args.rounds == 1 else f"(after round {r})"
        plain(f"plain {suffix}")
        plain(f"plain+malloc {suffix}", malloc=True)
        for names, out, new in ((plains, ratios, f"plain {suffix}"), (tuned, tuned_ratios, f"plain+malloc {suffix}")):
            around = (runs[names[-1]]["samples_per_s"] + runs[new]["samples_per_s"]) / 2
            out.append(res["samples_per_s"] / around)
            names.append(new)

    ref = sum(runs[p]["samples_per_s"] for p in plains) / len(plains)
    for r in runs.values():
        r["ratio_to_plain"] = r["samples_per_s"] / ref
    ratio = statistics.median(ratios)
    return {
        "plain_reference_samples_per_s": ref,
        "vlm_over_plain": ratio,
        "vlm_over_adjacent_plain_per_round": ratios,
        "vlm_over_plain_malloc": statistics.median(tuned_ratios),
        "vlm_over_adjacent_plain_malloc_per_round": tuned_ratios,
        "within_5_percent": ratio >= 0.95,
        "runs": runs,
        "phases": phases,
        "data": {
            "shards": len(tars),
            "samples": len(tars) * SAMPLES_PER_SHARD,
            "distinct_samples": UNIQUE_SAMPLES,
            "image_size": IMAGE_SIZE,
        },
    }


def throughput_table(res: dict, args) -> str:
    rows = [("variant", "samples/s", "ms/step", "data wait", "cpu wait", "vs plain", "last loss", "others")]
    for name, r in res["runs"].items():
        others = r["phase"].get("others_busy_cores")
        rows.append(
            (
                name,
                f"{r['samples_per_s']:.1f}",
                f"{r['step_ms']:.1f}",
                f"{r['data_wait_fraction']:.1%}",
                _pct(r.get("cpu_wait_fraction"), width=0),
                f"{r['ratio_to_plain']:.3f}",
                f"{r['last_window_loss']:.3f}" if r.get("last_window_loss") is not None else "-",
                "-" if name.startswith("vlm train clip") or others is None else f"{others:.2f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        f"Throughput: {PRESET}, global batch {args.batch}, {args.threads} intra-op thread(s), fp32 CPU, "
        f"{args.steps} steps, the first {args.warmup_windows * args.log_every} discarded (windows of "
        f"{args.log_every} steps)",
    ]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(row)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    ratio = res["vlm_over_plain"]
    lines.append(
        f"vlm / plain = {ratio:.3f} ({(ratio - 1) * 100:+.1f}%; target: within 5%: "
        f"{'met' if res['within_5_percent'] else 'NOT met'}): the median over rounds of each vlm run against the "
        f"mean of the plain runs just before and after it ("
        + ", ".join(f"{x:.3f}" for x in res["vlm_over_adjacent_plain_per_round"])
        + "). 'vs plain' column: against the mean of all plain runs."
    )
    tuned = res["vlm_over_plain_malloc"]
    lines.append(
        f"vlm / plain+malloc = {tuned:.3f} ({(tuned - 1) * 100:+.1f}%; per round "
        + ", ".join(f"{x:.3f}" for x in res["vlm_over_adjacent_plain_malloc_per_round"])
        + "): against a plain loop given vlm's malloc setting too (scaling.malloc_keep_mb), i.e. what Ray, "
        "Ray Data and DeepSpeed cost beyond it."
    )
    lines.append(
        "samples/s: wall clock from the end of the last warm-up step to the end of the last step, incl. data wait; "
        "plain/deepspeed: batches pre-decoded in memory; plain+DataLoader: 1 worker decoding from the tars; "
        "+malloc and deepspeed rows: glibc malloc set as vlm's workers set it (vlm/train/malloc.py); "
        "every variant but vlm runs in a fresh process; "
        "vlm: from its logged samples_per_s (Ray Data decoding, measured in the worker). "
        "cpu wait: the part of that time the training thread was ready to run but waited for a CPU "
        "(/proc/thread-self/schedstat; vlm: its logged cpu_wait_fraction). "
        "others: cores other processes kept busy meanwhile (should be ~0)."
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- ZeRO memory

CATEGORIES = ("params", "grads", "adam_state", "fp32_master", "buffers", "other")


class Census:
    """Every distinct tensor storage reachable from the model and the optimizer, counted once."""

    def __init__(self):
        self.storages: dict[int, dict] = {}
        self._visited: set[int] = set()

    def add(self, t, path: str) -> None:

        if not torch.is_tensor(t) or t.numel() == 0 or t.device.type != "cpu":
            return
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr == 0:
            return
        entry = self.storages.setdefault(ptr, {"bytes": st.nbytes(), "dtype": str(t.dtype), "paths": []})
        if len(entry["paths"]) < 6 and path not in entry["paths"]:
            entry["paths"].append(path)

    def walk(self, obj, path: str, depth: int = 0) -> None:

        if depth > 12:
            return
        if torch.is_tensor(obj):
            self.add(obj, path)
            if getattr(obj, "grad", None) is not None:
                self.add(obj.grad, path + ".grad")
            return
        if isinstance(obj, (str, bytes, int, float, bool, type(None))) or id(obj) in self._visited:
            return
        self._visited.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            return  # the model is counted by its parameters
        if isinstance(obj, dict):
            for k, v in list(obj.items()):
                if torch.is_tensor(k):
                    self.walk(k, f"{path}{{key}}", depth + 1)
                    name = "<param>"
                else:
                    name = str(k)
                self.walk(v, f"{path}[{name}]", depth + 1)
        elif isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
            for i, v in enumerate(list(obj)):
                self.walk(v, f"{path}[{i}]", depth + 1)
        elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
            for k, v in list(vars(obj).items()):
                self.walk(v, f"{path}.{k}", depth + 1)

    @staticmethod
    def classify(paths: list[str]) -> str:
        low = [p.lower() for p in paths]
        if any(
            p.startswith(("param:", "param.ds_tensor:")) or "bit16_groups_flat" in p or "fp16_partitioned_groups" in p
            for p in low
        ):
            return "params"
        if any("exp_avg" in p or ".state[" in p for p in low):
            return "adam_state"
        if any("fp32" in p and "grad" not in p for p in low):
            return "fp32_master"
        if any("ipg" in p or "bucket" in p for p in low):
            return "buffers"
        if any("grad" in p for p in low):
            return "grads"
        return "other"

    def totals(self) -> dict:
        out = dict.fromkeys(CATEGORIES, 0)
        for e in self.storages.values():
            e["category"] = self.classify(e["paths"])
            out[e["category"]] += e["bytes"]
        return out


def take_census(engine) -> Census:
    c = Census()
    for name, p in engine.module.named_parameters():
        c.add(p.data, f"param:{name}")
        if hasattr(p, "ds_tensor"):
            c.add(p.ds_tensor, f"param.ds_tensor:{name}")
        if p.grad is not None:
            c.add(p.grad, f"param.grad:{name}")
    c.walk(engine.optimizer, "engine.optimizer")
    return c


def _zero_child(rank: int, world: int, port: int, stage: int, preset: str, batch: int, steps: int, result: str) -> None:
    t_enter = time.perf_counter()
    marks: dict[str, float] = {}
    _quiet()
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_SIZE=str(world),
    )

    import deepspeed

    from vlm.models.clip.build import CLIPModelConfig, build_clip, model_config
    from vlm.models.clip.loss import clip_loss
    from vlm.models.scalars import reshape_scalar_params
    from vlm.train.config import DeepSpeedConfig, LoopConfig, OptimConfig, deepspeed_config, param_groups

    marks["imports"] = time.perf_counter() - t_enter
    deepspeed.utils.logger.setLevel(40)
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    marks["init_distributed"] = time.perf_counter() - t_enter
    torch.manual_seed(0)
    model, _, mcfg = build_clip(CLIPModelConfig(preset=preset))
    marks["model_built"] = time.perf_counter() - t_enter
    reshape_scalar_params(model)
    psi = sum(p.numel() for p in model.parameters() if p.requires_grad)
    name, biggest_p = max(model.named_parameters(), key=lambda kv: kv[1].numel())
    largest = {"name": name, "numel": biggest_p.numel(), "share": biggest_p.numel() / psi}  # before ZeRO-3 empties it
    t_start = time.perf_counter()
    rss_model = _rss_mb()
    oc = OptimConfig()
    cfg = deepspeed_config(
        oc, DeepSpeedConfig(zero_stage=stage), LoopConfig(global_batch_size=batch, max_steps=steps), world
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, oc.weight_decay), config=cfg
    )
    rss_init = _rss_mb()
    marks["initialized"] = time.perf_counter() - t_enter
    size = model_config(preset)["vision_cfg"]["image_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    ctx = model_config(preset)["text_cfg"]["context_length"]
    micro = batch // world
    gen = torch.Generator().manual_seed(rank)
    census = None
    rss_peak = None
    in_backward: dict = {}
    epilogue = getattr(engine.optimizer, "independent_gradient_partition_epilogue", None)
    if epilogue is not None:  # ZeRO 1-3: also look inside backward, before the gradient partitioning epilogue

        def census_then_epilogue(*a, **kw):
            if in_backward.get("armed"):
                in_backward["totals"] = take_census(engine).totals()
                in_backward["rss_mb"] = _rss_mb()
            return epilogue(*a, **kw)

        engine.optimizer.independent_gradient_partition_epilogue = census_then_epilogue
    for step in range(steps):
        in_backward["armed"] = step == steps - 1
        images = torch.randn(micro, 3, size, size, generator=gen)
        text = torch.randint(1, 49000, (micro, ctx), generator=gen)
        image_f, text_f, scale = engine(images, text)
        losses = clip_loss(
            image_f.float(), text_f.float(), scale.clamp(max=MAX_LOGIT_SCALE).float(), rank=rank, world=world
        )
        engine.backward(losses["loss"])
        if step == steps - 1:  # gradients, parameters and optimizer state (from step 1) all alive
            census = take_census(engine)
            rss_peak = _rss_mb()
        engine.step()
    after = take_census(engine).totals()
    totals = census.totals()
    biggest = sorted(census.storages.values(), key=lambda e: -e["bytes"])[:12]
    persistent = 0
    if stage == 3:
        persistent = sum(p.ds_numel for p in engine.module.parameters() if getattr(p, "ds_persist", False))
    Path(result).write_text(
        json.dumps(
            {
                "rank": rank,
                "stage": stage,
                "psi": psi,
                "largest_param": largest,
                "wall_s": round(time.perf_counter() - t_start, 2),
                "seconds_since_start": {k: round(v, 2) for k, v in marks.items()},
                "bytes": totals,
                "bytes_after_step": after,
                "bytes_in_backward_before_epilogue": in_backward.get("totals"),
                "rss_mb_in_backward": in_backward.get("rss_mb"),
                "rss_mb": {"model_built": rss_model, "after_initialize": rss_init, "after_backward": rss_peak},
                "zero3_persistent_params": persistent,
                "biggest_storages": [
                    {"mb": e["bytes"] / 2**20, "category": e["category"], "dtype": e["dtype"], "paths": e["paths"][:3]}
                    for e in biggest
                ],
                "optimizer_class": type(engine.optimizer).__name__,
            }
        )
    )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def zero_formula(stage: int, psi: int, n: int) -> float:
    """Bytes per rank, fp32 Adam (no fp16 copy): params 4Psi, grads 4Psi, Adam m+v 8Psi."""
    p, g, o = 4 * psi, 4 * psi, 8 * psi
    return {0: p + g + o, 1: p + g + o / n, 2: p + (g + o) / n, 3: (p + g + o) / n}[stage]


def zero_memory(args, tmp: Path, preset: str) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = {}
    for stage in args.zero_stages:
        port = _free_port()
        files = [tmp / f"zero_{preset}_{stage}_rank{r}.json" for r in range(args.zero_workers)]
        t0 = time.perf_counter()
        procs = [
            ctx.Process(
                target=_zero_child,
                args=(r, args.zero_workers, port, stage, preset, args.zero_batch, 2, str(files[r])),
            )
            for r in range(args.zero_workers)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
        if any(p.exitcode != 0 for p in procs):
            for p in procs:
                if p.is_alive():
                    p.kill()
            raise RuntimeError(f"ZeRO-{stage} subprocesses failed: exit codes {[p.exitcode for p in procs]}")
        ranks = [json.loads(f.read_text()) for f in files]
        psi = ranks[0]["psi"]
        n = args.zero_workers
        formula = zero_formula(stage, psi, n)
        for r in ranks:
            b = r["bytes"]
            r["model_states_bytes"] = b["params"] + b["grads"] + b["adam_state"]
            r["ratio_model_states"] = r["model_states_bytes"] / formula
            r["ratio_with_master"] = (r["model_states_bytes"] + b["fp32_master"]) / formula
        worst = max(ranks, key=lambda r: r["model_states_bytes"])
        results[stage] = {
            "psi": psi,
            "workers": n,
            "formula_bytes": formula,
            "max_rank_model_states_bytes": worst["model_states_bytes"],
            "max_rank_ratio": worst["ratio_model_states"],
            "ranks": ranks,
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        print(
            f"  {preset} ZeRO-{stage}: params+grads+Adam up to {worst['model_states_bytes'] / 2**20:.1f} MiB/rank, "
            f"formula {formula / 2**20:.1f} MiB ({results[stage]['wall_s']:.0f}s)",
            flush=True,
        )
    return results


def zero_table(res: dict, args, preset: str) -> str:
    mb = 2**20
    first = next(iter(res.values()))
    psi, n = first["psi"], first["workers"]
    big = first["ranks"][0]["largest_param"]
    head = (
        "stage",
        "rank",
        "params",
        "grads",
        "Adam m+v",
        "p+g+os",
        "formula",
        "ratio",
        "fp32 master",
        "ratio+m",
        "buckets",
        "in bwd",
        "RSS +",
    )
    rows = [head]
    for stage, r in res.items():
        for x in r["ranks"]:
            b = x["bytes"]
            rss = x["rss_mb"]["after_backward"] - x["rss_mb"]["model_built"]
            bwd = x.get("bytes_in_backward_before_epilogue")
            rows.append(
                (
                    str(stage),
                    str(x["rank"]),
                    f"{b['params'] / mb:.2f}",
                    f"{b['grads'] / mb:.2f}",
                    f"{b['adam_state'] / mb:.2f}",
                    f"{x['model_states_bytes'] / mb:.2f}",
                    f"{r['formula_bytes'] / mb:.2f}",
                    f"{x['ratio_model_states']:.2f}",
                    f"{b['fp32_master'] / mb:.2f}",
                    f"{x['ratio_with_master']:.2f}",
                    f"{b['buffers'] / mb:.1f}",
                    "-" if bwd is None else f"{(bwd['grads'] + bwd['buffers']) / mb:.1f}",
                    f"{rss:.0f}",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        f"ZeRO memory per rank (MiB), {preset}: Psi = {psi:,} trainable parameters "
        f"(largest tensor {big['name']}: {big['share']:.0%}), N = {n} ranks, fp32 on CPU, torch AdamW, "
        f"vlm's deepspeed_config (reduce_bucket_size 5e7, stage-3 persistence threshold 1e4).",
        "formula (fp32, no fp16 copy): params 4Psi + grads 4Psi + Adam m,v 8Psi, partitioned per stage: "
        "0: 16Psi, 1: 4Psi+4Psi+8Psi/N, 2: 4Psi+(4Psi+8Psi)/N, 3: 16Psi/N",
    ]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.rjust(widths[j]) for j, c in enumerate(row)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(
        "measured after the last engine.backward (before engine.step), every distinct tensor storage reachable "
        "from the model and engine.optimizer counted once: p+g+os = params + grads + Adam state; "
        "fp32 master = DeepSpeed's own fp32 copy of the rank's partition (stages 1-3 keep it even in fp32), "
        "ratio+m = (p+g+os + master) / formula; buckets = reduce-bucket buffers alive at that point "
        "(allocated size; on CPU only touched pages are resident); in bwd = gradients + buckets inside backward, "
        "before ZeRO's partitioning epilogue (stages 1-3; allocated size); RSS + = process RSS growth from model "
        "built to after backward."
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/train_clip.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per variant (default 300)")
    p.add_argument("--batch", type=int, default=64, help="global batch size (default 64)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads, every variant (default 1)")
    p.add_argument("--cpus-per-worker", type=float, default=None, help="vlm scaling.cpus_per_worker (default: threads)")
    p.add_argument("--log-every", type=int, default=25, help="vlm train.log_every = the measuring window (steps)")
    p.add_argument("--warmup-windows", type=int, default=3, help="log windows discarded as warm-up (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2, help="vlm runs, each followed by a plain run (default 2)")
    p.add_argument("--skip-variants", action="store_true", help="only plain (in memory) and vlm")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-zero", action="store_true")
    p.add_argument(
        "--zero-presets",
        default=f"{PRESET},ViT-S-32-alt",
        help=f"models for the ZeRO memory part, comma-separated (default {PRESET},ViT-S-32-alt: 3.4M and 43M "
        "parameters; the tiny one's token embedding holds 93%% of its parameters)",
    )
    p.add_argument("--zero-workers", type=int, default=2)
    p.add_argument("--zero-batch", type=int, default=16, help="global batch of the ZeRO memory runs")
    p.add_argument("--zero-stages", default="0,1,2,3")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60,
        help="seconds, in all, to wait for other processes to go quiet before timed variants (default 60; 0: never)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (shards, vlm run, MLflow store)")
    p.add_argument("--json", default=str(DEFAULT_JSON), help=f"results file (default {DEFAULT_JSON})")
    args = p.parse_args(argv)
    if args.cpus_per_worker is None:
        args.cpus_per_worker = float(args.threads)
    args.zero_stages = [int(s) for s in args.zero_stages.split(",") if s.strip()]
    args.zero_presets = [s.strip() for s in args.zero_presets.split(",") if s.strip()]
    if args.steps % args.log_every:
        p.error("--steps must be a multiple of --log-every (equal log windows)")
    if args.steps <= args.warmup_windows * args.log_every:
        p.error("--steps must exceed --warmup-windows x --log-every")
    if args.zero_batch % args.zero_workers:
        p.error("--zero-batch must be divisible by --zero-workers")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    _quiet()
    tmp = Path(tempfile.mkdtemp(prefix="vlm-bench-train-clip-"))
    settings = {
        k: getattr(args, k)
        for k in (
            "steps",
            "batch",
            "threads",
            "cpus_per_worker",
            "log_every",
            "warmup_windows",
            "seed",
            "quiet_wait",
            "zero_presets",
            "zero_workers",
            "zero_batch",
            "zero_stages",
        )
    }
    settings.update(preset=PRESET, image_size=IMAGE_SIZE, precision="fp32", device="cpu")
    result = {
        "benchmark": "train_clip",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "settings": settings,
    }
    print(f"work dir: {tmp}", flush=True)
    tables = []
    t0 = time.perf_counter()
    try:
        if not args.skip_throughput:
            print("throughput:", flush=True)
            tp = throughput(args, tmp)
            result["throughput"] = tp
            tables.append(throughput_table(tp, args))
        if not args.skip_zero:
            print("ZeRO memory:", flush=True)
            result["zero_memory"] = {}
            for preset in args.zero_presets:
                zm = zero_memory(args, tmp, preset)
                result["zero_memory"][preset] = {str(k): v for k, v in zm.items()}
                tables.append(zero_table(zm, args, preset))
            result["zero_memory_formula"] = (
                "fp32 Adam, no fp16 copy: params 4Psi + grads 4Psi + Adam m,v 8Psi; stage 0: 16Psi, "
                "stage 1: 4Psi+4Psi+8Psi/N, stage 2: 4Psi+(4Psi+8Psi)/N, stage 3: 16Psi/N"
            )
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["total_wall_s"] = round(time.perf_counter() - t0, 1)
    text = "\n\n".join(tables)
    result["tables"] = text
    print()
    print(text)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {path} (total {result['total_wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
