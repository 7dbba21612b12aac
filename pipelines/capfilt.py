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

The shard-stage driver (`pipelines.shard_stage`) runs the stage; its Ray Data map of one task per
shard is replaced here by the actor-pool pipeline above (`CapfiltStage.execute`), since the
models must load once per actor, not once per shard. `CapfiltStage.process_shard` runs the same
steps on one shard in-process, without Ray.

When the input carries known noise labels (the `noisy` column of the demo's local web), the
stage also measures the filter: precision and recall of "the web caption is dropped" against them.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipelines import shard_stage
from vlm import storage
from vlm.config import config_hash, to_dict
from vlm.data import shards as sh
from vlm.data.capfilt import filter_quality
from vlm.data.filtered_shards import read_input_shard, write_filtered_shard
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
        for s in read_input_shard(in_dir, shard)
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


# ------------------------------------------------------------------------------------ pictures


def _read_parquets(out: Path, shards: list[int]) -> list[dict]:
    rows = []
    for s in shards:
        rows += sh.read_parquet(sh.parquet_path(out, s)).to_pylist()
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
        for where in (out, sh.at(out, "_dropped")):
            if not storage.is_file(sh.tar_path(where, s)):
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


def _results(batch: dict) -> dict[str, dict]:
    """`{key: {"shard", "synthetic", "scores", "decision"}}` of a batch of decisions."""
    return {
        str(batch["key"][i]): {
            "shard": int(batch["shard"][i]),
            "synthetic": batch["synthetic"][i],
            "scores": batch["scores"][i],
            "decision": batch["decision"][i],
        }
        for i in range(len(batch["key"]))
    }


class CapfiltStage(shard_stage.ShardDirStage):
    name = STAGE

    def check(self) -> None:
        super().check()
        _check_models(self.cfg.blip)

    def content_hash(self) -> str:
        # The pools (captioner/filter sections) say how fast, not what.
        return config_hash(self.cfg, exclude=("tracking", "captioner", "filter"))

    def process_shard(self, shard: int, retry: bool = False) -> dict:
        """Caption, score and write one shard in this process (no Ray; models load on first use)."""
        import numpy as np

        from vlm.data.capfilt import CaptionerStep, FilterStep

        if not hasattr(self, "_steps"):
            blip = to_dict(self.cfg.blip)
            self._steps = (CaptionerStep(blip), FilterStep(blip))
        t0 = time.time()
        rows = _read_rows({"shard": shard}, str(self.in_dir))
        results: dict[str, dict] = {}
        size = self.cfg.filter.batch_size
        for i in range(0, len(rows), size):
            chunk = rows[i : i + size]
            batch = {k: np.array([r[k] for r in chunk], dtype=object) for k in chunk[0]}
            for step in self._steps:
                batch = step(batch)
            results.update(_results(batch))
        return write_shard(self.in_dir, self.out, shard, results, self.cfg.blip.itm_threshold, t0)

    def execute(self, todo: list[tuple[int, bool]], plan: dict, bar: shard_stage.Progress) -> list[dict]:
        """Stream the decisions back from the actor pools; publish each shard once all its samples are in."""
        shards = [s for s, _ in todo]
        threshold = self.cfg.blip.itm_threshold
        sizes = _shard_sizes(self.in_dir, shards)
        stats = [write_shard(self.in_dir, self.out, s, {}, threshold, time.time()) for s in shards if not sizes[s]]
        pending: dict[int, dict[str, dict]] = {s: {} for s in shards if sizes[s]}
        t0 = time.time()
        for batch in _dataset(self.in_dir, list(pending), self.cfg).iter_batches(batch_size=None, batch_format="numpy"):
            for key, result in _results(batch).items():
                pending[result["shard"]][key] = result
            finished = [s for s, got in pending.items() if len(got) >= sizes[s]]
            for s in finished:
                stats.append(write_shard(self.in_dir, self.out, s, pending.pop(s), threshold, t0))
            bar.update(len(batch["key"]), shards=len(finished))
        if pending:
            raise RuntimeError(f"capfilt: shards {sorted(pending)[:10]} did not receive all their samples")
        return stats

    def finish_totals(self, totals: dict, plan: dict) -> dict:
        return totals | {"quality": filter_quality(totals.get("quality", {}))}

    def extra_metrics(self, totals: dict) -> dict[str, float]:
        metrics = {k: totals.get(k, 0) for k in ("chosen_original", "chosen_synthetic")}
        return metrics | {f"filter_{k}": v for k, v in totals["quality"].items()}

    def log_artifacts(self, run, shards: list[int], manifest: dict) -> None:
        rows = _read_parquets(self.out, shards)
        run.log_image(score_histogram(rows, self.cfg.blip.itm_threshold), "score_histogram.png")
        sheet = gallery(self.out, shards, self.cfg.tracking.gallery_samples)
        if sheet is not None:
            run.log_image(sheet, "gallery.png")

    @staticmethod
    def summary_lines(manifest: dict) -> list[str]:
        t, q = manifest["totals"], manifest["totals"]["quality"]
        lines = [f"chosen caption: web {t.get('chosen_original', 0)}, synthetic {t.get('chosen_synthetic', 0)}"]
        if q:
            lines.append(
                f"filter vs known noise labels: precision {q['precision']:.3f}, recall {q['recall']:.3f} "
                f"({q['labelled']} labelled samples)"
            )
        return lines


def _shard_sizes(in_dir: Path, shards: list[int]) -> dict[int, int]:
    import tarfile

    sizes = {}
    for s in shards:
        if storage.is_url(in_dir):  # one sequential read; the shard is read whole next anyway
            sizes[s] = len(sh.read_tar_samples(sh.tar_path(in_dir, s)))
            continue
        with tarfile.open(sh.tar_path(in_dir, s)) as tar:
            sizes[s] = len({m.name.rsplit(".", 1)[0] for m in tar.getmembers() if m.isfile()})
    return sizes


capfilt = shard_stage.entrypoint(
    CapfiltStage,
    "Run CapFilt over the shards in a shard directory. Returns the manifest (this invocation's figures under `run`).",
)


def summary_table(manifest: dict) -> str:
    """The table printed when capfilt ends."""
    return shard_stage.summary_table(CapfiltStage, manifest)
