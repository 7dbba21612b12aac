"""GPU readiness in one command (`make gpu-check`): every GPU path of the project, measured, in one table.

Synthetic digit shards are written locally (no downloads); then each row runs the real thing:

* clip      - `vlm train clip` (1 Ray Train worker, Ray Data decoding, DeepSpeed ZeRO-0,
              `deepspeed.precision=auto`: bf16 on a GPU) against open_clip's own trainer
              (`open_clip_train.main`, launched by bench/_open_clip.py, `--precision amp_bf16` on a
              GPU) on the same shards, model, batch and steps: samples/s after the warm-up windows,
              their ratio (goal >= 1.0x), data wait, and each one's GPU memory peak (device-wide, sampled).
* flamingo  - Flamingo (ViT-L-14 vision, a config-built ~1.1B Llama-layout LM, random weights:
              preset `flamingo-3b` without its hub LM) through a bare DeepSpeed engine built from vlm's
              `deepspeed_config` at ZeRO-2 and ZeRO-3, fed by vlm's FlamingoPreprocess: tokens/s and
              MFU (goal >= 35%). Model FLOPs per step, with T text tokens and I images of V patch
              tokens (+1 CLS) and n latents: 2 P_vision (V+1) I (frozen, forward only)
              + 6 P_resampler (V+n) I + 6 P_xattn T (trained) + 4 P_lm T (frozen: forward and the
              input-gradient half of backward; input embeddings excluded); attention-score FLOPs
              are left out, so MFU errs low. MFU = model FLOPs/s over PEAK_BF16_FLOPS (dense bf16
              peak of one GPU, by name) - None on a CPU.
* plan      - `vlm plan flamingo`'s predicted per-GPU memory for the same model, micro-batch,
              sequence length and stage against the measured peak (torch.cuda.max_memory_allocated;
              on a CPU the peak RSS growth of the process, in fp32 where the plan assumes bf16).
* capfilt   - BLIP captioner + ITM filter (`CaptionerStep`, `FilterStep`, the stage's actors' steps;
              BLIP-base size, random weights), batched vs image by image (bench/capfilt.py's loop),
              images/s and their ratio (goal >= 10x).
* clipscore - the clean stage's CLIP-score step (`ClipScorer`, a random CLIP export): images/s.

Sizes: the default (a GPU, ~8 min), `--quick` (a GPU, one small row each, ~2 min) and
`--cpu-dry-run` (tiny models on the CPU, ~2-3 min on 2 cores: it runs in the test suite so this
script cannot rot). Any row whose step fails makes the script exit non-zero.

    python bench/gpu_check.py                 # on a GPU machine
    python bench/gpu_check.py --cpu-dry-run --json /tmp/gpu_check.json

Prints one table and writes `bench/results/gpu_check.json`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from _clip_loops import make_shards
from _common import REPO, RESULTS, check_positive, machine_info, quiet_logs, report, text_table
from _gpu_flamingo import PEAK_BF16_FLOPS, flamingo_rows

DEFAULT_JSON = RESULTS / "gpu_check.json"


SIZES = {
    "cpu": {
        "clip": {"preset": "vlm-clip-tiny", "batch": 32, "steps": 12, "log_every": 4, "warmup_windows": 1},
        "flamingo": {"preset": "tiny-llama", "micro": 2, "steps": 3, "stages": [2, 3], "images": 2, "length": 48},
        "capfilt": {"preset": "tiny", "images": 16, "batch": 8, "loop_images": 4, "tokens": 4},
        "clipscore": {"preset": "vlm-clip-tiny", "images": 64, "batch": 32},
        "threads": 1,
    },
    "quick": {
        "clip": {"preset": "ViT-B-32", "batch": 256, "steps": 30, "log_every": 10, "warmup_windows": 1},
        "flamingo": {"preset": "flamingo-3b", "micro": 2, "steps": 6, "stages": [3], "images": 4, "length": 256},
        "capfilt": {"preset": "base", "images": 64, "batch": 32, "loop_images": 8, "tokens": 20},
        "clipscore": {"preset": "ViT-B-32", "images": 1024, "batch": 256},
        "threads": 4,
    },
    "full": {
        "clip": {"preset": "ViT-B-32", "batch": 1024, "steps": 80, "log_every": 10, "warmup_windows": 2},
        "flamingo": {"preset": "flamingo-3b", "micro": 4, "steps": 12, "stages": [2, 3], "images": 8, "length": 512},
        "capfilt": {"preset": "base", "images": 256, "batch": 64, "loop_images": 16, "tokens": 20},
        "clipscore": {"preset": "ViT-L-14", "images": 4096, "batch": 512},
        "threads": 4,
    },
}


def _image_size(preset: str) -> int:
    from vlm.models.clip.build import model_config

    size = model_config(preset)["vision_cfg"]["image_size"]
    return size[0] if isinstance(size, (list, tuple)) else size


# ----------------------------------------------------------------------------- clip


def clip_row(c: dict, tmp: Path, cuda: bool, threads: int) -> dict:
    """`vlm train clip` vs open_clip_train on the same shards: samples/s, data wait, ratio."""
    from _open_clip import parse_log
    from train_clip import run_vlm

    size = _image_size(c["preset"])
    tars = make_shards(tmp / "clip", (c["steps"] + 2) * c["batch"], image_size=size, unique_samples=512)
    args = argparse.Namespace(
        batch=c["batch"],
        steps=c["steps"],
        log_every=c["log_every"],
        warmup_windows=c["warmup_windows"],
        threads=threads,
        cpus_per_worker=float(threads),
        seed=0,
    )
    extra = [f"model.preset={c['preset']}", "deepspeed.precision=auto"]
    if cuda:
        extra += ["scaling.use_gpu=true", "scaling.gpus_per_worker=1"]
    t0 = time.perf_counter()
    with GpuMemory(cuda) as mem:
        vlm = run_vlm(tmp / "clip" / "shards", tmp / "clip_vlm", tmp, args, extra)
    vlm["wall_s"] = round(time.perf_counter() - t0, 1)
    vlm["gpu_memory_peak_gib"] = mem.peak_gib

    logs = tmp / "open_clip_logs"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "_open_clip.py"),
        f"--train-data={tars[0].parent}/{{{0:05d}..{len(tars) - 1:05d}}}.tar",
        f"--train-num-samples={c['steps'] * c['batch']}",
        "--dataset-type=webdataset",
        f"--batch-size={c['batch']}",
        "--epochs=1",
        f"--model={c['preset']}",
        f"--precision={'amp_bf16' if cuda else 'fp32'}",
        f"--workers={max(1, min(8, (os.cpu_count() or 2) - 1)) if cuda else 1}",
        f"--log-every-n-steps={c['log_every']}",
        f"--logs={logs}",
        "--name=run",
        "--save-frequency=0",
        "--report-to=none",
        # vlm's OptimConfig defaults: lr, weight decay, betas, eps, warmup, grad clip
        "--lr=5e-4",
        "--wd=0.2",
        "--beta1=0.9",
        "--beta2=0.98",
        "--eps=1e-6",
        "--warmup=10",
        "--grad-clip-norm=1.0",
        "--seed=0",
        "--zeroshot-frequency=0",
        "--val-frequency=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    with GpuMemory(cuda) as mem:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    wall = round(time.perf_counter() - t0, 1)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.stderr.write(text[-4000:])
        raise RuntimeError(f"open_clip_train failed (exit {proc.returncode})")
    theirs = parse_log(text, c["batch"], c["warmup_windows"], c["log_every"])
    theirs["wall_s"] = wall
    theirs["gpu_memory_peak_gib"] = mem.peak_gib
    check_positive("clip", vlm_samples_per_s=vlm["samples_per_s"], open_clip_samples_per_s=theirs["samples_per_s"])
    ratio = vlm["samples_per_s"] / theirs["samples_per_s"]
    return {
        "model": c["preset"],
        "batch": c["batch"],
        "steps": c["steps"],
        "precision": "bf16 (vlm: DeepSpeed bf16; open_clip: amp_bf16)" if cuda else "fp32",
        "vlm": vlm,
        "open_clip": theirs,
        "vlm_over_open_clip": ratio,
        "goal": 1.0,
        "met": ratio >= 1.0,
    }


class GpuMemory:
    """Peak device memory in use (all processes, sampled every 0.2 s from the driver's view of the GPU,
    less what was in use before) while a training command runs in other processes; None without CUDA."""

    def __init__(self, cuda: bool):
        self.cuda, self.peak_gib = cuda, None
        self._stop = threading.Event()

    def _used(self) -> int:
        free, total = torch.cuda.mem_get_info()
        return total - free

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self._peak = max(self._peak, self._used())

    def __enter__(self) -> GpuMemory:
        if self.cuda:
            self._base = self._peak = self._used()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._stop.set()
            self._thread.join()
            self.peak_gib = (self._peak - self._base) / 2**30


# ----------------------------------------------------------------------------- capfilt, clipscore


def capfilt_row(sz: dict, cuda: bool) -> dict:
    """Captioner + filter batched vs image by image, on the GPU where there is one."""
    from capfilt import _slice, digit_batch, run

    from vlm.config import to_dict
    from vlm.data.capfilt import CaptionerStep, FilterStep
    from vlm.models.blip.config import BlipConfig

    c = sz["capfilt"]
    device = "cuda" if cuda else "cpu"
    bcfg = to_dict(BlipConfig(preset=c["preset"], device=device, min_length=c["tokens"], max_length=c["tokens"]))
    captioner, filt = CaptionerStep(bcfg), FilterStep(bcfg)
    data = digit_batch(c["images"])
    run(captioner, filt, _slice(data, 0, c["batch"]), c["batch"])  # warm-up
    batched = run(captioner, filt, data, c["batch"])
    single = run(captioner, filt, _slice(data, 0, c["loop_images"]), 1)
    check_positive("capfilt", batched=batched["images_per_s"], image_by_image=single["images_per_s"])
    ratio = batched["images_per_s"] / single["images_per_s"]
    return {
        "preset": c["preset"],
        "device": device,
        "batch": c["batch"],
        "tokens": c["tokens"],
        "batched": batched,
        "image_by_image": single,
        "batched_over_image_by_image": ratio,
        "goal": 10.0,
        "met": ratio >= 10.0,
    }


def clipscore_row(sz: dict, tmp: Path, cuda: bool) -> dict:
    """The clean stage's ClipScorer over JPEG bytes + captions: images/s."""
    import numpy as np
    from capfilt import digit_batch

    from vlm.data.cleaning import ClipScorer
    from vlm.models.clip.build import CLIPModelConfig, build_clip, export_clip, model_config

    c = sz["clipscore"]
    model = build_clip(CLIPModelConfig(preset=c["preset"]))[0]
    export = tmp / "clipscore_export"
    export_clip(model.state_dict(), model_config(c["preset"]), export, c["preset"])
    del model
    scorer = ClipScorer(str(export), device="cuda" if cuda else "cpu")
    data = digit_batch(c["images"], size=64)
    batch = {"key": data["key"], "image": data["jpg"], "caption": data["txt"]}
    scorer({k: v[: c["batch"]] for k, v in batch.items()})  # warm-up
    t0 = time.perf_counter()
    scores = []
    for lo in range(0, c["images"], c["batch"]):
        scores.append(scorer({k: v[lo : lo + c["batch"]] for k, v in batch.items()})["clip_score"])
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    scores = np.concatenate(scores)
    if not np.isfinite(scores).all():
        raise RuntimeError("clipscore: some images scored NaN")
    rate = c["images"] / dt
    check_positive("clipscore", images_per_s=rate)
    return {
        "preset": c["preset"],
        "device": scorer.device,
        "batch": c["batch"],
        "images": c["images"],
        "images_per_s": rate,
    }


