"""`vlm train blip`: fine-tune the CapFilt captioner or filter on clean pairs, on Ray Train + DeepSpeed.

BLIP (Li et al. 2022, sec. 3.3) fine-tunes its captioner (language modelling of the caption given the
image) and its filter (ITC + ITM with hard negatives mined from the batch) on a clean human-annotated
set before bootstrapping web data with them. Offline there are no BLIP weights, so the demo trains both
from scratch on clean digit pairs. parse -> build (config, Ray Data pipeline, TorchTrainer) -> train ->
close, as `train_clip`: the per-worker loop is `vlm.train.loop.train_worker`; this module supplies the
BLIP task, the shard preprocessing and the held-out evaluation.

The export (`OUTPUT/export`, `save_pretrained` model + processor) is what the CapFilt stage loads:
`BlipConfig(pretrained=EXPORT)` for a captioner, `BlipConfig(filter_pretrained=EXPORT)` for a filter.
The held-out evaluation runs the export through the same `Captioner` / `Filter` CapFilt uses.

Differences from BLIP, on purpose: ITC negatives and ITM hard negatives come from each worker's own
micro batch (BLIP all-gathers features across GPUs first), and see `vlm.models.blip.losses`.
"""

from __future__ import annotations

import dataclasses
import json
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from pipelines import training
from vlm.config import write_config
from vlm.models.blip.config import BlipConfig
from vlm.tracking import TrackingConfig, tracking_defaults
from vlm.train.config import DeepSpeedConfig, LoopConfig, OptimConfig, ScalingConfig, deepspeed_config

Task = Literal["captioner", "filter"]
IGNORE = -100  # label of positions without loss


@dataclass
class BlipDataConfig:
    caption_source: Literal["original", "synthetic", "random_kept"] = "original"  # see clip_data.pick_caption
    augment: bool = True  # random resized crop (scale crop_scale_min-1) for training
    crop_scale_min: float = 0.8
    shuffle_files: bool = True
    # Filter only: a KEY.json field; samples with equal values are positives of each other (their
    # captions match each other's images), never drawn as ITM negatives. BLIP uses the COCO image id
    # this way; for the digits it is `label`. null: only identical captions count as matches.
    group_key: str | None = None
    # Passes over the shards per loop epoch. A small clean set (BLIP fine-tunes on ~100k COCO pairs, the
    # demo on ~1k digits) ends an epoch every few seconds, and each epoch restarts Ray Data's streaming
    # execution; several passes per epoch (each freshly augmented) keep the workers fed.
    repeat: int = 1
    # Preprocessing tasks in flight; null: as many as Ray Data likes. Each task process imports torch and
    # transformers once (seconds); on a 2-core machine one process keeps up with a tiny model and starts
    # faster than four competing for the cores.
    concurrency: int | None = None

    def validate(self) -> None:
        if self.repeat < 1:
            raise ValueError(f"data.repeat must be >= 1, got {self.repeat}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"data.concurrency must be >= 1 or null, got {self.concurrency}")


@dataclass
class BlipLossConfig:
    hard_negatives: bool = True  # filter: ITM negatives drawn by ITC similarity (BLIP); false: uniformly
    temperature: float = 0.07  # filter: ITC softmax temperature (BLIP's initial value)

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")


@dataclass
class BlipEvalConfig:
    digits: bool = True  # evaluate the export on the held-out handwritten digits
    image_size: int = 64  # size the held-out digits are stored at (as ingest stores training data)
    limit: int | None = None  # evaluate on N held-out digits (balanced over the ten); null: all 299
    batch_size: int = 64
    gallery: int = 24  # captioner: images in the gallery logged to MLflow
    seed: int = 0  # captioner sampling and the filter's noisy captions


@dataclass
class TrainBlipConfig:
    task: Task = "captioner"  # set by `vlm train blip --task`
    # Model, generation (used by the captioner eval, as CapFilt uses it) and filter threshold. Training
    # starts from `pretrained` (captioner) / `filter_pretrained` (filter) if set, else from `preset`.
    blip: BlipConfig = field(default_factory=lambda: BlipConfig(preset="small"))
    data: BlipDataConfig = field(default_factory=BlipDataConfig)
    loss: BlipLossConfig = field(default_factory=BlipLossConfig)
    # From scratch (the default preset) a tiny model wants ~2e-3; BLIP fine-tunes pretrained weights at 1e-5.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, weight_decay=0.05, warmup_steps=50))
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    train: LoopConfig = field(default_factory=lambda: LoopConfig(global_batch_size=32))
    eval: BlipEvalConfig = field(default_factory=BlipEvalConfig)
    tracking: TrackingConfig = field(default_factory=tracking_defaults("train-blip"))


def checkpoint_of(task: Task, blip: BlipConfig) -> str | None:
    """The checkpoint training starts from (None: the preset, randomly initialised)."""
    return blip.pretrained if task == "captioner" else blip.filter_pretrained


# ---------------------------------------------------------------- data


_PROCESSORS: dict = {}


def _processor(task: Task, blip: BlipConfig):
    """The processor of the model being trained, built once per process."""
    from vlm.models.blip.build import build_processor

    key = (task, blip.backend, blip.preset, blip.image_size, checkpoint_of(task, blip))
    if key not in _PROCESSORS:
        _PROCESSORS[key] = build_processor(blip, task)
    return _PROCESSORS[key]


def processor_image_size(processor) -> int:
    size = processor.image_processor.size  # a dict or transformers' SizeDict
    return int(size["height"] if isinstance(size, dict) else getattr(size, "height", size))


def text_length(processor, blip: BlipConfig) -> int:
    """Token columns of a training row: the text budget plus a BLIP-2 processor's image tokens."""
    return blip.max_text_length + (getattr(processor, "num_query_tokens", 0) or 0)


def group_id(value) -> int:
    """A `group_key` value as a non-negative int64 id (strings hashed); -1 when missing."""
    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, int):
        return zlib.crc32(str(value).encode()) & 0x7FFFFFFF
    return int(value) & 0x7FFFFFFFFFFFFFFF


