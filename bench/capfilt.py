"""CapFilt throughput: the captioner + filter batched (as the stage runs them) vs image by image.

Both variants run the same models (`CaptionerStep` then `FilterStep`, the classes the stage's
actors hold) over the same digit images in one process, no Ray, after one untimed warm-up call:

* batched       - batches of `--batch` images per model call (the stage's `batch_size`);
* image-by-image - the same steps called once per image (what a naive per-sample loop does).

Figures are images/s for caption + filter together, plus each part. Generation lengths are
pinned (min_length = max_length) so both variants decode the same number of tokens: sampling
would otherwise let one variant stop early. The models are the tiny presets built from configs
(random weights: speed does not depend on what they learned), or yours with --captioner/--filter
(save_pretrained directories, e.g. `vlm train blip` exports). Where CUDA exists a GPU row runs
the batched variant on the GPU as well.

    python bench/capfilt.py                      # ~1-2 min on 2 cores
    python bench/capfilt.py --images 256 --batch 64 --preset base

Prints a table and writes `bench/results/capfilt.json`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "bench" / "results" / "capfilt.json"


def digit_batch(n: int, size: int = 64) -> dict[str, np.ndarray]:
    from vlm.testbed.digits import caption_for, render_digit, train_indices

    idx = train_indices()
    jpgs, txts, keys = [], [], []
    for i in range(n):
        buf = io.BytesIO()
        render_digit(int(idx[i % len(idx)]), size, size, seed=i).save(buf, format="JPEG", quality=90)
        jpgs.append(buf.getvalue())
        txts.append(caption_for(i % 10))
        keys.append(f"{i:09d}")
    col = np.empty(n, dtype=object)
    col[:] = jpgs
    return {"key": np.array(keys), "jpg": col, "txt": np.array(txts, dtype=object)}


def _slice(batch: dict, lo: int, hi: int) -> dict:
    return {k: v[lo:hi] for k, v in batch.items()}


def run(captioner, filt, batch: dict, size: int) -> dict:
    """Seconds spent captioning and filtering all of `batch` in calls of `size` images."""
    n = len(batch["key"])
    t_cap = t_filt = 0.0
    for lo in range(0, n, size):
        part = _slice(batch, lo, lo + size)
        t0 = time.perf_counter()
        part = captioner(part)
        t1 = time.perf_counter()
        filt(part)
        t_filt += time.perf_counter() - t1
        t_cap += t1 - t0
    return {"images": n, "caption_s": t_cap, "filter_s": t_filt, "images_per_s": n / (t_cap + t_filt)}


def main(argv: list[str] | None = None) -> int:
    import torch

    from vlm.config import to_dict
    from vlm.data.capfilt import CaptionerStep, FilterStep
    from vlm.models.blip.config import BlipConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=12, help="caption tokens generated per image")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--backend", default="blip", choices=["blip", "blip2"])
    ap.add_argument("--captioner", help="save_pretrained dir of a captioner (default: build the preset)")
    ap.add_argument("--filter", help="save_pretrained dir of a filter")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", default=str(DEFAULT_JSON))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    def cfg(device: str) -> dict:
        return to_dict(
            BlipConfig(
                backend=args.backend,
                preset=args.preset,
                pretrained=args.captioner,
                filter_pretrained=args.filter,
                device=device,
                min_length=args.tokens,
                max_length=args.tokens,
            )
        )

    data = digit_batch(args.images)
    rows = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        captioner, filt = CaptionerStep(cfg(device)), FilterStep(cfg(device))
        run(captioner, filt, _slice(data, 0, min(args.batch, args.images)), args.batch)  # warm-up
        variants = [("batched", args.batch), ("image-by-image", 1)] if device == "cpu" else [("batched", args.batch)]
        for name, size in variants:
            r = run(captioner, filt, data, size)
            rows.append({"device": device, "variant": name, "batch": size, **r})
    ref = {r["device"]: r["images_per_s"] for r in rows if r["variant"] == "image-by-image"}
    for r in rows:
        base = ref.get("cpu")
        r["speedup_vs_image_by_image_cpu"] = r["images_per_s"] / base if base else None

    print(f"CapFilt captioner + filter, {args.backend} {args.preset}, {args.images} images, {args.tokens} tokens")
    print(f"{'device':<7} {'variant':<15} {'batch':>5} {'images/s':>9} {'caption s':>10} {'filter s':>9} {'x':>6}")
    for r in rows:
        print(
            f"{r['device']:<7} {r['variant']:<15} {r['batch']:>5} {r['images_per_s']:>9.1f} {r['caption_s']:>10.2f} "
            f"{r['filter_s']:>9.2f} {r['speedup_vs_image_by_image_cpu']:>6.2f}"
        )
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": args.threads,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_avg": os.getloadavg(),
        },
        "args": vars(args),
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
