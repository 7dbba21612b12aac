"""`vlm demo`: the mission on embedded defaults, against a local web of handwritten digits.

So far: local web -> ingest -> CLIP (2 workers, ZeRO-2) -> zero-shot eval on held-out digits.
Later stages (clean, CapFilt, Flamingo, the pipeline runner) extend this. Reruns reuse what is
complete: ingest skips complete shards, and a finished CLIP run is not trained again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from vlm import tracking
from vlm.config import load_config
from vlm.runtime import init_ray

ROOT = Path(__file__).resolve().parents[1]
INGEST_CONFIG = ROOT / "configs" / "ingest" / "demo.yaml"
CLIP_CONFIG = ROOT / "configs" / "train" / "clip-tiny-digits.yaml"


def run_demo(args) -> int:
    from pipelines.ingest import IngestConfig, ingest, summary_table
    from pipelines.train_clip import TrainClipConfig, train_clip
    from vlm.data.localweb import LocalWeb, make_url_rows, write_url_list

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    ingest_cfg = load_config(IngestConfig, INGEST_CONFIG)
    clip_cfg = load_config(TrainClipConfig, CLIP_CONFIG, [f"train.max_steps={args.clip_steps}"])
    t0 = time.time()
    init_ray(args.address)  # one Ray for every stage (with the dashboard Ray Train needs)

    print("== 1/2 ingest: local web -> WebDataset shards")
    # A fixed port keeps URLs (and so the ingest plan) identical across demo reruns.
    with LocalWeb(port=args.port, seed=0, slow_delay_s=30) as web:
        print(f"local web serving handwritten digits and web failures at {web.base_url}")
        urls = out / "urls.parquet"
        rows = make_url_rows(
            web.base_url, args.n, seed=0, noisy_fraction=args.noisy_fraction, duplicates=max(1, args.n // 100)
        )
        write_url_list(rows, urls)
        print(f"wrote {len(rows)} URLs ({args.noisy_fraction:.0%} of captions deliberately wrong) to {urls}")
        manifest = ingest(str(urls), out / "raw", ingest_cfg, address=args.address, show_progress=not args.quiet)
    print(summary_table(manifest))
    t_ingest = time.time() - t0

    print("\n== 2/2 train CLIP (tiny, 2 workers, DeepSpeed ZeRO-2) on the raw shards")
    clip_dir = out / "clip-raw"
    if (clip_dir / "eval.json").is_file():
        evals = json.loads((clip_dir / "eval.json").read_text())
        print(f"already trained: {clip_dir} (delete it to train again)")
    else:
        evals = train_clip(str(out / "raw"), clip_dir, clip_cfg, address=args.address)["eval"]
    t_clip = time.time() - t0 - t_ingest

    print()
    print(f"demo finished in {time.time() - t0:.0f}s (ingest {t_ingest:.0f}s, CLIP {t_clip:.0f}s)")
    print(
        f"  CLIP zero-shot top-1 on held-out digits: {100 * evals['zeroshot_top1']:.1f}%  "
        f"(top-5 {100 * evals['zeroshot_top5']:.1f}%, image->text R@10 {100 * evals['image_to_text_R@10']:.1f}%)"
    )
    print(f"  shards:      {(out / 'raw').resolve()}  ({manifest['num_shards']} WebDataset shards + parquet + stats)")
    print(f"  CLIP model:  {(clip_dir / 'export').resolve()}  (open_clip.create_model('local-dir:<path>'))")
    print(f"  mlflow runs: {tracking.tracking_uri()}")
    print(f"  open the UI: {tracking.ui_hint()}")
    return 0
