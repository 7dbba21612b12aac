"""CLIP training throughput: `vlm train clip` against a plain PyTorch loop.

The same model (`vlm-clip-tiny`), global batch, optimizer (torch AdamW,
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

    python bench/train_clip.py                           # the whole benchmark (~6-7 min on 2 cores)
    python bench/train_clip.py --steps 40 --log-every 10   # a quick look

Prints a table and writes `bench/results/train_clip.json`. The variants' data and loops are in
bench/_clip_loops.py; ZeRO's memory per rank is measured by bench/zero_memory.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _clip_loops import (
    IMAGE_SIZE,
    SAMPLES_PER_SHARD,
    UNIQUE_SAMPLES,
    StepTimer,
    make_shards,
    predecode,
    run_deepspeed,
    run_plain_variant,
)
from _common import PRESET, RESULTS, Phase, QuietWait, machine_info, quiet_logs, report, text_table

DEFAULT_JSON = RESULTS / "train_clip.json"
EXPERIMENT = "bench-train-clip"


def run_vlm(data_dir: Path, out_dir: Path, tmp: Path, args, extra: list[str] = ()) -> dict:
    """`train_clip` with 1 worker (`extra` overrides last); its logged samples_per_s / data_wait_fraction
    from MLflow, over the log windows after `args.warmup_windows`."""
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
    overrides = [*vlm_overrides(args), *extra]
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
    lines = [
        f"Throughput: {PRESET}, global batch {args.batch}, {args.threads} intra-op thread(s), fp32 CPU, "
        f"{args.steps} steps, the first {args.warmup_windows * args.log_every} discarded (windows of "
        f"{args.log_every} steps)",
        *text_table(rows),
    ]
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
    if args.steps % args.log_every:
        p.error("--steps must be a multiple of --log-every (equal log windows)")
    if args.steps <= args.warmup_windows * args.log_every:
        p.error("--steps must exceed --warmup-windows x --log-every")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    quiet_logs()
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
        print("throughput:", flush=True)
        tp = throughput(args, tmp)
        result["throughput"] = tp
        tables.append(throughput_table(tp, args))
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["total_wall_s"] = round(time.perf_counter() - t0, 1)
    text = "\n\n".join(tables)
    result["tables"] = text
    report(args.json, result, text, result["total_wall_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
