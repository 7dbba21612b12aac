"""bench/gpu_check.py's Flamingo rows: tokens/s and MFU per ZeRO stage, and `vlm plan flamingo` against the
measured peak memory (the FLOP count and the peak table are described in bench/gpu_check.py).

Each stage trains in a fresh process (multiprocessing spawn): a DeepSpeed engine of world size 1 built from
vlm's `deepspeed_config`, fed by vlm's FlamingoPreprocess from digit shards, so one stage's allocations and
peak RSS cannot leak into the next.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch
from _clip_loops import make_shards
from _common import check_positive, free_port, in_subprocess, quiet_logs, rss_mb

# Dense bf16 peak of one GPU (no sparsity), from the vendors' data sheets: the MFU denominator.
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100 PCIe": 756.0e12, "H100": 989.4e12, "A100": 312.0e12}


def _peak_flops(cuda: bool) -> tuple[str | None, float | None]:
    if not cuda:
        return None, None
    name = torch.cuda.get_device_name(0)
    for key, flops in PEAK_BF16_FLOPS.items():  # "H100 PCIe" before "H100"
        if key in name:
            return name, flops
    return name, None


def _flamingo_child(sz: dict, stage: int, shards: str, port: int, result: str) -> None:
    """One Flamingo DeepSpeed engine (world 1) trained `steps` steps; tokens/s, FLOPs, peak memory."""
    quiet_logs()
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1"
    )
    import deepspeed
    from _clip_loops import _raw_batches

    from pipelines.train_flamingo import vision_image_size
    from vlm.data.flamingo_data import FlamingoDataConfig, FlamingoPreprocess, flamingo_tokenizer
    from vlm.models.flamingo.build import build_flamingo
    from vlm.models.flamingo.config import flamingo_preset
    from vlm.models.flamingo.model import FlamingoLayer
    from vlm.models.flamingo.plan import model_facts
    from vlm.models.scalars import reshape_scalar_params
    from vlm.train.config import DeepSpeedConfig, LoopConfig, OptimConfig, deepspeed_config, param_groups

    cuda = torch.cuda.is_available()
    deepspeed.utils.logger.setLevel(40)
    torch.set_num_threads(sz["threads"])
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    f = sz["flamingo"]
    mcfg = flamingo_preset(f["preset"], lm_name_or_path=None, max_num_media=max(f["images"], 1))
    data_cfg = FlamingoDataConfig(images_per_sequence=f["images"], max_length=f["length"], augment=False)
    pre = FlamingoPreprocess(None, vision_image_size(mcfg), data_cfg)
    batches = []
    for rows in _raw_batches(sorted(Path(shards).glob("*.tar")), f["images"] * f["micro"]):
        out = pre(rows)
        if len(out["input_ids"]) >= f["micro"]:
            batches.append({k: torch.from_numpy(v[: f["micro"]]) for k, v in out.items()})
        if len(batches) == f["steps"] + 1:
            break
    if len(batches) < f["steps"] + 1:
        raise RuntimeError(f"flamingo: only {len(batches)} packed batches from the shards")

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss0 = rss_mb()
    model, _ = build_flamingo(mcfg, tokenizer=flamingo_tokenizer(None))
    reshape_scalar_params(model)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    xattn = sum(count(m.gated_xattn) for m in model.lm.modules() if isinstance(m, FlamingoLayer))
    p = {
        "vision": count(model.vision_encoder),
        "resampler": count(model.resampler),
        "xattn": xattn,
        "lm": count(model.lm) - xattn - count(model.lm.get_input_embeddings()),
        "trainable": sum(q.numel() for q in model.parameters() if q.requires_grad),
    }
    oc = OptimConfig(lr=1e-4, weight_decay=0.1, warmup_steps=2)
    ds = DeepSpeedConfig(zero_stage=stage, precision="auto")
    cfg = deepspeed_config(oc, ds, LoopConfig(global_batch_size=f["micro"], max_steps=f["steps"] + 1), 1, use_gpu=cuda)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=cfg)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    times = []
    for batch in batches:
        images = batch["images"].to(engine.device, dtype, non_blocking=True)  # (B, T_img, 1, 3, S, S)
        ids, mask = batch["input_ids"].to(engine.device), batch["attention_mask"].to(engine.device)
        out = engine(images, ids, mask, batch["labels"].to(engine.device))
        engine.backward(out["loss"])
        engine.step()
        loss = float(out["loss"].detach())
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    _, shape = model_facts(mcfg)
    tokens = f["micro"] * f["length"]
    imgs = f["micro"] * f["images"]
    flops = (
        2 * p["vision"] * (shape.vision_tokens + 1) * imgs
        + 6 * p["resampler"] * (shape.vision_tokens + shape.num_latents) * imgs
        + 6 * p["xattn"] * tokens
        + 4 * p["lm"] * tokens
    )
    span = times[-1] - times[0]  # the first step (allocations, DeepSpeed's first-step work) is warm-up
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:  # ru_maxrss: KiB on Linux
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0) * 2**20
    Path(result).write_text(
        json.dumps(
            {
                "stage": stage,
                "precision": str(dtype).removeprefix("torch."),
                "params": p,
                "model_flops_per_step": flops,
                "measured_steps": len(times) - 1,
                "tokens_per_s": (len(times) - 1) * tokens / span,
                "model_flops_per_s": (len(times) - 1) * flops / span,
                "peak_memory_bytes": peak,
                "peak_memory_kind": "torch.cuda.max_memory_allocated" if cuda else "peak RSS growth (fp32)",
                "last_loss": loss,
            }
        )
    )
    torch.distributed.destroy_process_group()


def flamingo_rows(sz: dict, tmp: Path, cuda: bool) -> tuple[dict, dict]:
    """Flamingo tokens/s + MFU per ZeRO stage, and the plan's prediction against the measured peak."""
    from vlm.models.flamingo.config import flamingo_preset
    from vlm.models.flamingo.plan import plan_flamingo

    f = sz["flamingo"]
    shards = tmp / "flamingo"
    make_shards(shards, f["images"] * f["micro"] * (f["steps"] + 2) * 2, image_size=64, unique_samples=256)
    gpu, peak = _peak_flops(cuda)
    stages, plans = {}, {}
    mcfg = flamingo_preset(f["preset"], lm_name_or_path=None, max_num_media=max(f["images"], 1))
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 80.0
    for stage in f["stages"]:
        result = tmp / f"flamingo_zero{stage}.json"
        in_subprocess(_flamingo_child, (sz, stage, str(shards / "shards"), free_port(), str(result)))
        r = json.loads(result.read_text())
        r["mfu"] = r["model_flops_per_s"] / peak if peak else None
        check_positive(f"flamingo ZeRO-{stage}", tokens_per_s=r["tokens_per_s"], peak_memory=r["peak_memory_bytes"])
        stages[str(stage)] = r
        plan = next(
            p
            for p in plan_flamingo(
                mcfg,
                1,
                1,
                gpu_memory_gib=gib,
                micro_batch=f["micro"],
                seq_len=f["length"],
                grad_checkpointing=mcfg.gradient_checkpointing,
                images_per_sample=f["images"],
            )
            if p.zero_stage == stage and p.offload == "none"
        )
        plans[str(stage)] = {
            "predicted_bytes": plan.total_bytes,
            "predicted": plan.to_dict(),
            "measured_bytes": r["peak_memory_bytes"],
            "measured_kind": r["peak_memory_kind"],
            "measured_over_predicted": r["peak_memory_bytes"] / plan.total_bytes,
        }
    flamingo = {
        "preset": f["preset"],
        "lm": "config-built (random weights)",
        "micro_batch": f["micro"],
        "seq_len": f["length"],
        "images_per_sequence": f["images"],
        "gpu": gpu,
        "peak_bf16_flops": peak,
        "stages": stages,
        "goal_mfu": 0.35,
        "met": all(r["mfu"] is not None and r["mfu"] >= 0.35 for r in stages.values()),
    }
    return flamingo, plans
