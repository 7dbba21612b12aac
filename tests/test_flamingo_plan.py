"""Flamingo memory planner: the ZeRO formulas (Rajbhandari et al. 2020), offload, fits, the real presets, output."""

from __future__ import annotations

import pytest

from vlm.errors import ConfigError
from vlm.models.flamingo.build import count_parameters
from vlm.models.flamingo.config import flamingo_preset
from vlm.models.flamingo.plan import (
    CONFIGS,
    GIB,
    ActivationShape,
    estimate_activation_bytes,
    format_plan,
    model_facts,
    plan_flamingo,
    plan_from_counts,
    recommend,
)

PSI_T = 1_000_000  # trainable
PSI_F = 8_000_000  # frozen
COUNTS = {"trainable": PSI_T, "total": PSI_T + PSI_F}
N = 8  # 2 nodes x 4 GPUs; divides both counts, so the formulas are exact
ACT = 123_456


def by_key(plans):
    return {(p.zero_stage, p.offload): p for p in plans}


def model_states(p):
    return p.param_bytes + p.grad_bytes + p.optimizer_bytes


def test_numbers_match_zero_formulas():
    """Every stage without offload gives ZeRO's params / grads / optimizer bytes for round Ψt, Ψf and N."""
    plans = by_key(plan_from_counts(COUNTS, 2, 4, activation_bytes=ACT))
    expected = {  # (frozen, trainable params, grads, optimizer) per GPU
        0: (2 * PSI_F, 2 * PSI_T, 2 * PSI_T, 12 * PSI_T),
        1: (2 * PSI_F, 2 * PSI_T, 2 * PSI_T, 12 * PSI_T // N),
        2: (2 * PSI_F, 2 * PSI_T, 2 * PSI_T // N, 12 * PSI_T // N),
        3: (2 * PSI_F // N, 2 * PSI_T // N, 2 * PSI_T // N, 12 * PSI_T // N),
    }
    for stage, (frozen, params, grads, optim) in expected.items():
        p = plans[(stage, "none")]
        got = (p.frozen_param_bytes, p.trainable_param_bytes, p.grad_bytes, p.optimizer_bytes)
        assert got == (frozen, params, grads, optim), stage
        assert p.total_bytes == frozen + params + grads + optim + ACT
        assert p.cpu_bytes_per_node == 0
        assert p.ranks == N


def test_stage3_is_16_psi_over_n():
    """ZeRO-3 model states per GPU are 16Ψt/N + 2Ψf/N."""
    p = by_key(plan_from_counts(COUNTS, 2, 4))[(3, "none")]
    assert model_states(p) == 16 * PSI_T // N + 2 * PSI_F // N


def test_partitions_round_up():
    """Counts that N does not divide are padded per rank, as DeepSpeed pads its partitions."""
    p = by_key(plan_from_counts({"trainable": 10, "total": 17}, 1, 3))[(3, "none")]
    assert (p.trainable_param_bytes, p.frozen_param_bytes, p.optimizer_bytes) == (2 * 4, 2 * 3, 12 * 4)


def test_higher_stage_never_uses_more_gpu_memory():
    """Per GPU, stage k+1 <= stage k (same offload) for several layouts, the real 9B counts included."""
    real, _ = model_facts(flamingo_preset("flamingo-9b"))
    for counts in (COUNTS, real):
        for nodes, gpus in ((1, 1), (1, 8), (4, 8)):
            plans = by_key(plan_from_counts(counts, nodes, gpus, activation_bytes=ACT))
            for offload in ("none", "optimizer"):
                stages = sorted(s for s, o in plans if o == offload)
                totals = [plans[(s, offload)].total_bytes for s in stages]
                assert totals == sorted(totals, reverse=True), (counts, nodes, gpus, offload)


def test_offload_moves_optimizer_to_cpu():
    """Offloading the optimizer moves exactly its bytes from each GPU to host memory (x GPUs per node)."""
    gpus = 4
    plans = by_key(plan_from_counts(COUNTS, 2, gpus, activation_bytes=ACT))
    for stage in (1, 2, 3):
        kept, moved = plans[(stage, "none")], plans[(stage, "optimizer")]
        assert moved.optimizer_bytes == 0
        assert kept.total_bytes - moved.total_bytes == kept.optimizer_bytes
        assert moved.cpu_bytes_per_node == kept.optimizer_bytes * gpus
        assert (moved.param_bytes, moved.grad_bytes) == (kept.param_bytes, kept.grad_bytes)


def test_param_offload_moves_stage3_params_to_cpu():
    """ZeRO-3 optimizer+params offload leaves only gradients and activations on the GPU."""
    gpus = 4
    p = by_key(plan_from_counts(COUNTS, 2, gpus, activation_bytes=ACT))[(3, "optimizer+params")]
    assert p.param_bytes == p.optimizer_bytes == 0
    assert p.total_bytes == 2 * PSI_T // N + ACT
    assert p.cpu_bytes_per_node == gpus * (14 * PSI_T + 2 * PSI_F) // N


def test_configs_are_what_deepspeed_accepts():
    """No offload at stage 0, param offload only at stage 3, one row per config."""
    plans = plan_from_counts(COUNTS, 1, 2)
    assert [(p.zero_stage, p.offload) for p in plans] == list(CONFIGS)
    assert {o for s, o in CONFIGS if s == 0} == {"none"}
    assert {s for s, o in CONFIGS if o == "optimizer+params"} == {3}


def test_fits_uses_headroom():
    """A plan fits iff its total is at most headroom x GPU memory."""
    total = by_key(plan_from_counts(COUNTS, 1, 1))[(0, "none")].total_bytes
    edge = total / (0.9 * GIB)
    assert by_key(plan_from_counts(COUNTS, 1, 1, gpu_memory_gib=edge * 1.001))[(0, "none")].fits
    assert not by_key(plan_from_counts(COUNTS, 1, 1, gpu_memory_gib=edge * 0.999))[(0, "none")].fits


def test_recommend_prefers_least_communication():
    """The recommendation is the lowest stage without offload that fits, and None when nothing fits."""
    stage3 = by_key(plan_from_counts(COUNTS, 1, 8))[(3, "none")].total_bytes
    stage2 = by_key(plan_from_counts(COUNTS, 1, 8))[(2, "none")].total_bytes
    plans = plan_from_counts(COUNTS, 1, 8, gpu_memory_gib=(stage3 + stage2) / 2 / (0.9 * GIB))
    best = recommend(plans)
    assert (best.zero_stage, best.offload) == (3, "none")
    assert recommend(plan_from_counts(COUNTS, 1, 8, gpu_memory_gib=1e-6)) is None


@pytest.mark.parametrize("nodes", [1, 2])
def test_flamingo_9b_on_80gib_gpus(nodes):
    """flamingo-9b on nodes x 8 x 80 GiB: rows follow the formulas from the real counts and fit accordingly."""
    counts = count_parameters(flamingo_preset("flamingo-9b"))
    psi_t, psi_f, n = counts["trainable"], counts["total"] - counts["trainable"], nodes * 8
    plans = by_key(plan_flamingo("flamingo-9b", nodes, 8))
    act = plans[(0, "none")].activation_bytes
    assert 0 < act < 16 * GIB  # one micro-batch of 512 tokens with checkpointing: GiBs, not tens of them
    expected = {0: 16 * psi_t + 2 * psi_f, 3: -(-psi_t // n) * 16 + -(-psi_f // n) * 2}
    for stage, states in expected.items():
        p = plans[(stage, "none")]
        assert model_states(p) == states
        assert p.fits == (states + act <= 0.9 * 80 * GIB)
    # Ψt ~ 1.18B, Ψf ~ 7.55B: stage 0 needs ~34 GiB, stage 3 on 8+ GPUs ~4-7 GiB; both fit in 72 GiB.
    assert plans[(3, "none")].fits and plans[(0, "none")].fits
    # On 24 GiB GPUs plain data parallelism (16Ψt + 2Ψf ~ 31.6 GiB of states alone) no longer fits; ZeRO-3 does.
    small = by_key(plan_flamingo("flamingo-9b", nodes, 8, gpu_memory_gib=24))
    assert not small[(0, "none")].fits and small[(3, "none")].fits


def test_activation_formula():
    """The activation estimate is the documented formula (Korthikanti et al. 2022 layer constants)."""
    shape = ActivationShape(
        lm_hidden=100, lm_layers=4, vocab_size=1000, xattn_blocks=2, xattn_heads=2, num_latents=3,
        vision_tokens=7, vision_width=10, resampler_depth=2, resampler_heads=4,
    )  # fmt: skip
    b, s, m = 2, 50, 5
    k = m * 3
    lm_layer = 34 * s * b * 100
    xattn = lm_layer + 5 * 2 * s * k * b
    resampler = 2 * (34 * b * m * (7 + 3) * 10 + 5 * 4 * b * m * 3 * (7 + 3))
    logits = 10 * s * b * 1000
    kw = {"micro_batch": b, "seq_len": s, "images_per_sample": m}
    assert estimate_activation_bytes(shape, grad_checkpointing=False, **kw) == (
        4 * lm_layer + 2 * xattn + resampler + logits
    )
    assert estimate_activation_bytes(shape, grad_checkpointing=True, **kw) == (
        2 * s * b * 100 * (4 + 2) + xattn + resampler + logits
    )


def test_activation_estimate_responds_to_inputs():
    """Checkpointing lowers the activation estimate; batch and sequence length raise it; states do not change."""
    act = lambda **kw: plan_flamingo("flamingo-3b", 1, 8, **kw)[0].activation_bytes  # noqa: E731
    base = act()
    assert act(grad_checkpointing=False) > base
    assert act(micro_batch=2) > base and act(seq_len=1024) > base
    assert act(images_per_sample=1) < base
    a, b = plan_flamingo("flamingo-3b", 1, 8)[0], plan_flamingo("flamingo-3b", 1, 8, micro_batch=4)[0]
    assert model_states(a) == model_states(b)


def test_counts_are_cached_and_real():
    """plan_flamingo uses count_parameters' numbers, computed once per config."""
    cfg = flamingo_preset("tiny")
    counts, _ = model_facts(cfg)
    assert counts == count_parameters(cfg)
    assert model_facts(flamingo_preset("tiny"))[1] is model_facts(cfg)[1]
    p = plan_flamingo(cfg, 1, 2)[0]
    assert (p.trainable_params, p.frozen_params) == (counts["trainable"], counts["total"] - counts["trainable"])


def test_format_plan_lists_every_stage_and_recommends():
    """The table has a row for every config, the column names, and one recommendation line."""
    plans = plan_flamingo("flamingo-9b", 1, 8)
    text = format_plan(plans, title="flamingo-9b")
    lines = text.splitlines()
    assert lines[0] == "flamingo-9b"
    for word in ("stage", "offload", "params", "grads", "optim", "activ*", "GPU total", "CPU/node", "fits"):
        assert word in text
    rows = [cells for cells in map(str.split, lines) if len(cells) == 9 and cells[0].isdigit()]
    assert [(int(r[0]), r[1]) for r in rows] == list(CONFIGS)
    assert {r[0] for r in rows} == {"0", "1", "2", "3"}
    assert sum(line.startswith("recommendation: ") for line in lines) == 1
    assert "recommendation: ZeRO-0, no offload" in text
    assert "nothing fits" in format_plan(plan_flamingo("flamingo-9b", 1, 8, gpu_memory_gib=1))


def test_unknown_preset_is_config_error():
    """An unknown preset name is a ConfigError that names it."""
    with pytest.raises(ConfigError, match="flamingo-99b"):
        plan_flamingo("flamingo-99b", 1, 8)


def test_bad_layout_is_config_error():
    """Zero nodes, GPUs or micro-batch are ConfigErrors naming the setting."""
    with pytest.raises(ConfigError, match="gpus_per_node"):
        plan_flamingo("tiny", 1, 0)
    with pytest.raises(ConfigError, match="micro_batch"):
        plan_flamingo("tiny", 1, 1, micro_batch=0)
