"""`vlm train blip`: fine-tune the CapFilt captioner or filter on clean pairs, on Ray Train + DeepSpeed.

BLIP (Li et al. 2022, sec. 3.3) fine-tunes its captioner (language modelling of the caption given the
image) and its filter (ITC + ITM with hard negatives mined from the batch) on a clean human-annotated
set before bootstrapping web data with them. Offline there are no BLIP weights, so the demo trains both
from scratch on clean digit pairs. This module supplies the BLIP task; the driver is
`pipelines.training.run`, the per-worker loop `vlm.train.loop.train_worker`, the shard preprocessing
`vlm.data.blip_data` and the held-out evaluation `vlm.models.blip.eval`.

The export (`OUTPUT/export`, `save_pretrained` model + processor) is what the CapFilt stage loads:
`BlipConfig(pretrained=EXPORT)` for a captioner, `BlipConfig(filter_pretrained=EXPORT)` for a filter.
The held-out evaluation runs the export through the same `Captioner` / `Filter` CapFilt uses.

Differences from BLIP, on purpose: ITC negatives and ITM hard negatives come from each worker's own
micro batch (BLIP all-gathers features across GPUs first), and see `vlm.models.blip.losses`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipelines import training
from vlm import storage
from vlm.data.blip_data import BlipDataConfig, BlipPreprocess, Task, checkpoint_of, training_processor
from vlm.models.blip.config import BlipConfig
from vlm.models.blip.eval import BlipEvalConfig, evaluate_captioner, evaluate_filter
from vlm.tracking import TrackingConfig, tracking_defaults
from vlm.train.config import DeepSpeedConfig, LoopConfig, OptimConfig, ScalingConfig


@dataclass
class BlipLossConfig:
    hard_negatives: bool = True  # filter: ITM negatives drawn by ITC similarity (BLIP); false: uniformly
    temperature: float = 0.07  # filter: ITC softmax temperature (BLIP's initial value)

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")


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


# ---------------------------------------------------------------- task


class BlipTask(training.Task):
    """The BLIP task: captioner (LM loss) or filter (ITC + ITM), exported with `save_pretrained`."""

    cfg: TrainBlipConfig

    def __init__(self, cfg: TrainBlipConfig):
        super().__init__(cfg)
        self.kind = f"blip-{cfg.task}"
        self.stage = f"train-blip-{cfg.task}"

    def check(self) -> None:
        check_start(self.cfg)

    def run_name(self, out: str) -> str:
        start = checkpoint_of(self.cfg.task, self.cfg.blip)
        model_name = storage.basename(start) if start else self.cfg.blip.preset
        return f"blip-{self.cfg.task}-{self.cfg.blip.backend}-{model_name}-{storage.basename(out)}"

    def min_samples(self) -> int:
        return -(-self.cfg.train.global_batch_size // self.cfg.data.repeat)  # each pass is repeated

    def dataset(self, shards, skips):
        import ray.data

        data = self.cfg.data
        ds = training.read_shards(shards, data.shuffle_files)
        ds = ds.map_batches(
            BlipPreprocess(self.cfg.task, self.cfg.blip, data, skips),
            batch_size=64,
            batch_format="numpy",
            compute=ray.data.TaskPoolStrategy(size=data.concurrency),
        )
        return ds.union(*[ds] * (data.repeat - 1)) if data.repeat > 1 else ds

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


# ---------------------------------------------------------------- driver


def check_start(cfg: TrainBlipConfig) -> None:
    """One-line errors, in the driver, for a starting checkpoint that cannot be used."""
    from vlm.errors import ConfigError, InputError

    start = checkpoint_of(cfg.task, cfg.blip)
    if start is None:
        return
    if cfg.blip.image_size is not None:
        raise ConfigError("blip.image_size applies to preset-built models; a checkpoint brings its own")
    if storage.is_url(start):  # an export on object storage
        if not storage.is_dir(start):
            raise InputError(f"cannot load the blip {cfg.task} checkpoint {start}: no such directory")
    elif Path(start).expanduser().is_absolute() or start.startswith("."):  # a path, not a hub id
        if not Path(start).expanduser().is_dir():
            raise InputError(f"cannot load the blip {cfg.task} checkpoint {start}: no such directory")
    try:
        training_processor(cfg.task, cfg.blip)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot load the blip {cfg.task} checkpoint {start}: {first}") from None


train_blip = training.entrypoint(
    BlipTask,
    """Train the BLIP captioner or filter (`cfg.task`); returns {"eval", "mlflow_run_id", "export", "steps",
    "checkpoint", ...}. The export loads with `BlipConfig(pretrained=...)` / `BlipConfig(filter_pretrained=...)`.""",
)
