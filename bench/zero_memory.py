"""ZeRO memory per rank: what DeepSpeed stages 0-3 keep for vlm's CLIP, against the ZeRO formulas.

Two processes (multiprocessing spawn, gloo, DeepSpeed's CPU accelerator)
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

    python bench/zero_memory.py                          # both models, stages 0-3 (~2 min on 2 cores)
    python bench/zero_memory.py --presets vlm-clip-tiny --stages 2,3

Prints a table per model and writes `bench/results/zero_memory.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import MAX_LOGIT_SCALE, PRESET, RESULTS, free_port, machine_info, quiet_logs, report, rss_mb, text_table

DEFAULT_JSON = RESULTS / "zero_memory.json"


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
    quiet_logs()
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
    rss_model = rss_mb()
    oc = OptimConfig()
    cfg = deepspeed_config(
        oc, DeepSpeedConfig(zero_stage=stage), LoopConfig(global_batch_size=batch, max_steps=steps), world
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, oc.weight_decay), config=cfg
    )
    rss_init = rss_mb()
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
                in_backward["rss_mb"] = rss_mb()
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
            rss_peak = rss_mb()
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


def zero_memory(args, preset: str) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = {}
    for stage in args.zero_stages:
        port = free_port()
        files = [args.tmp / f"zero_{preset}_{stage}_rank{r}.json" for r in range(args.zero_workers)]
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
    lines = [
        f"ZeRO memory per rank (MiB), {preset}: Psi = {psi:,} trainable parameters "
        f"(largest tensor {big['name']}: {big['share']:.0%}), N = {n} ranks, fp32 on CPU, torch AdamW, "
        f"vlm's deepspeed_config (reduce_bucket_size 5e7, stage-3 persistence threshold 1e4).",
        "formula (fp32, no fp16 copy): params 4Psi + grads 4Psi + Adam m,v 8Psi, partitioned per stage: "
        "0: 16Psi, 1: 4Psi+4Psi+8Psi/N, 2: 4Psi+(4Psi+8Psi)/N, 3: 16Psi/N",
    ]
    lines += text_table(rows, left=0)
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/zero_memory.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--presets",
        default=f"{PRESET},ViT-S-32-alt",
        help=f"models, comma-separated (default {PRESET},ViT-S-32-alt: 3.4M and 43M "
        "parameters; the tiny one's token embedding holds 93%% of its parameters)",
    )
    p.add_argument("--workers", type=int, default=2, help="ranks (processes), default 2")
    p.add_argument("--batch", type=int, default=16, help="global batch (default 16)")
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--json", default=str(DEFAULT_JSON), help=f"results file (default {DEFAULT_JSON})")
    args = p.parse_args(argv)
    args.zero_stages = [int(s) for s in args.stages.split(",") if s.strip()]
    args.zero_presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    args.zero_workers, args.zero_batch = args.workers, args.batch
    if args.zero_batch % args.zero_workers:
        p.error("--batch must be divisible by --workers")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    quiet_logs()
    args.tmp = Path(tempfile.mkdtemp(prefix="vlm-bench-zero-memory-"))
    result = {
        "benchmark": "zero_memory",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "settings": {
            "presets": args.zero_presets,
            "workers": args.zero_workers,
            "batch": args.zero_batch,
            "stages": args.zero_stages,
            "precision": "fp32",
            "device": "cpu",
        },
        "zero_memory": {},
        "zero_memory_formula": (
            "fp32 Adam, no fp16 copy: params 4Psi + grads 4Psi + Adam m,v 8Psi; stage 0: 16Psi, "
            "stage 1: 4Psi+4Psi+8Psi/N, stage 2: 4Psi+(4Psi+8Psi)/N, stage 3: 16Psi/N"
        ),
    }
    tables = []
    t0 = time.perf_counter()
    try:
        for preset in args.zero_presets:
            zm = zero_memory(args, preset)
            result["zero_memory"][preset] = {str(k): v for k, v in zm.items()}
            tables.append(zero_table(zm, args, preset))
    finally:
        shutil.rmtree(args.tmp, ignore_errors=True)
    result["total_wall_s"] = round(time.perf_counter() - t0, 1)
    result["tables"] = "\n\n".join(tables)
    report(args.json, result, result["tables"], result["total_wall_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