class BlipPreprocess:
    """Ray Data `map_batches` transform: raw shard rows -> fixed-shape training arrays.

    pixel_values float32 (B, 3, S, S); input_ids, attention_mask int64 (B, L), right-padded to
    L = blip.max_text_length (+ BLIP-2 image tokens), so rows from any batch stack; captioner: labels
    int64 (B, L) (prompt and padding -100); filter: group int64 (B,). Rows without an image are dropped.
    Passed as an instance (Ray Data runs it as tasks); the processor is cached per worker process.
    """

    def __init__(self, task: Task, blip: BlipConfig, data: BlipDataConfig):
        self.task = task
        self.blip = blip
        self.cfg = data

    def __call__(self, batch: dict) -> dict:
        from vlm.data.clip_data import load_rgb, pick_caption, row_fields
        from vlm.models.blip.losses import collate_blip

        processor = _processor(self.task, self.blip)
        size = processor_image_size(processor)
        rng = random.Random()
        samples, groups = [], []
        for i in range(len(batch["__key__"])):
            data, txt, meta = row_fields(batch, i)
            if data is None:
                continue
            image = load_rgb(data, size, self.cfg.augment, rng, self.cfg.crop_scale_min)
            samples.append({"image": image, "text": pick_caption(txt, meta, self.cfg.caption_source, rng)})
            groups.append(group_id((meta or {}).get(self.cfg.group_key)) if self.cfg.group_key else -1)
        length = text_length(processor, self.blip)
        if not samples:
            return _empty(self.task, size, length)
        kind = "caption" if self.task == "captioner" else "filter"
        out = collate_blip(samples, processor, kind, prompt=self.blip.prompt, max_length=self.blip.max_text_length)
        pad = processor.tokenizer.pad_token_id
        arrays = {
            "pixel_values": out["pixel_values"].numpy().astype(np.float32),
            "input_ids": _pad(out["input_ids"].numpy(), length, pad),
            "attention_mask": _pad(out["attention_mask"].numpy(), length, 0),
        }
        if self.task == "captioner":
            arrays["labels"] = _pad(out["labels"].numpy(), length, IGNORE)
        else:
            arrays["group"] = np.asarray(groups, dtype=np.int64)
        return arrays


def _pad(x: np.ndarray, length: int, value: int) -> np.ndarray:
    """(B, T) int -> (B, length) int64, right-padded with `value` (T <= length after truncation)."""
    out = np.full((x.shape[0], length), value, dtype=np.int64)
    out[:, : x.shape[1]] = x[:, :length]
    return out


def _empty(task: Task, size: int, length: int) -> dict:
    """The arrays of a batch whose rows all lacked an image."""
    arrays = {
        "pixel_values": np.zeros((0, 3, size, size), np.float32),
        "input_ids": np.zeros((0, length), np.int64),
        "attention_mask": np.zeros((0, length), np.int64),
    }
    if task == "captioner":
        arrays["labels"] = np.zeros((0, length), np.int64)
    else:
        arrays["group"] = np.zeros((0,), np.int64)
    return arrays


