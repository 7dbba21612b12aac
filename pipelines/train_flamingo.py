"""`vlm train flamingo`: Flamingo on image-text shards, on Ray Train + DeepSpeed ZeRO (3 by default).

The driver is `pipelines.training.run`, the per-worker loop `vlm.train.loop.train_worker`; this module
supplies the Flamingo task: a frozen CLIP vision encoder (from `vlm train clip`'s export), Perceiver
Resampler and gated cross-attention trained into a frozen causal LM (Alayrac et al. 2022), on image-text
pairs packed into interleaved sequences (`vlm.data.flamingo_data`), evaluated by few-shot captioning of
held-out digits.

A config-built LM is random; with `lm_pretrain.steps > 0` the task's `prepare` first pretrains it on the
shards' caption text (`vlm.models.flamingo.text_lm`, into OUTPUT/lm, reused on resume) and Flamingo
freezes that, as the paper freezes its pretrained LM. An LM given by `model.lm_name_or_path` is used as it is.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pipelines import training
from vlm import storage
from vlm.config import to_dict
from vlm.data.flamingo_data import FlamingoDataConfig, FlamingoPreprocess
from vlm.errors import ConfigError, InputError
from vlm.tracking import TrackingConfig, tracking_defaults
from vlm.train.config import DeepSpeedConfig, LoopConfig, OptimConfig, ScalingConfig


@dataclass
class FlamingoEvalConfig:
    digits: bool = True  # few-shot captioning of the held-out handwritten digits
    shots: list[int] = field(default_factory=lambda: [0, 2, 4, 8])  # in-context examples per prompt
    limit: int = 50  # query prompts per shot count (queries cycle through the held-out digits past ~230)
    image_size: int = 64  # size the held-out digits are stored at (as ingest stores training data)
    max_new_tokens: int = 16  # greedy decoding budget; the longest digit caption names it by token ~15
    ranking: bool = True  # also classify by the log-likelihood of each digit's captions (fewshot_{k}_rank_acc)
    generate_limit: int | None = None  # decode only the first this many queries (fewshot_{k}_acc); None: all
    novel: bool = True  # the novel-mapping task (digit -> nonce word, fresh per prompt): novel_{k}_acc


@dataclass
class LMPretrainConfig:
    """Text-only pretraining of a config-built LM on the training captions, before Flamingo training
    (vlm.models.flamingo.text_lm): the stand-in for a pretrained LM where none is on disk. Skipped when
    model.lm_name_or_path names an LM, which is pretrained already."""

    steps: int = 0  # 0: no pretraining (a config-built LM then stays random)
    lr: float = 3.0e-3
    batch_size: int = 8  # rows of seq_len tokens per step
    seq_len: int = 256  # at least the longest Flamingo sequence (k-shot eval prompts too): every position is trained
    warmup_steps: int = 20
    max_captions: int = 100_000  # captions read from the shards (the first ones, in shard order)
    # Fraction of the texts that teach copying from context (text_lm.copy_texts over data.novel_classes), as a
    # web-pretrained LM has learnt it; what few-shot learning of a novel mapping builds on. 0: captions only.
    copy_fraction: float = 0.0

    def validate(self) -> None:
        if not 0.0 <= self.copy_fraction < 1.0:
            raise ValueError(f"lm_pretrain.copy_fraction must be in [0, 1), got {self.copy_fraction}")


@dataclass
class TrainFlamingoConfig:
    model_preset: str = "tiny"  # a vlm.models.flamingo.config.FLAMINGO_PRESETS name
    # The frozen vision encoder: a `vlm train clip` export dir (its architecture is used) or an open_clip
    # checkpoint file of the preset's vision architecture; a path or URL (s3://...). None: random (tests only).
    vision_checkpoint: str | None = None
    # FlamingoConfig field overrides. max_num_media, unless given, is raised to what data and eval need.
    model: dict = field(default_factory=dict)
    data: FlamingoDataConfig = field(default_factory=FlamingoDataConfig)
    lm_pretrain: LMPretrainConfig = field(default_factory=LMPretrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.1, warmup_steps=50))
    deepspeed: DeepSpeedConfig = field(default_factory=lambda: DeepSpeedConfig(zero_stage=3))
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    train: LoopConfig = field(default_factory=lambda: LoopConfig(global_batch_size=8))  # sequences per step
    eval: FlamingoEvalConfig = field(default_factory=FlamingoEvalConfig)
    tracking: TrackingConfig = field(default_factory=tracking_defaults("train-flamingo"))

    def validate(self) -> None:
        if self.lm_pretrain.copy_fraction > 0 and len(set(self.data.novel_classes)) < 2:
            raise ValueError("lm_pretrain.copy_fraction > 0 needs data.novel_classes: at least two class words")


def model_config(cfg: TrainFlamingoConfig):
    """The resolved FlamingoConfig: preset + overrides + vision checkpoint. One-line errors for bad input."""
    from vlm.models.clip.build import EXPORT_CONFIG, EXPORT_WEIGHTS
    from vlm.models.flamingo.build import check_lm
    from vlm.models.flamingo.config import FLAMINGO_PRESETS, flamingo_preset

    overrides = dict(cfg.model)
    if "vision_checkpoint" in overrides:
        raise ConfigError("set 'vision_checkpoint' at the top level, not as model.vision_checkpoint")
    if cfg.vision_checkpoint:  # a path or URL (s3://... : an export `vlm train clip` wrote to a bucket)
        path = storage.normalize(cfg.vision_checkpoint)
        if not storage.exists(path):
            raise InputError(f"vision checkpoint not found: {cfg.vision_checkpoint}")
        if storage.is_dir(path):
            if not storage.is_file(storage.join(path, EXPORT_WEIGHTS)):
                raise InputError(f"vision checkpoint {path} is a directory without {EXPORT_WEIGHTS} (a CLIP export)")
            config = storage.join(path, EXPORT_CONFIG)
            if storage.is_file(config) and "vision_model" not in overrides:
                overrides["vision_model"] = storage.read_json(config)["model_cfg"]
            path = storage.join(path, EXPORT_WEIGHTS)
        overrides["vision_checkpoint"] = path
    if cfg.model_preset in FLAMINGO_PRESETS and "max_num_media" not in overrides:
        needed = max([cfg.data.images_per_sequence, *(k + 1 for k in cfg.eval.shots)])
        overrides["max_num_media"] = max(FLAMINGO_PRESETS[cfg.model_preset].get("max_num_media", 32), needed)
    mcfg = flamingo_preset(cfg.model_preset, **overrides)
    if cfg.data.images_per_sequence > mcfg.max_num_media:
        raise ConfigError(
            f"data.images_per_sequence={cfg.data.images_per_sequence} exceeds model.max_num_media={mcfg.max_num_media}"
        )
    if cfg.eval.digits and max(cfg.eval.shots) + 1 > mcfg.max_num_media:
        raise ConfigError(
            f"eval.shots up to {max(cfg.eval.shots)} need {max(cfg.eval.shots) + 1} images per prompt but "
            f"model.max_num_media={mcfg.max_num_media}"
        )
    check_lm(mcfg)  # an LM Flamingo cannot wrap fails here in one line, not in every worker
    return mcfg


def vision_image_size(mcfg) -> int:
    """Input size of the vision tower, from its open_clip config (dict or model name)."""
    import open_clip

    vm = mcfg.vision_model
    conf = vm if isinstance(vm, dict) else open_clip.get_model_config(vm)
    if conf is None:
        raise ConfigError(f"cannot tell the image size of vision model {vm!r}; give model.vision_model as a dict")
    size = conf["vision_cfg"].get("image_size", 224)
    return size[0] if isinstance(size, (list, tuple)) else size


def check_vision_checkpoint(mcfg) -> None:
    """InputError (one line) if the checkpoint's vision weights do not fit the vision architecture.

    Reads the file once in the driver, so a wrong checkpoint fails before Ray starts, not in every worker.
    """
    import torch
    from open_clip.factory import load_state_dict

    from vlm.models import local_copy
    from vlm.models.flamingo.vision import build_vision_tower

    if mcfg.vision_checkpoint is None:
        return
    with torch.device("meta"):
        tower = build_vision_tower(mcfg.vision_model)
    want = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    try:
        state = load_state_dict(local_copy(mcfg.vision_checkpoint))  # a URL: downloaded once per process
    except Exception as exc:  # any unreadable file: one line, not a traceback
        raise InputError(f"cannot read vision checkpoint {mcfg.vision_checkpoint}: {exc}") from None
    if any(k.startswith("visual.") for k in state):
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    got = {k: tuple(v.shape) for k, v in state.items()}
    bad = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
    if bad:
        raise InputError(
            f"vision checkpoint {mcfg.vision_checkpoint} does not fit the vision model (first mismatch: '{bad[0]}'); "
            "pass a `vlm train clip` export directory, or set model.vision_model"
        )


def pretrain_lm(shards: list[str], out: str, cfg: TrainFlamingoConfig, mcfg) -> tuple[object, dict]:
    """(model config, metrics): with lm_pretrain.steps > 0 and a config-built LM, pretrain the LM on the
    shards' caption text into `out/lm` (once; a finished directory is reused) and point the model at it.
    On a URL output the LM is trained into a local temp dir and uploaded, its marker last; workers then
    download it (vlm.models.local_copy)."""
    import dataclasses

    from vlm.data.flamingo_data import shard_captions
    from vlm.models.flamingo.build import build_lm, build_tokenizer
    from vlm.models.flamingo.text_lm import (
        DONE_MARKER,
        TextLMTraining,
        copy_texts,
        documents,
        is_done,
        pair_text,
        pretrain_text_lm,
    )

    pre = cfg.lm_pretrain
    if pre.steps <= 0 or mcfg.lm_name_or_path is not None:
        return mcfg, {}
    lm_dir = storage.join(out, "lm")
    metrics: dict = {}
    if not is_done(lm_dir):
        captions = shard_captions(shards, cfg.data.caption_source, pre.max_captions, seed=cfg.train.seed)
        if not captions:
            raise InputError(f"no captions in the shards to pretrain the LM on ({len(shards)} shards)")
        per_sequence = cfg.data.images_per_sequence
        texts = documents([pair_text(c, cfg.data.prompt) for c in captions], per_sequence)
        if pre.copy_fraction > 0:
            n_copy = round(len(texts) * pre.copy_fraction / (1 - pre.copy_fraction))
            rng = random.Random(cfg.train.seed)
            # One pair more than a training sequence holds: the k-shot prompts' k + 1 (k = images_per_sequence).
            texts += copy_texts(cfg.data.novel_classes, n_copy, per_sequence + 1, cfg.data.prompt, rng)
        import torch

        torch.manual_seed(cfg.train.seed)
        train = TextLMTraining(pre.steps, pre.lr, pre.batch_size, pre.seq_len, pre.warmup_steps, cfg.train.seed)
        if storage.is_url(lm_dir):
            with tempfile.TemporaryDirectory(prefix="vlm-lm-") as tmp:
                metrics = pretrain_text_lm(build_lm(mcfg), build_tokenizer(mcfg), texts, tmp, train)
                (Path(tmp) / DONE_MARKER).unlink()
                storage.rmtree(lm_dir)  # an unfinished upload of a killed run
                storage.copy_dir(tmp, lm_dir)
                storage.write_bytes(storage.join(lm_dir, DONE_MARKER), b"")
        else:
            metrics = pretrain_text_lm(build_lm(mcfg), build_tokenizer(mcfg), texts, lm_dir, train)
        metrics.update(lm_pretrain_captions=len(captions), lm_pretrain_texts=len(texts))
    return dataclasses.replace(mcfg, lm_name_or_path=lm_dir), metrics


class FlamingoTask(training.Task):
    """The Flamingo task: frozen vision + LM, trained resampler / cross-attention / new token rows."""

    kind = "flamingo"
    stage = "train-flamingo"
    cfg: TrainFlamingoConfig

    def check(self) -> None:
        self.model_cfg = model_config(self.cfg)
        check_vision_checkpoint(self.model_cfg)
        self.image_size = vision_image_size(self.model_cfg)

    def run_name(self, out: str) -> str:
        return f"flamingo-{self.cfg.model_preset}-{storage.basename(out)}"

    def prepare(self, shards, out) -> dict:
        self.model_cfg, metrics = pretrain_lm(shards, out, self.cfg, self.model_cfg)
        return metrics

    def params(self) -> dict:
        return {"image_size": self.image_size}

    def files(self) -> dict:
        return {"model_config.json": to_dict(self.model_cfg)}

    def dataset(self, shards, skips):
        ds = training.read_shards(shards, self.cfg.data.shuffle_files)
        # Packing happens within a batch: whole sequences' worth of pairs per batch.
        return ds.map_batches(
            FlamingoPreprocess(self.model_cfg.lm_name_or_path, self.image_size, self.cfg.data, skips),
            batch_size=self.cfg.data.images_per_sequence * 8,
            batch_format="numpy",
        )

    def build_model(self):
        from vlm.data.flamingo_data import flamingo_tokenizer
        from vlm.models.flamingo.build import build_flamingo

        # The data pipeline's cached tokenizer, so token ids agree by construction. build_flamingo freezes
        # vision and LM once (Flamingo.freeze_for_training); the optimizer only sees what requires grad.
        self.tokenizer = flamingo_tokenizer(self.model_cfg.lm_name_or_path)
        model, _ = build_flamingo(self.model_cfg, tokenizer=self.tokenizer)
        self.trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        self.gates = [(i, layer.gated_xattn) for i, layer in _flamingo_layers(model)]
        return model

    def loss(self, model, batch, dist):
        import torch

        images = batch["images"].to(dist.device, dist.dtype)  # (B, T_img, 1, 3, S, S)
        input_ids = batch["input_ids"].to(dist.device)  # (B, L)
        labels = batch["labels"].to(dist.device)  # (B, L)
        out = model(images, input_ids, batch["attention_mask"].to(dist.device), labels)
        with torch.no_grad():
            target = labels[:, 1:]
            valid = target != -100
            hits = (out["logits"][:, :-1].argmax(-1) == target) & valid
            metrics = {"loss": out["loss"], "acc": hits.sum() / valid.sum().clamp(min=1)}
            metrics.update(self._gates())
        return metrics

    def _gates(self) -> dict:
        """tanh(gate) of each cross-attention block, logged with the loss (gates are tiny ZeRO-3-persistent
        parameters, whole on every rank; skipped if a config ever partitions them)."""
        out = {}
        for i, block in self.gates:
            for name in ("attn", "ff"):
                p = getattr(block, f"{name}_gate")
                if p.data.numel() == 1:
                    out[f"gate_{name}_l{i}"] = float(p.data.float().tanh().reshape(()))
        return out

    def export(self, state_dict, out_dir):
        from vlm.models.flamingo.build import export_flamingo

        export_flamingo(state_dict, self.model_cfg, self.tokenizer, out_dir, trainable=self.trainable)

    def evaluate(self, export_dir, run) -> dict:
        return evaluate_export(export_dir, self.cfg, run)


def _flamingo_layers(model) -> list[tuple[int, object]]:
    """(LM layer index, FlamingoLayer) pairs; the index names the gate metrics, as in build.gate_values."""
    from vlm.models.flamingo.lm import find_decoder_layers
    from vlm.models.flamingo.model import FlamingoLayer

    _, layers = find_decoder_layers(model.lm)
    return [(i, layer) for i, layer in enumerate(layers) if isinstance(layer, FlamingoLayer)]


def evaluate_export(export_dir, cfg: TrainFlamingoConfig, run=None) -> dict:
    """Final gate values and few-shot digit captioning of an export; sample generations logged to `run`."""
    from safetensors.torch import load_file

    from vlm.models.flamingo.build import EXPORT_WEIGHTS, gate_values, load_flamingo_export
    from vlm.models.flamingo.eval import fewshot_digit_accuracy, kshot_plot, novel_mapping_accuracy, prompt_gallery

    export_dir = Path(export_dir)
    metrics = {f"gate_{k}": v for k, v in gate_values(load_file(str(export_dir / EXPORT_WEIGHTS))).items()}
    if not cfg.eval.digits:
        return metrics
    model, tokenizer = load_flamingo_export(export_dir)
    common = dict(shots=cfg.eval.shots, limit=cfg.eval.limit, stored_size=cfg.eval.image_size, prompt=cfg.data.prompt)
    samples: list = []
    metrics.update(
        fewshot_digit_accuracy(
            model,
            tokenizer,
            **common,
            max_new_tokens=cfg.eval.max_new_tokens,
            samples=samples,
            ranking=cfg.eval.ranking,
            generate_limit=cfg.eval.generate_limit,
        )
    )
    novel: list = []
    if cfg.eval.novel:
        metrics.update(novel_mapping_accuracy(model, tokenizer, **common, samples=novel))
    if run is not None:
        lines = [f"{k}-shot\tdigit {label}\t{text!r}" for k, label, text in samples]
        run.log_text("\n".join(lines) + "\n", "fewshot_samples.txt")
        run.log_image(kshot_plot(metrics, cfg.eval.shots, cfg.eval.limit), "kshot_accuracy.png")
        if novel:
            run.log_image(prompt_gallery(novel, cfg.eval.image_size), "novel_prompts.png")
    return metrics


train_flamingo = training.entrypoint(
    FlamingoTask,
    """Run Flamingo training; returns {"eval": metrics, "mlflow_run_id", "export", "steps", "checkpoint", ...}.""",
)
