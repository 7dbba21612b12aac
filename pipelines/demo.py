"""`vlm demo`: the mission on embedded defaults, against a local web of handwritten digits.

So far: local web -> ingest. Later stages (clean, CapFilt, CLIP, Flamingo) extend this list.
Reruns reuse what is complete.
"""

from __future__ import annotations

import time
from pathlib import Path

from vlm import tracking
from vlm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "ingest" / "demo.yaml"


def run_demo(args) -> int:
    from pipelines.ingest import IngestConfig, ingest, summary_table
    from vlm.data.localweb import LocalWeb, make_url_rows, write_url_list

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(IngestConfig, args.config or DEMO_CONFIG, args.overrides)
    t0 = time.time()
    # A fixed port keeps URLs (and so the ingest plan) identical across demo reruns.
    with LocalWeb(port=args.port, seed=0, slow_delay_s=30) as web:
        print(f"local web serving handwritten digits and web failures at {web.base_url}")
        urls = out / "urls.parquet"
        rows = make_url_rows(web.base_url, args.n, seed=0, noisy_fraction=0.3, duplicates=max(1, args.n // 100))
        write_url_list(rows, urls)
        print(f"wrote {len(rows)} URLs (every failure kind included) to {urls}")
        manifest = ingest(str(urls), out / "raw", cfg, address=args.address, show_progress=not args.quiet)
    print()
    print(summary_table(manifest))
    print()
    print(f"demo finished in {time.time() - t0:.0f}s")
    print(f"  shards:      {(out / 'raw').resolve()}  ({manifest['num_shards']} WebDataset shards + parquet + stats)")
    print(f"  mlflow runs: {tracking.tracking_uri()}")
    print(f"  open the UI: {tracking.ui_hint()}")
    return 0