# ---------------------------------------------------------------- task


class BlipTask:
    """The BLIP `TrainTask`: captioner (LM loss) or filter (ITC + ITM), exported with `save_pretrained`."""

    def __init__(self, cfg: TrainBlipConfig):
        self.cfg = cfg

    def _build(self):
        from vlm.models.blip.build import build_captioner, build_filter

        return (build_captioner if self.cfg.task == "captioner" else build_filter)(self.cfg.blip)

    def build_model(self):
        model, self.processor = self._build()
        return model.train()

    def loss(self, model, batch, dist):
        from vlm.models.blip.losses import captioner_loss, filter_loss

        module = model.module  # the HF model; ZeRO-3 gathers per submodule (see losses.py)
        # Rows are padded to the longest allowed text; cut the columns no row uses.
        width = int(batch["attention_mask"].sum(dim=1).max())
        batch = {k: v[:, :width] if k in ("input_ids", "attention_mask", "labels") else v for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(dist.device, dist.dtype)
        if self.cfg.task == "captioner":
            return captioner_loss(module, batch)
        return filter_loss(
            module,
            batch,
            hard_negatives=self.cfg.loss.hard_negatives,
            temperature=self.cfg.loss.temperature,
            groups=batch["group"] if self.cfg.data.group_key else None,
        )

    def export(self, state_dict, out_dir):
        from vlm.models.blip.build import export_pretrained

        model, processor = self._build()
        model.load_state_dict(state_dict)
        export_pretrained(model, processor, out_dir)

    def evaluate(self, export_dir, run) -> dict:
        if not self.cfg.eval.digits:
            return {}
        fn = evaluate_captioner if self.cfg.task == "captioner" else evaluate_filter
        return fn(export_dir, self.cfg.blip, self.cfg.eval, run)


# ---------------------------------------------------------------- evaluation


def _heldout(eval_cfg: BlipEvalConfig):
    """(PIL images, labels) of the held-out digits, stored as ingest stores them; balanced if limited."""
    from vlm.models.clip.zeroshot import digits_eval_set
    from vlm.models.flamingo.eval import balanced_queries

    data = digits_eval_set(eval_cfg.image_size)
    order = balanced_queries(data.labels, eval_cfg.limit) if eval_cfg.limit else range(len(data.images))
    return [data.images[i] for i in order], [int(data.labels[i]) for i in order]


def evaluate_captioner(export_dir, blip: BlipConfig, eval_cfg: BlipEvalConfig, run=None) -> dict:
    """Caption held-out digits as CapFilt does (`Captioner`, nucleus sampling); fraction naming the digit."""
    from vlm.data.contact_sheet import contact_sheet
    from vlm.models.blip.build import build_captioner
    from vlm.models.blip.captioner import Captioner
    from vlm.models.flamingo.eval import named_digit

    cfg = dataclasses.replace(blip, pretrained=str(export_dir), image_size=None)
    model, processor = build_captioner(cfg)
    captioner = Captioner(model, processor, cfg)
    images, labels = _heldout(eval_cfg)
    captions: list[list[str]] = []
    for i in range(0, len(images), eval_cfg.batch_size):
        captions += captioner.caption(images[i : i + eval_cfg.batch_size], seed=eval_cfg.seed + i)
    named = [[named_digit(c) for c in caps] for caps in captions]
    flat = [(n, label) for ns, label in zip(named, labels) for n in ns]
    texts = [c for caps in captions for c in caps]
    metrics = {
        "caption_digit_acc": float(np.mean([n == label for n, label in flat])),
        "caption_names_a_digit": float(np.mean([n is not None for n, _ in flat])),
        "caption_distinct": len(set(texts)) / max(len(texts), 1),
        "caption_words": float(np.mean([len(t.split()) for t in texts])),
        "num_images": len(images),
    }
    if run is not None:
        tiles = [
            (im, caps[0], f"digit {label} {'ok' if ns[0] == label else 'WRONG'}")
            for im, caps, ns, label in zip(images, captions, named, labels)
        ]
        run.log_image(contact_sheet(tiles[: eval_cfg.gallery], cols=6, tile=128), "caption_gallery.png")
        lines = [f"{label}\t{c}" for caps, label in zip(captions, labels) for c in caps]
        run.log_text("\n".join(lines) + "\n", "captions.txt")
    return metrics


def noisy_caption_sets(labels: list[int], seed: int = 0) -> list[tuple[str, str, str]]:
    """(correct, wrong-digit, spam) captions per label, from the same generators as the demo's web."""
    from vlm.testbed.digits import caption_for, noisy_caption_for

    rng = random.Random(seed)
    # noisy_caption_for draws a wrong digit or spam; spam is whatever is no clean caption of any digit.
    clean = {caption_for(d, random.Random(s)) for d in range(10) for s in range(400)}
    sets = []
    for label in labels:
        wrong = caption_for((label + rng.randint(1, 9)) % 10, rng)
        spam = noisy_caption_for(label, rng)
        while spam in clean:
            spam = noisy_caption_for(label, rng)
        sets.append((caption_for(label, rng), wrong, spam))
    return sets


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half (the ROC AUC)."""
    diff = positive[:, None] - negative[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / max(diff.size, 1))


def noise_detection(scores: np.ndarray, threshold: float) -> dict:
    """Metrics of "caption is noisy" = score < threshold, from (N, 3) scores (correct, wrong, spam)."""
    flagged = scores < threshold
    tp, fp = int(flagged[:, 1:].sum()), int(flagged[:, 0].sum())
    precision = tp / max(tp + fp, 1)
    recall = tp / flagged[:, 1:].size
    return {
        "noise_precision": precision,
        "noise_recall": recall,
        "noise_f1": 2 * precision * recall / max(precision + recall, 1e-12),
        "wrong_digit_recall": float(flagged[:, 1].mean()),
        "spam_recall": float(flagged[:, 2].mean()),
        "correct_kept": float(1.0 - flagged[:, 0].mean()),
    }


def best_threshold(scores: np.ndarray) -> float:
    """The threshold (midpoint between observed scores) with the best noise-detection F1."""
    values = np.unique(scores)
    candidates = np.r_[(values[:-1] + values[1:]) / 2, values[-1] + 1e-6] if len(values) > 1 else values
    return float(max(candidates, key=lambda t: noise_detection(scores, float(t))["noise_f1"]))


def score_histogram(scores: np.ndarray, threshold: float, title: str):
    """A PIL image: score histograms of correct, wrong-digit and spam captions, threshold marked."""
    from vlm import plots

    fig, ax = plots.figure((6.5, 4))
    lo, hi = min(0.0, float(scores.min())), max(1.0, float(scores.max()))
    bins = np.linspace(lo, hi, 41)
    for col, name, color in ((0, "correct", "tab:green"), (1, "wrong digit", "tab:orange"), (2, "spam", "tab:red")):
        ax.hist(scores[:, col], bins=bins, alpha=0.55, label=name, color=color)
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel("filter score")
    ax.set_ylabel("captions")
    ax.set_title(title, fontsize=10)
    ax.legend()
    return plots.to_image(fig)


def evaluate_filter(export_dir, blip: BlipConfig, eval_cfg: BlipEvalConfig, run=None) -> dict:
    """Score correct / wrong-digit / spam captions of held-out digits with `Filter` (as CapFilt does);
    precision and recall of noise detection at `blip.itm_threshold`, AUC, and the best threshold."""
    from vlm.models.blip.build import build_filter
    from vlm.models.blip.captioner import Filter

    cfg = dataclasses.replace(blip, filter_pretrained=str(export_dir), image_size=None)
    model, processor = build_filter(cfg)
    scorer = Filter(model, processor, cfg)
    images, labels = _heldout(eval_cfg)
    sets = noisy_caption_sets(labels, eval_cfg.seed)
    scores: list[np.ndarray] = []
    for i in range(0, len(images), eval_cfg.batch_size):
        scores += scorer.score_sets(images[i : i + eval_cfg.batch_size], sets[i : i + eval_cfg.batch_size])
    s = np.stack(scores)  # (N, 3): correct, wrong digit, spam
    best = best_threshold(s)
    metrics = {
        **noise_detection(s, blip.itm_threshold),
        "auc": auc(s[:, 0], s[:, 1:].ravel()),
        "auc_wrong_digit": auc(s[:, 0], s[:, 1]),
        "auc_spam": auc(s[:, 0], s[:, 2]),
        "best_threshold": best,
        **{f"best_{k}": v for k, v in noise_detection(s, best).items() if k in ("noise_precision", "noise_recall")},
        "score_correct_mean": float(s[:, 0].mean()),
        "score_wrong_digit_mean": float(s[:, 1].mean()),
        "score_spam_mean": float(s[:, 2].mean()),
        "num_images": len(images),
    }
    if run is not None:
        title = (
            f"{blip.score} scores on {len(images)} held-out digits: noise precision "
            f"{metrics['noise_precision']:.2f}, recall {metrics['noise_recall']:.2f}, AUC {metrics['auc']:.3f}"
        )
        run.log_image(score_histogram(s, blip.itm_threshold, title), "filter_scores.png")
        lines = [f"{label}\t{c:.3f}\t{w:.3f}\t{p:.3f}\t{t}" for label, (c, w, p), t in zip(labels, s, sets)]
        run.log_text("label\tcorrect\twrong\tspam\tcaptions\n" + "\n".join(lines) + "\n", "filter_scores.tsv")
    return metrics


# ---------------------------------------------------------------- driver


def check_start(cfg: TrainBlipConfig) -> None:
    """One-line errors, in the driver, for a starting checkpoint that cannot be used."""
    from vlm.errors import ConfigError, InputError

    start = checkpoint_of(cfg.task, cfg.blip)
    if start is None:
        return
    if cfg.blip.image_size is not None:
        raise ConfigError("blip.image_size applies to preset-built models; a checkpoint brings its own")
    if Path(start).expanduser().is_absolute() or start.startswith("."):  # a path, not a hub id
        if not Path(start).expanduser().is_dir():
            raise InputError(f"cannot load the blip {cfg.task} checkpoint {start}: no such directory")
    try:
        _processor(cfg.task, cfg.blip)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot load the blip {cfg.task} checkpoint {start}: {first}") from None


def _blip_worker(config: dict) -> None:
    from vlm.train.loop import train_worker

    cfg = config["cfg"]
    train_worker(lambda: BlipTask(cfg), config["spec"])


def train_blip(
    data: str,
    output: str | Path,
    cfg: TrainBlipConfig,
    *,
    resume: bool = False,
    address: str | None = None,
    parent_run_id: str | None = None,
) -> dict:
    """Train the BLIP captioner or filter (`cfg.task`); returns {"eval", "mlflow_run_id", "export", "steps",
    "checkpoint"}. The export loads with `BlipConfig(pretrained=...)` / `BlipConfig(filter_pretrained=...)`."""
    import ray
    import ray.data

    from vlm import tracking
    from vlm.runtime import init_ray
    from vlm.train.config import micro_batch_size

    shards = training.find_shards(data)
    check_start(cfg)
    micro = micro_batch_size(cfg.train, cfg.scaling.num_workers)
    out = Path(output).resolve()
    previous = training.previous_run(out, resume)
    ds_config = deepspeed_config(
        cfg.optim, cfg.deepspeed, cfg.train, cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu
    )
    init_ray(address, num_cpus=training.local_cpus(cfg.scaling))
    training.check_data_headroom(cfg.scaling)
    out.mkdir(parents=True, exist_ok=True)
    write_config(cfg, out / "config.yaml")
    (out / "deepspeed.json").write_text(json.dumps(ds_config, indent=2))
    start = checkpoint_of(cfg.task, cfg.blip)
    model_name = Path(start).name if start else cfg.blip.preset
    run_name = training.ray_run_name(previous, f"blip-{cfg.task}")

    with tracking.start_run(
        cfg.tracking.experiment,
        cfg.tracking.run_name or f"blip-{cfg.task}-{cfg.blip.backend}-{model_name}-{out.name}",
        tags={"stage": f"train-blip-{cfg.task}", "output": str(out), "data": data},
        run_id=previous.get("mlflow_run_id") if previous else None,
        parent_run_id=parent_run_id,
    ) as run:
        run_id = run.run_id if run else None
        training.write_state(out, run_name, run_id, shards)
        if run and not previous:
            training.log_setup(run, cfg, ds_config, {"data.num_shards": len(shards), "micro_batch_size": micro})

        ds = ray.data.read_webdataset(shards, decoder=None, shuffle="files" if cfg.data.shuffle_files else None)
        ds = ds.map_batches(
            BlipPreprocess(cfg.task, cfg.blip, cfg.data),
            batch_size=64,
            batch_format="numpy",
            compute=ray.data.TaskPoolStrategy(size=cfg.data.concurrency),
        )
        if cfg.data.repeat > 1:
            ds = ds.union(*[ds] * (cfg.data.repeat - 1))

        spec = training.loop_spec(cfg, ds_config, micro, out, run_id)
        return training.fit(_blip_worker, {"cfg": cfg, "spec": spec}, cfg, out, run_name, ds, run)
