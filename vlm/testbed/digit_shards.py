"""Write shards of handwritten digits directly (no HTTP), in ingest's output layout.

For tests and benchmarks of the stages after ingest: the same images the local web would
serve, resized as ingest would store them, with clean or deliberately noisy captions.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from vlm.data import shards as sh
from vlm.data.images import ImageConfig, process_image
from vlm.testbed.digits import caption_for, load_digit_images, noisy_caption_for, render_digit, train_indices


def write_digit_shards(
    out: str | Path,
    n: int,
    *,
    samples_per_shard: int = 256,
    image_size: int = 64,
    noisy_fraction: float = 0.0,
    seed: int = 0,
) -> list[Path]:
    """Write `n` digit samples as complete shards (+ _SUCCESS). Returns the tar paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _, labels = load_digit_images()
    idx = train_indices()
    rng = random.Random(seed)
    cfg = ImageConfig(image_size=image_size, resize_mode="border")
    tars = []
    for shard in range((n + samples_per_shard - 1) // samples_per_shard):
        writer = sh.ShardWriter(out, shard)
        for i in range(shard * samples_per_shard, min(n, (shard + 1) * samples_per_shard)):
            digit = int(idx[(i * 7 + seed) % len(idx)])
            label = int(labels[digit])
            w, h = rng.choice([(256, 256), (320, 240), (240, 320)])
            buf = io.BytesIO()
            render_digit(digit, w, h, seed=seed * 100_003 + i).save(buf, format="JPEG", quality=90)
            img = process_image(buf.getvalue(), cfg)
            noisy = rng.random() < noisy_fraction
            caption = noisy_caption_for(label, rng) if noisy else caption_for(label, rng)
            key = sh.sample_key(shard, i - shard * samples_per_shard)
            row = {
                "key": key,
                "url": f"digit://{digit}",
                "caption": caption,
                "status": "success",
                "width": img.width,
                "height": img.height,
                "label": label,
                "noisy": noisy,
            }
            writer.write_sample(key, img.data, img.ext, caption, row)
            writer.add_row(row)
        writer.close()
        tars.append(sh.tar_path(out, shard))
    sh.write_success(out, {"stage": "digit_shards", "num_shards": len(tars), "count": n})
    return tars
