"""Per-GPU memory plan for training Flamingo under DeepSpeed ZeRO 0-3 and CPU offload (`vlm plan flamingo`).

Model states follow Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models" (Sec. 5, Fig. 1), for mixed-precision Adam (K = 12 bytes of optimizer state per parameter: fp32 master
copy 4 + Adam m 4 + v 4) over N = nodes * gpus_per_node data-parallel ranks. Flamingo trains only the resampler,
the gated cross-attention and the added token rows (Ψt); the vision tower and the LM (Ψf) are frozen, so they
have bf16 weights only, no gradients and no optimizer state:

    stage   trainable params   gradients   optimizer state   frozen params
    0       2Ψt                2Ψt         12Ψt              2Ψf
    1       2Ψt                2Ψt         12Ψt/N            2Ψf
    2       2Ψt                2Ψt/N       12Ψt/N            2Ψf
    3       2Ψt/N              2Ψt/N       12Ψt/N            2Ψf/N       (ZeRO-3 partitions every parameter)

Offload (ZeRO-Offload, Ren et al. 2021; DeepSpeed's `offload_optimizer` / `offload_param`): "optimizer" moves
the rank's optimizer partition to CPU memory (DeepSpeed allows it for stages 1-3 only, so stage 0 has no
offload row); "optimizer+params" (stage 3 only) moves the rank's parameter partitions there too. CPU memory is
reported per node (gpus_per_node ranks share it). Partitions are rounded up, as DeepSpeed pads them.

Activations are an ESTIMATE (see `estimate_activation_bytes`); temporary buffers (ZeRO-3's gathered layers, gradient
buckets, all-gather/reduce-scatter buffers), the CUDA context and fragmentation are not counted: the headroom
factor (default 0.9 of the GPU usable) is there for them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from vlm.errors import ConfigError
from vlm.models.flamingo.config import FlamingoConfig, flamingo_preset

GIB = 2**30
BF16 = 2  # bytes per bf16 parameter / gradient
ADAM_STATE = 12  # bytes per trainable parameter: fp32 master 4 + Adam m 4 + v 4 (ZeRO's K)

OFFLOAD_NONE = "none"
OFFLOAD_OPTIMIZER = "optimizer"
OFFLOAD_OPTIMIZER_PARAMS = "optimizer+params"

# Every (stage, offload) DeepSpeed accepts (offload_optimizer needs stage >= 1, offload_param stage 3): the rows.
CONFIGS: tuple[tuple[int, str], ...] = (
    (0, OFFLOAD_NONE),
    (1, OFFLOAD_NONE),
    (1, OFFLOAD_OPTIMIZER),
    (2, OFFLOAD_NONE),
    (2, OFFLOAD_OPTIMIZER),
    (3, OFFLOAD_NONE),
    (3, OFFLOAD_OPTIMIZER),
    (3, OFFLOAD_OPTIMIZER_PARAMS),
)
# The same, fastest first: less communication, no PCIe traffic, no CPU Adam step. It is the speed ranking of the
# DeepSpeed/HF guides, "0 > 1 > 2 > 2+offload > 3 > 3+offloads" (ZeRO-3 adds a parameter all-gather per pass).
PREFERENCE: tuple[tuple[int, str], ...] = (
    (0, OFFLOAD_NONE),
    (1, OFFLOAD_NONE),
    (2, OFFLOAD_NONE),
    (1, OFFLOAD_OPTIMIZER),
    (2, OFFLOAD_OPTIMIZER),
    (3, OFFLOAD_NONE),
    (3, OFFLOAD_OPTIMIZER),
    (3, OFFLOAD_OPTIMIZER_PARAMS),
)


@dataclass(frozen=True)
class MemoryPlan:
    """Memory of one (ZeRO stage, offload) choice: bytes per GPU by kind, CPU bytes per node, and whether it fits."""

    zero_stage: int
    offload: str  # "none", "optimizer" or "optimizer+params"
    nodes: int
    gpus_per_node: int
    trainable_params: int  # Ψt
    frozen_params: int  # Ψf
    frozen_param_bytes: int  # per GPU: bf16 vision + LM weights
    trainable_param_bytes: int  # per GPU: bf16 working copy of the trainable weights
    grad_bytes: int  # per GPU: bf16 gradients
    optimizer_bytes: int  # per GPU: fp32 master + Adam m, v
    activation_bytes: int  # per GPU: an estimate, see estimate_activation_bytes()
    cpu_bytes_per_node: int  # what offload puts in host memory, all ranks of a node together
    gpu_memory_gib: float = 80.0
    headroom: float = 0.9  # fraction of the GPU counted as usable

    @property
    def ranks(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def param_bytes(self) -> int:
        return self.frozen_param_bytes + self.trainable_param_bytes

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes

    @property
    def usable_bytes(self) -> float:
        return self.headroom * self.gpu_memory_gib * GIB

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes

    def to_dict(self) -> dict:
        """Fields plus the derived totals, for JSON output."""
        return {**asdict(self), "param_bytes": self.param_bytes, "total_bytes": self.total_bytes, "fits": self.fits}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def plan_from_counts(
    counts: Mapping[str, int],
    nodes: int,
    gpus_per_node: int,
    *,
    activation_bytes: int = 0,
    gpu_memory_gib: float = 80.0,
    headroom: float = 0.9,
) -> list[MemoryPlan]:
    """One MemoryPlan per entry of CONFIGS, from parameter counts alone (the ZeRO formulas; see the module doc).

    Args:
        counts: needs "trainable" and "total" (as `count_parameters` returns); frozen = total - trainable.
        nodes, gpus_per_node: N = nodes * gpus_per_node data-parallel ranks.
        activation_bytes: activation memory per GPU, the same under every stage (ZeRO does not split it).
        gpu_memory_gib, headroom: a plan fits when its total is at most headroom * gpu_memory_gib GiB.
    """
    for name, value in (("nodes", nodes), ("gpus_per_node", gpus_per_node)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if gpu_memory_gib <= 0 or not 0 < headroom <= 1:
        raise ConfigError(f"need gpu_memory_gib > 0 and 0 < headroom <= 1, got {gpu_memory_gib}, {headroom}")
    trainable = int(counts["trainable"])
    frozen = int(counts["total"]) - trainable
    n = nodes * gpus_per_node
    part_t, part_f = _ceil_div(trainable, n), _ceil_div(frozen, n)  # per-rank partitions

    plans = []
    for stage, offload in CONFIGS:
        frozen_b = BF16 * (part_f if stage == 3 else frozen)
        param_b = BF16 * (part_t if stage == 3 else trainable)
        grad_b = BF16 * (part_t if stage >= 2 else trainable)
        optim_b = ADAM_STATE * (part_t if stage >= 1 else trainable)
        cpu_per_rank = 0
        if offload in (OFFLOAD_OPTIMIZER, OFFLOAD_OPTIMIZER_PARAMS):
            cpu_per_rank, optim_b = optim_b, 0
        if offload == OFFLOAD_OPTIMIZER_PARAMS:
            cpu_per_rank += frozen_b + param_b
            frozen_b = param_b = 0
        plans.append(
            MemoryPlan(
                zero_stage=stage,
                offload=offload,
                nodes=nodes,
                gpus_per_node=gpus_per_node,
                trainable_params=trainable,
                frozen_params=frozen,
                frozen_param_bytes=frozen_b,
                trainable_param_bytes=param_b,
                grad_bytes=grad_b,
                optimizer_bytes=optim_b,
                activation_bytes=int(activation_bytes),
                cpu_bytes_per_node=cpu_per_rank * gpus_per_node,
                gpu_memory_gib=float(gpu_memory_gib),
                headroom=headroom,
            )
        )
    return plans


@dataclass(frozen=True)
class ActivationShape:
    """The sizes the activation estimate needs, read from a FlamingoConfig and its LM / vision configs."""

    lm_hidden: int  # h
    lm_layers: int  # L
    vocab_size: int  # W
    xattn_blocks: int  # X = L // cross_attn_every_n_layers
    xattn_heads: int  # a_x
    num_latents: int  # n, visual tokens per image
    vision_tokens: int  # V, patch tokens per image (CLS excluded)
    vision_width: int  # Dv, the resampler's width
    resampler_depth: int  # R
    resampler_heads: int  # a_r


# Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 1): a transformer
# layer keeps s*b*h*(34 + 5*a*s/h) bytes of 16-bit activations for backward.
LAYER_FACTOR = 34
SCORE_FACTOR = 5
LOGIT_BYTES = 10  # per logit: bf16 logits 2 + fp32 copy 4 + fp32 log-softmax kept by cross-entropy 4


def estimate_activation_bytes(
    shape: ActivationShape, *, micro_batch: int, seq_len: int, images_per_sample: int, grad_checkpointing: bool
) -> int:
    """ESTIMATED activation bytes per GPU kept for backward (bf16), one micro-batch; the same under every stage.

    With b = micro_batch, s = seq_len, M = images_per_sample, K = M * n media tokens per sequence:
        lm_layer  = 34 s b h                              (eq. 1 without 5as/h: the LM runs fused SDPA attention,
                                                           which keeps no s x s scores)
        xattn     = 34 s b h + 5 a_x s K b                (this block materialises its s x K scores)
        resampler = R * (34 b M (V+n) Dv + 5 a_r b M n (V+n))   (never checkpointed; the frozen ViT runs
                                                           under no_grad and keeps nothing)
        logits    = 10 s b W
    checkpointing off: L*lm_layer + X*xattn + resampler + logits
    checkpointing on:  2 s b h (L + X)  (each checkpointed block keeps its bf16 input)
                       + max(lm_layer, xattn)  (one block's activations while it is recomputed in backward)
                       + resampler + logits
    The constants come from a GPT layer with dropout and a 4h GELU MLP, so for Llama/Mistral layers (no dropout,
    grouped-query attention) the estimate errs high.
    """
    b, s, m = micro_batch, seq_len, images_per_sample
    k = m * shape.num_latents
    lm_layer = LAYER_FACTOR * s * b * shape.lm_hidden
    xattn = lm_layer + SCORE_FACTOR * shape.xattn_heads * s * k * b
    rs_tokens = shape.vision_tokens + shape.num_latents
    resampler = shape.resampler_depth * (
        LAYER_FACTOR * b * m * rs_tokens * shape.vision_width
        + SCORE_FACTOR * shape.resampler_heads * b * m * shape.num_latents * rs_tokens
    )
    logits = LOGIT_BYTES * s * b * shape.vocab_size
    if grad_checkpointing:
        blocks = BF16 * s * b * shape.lm_hidden * (shape.lm_layers + shape.xattn_blocks)
        blocks += max(lm_layer, xattn if shape.xattn_blocks else 0)
    else:
        blocks = shape.lm_layers * lm_layer + shape.xattn_blocks * xattn
    return blocks + resampler + logits


_FACTS: dict[str, tuple[dict[str, int], ActivationShape]] = {}


def model_facts(cfg: FlamingoConfig) -> tuple[dict[str, int], ActivationShape]:
    """(count_parameters(cfg), ActivationShape) from the model built on the meta device; cached per config."""
    key = json.dumps(asdict(cfg), sort_keys=True, default=str)
    if key not in _FACTS:
        import torch

        from vlm.models.flamingo.build import count_parameters, lm_config
        from vlm.models.flamingo.vision import build_vision_tower

        text = lm_config(cfg).get_text_config()
        with torch.device("meta"):
            visual = build_vision_tower(cfg.vision_model)
        grid_h, grid_w = visual.grid_size
        shape = ActivationShape(
            lm_hidden=text.hidden_size,
            lm_layers=text.num_hidden_layers,
            vocab_size=text.vocab_size,
            xattn_blocks=text.num_hidden_layers // cfg.cross_attn_every_n_layers,
            xattn_heads=cfg.xattn_heads,
            num_latents=cfg.num_latents,
            vision_tokens=grid_h * grid_w,
            vision_width=visual.transformer.width,
            resampler_depth=cfg.resampler_depth,
            resampler_heads=cfg.resampler_heads,
        )
        _FACTS[key] = (count_parameters(cfg), shape)
    counts, shape = _FACTS[key]
    return dict(counts), shape


def plan_flamingo(
    cfg_or_preset_name: FlamingoConfig | str,
    nodes: int,
    gpus_per_node: int,
    *,
    gpu_memory_gib: float = 80.0,
    micro_batch: int = 1,
    seq_len: int = 512,
    grad_checkpointing: bool = True,
    images_per_sample: int | None = None,
    headroom: float = 0.9,
    overrides: Mapping[str, object] | None = None,
) -> list[MemoryPlan]:
    """Memory plans for every (ZeRO stage, offload) from the model's real parameter counts.

    Args:
        cfg_or_preset_name: a FlamingoConfig or a preset name (unknown names are a ConfigError).
        nodes, gpus_per_node: the data-parallel layout.
        gpu_memory_gib: memory of one GPU; a plan fits within `headroom` of it.
        micro_batch, seq_len, grad_checkpointing: what the activation estimate depends on (grad_checkpointing is
            asked here, not read from cfg.gradient_checkpointing, so one config can be planned both ways).
        images_per_sample: images per sequence; None = the config's max_num_media (the worst case).
        overrides: FlamingoConfig fields set on top of a preset (e.g. lm_name_or_path: the LM of that directory
            replaces the preset's); only with a preset name.
    """
    if isinstance(cfg_or_preset_name, str):
        cfg = flamingo_preset(cfg_or_preset_name, **(overrides or {}))
    elif overrides:
        raise ConfigError("overrides apply to a preset name, not to a FlamingoConfig")
    else:
        cfg = cfg_or_preset_name
    for name, value in (("micro_batch", micro_batch), ("seq_len", seq_len)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    images = cfg.max_num_media if images_per_sample is None else images_per_sample
    if not 0 <= images <= cfg.max_num_media:
        raise ConfigError(f"images_per_sample must be in 0..{cfg.max_num_media} (max_num_media), got {images}")
    counts, shape = model_facts(cfg)
    act = estimate_activation_bytes(
        shape, micro_batch=micro_batch, seq_len=seq_len, images_per_sample=images, grad_checkpointing=grad_checkpointing
    )
    return plan_from_counts(
        counts, nodes, gpus_per_node, activation_bytes=act, gpu_memory_gib=gpu_memory_gib, headroom=headroom
    )


def recommend(plans: Sequence[MemoryPlan]) -> MemoryPlan | None:
    """The fitting plan that communicates least (earliest in PREFERENCE: lower stage, no offload), or None."""
    order = {c: i for i, c in enumerate(PREFERENCE)}
    fitting = [p for p in plans if p.fits]
    return min(fitting, key=lambda p: order.get((p.zero_stage, p.offload), len(order)), default=None)


def _describe(plan: MemoryPlan) -> str:
    offload = "no offload" if plan.offload == OFFLOAD_NONE else f"offload {plan.offload}"
    return f"ZeRO-{plan.zero_stage}, {offload}"


def _count(n: int) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.2f}{suffix}"
    return str(n)


def format_plan(plans: Sequence[MemoryPlan], *, title: str | None = None) -> str:
    """A table (memory per GPU by kind, CPU memory per node, fits) and a one-line recommendation.

    Sizes are in GiB, or in MiB when every plan is under 1 GiB (the debug presets).
    """
    if not plans:
        raise ValueError("format_plan needs at least one MemoryPlan")
    first = plans[0]
    unit, unit_name = (GIB, "GiB") if max(p.total_bytes for p in plans) >= GIB else (2**20, "MiB")
    lines = [title] if title else []
    lines.append(
        f"{first.nodes} node(s) x {first.gpus_per_node} GPU(s) = {first.ranks} data-parallel ranks, "
        f"{first.gpu_memory_gib:g} GiB per GPU ({first.usable_bytes / GIB:.1f} GiB usable); "
        f"parameters: {_count(first.trainable_params)} trainable, {_count(first.frozen_params)} frozen"
    )
    header = ("stage", "offload", "params", "grads", "optim", "activ*", "GPU total", "CPU/node", "fits")
    rows = [
        (
            str(p.zero_stage),
            p.offload,
            *(
                f"{v / unit:.2f}"
                for v in (
                    p.param_bytes,
                    p.grad_bytes,
                    p.optimizer_bytes,
                    p.activation_bytes,
                    p.total_bytes,
                    p.cpu_bytes_per_node,
                )
            ),
            "yes" if p.fits else "no",
        )
        for p in plans
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines += [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    lines.append(
        f"{unit_name}; all columns but CPU/node are per GPU. *activations are an estimate "
        "(vlm/models/flamingo/plan.py: estimate_activation_bytes)"
    )
    best = recommend(plans)
    if best is None:
        low = min(plans, key=lambda p: p.total_bytes)
        lines.append(
            f"recommendation: nothing fits; the smallest is {_describe(low)} at {low.total_bytes / GIB:.1f} GiB per "
            "GPU: add GPUs, lower micro_batch, seq_len or images per sample, or checkpoint activations"
        )
    else:
        cpu = f", {best.cpu_bytes_per_node / unit:.1f} {unit_name} CPU per node" if best.cpu_bytes_per_node else ""
        lines.append(
            f"recommendation: {_describe(best)} ({best.total_bytes / unit:.1f} {unit_name} per GPU of "
            f"{best.usable_bytes / GIB:.1f} GiB usable{cpu})"
        )
    return "\n".join(lines)
