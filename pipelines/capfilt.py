"""`vlm capfilt`: BLIP CapFilt (Li et al. 2022, sec. 3.3) over shards, as Ray Data actor pools.

    input shards --read (CPU tasks)--> CaptionerStep actors --> FilterStep actors --> driver
                                        K synthetic captions     ITM scores of the web caption
                                        per image (batched        and the synthetic ones; keep
                                        nucleus sampling)         every caption >= threshold

Each model stage is a pool of stateful actors (`captioner` / `filter` config sections: actors,
batch size, CPUs/GPUs per actor), so on a cluster the models sit on GPU nodes and load once per
actor. The driver gathers the small per-sample decisions (no pixels) and, once a shard's samples
are all in, writes it with `write_filtered_shard`: kept samples with the chosen caption in KEY.txt
and every candidate with its source and score in KEY.json, dropped samples under `_dropped/` with
the reason, the stats file last. A rerun skips complete shards. Ray Data restarts a dead actor and
retries its batch, and decisions are keyed by sample, so a lost actor loses or duplicates nothing.

When the input carries known noise labels (the `noisy` column of the demo's local web), the
stage also measures the filter: precision and recall of "the web caption is dropped" against them.
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vlm.config import config_hash, to_dict, write_config
from vlm.data import shards as sh
from vlm.data.filtered_shards import input_shards, read_input_shard, write_filtered_shard
from vlm.errors import InputError
from vlm.models.blip.config import BlipConfig
from vlm.tracking import TrackingConfig, tracking_defaults

STAGE = "capfilt"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class PoolConfig:
    """One actor pool of the stage."""

    actors: int = 1  # concurrent actors, each holding one copy of the model
    batch_size: int = 32  # images per model call
    num_cpus: float = 1.0  # per actor
    num_gpus: float = 0.0  # per actor; > 0 places the actors on GPU nodes (blip.device auto => cuda)

    def validate(self) -> None:
        if self.actors < 1 or self.batch_size < 1:
            raise ValueError(f"actors and batch_size must be >= 1, got {self.actors}, {self.batch_size}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("num_cpus and num_gpus must be >= 0")


@dataclass
class CapfiltConfig:
    blip: BlipConfig = field(default_factory=BlipConfig)
    captioner: PoolConfig = field(default_factory=PoolConfig)
    filter: PoolConfig = field(default_factory=PoolConfig)
    tracking: TrackingConfig = field(default_factory=tracking_defaults("capfilt"))


# ------------------------------------------------------------------------------------ Ray plumbing


def _image_bytes(files: dict[str, bytes]) -> bytes:
    return next((files[e] for e in IMAGE_EXTS if e in files), b"")


def _read_rows(item: dict, in_dir: str) -> list[dict]:
    """One input shard -> rows for the model stages (encoded image, web caption)."""
    shard = int(item["shard"])
    return [
        {
            "shard": shard,
            "key": s["key"],
            "jpg": _image_bytes(s["files"]),
            "txt": s["files"].get("txt", b"").decode("utf-8", "replace"),
        }
        for s in read_input_shard(Path(in_dir), shard)
    ]


def _decisions_only(batch: dict) -> dict:
    return {k: batch[k] for k in ("shard", "key", "synthetic", "scores", "decision")}


def _pool_args(pool: PoolConfig) -> dict:
    import ray.data

    args = {
        "compute": ray.data.ActorPoolStrategy(size=pool.actors),
        "batch_size": pool.batch_size,
        "num_cpus": pool.num_cpus,
    }
    if pool.num_gpus:
        args["num_gpus"] = pool.num_gpus
    return args


def _bound(step_cls, cfg_dict: dict):
    """`step_cls` with its config built in: Ray Data then passes no constructor arguments, which it
    would keep in the object store (a restarted actor could find them gone)."""

    def __init__(self) -> None:
        step_cls.__init__(self, cfg_dict)

    return type(step_cls.__name__, (step_cls,), {"__init__": __init__})


def _dataset(in_dir: Path, todo: list[int], cfg: CapfiltConfig):
    import ray.data

    from vlm.data.capfilt import CaptionerStep, FilterStep

    blip = to_dict(cfg.blip)
    ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=max(1, len(todo)))
    ds = ds.flat_map(_read_rows, fn_kwargs={"in_dir": str(in_dir)})
    ds = ds.map_batches(_bound(CaptionerStep, blip), batch_format="numpy", **_pool_args(cfg.captioner))
    ds = ds.map_batches(_bound(FilterStep, blip), batch_format="numpy", **_pool_args(cfg.filter))
    return ds.map_batches(_decisions_only, batch_format="numpy")


def _shard_sizes(in_dir: Path, shards: list[int]) -> dict[int, int]:
    import tarfile

    sizes = {}
    for s in shards:
        with tarfile.open(sh.tar_path(in_dir, s)) as tar:
            sizes[s] = len({m.name.rsplit(".", 1)[0] for m in tar.getmembers() if m.isfile()})
    return sizes


class _Progress:
    def __init__(self, total_images: int, total_shards: int, enabled: bool):
        self.total, self.shards, self.enabled = total_images, total_shards, enabled
        self.images = self.done = 0
        self.t0 = time.time()

    def update(self, images: int = 0, shards: int = 0) -> None:
        self.images += images
        self.done += shards
        if self.enabled:
            rate = self.images / max(time.time() - self.t0, 1e-6)
            sys.stderr.write(
                f"\rcapfilt: {self.images}/{self.total} images, {self.done}/{self.shards} shards, {rate:.1f} images/s "
            )
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


# ------------------------------------------------------------------------------------ shard output


def _sample_record(decision: dict, scores: dict, synthetic: list[str]) -> dict:
    meta = {
        "chosen": decision["chosen"],
        "candidates": decision["candidates"],
        "original_score": scores.get("original"),
        "synthetic_scores": scores.get("synthetic", []),
        "threshold": None,
    }
    if not decision["candidates"] and synthetic:
        meta["synthetic"] = synthetic
    return meta


def write_shard(in_dir: Path, out: Path, shard: int, results: dict[str, dict], threshold: float, t0: float) -> dict:
    """Join the decisions of one shard with its input samples and publish the output shard."""
    samples = []
    quality: Counter = Counter()
    chosen: Counter = Counter()
    for s in read_input_shard(in_dir, shard):
        r = results[s["key"]]
        decision, scores = json.loads(r["decision"]), json.loads(r["scores"])
        meta = _sample_record(decision, scores, json.loads(r["synthetic"]))
        meta["threshold"] = threshold
        original = next((c for c in decision["candidates"] if c["source"] == "original"), None)
        noisy = s["row"].get("noisy")
        if original is not None and noisy is not None:
            flagged = not original["kept"]  # the filter says the web caption is wrong
            quality["tp" if flagged and noisy else "fp" if flagged else "fn" if noisy else "tn"] += 1
        if decision["keep"]:
            source = next(c["source"] for c in decision["candidates"] if c["kept"] and c["text"] == decision["chosen"])
            chosen[f"chosen_{source}"] += 1
        syn = scores.get("synthetic") or []
        samples.append(
            {
                "key": s["key"],
                "files": s["files"],
                "keep": decision["keep"],
                "reason": decision["reason"],
                "caption": decision["chosen"],
                "meta": meta,
                "row": {
                    **s["row"],
                    "original_caption": original["text"] if original else None,
                    "original_score": scores.get("original"),
                    "synthetic_caption": (json.loads(r["synthetic"]) or [None])[0],
                    "synthetic_score": max(syn) if syn else None,
                },
            }
        )
    extra = {"quality": dict(quality), **chosen}
    return write_filtered_shard(out, shard, samples, stage=STAGE, extra_stats=extra, duration_s=time.time() - t0)


def _check_models(cfg: BlipConfig) -> None:
    for key, path in (("blip.pretrained", cfg.pretrained), ("blip.filter_pretrained", cfg.filter_pretrained)):
        local = path and (path.startswith((".", "/", "~")) or Path(path).exists())
        if local and not Path(path).expanduser().is_dir():
            raise InputError(f"{key}: model directory not found: {path}")


def _totals(out: Path, shards: list[int]) -> dict:
    totals: Counter = Counter()
    quality: Counter = Counter()
    reasons: Counter = Counter()
    for s in shards:
        st = sh.read_stats(out, s)
        totals.update({k: st.get(k, 0) for k in ("count", "kept", "dropped", "chosen_original", "chosen_synthetic")})
        quality.update(st.get("quality", {}))
        reasons.update(st.get("reason_counts", {}))
    count = totals["count"]
    result = dict(totals) | {"kept_fraction": totals["kept"] / count if count else 0.0, "reason_counts": dict(reasons)}
    return result | {"quality": filter_quality(quality)}


def filter_quality(q: dict) -> dict:
    """Precision / recall of noise detection from tp/fp/fn/tn counts ({} without labels)."""
    tp, fp, fn, tn = (q.get(k, 0) for k in ("tp", "fp", "fn", "tn"))
    if tp + fp + fn + tn == 0:
        return {}
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "accuracy": (tp + tn) / (tp + fp + fn + tn),
        "labelled": tp + fp + fn + tn,
    }


# ------------------------------------------------------------------------------------ pictures


def _read_parquets(out: Path, shards: list[int]) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for s in shards:
        rows += pq.read_table(sh.parquet_path(out, s)).to_pylist()
    return rows


def score_histogram(rows: list[dict], threshold: float):
    """Original vs synthetic caption scores, the threshold marked; a PIL image."""
    from vlm import plots

    fig, ax = plots.figure((6, 3.5))
    bins = [i / 40 for i in range(41)]
    orig = [r["original_score"] for r in rows if r.get("original_score") is not None]
    syn = [r["synthetic_score"] for r in rows if r.get("synthetic_score") is not None]
    if any("noisy" in r and r["noisy"] is not None for r in rows):
        clean = [r["original_score"] for r in rows if r.get("original_score") is not None and not r.get("noisy")]
        noisy = [r["original_score"] for r in rows if r.get("original_score") is not None and r.get("noisy")]
        ax.hist(clean, bins=bins, alpha=0.6, label=f"web caption, correct ({len(clean)})")
        ax.hist(noisy, bins=bins, alpha=0.6, label=f"web caption, known noisy ({len(noisy)})")
    else:
        ax.hist(orig, bins=bins, alpha=0.6, label=f"web caption ({len(orig)})")
    ax.hist(syn, bins=bins, alpha=0.5, histtype="step", linewidth=2, label=f"synthetic caption ({len(syn)})")
    ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xlabel("ITM score P(match)")
    ax.set_ylabel("samples")
    ax.set_title("CapFilt filter scores")
    ax.legend(fontsize=8)
    return plots.to_image(fig)


def gallery(out: Path, shards: list[int], limit: int):
    """Images with their web caption, synthetic caption(s) and scores; kept and dropped mixed."""
    from PIL import Image

    from vlm.data.contact_sheet import contact_sheet

    picked = []
    for s in shards:
        for where in (out, out / "_dropped"):
            if not sh.tar_path(where, s).is_file():
                continue
            for key, files in sorted(sh.read_tar_samples(sh.tar_path(where, s)).items())[: limit // 2]:
                meta = json.loads(files["json"]).get(STAGE, {})
                lines = []
                for c in meta.get("candidates", []):
                    mark = "+" if c["kept"] else "x"
                    lines.append(f"{mark}{c['score']:.2f} {'web' if c['source'] == 'original' else 'syn'}: {c['text']}")
                status = "kept" if where == out else f"DROPPED ({meta.get('reason', '')})"
                image = Image.open(io.BytesIO(_image_bytes(files)))
                picked.append((image, " | ".join(lines) or meta.get("reason", ""), f"{key} {status}"[:40]))
        if len(picked) >= limit:
            break
    if not picked:
        return None
    return contact_sheet(picked[:limit], cols=6, tile=150, caption_lines=6)


# ------------------------------------------------------------------------------------ the stage


def capfilt(
    input_dir: str | Path,
    output: str | Path,
    cfg: CapfiltConfig,
    *,
    address: str | None = None,
    show_progress: bool = True,
) -> dict:
    """Run CapFilt over the shards in `input_dir`, writing `output`. Returns the manifest."""
    from vlm import tracking
    from vlm.runtime import init_ray

    in_dir, out = Path(input_dir), Path(output)
    shards = input_shards(in_dir)
    _check_models(cfg.blip)
    chash = config_hash(cfg, exclude=("tracking", "captioner", "filter"))
    previous = sh.read_manifest(out) or {}
    plan_file = out / "_capfilt_plan.json"
    if plan_file.is_file():
        planned = json.loads(plan_file.read_text())
        if planned.get("config_hash") != chash or planned.get("input") != str(in_dir.resolve()):
            raise InputError(f"{out} holds CapFilt output of another config or input; use a new --output or delete it")
    where = init_ray(address, dashboard=False)
    out.mkdir(parents=True, exist_ok=True)
    write_config(cfg, out / "config.yaml")
    sh.atomic_write_json(plan_file, {"config_hash": chash, "input": str(in_dir.resolve()), "shards": shards})
    todo = [s for s in shards if not sh.is_complete(out, s)]
    threshold = cfg.blip.itm_threshold
    t0 = time.time()
    with tracking.start_run(
        cfg.tracking.experiment,
        cfg.tracking.run_name or f"capfilt-{out.name}",
        tags={"stage": STAGE, "input": str(in_dir.resolve()), "output": str(out.resolve())},
    ) as run:
        if run:
            run.log_config(cfg)
            run.log_params({"num_shards": len(shards), "config_hash": chash, "where": where})
        images = 0
        if todo:
            sh.clear_success(out)
            images = _process(in_dir, out, todo, cfg, threshold, show_progress)
        elapsed = time.time() - t0
        missing = [s for s in shards if not sh.is_complete(out, s)]
        if missing:
            raise RuntimeError(f"capfilt finished with incomplete shards: {missing[:10]}")
        totals = _totals(out, shards)
        manifest = {
            "stage": STAGE,
            "config_hash": chash,
            "inputs": [
                {"path": str(in_dir.resolve()), "manifest": (sh.read_manifest(in_dir) or {}).get("config_hash")}
            ],
            "shards": [f"{sh.shard_name(s)}.tar" for s in shards],
            "num_shards": len(shards),
            "totals": {k: v for k, v in totals.items() if k != "quality"},
            "quality": totals["quality"],
            "mlflow_run_id": run.run_id if run else previous.get("mlflow_run_id"),
        }
        sh.write_success(out, manifest)
        if run:
            metrics = {
                "kept": totals["kept"],
                "dropped": totals["dropped"],
                "kept_fraction": totals["kept_fraction"],
                "chosen_original": totals.get("chosen_original", 0),
                "chosen_synthetic": totals.get("chosen_synthetic", 0),
                "duration_s": elapsed,
                **{f"dropped/{k}": v for k, v in totals["reason_counts"].items()},
                **{f"filter_{k}": v for k, v in totals["quality"].items()},
            }
            if images:
                metrics["images_per_s"] = images / elapsed
            run.log_metrics(metrics)
            run.log_dict(manifest, "manifest.json")
            rows = _read_parquets(out, shards)
            run.log_image(score_histogram(rows, threshold), "score_histogram.png")
            sheet = gallery(out, shards, cfg.tracking.gallery_samples)
            if sheet is not None:
                run.log_image(sheet, "gallery.png")
    return manifest | {"images_per_s": images / elapsed if images else 0.0}


def _process(in_dir: Path, out: Path, todo: list[int], cfg: CapfiltConfig, threshold: float, show: bool) -> int:
    """Stream the decisions back and publish each shard as soon as all its samples are in."""
    sizes = _shard_sizes(in_dir, todo)
    pending: dict[int, dict[str, dict]] = {s: {} for s in todo if sizes[s]}
    for s in todo:
        if not sizes[s]:
            write_shard(in_dir, out, s, {}, threshold, time.time())
    progress = _Progress(sum(sizes.values()), len(todo), show)
    t0 = time.time()
    images = 0
    for batch in _dataset(in_dir, list(pending), cfg).iter_batches(batch_size=None, batch_format="numpy"):
        n = len(batch["key"])
        for i in range(n):
            s = int(batch["shard"][i])
            pending[s][str(batch["key"][i])] = {
                "synthetic": batch["synthetic"][i],
                "scores": batch["scores"][i],
                "decision": batch["decision"][i],
            }
        images += n
        finished = [s for s, got in pending.items() if len(got) >= sizes[s]]
        for s in finished:
            write_shard(in_dir, out, s, pending.pop(s), threshold, t0)
        progress.update(n, len(finished))
    progress.close()
    if pending:
        raise RuntimeError(f"capfilt: shards {sorted(pending)[:10]} did not receive all their samples")
    return images
