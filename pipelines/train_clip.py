"""`vlm train clip`: contrastive pretraining of open_clip CLIP on Ray Train + DeepSpeed ZeRO.

This module supplies the CLIP task (dataset, model, loss, export, eval); the driver is
`pipelines.training.run` and the per-worker loop `vlm.train.loop.train_worker`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines import training
from vlm import storage
from vlm.data.clip_data import ClipDataConfig
from vlm.models.clip.build import CLIPModelConfig
from vlm.tracking import TrackingConfig, tracking_defaults
from vlm.train.config import DeepSpeedConfig, LoopConfig, OptimConfig, ScalingConfig


@dataclass
class ClipLossConfig:
    local_loss: bool = False  # only this rank's rows of the logit matrix (same gradients)
    gather_with_grad: bool = True  # all-gather features with gradients (global-batch negatives)
    max_logit_scale: float = 100.0  # CLIP clamps the temperature so logits scale <= 100


@dataclass
class ClipEvalConfig:
    digits: bool = True  # zero-shot + retrieval on the held-out handwritten digits
    image_size: int = 64  # size the held-out digits are stored at (as ingest stores training data)
    limit: int | None = None  # evaluate on the first N held-out digits only


@dataclass
class TrainClipConfig:
    model: CLIPModelConfig = field(default_factory=CLIPModelConfig)
    data: ClipDataConfig = field(default_factory=ClipDataConfig)
    loss: ClipLossConfig = field(default_factory=ClipLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: ClipEvalConfig = field(default_factory=ClipEvalConfig)
    tracking: TrackingConfig = field(default_factory=tracking_defaults("train-clip"))


def clip_dataset(shards: list[str], preset: str, image_size: int, data_cfg, skips=None):
    """The training dataset: raw WebDataset rows -> ClipPreprocess'd {"image", "text"} batches."""
    from vlm.data.clip_data import ClipPreprocess

    ds = training.read_shards(shards, data_cfg.shuffle_files)
    transform = ClipPreprocess(preset, image_size, data_cfg, skips)
    return ds.map_batches(transform, batch_size=data_cfg.decode_batch_size, batch_format="numpy")


class ClipTask(training.Task):
    """The CLIP task: open_clip model, global-batch contrastive loss, export, eval."""

    kind = "clip"
    stage = "train-clip"
    cfg: TrainClipConfig

    def check(self) -> None:
        from vlm.models.clip.build import checkpoint_file, model_config

        size = model_config(self.cfg.model.preset)["vision_cfg"]["image_size"]  # unknown preset: ConfigError
        self.image_size = size[0] if isinstance(size, (list, tuple)) else size
        if self.cfg.model.checkpoint:
            checkpoint_file(self.cfg.model.checkpoint)  # a missing one: one line here, not in every worker

    def run_name(self, out: str) -> str:
        return f"clip-{self.cfg.model.preset}-{storage.basename(out)}"

    def dataset(self, shards, skips):
        return clip_dataset(shards, self.cfg.model.preset, self.image_size, self.cfg.data, skips)

    def build_model(self):
        from vlm.models.clip.build import build_clip

        model, _, self.model_cfg = build_clip(self.cfg.model)
        return model

    def loss(self, model, batch, dist):
        from vlm.data.clip_data import normalize
        from vlm.models.clip.loss import clip_loss

        images = normalize(batch["image"].to(dist.device), dist.dtype)  # uint8 over the wire
        text = batch["text"].to(dist.device)
        image_f, text_f, logit_scale = model(images, text)  # logit_scale: exp of the learned temperature
        scale = logit_scale.clamp(max=self.cfg.loss.max_logit_scale)
        out = clip_loss(
            image_f.float(),
            text_f.float(),
            scale.float(),
            rank=dist.rank,
            world=dist.world,
            local_loss=self.cfg.loss.local_loss,
            gather_with_grad=self.cfg.loss.gather_with_grad,
        )
        return {**out, "logit_scale": logit_scale.detach().float().reshape(-1)[0]}

    def export(self, state_dict, out_dir):
        from vlm.models.clip.build import export_clip, model_config

        export_clip(state_dict, model_config(self.cfg.model.preset), out_dir, self.cfg.model.preset)

    def evaluate(self, export_dir, run) -> dict:
        if not self.cfg.eval.digits:
            return {}
        return evaluate_export(export_dir, self.cfg.eval, run)


def evaluate_export(export_dir, eval_cfg: ClipEvalConfig, run=None) -> dict:
    """Zero-shot + retrieval of an exported model on held-out digits; plot logged to `run`."""
    from open_clip.transform import image_transform

    from vlm.models.clip.build import load_export
    from vlm.models.clip.zeroshot import confusion_plot, digits_eval_set, evaluate

    model, tokenizer = load_export(export_dir)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    preprocess = image_transform(size, is_train=False)
    data = digits_eval_set(eval_cfg.image_size, eval_cfg.limit)
    result = evaluate(model, tokenizer, preprocess, data)
    if run is not None:
        run.log_image(confusion_plot(result["confusion"], data.classnames), "zeroshot_confusion.png")
    return result["metrics"]


train_clip = training.entrypoint(
    ClipTask, """Run CLIP training; returns {"eval": metrics, "mlflow_run_id", "export", "steps", ...}."""
)
