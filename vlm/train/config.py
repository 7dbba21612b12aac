"""Run configuration shared by every trainer (CLIP, BLIP, Flamingo), and the DeepSpeed dict.

`deepspeed_config` is the one function that turns a run config into DeepSpeed's JSON; it is
passed explicitly to `deepspeed.initialize` and logged with the run (never a module global).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vlm.errors import ConfigError


@dataclass
class OptimConfig:
    lr: float = 5e-4  # peak learning rate (after warmup)
    weight_decay: float = 0.2  # not applied to gains, biases, embeddings' scales, logit scale
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 10  # linear warmup, then cosine decay to min_lr_ratio * lr at max_steps
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # global norm; 0 disables

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError("optim.lr must be > 0")
        if len(self.betas) != 2:
            raise ValueError("optim.betas must hold two numbers")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2  # 0 (plain data parallel), 1 (optimizer), 2 (+gradients), 3 (+parameters)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPUs that have it, else fp32
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer state to CPU memory
    offload_params: bool = False  # ZeRO-3 parameter offload to CPU memory
    extra: dict = field(default_factory=dict)  # merged last into DeepSpeed's dict (escape hatch)

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs deepspeed.zero_stage=3")


@dataclass
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    resources_per_worker: dict = field(default_factory=dict)  # e.g. {"gpu_node": 1}: pin to labelled nodes
    torch_threads: int | None = None  # intra-op threads per worker; null: max(1, cpus_per_worker)
    # glibc malloc in each training worker keeps up to this many MiB of freed memory instead of
    # returning it to the OS after every step (vlm/train/malloc.py); 0 leaves malloc as it is.
    malloc_keep_mb: int = 1024
    # CPUs Ray Data's decoding may use beside the training workers. null: on a local Ray, the
    # machine's cores the workers do not hold (at least 1), so decoding never preempts training;
    # on a cluster, Ray Data's default (the cluster's CPUs minus the workers').
    data_cpus: float | None = None

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ValueError("scaling.num_workers must be >= 1")
        if self.data_cpus is not None and self.data_cpus <= 0:
            raise ValueError("scaling.data_cpus must be > 0 (or null)")
        if self.malloc_keep_mb < 0:
            raise ValueError("scaling.malloc_keep_mb must be >= 0 (0: leave malloc alone)")


@dataclass
class LoopConfig:
    global_batch_size: int = 64  # samples per optimizer step over all workers
    grad_accum_steps: int = 1
    max_steps: int = 100  # optimizer steps
    log_every: int = 10
    checkpoint_every: int = 50  # steps; the final step is always checkpointed
    keep_checkpoints: int = 2
    max_failures: int = 2  # worker failures survived by restarting from the latest checkpoint
    seed: int = 0
    # Samples whose image or json does not decode are skipped and counted (metric samples_skipped);
    # more than this fraction of the shards' samples stops the run with one line (vlm.data.skips).
    max_skipped_fraction: float = 0.01

    def validate(self) -> None:
        if self.max_steps < 1 or self.global_batch_size < 1 or self.grad_accum_steps < 1:
            raise ValueError("train.max_steps, train.global_batch_size, train.grad_accum_steps must be >= 1")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ValueError(f"train.max_skipped_fraction must be in [0, 1], got {self.max_skipped_fraction}")


def micro_batch_size(loop: LoopConfig, num_workers: int) -> int:
    """Per-worker micro batch; a one-line ConfigError if the global batch does not divide."""
    denom = num_workers * loop.grad_accum_steps
    if loop.global_batch_size % denom:
        raise ConfigError(
            f"train.global_batch_size={loop.global_batch_size} is not divisible by "
            f"scaling.num_workers x train.grad_accum_steps = {num_workers} x {loop.grad_accum_steps}"
        )
    return loop.global_batch_size // denom


def resolve_precision(ds: DeepSpeedConfig, use_gpu: bool) -> str:
    if ds.precision != "auto":
        return ds.precision
    import torch

    if use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def deepspeed_config(
    optim: OptimConfig, ds: DeepSpeedConfig, loop: LoopConfig, num_workers: int, *, use_gpu: bool = False
) -> dict:
    """DeepSpeed's config dict for this run: batch sizes, ZeRO, AdamW (torch), warmup+cosine."""
    precision = resolve_precision(ds, use_gpu)
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_bucket_size=5e7)
    if ds.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold=1e4)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    # DeepSpeed rejects warmup_num_steps=0; no warmup = a 1-step "warmup" already at the full rate.
    warmup = min(optim.warmup_steps, max(loop.max_steps - 1, 0))
    config = {
        "train_batch_size": loop.global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(loop, num_workers),
        "gradient_accumulation_steps": loop.grad_accum_steps,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                "torch_adam": True,  # no compiled kernels needed
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": loop.max_steps,
                "warmup_num_steps": max(warmup, 1),
                "warmup_min_ratio": 0.0 if warmup > 0 else 1.0,
                "cos_min_ratio": optim.min_lr_ratio,
                "warmup_type": "linear",
            },
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    return _deep_update(config, ds.extra)


def _deep_update(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def param_groups(model, weight_decay: float, no_decay=None) -> list[dict]:
    """AdamW groups: decay for weight matrices; none for gains, biases, scales, embeddings' 1-d params.

    Frozen parameters are left out (they have no optimizer state).
    """
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "logit_scale" in name or "logit_bias" in name or name.endswith(".bias")
        if no_decay is not None:
            skip = skip or no_decay(name, p)
        (plain if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