# ----------------------------------------------------------------------------- table, main


def _fmt(v, spec: str = ".1f") -> str:
    return "n.a." if v is None else format(v, spec)


def table(res: dict) -> str:
    rows = [("row", "figure", "value", "against", "ratio", "goal", "met")]
    c = res["rows"]["clip"]
    rows.append(
        (
            f"clip {c['model']} b{c['batch']}",
            "samples/s vlm / open_clip",
            f"{c['vlm']['samples_per_s']:.1f}",
            f"{c['open_clip']['samples_per_s']:.1f}",
            f"{c['vlm_over_open_clip']:.2f}x",
            ">= 1.0x",
            "yes" if c["met"] else "no",
        )
    )
    rows.append(
        (
            "",
            "data wait vlm / open_clip",
            f"{c['vlm']['data_wait_fraction']:.1%}",
            f"{c['open_clip']['data_wait_fraction']:.1%}",
            "",
            "",
            "",
        )
    )
    vlm_mem, their_mem = c["vlm"]["gpu_memory_peak_gib"], c["open_clip"]["gpu_memory_peak_gib"]
    rows.append(("", "GPU memory peak GiB vlm / open_clip", _fmt(vlm_mem, ".2f"), _fmt(their_mem, ".2f"), "", "", ""))
    fl = res["rows"]["flamingo"]
    for stage, r in fl["stages"].items():
        rows.append(
            (
                f"flamingo {fl['preset']} ZeRO-{stage}",
                "tokens/s, MFU",
                f"{r['tokens_per_s']:.0f}",
                "",
                _fmt(r["mfu"], ".1%"),
                ">= 35%",
                "n.a." if r["mfu"] is None else ("yes" if r["mfu"] >= 0.35 else "no"),
            )
        )
    for stage, p in res["rows"]["plan"].items():
        rows.append(
            (
                f"plan flamingo ZeRO-{stage}",
                "measured / predicted GiB",
                f"{p['measured_bytes'] / 2**30:.3f}",
                f"{p['predicted_bytes'] / 2**30:.3f}",
                f"{p['measured_over_predicted']:.2f}",
                "<= 1",
                "n.a." if res["mode"] == "cpu" else "yes" if p["measured_over_predicted"] <= 1 else "no",
            )
        )
    cf = res["rows"]["capfilt"]
    rows.append(
        (
            f"capfilt {cf['preset']} {cf['device']}",
            "images/s batched / 1-by-1",
            f"{cf['batched']['images_per_s']:.1f}",
            f"{cf['image_by_image']['images_per_s']:.1f}",
            f"{cf['batched_over_image_by_image']:.1f}x",
            ">= 10x",
            "yes" if cf["met"] else "no",
        )
    )
    cs = res["rows"]["clipscore"]
    rows.append((f"clipscore {cs['preset']} {cs['device']}", "images/s", f"{cs['images_per_s']:.1f}", "", "", "", ""))
    lines = [f"GPU check ({res['mode']}): {res['device']}", *text_table(rows, left=2)]
    peak = fl["peak_bf16_flops"]
    lines.append(
        f"MFU over the dense bf16 peak of {fl['gpu'] or 'the GPU'} ({_fmt(peak and peak / 1e12, '.0f')} "
        f"TFLOP/s; table: {', '.join(f'{k} {v / 1e12:g}' for k, v in PEAK_BF16_FLOPS.items())}); n.a. on a CPU or an "
        "unlisted GPU. Plan on a CPU: RSS growth in fp32 against a bf16 plan, so the ratio is not the GPU's."
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one small row each (~2 min on a GPU)")
    mode.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes, everything on the CPU")
    p.add_argument("--json", default=str(DEFAULT_JSON), help=f"results file (default {DEFAULT_JSON})")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (shards, runs, logs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cuda = torch.cuda.is_available() and not args.cpu_dry_run
    if not cuda and not args.cpu_dry_run:
        print("gpu_check: no CUDA device here; run it on a GPU machine, or pass --cpu-dry-run", file=sys.stderr)
        return 2
    mode = "cpu" if args.cpu_dry_run else "quick" if args.quick else "full"
    if args.cpu_dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the dry run stays on the CPU even on a GPU machine
    quiet_logs()
    sz = SIZES[mode]
    tmp = Path(tempfile.mkdtemp(prefix="vlm-gpu-check-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlruns.db'}"
    result = {
        "benchmark": "gpu_check",
        "mode": mode,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": torch.cuda.get_device_name(0) if cuda else "CPU (dry run)",
        "machine": machine_info(),
        "sizes": sz,
        "rows": {},
        "wall_s": {},
    }
    t_all = time.perf_counter()
    try:
        for name, fn in (
            ("clip", lambda: clip_row(sz["clip"], tmp, cuda, sz["threads"])),
            ("flamingo", lambda: flamingo_rows(sz, tmp, cuda)),
            ("capfilt", lambda: capfilt_row(sz, cuda)),
            ("clipscore", lambda: clipscore_row(sz, tmp, cuda)),
        ):
            print(f"{name} ...", flush=True)
            t0 = time.perf_counter()
            out = fn()
            if name == "flamingo":
                result["rows"]["flamingo"], result["rows"]["plan"] = out
            else:
                result["rows"][name] = out
            result["wall_s"][name] = round(time.perf_counter() - t0, 1)
            print(f"{name} done in {result['wall_s'][name]:.0f}s", flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["wall_s"]["total"] = round(time.perf_counter() - t_all, 1)
    result["table"] = table(result)
    report(args.json, result, result["table"], result["wall_s"]["total"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
