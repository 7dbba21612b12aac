"""Clean stage: ingest's shards -> basic filters, exact + near dedup, CLIP score -> filtered shards.

The shard-stage driver (`pipelines.shard_stage`) runs it; this module supplies the plan, the
per-shard writer and the reporting:
1. Features (Ray Data): one task per input shard reads its tar and computes every CPU step's
   per-sample features (image header, caption length, SHA-256, pHash); a model step
   (`clipscore`) then runs as a `map_batches` actor pool (`ClipScorer`, model loaded once per
   actor, `clipscore.num_gpus` each).
2. Plan (Ray tasks, `vlm.data.clean_plan`): the steps decide in YAML order over all samples in
   (shard, key) order, so global decisions (dedup keeps the first occurrence across every
   shard; top-fraction CLIP score) see the whole dataset, as distributed jobs over the feature
   blocks in the object store: the driver holds refs and counts, never the samples' records.
   Decisions go to `OUTPUT/_plan/{shard}.parquet` (the driver writes `OUTPUT/_plan/plan.json`
   last); reruns reuse the plan, so they make the same decisions.
3. Write (per shard, a Ray Data task): kept / `_dropped/` samples with
   `vlm.data.filtered_shards.write_filtered_shard` (stats last).
4. Reporting: per-step drop counts, the CLIP score histogram, dropped examples.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipelines import shard_stage
from pipelines.shard_stage import Progress
from vlm import storage
from vlm.config import to_dict
from vlm.data import clean_plan as cp
from vlm.data import cleaning as cl
from vlm.data import filtered_shards as fs
from vlm.data import shards as sh
from vlm.errors import InputError
from vlm.tracking import TrackingConfig, tracking_defaults

STAGE = "clean"
_CLIP_RUNTIME_FIELDS = ("batch_size", "concurrency", "num_gpus", "num_cpus")  # how fast, not what


@dataclass
class CleanRayConfig:
    concurrency: int | None = None  # shard tasks in flight (features, writing); null: the cluster's CPUs
    num_cpus_per_task: float = 1.0  # CPUs reserved per shard task


@dataclass
class CleanConfig:
    steps: list[str] = field(default_factory=lambda: ["basic", "dedup"])  # applied in this order
    basic: cl.BasicConfig = field(default_factory=cl.BasicConfig)
    dedup: cl.DedupConfig = field(default_factory=cl.DedupConfig)
    clipscore: cl.ClipScoreConfig = field(default_factory=cl.ClipScoreConfig)
    ray: CleanRayConfig = field(default_factory=CleanRayConfig)
    tracking: TrackingConfig = field(default_factory=tracking_defaults("clean"))

    def validate(self) -> None:
        for name in self.steps:
            if name not in cl.STEPS:
                raise ValueError(f"unknown clean step '{name}' in steps; expected some of {', '.join(cl.STEPS)}")
        if len(set(self.steps)) != len(self.steps):
            raise ValueError(f"clean steps listed twice: {self.steps}")
        if "clipscore" in self.steps and not self.clipscore.checkpoint:
            raise ValueError("step clipscore needs clipscore.checkpoint (an open_clip export dir)")

    def build_steps(self) -> list[cl.Step]:
        return cl.build_steps(self.steps, {name: getattr(self, name) for name in self.steps})


def content_hash(cfg: CleanConfig) -> str:
    """Digest of what decides the output: the steps in order and their settings (not speed knobs)."""
    content: dict = {"steps": list(cfg.steps)}
    for name in cfg.steps:
        section = to_dict(getattr(cfg, name))
        if name == "clipscore":
            section = {k: v for k, v in section.items() if k not in _CLIP_RUNTIME_FIELDS}
            section["checkpoint"] = storage.normalize(section["checkpoint"])
        content[name] = section
    return shard_stage.digest(content)


# ----------------------------------------------------------------------------- features (Ray)


def _concurrency(cfg: CleanConfig, n: int) -> int:
    from vlm.runtime import cluster_cpus

    size = cfg.ray.concurrency or max(1, int(cluster_cpus() / cfg.ray.num_cpus_per_task))
    return max(1, min(size, n))


def _feature_rows(in_dir: Path, steps: list[cl.Step], keep_image: bool):
    """The per-shard feature task: one row per sample (+ image and caption for a model step)."""
    cpu_steps = [s for s in steps if not s.needs_model]

    def read(item: dict) -> list[dict]:
        rows = []
        files = sh.read_tar_samples(sh.tar_path(in_dir, item["shard"]))
        for rank, key in enumerate(sorted(files)):
            sample = cl.sample_from_files(key, files[key])
            row = {
                "id": cp.sample_id(item["shard"], rank),
                "key": key,
                "shard": item["shard"],
                "features": json.dumps(cl.sample_features(cpu_steps, sample)),
            }
            if keep_image:
                row["image"] = sample.image or b""
                row["caption"] = sample.caption or ""
            rows.append(row)
        return rows

    return read


def compute_features(in_dir: Path, shards: list[int], cfg: CleanConfig, steps: list[cl.Step], show_progress: bool):
    """Refs of blocks of feature rows (`id`, `shard`, `key`, `features`, `clip_score`) and their row counts.

    Nothing but refs and counts reaches the driver.
    """
    import ray.data

    model_steps = [s for s in steps if s.needs_model]
    ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
    ds = ds.flat_map(
        _feature_rows(in_dir, steps, keep_image=bool(model_steps)),
        num_cpus=cfg.ray.num_cpus_per_task,
        compute=ray.data.TaskPoolStrategy(size=_concurrency(cfg, len(shards))),
    )
    if model_steps:  # clipscore is the one model-bearing step
        c = cfg.clipscore
        ds = ds.map_batches(
            cl.ClipScorer.bound(storage.normalize(c.checkpoint), c.preset),
            batch_size=c.batch_size,
            batch_format="numpy",
            num_cpus=c.num_cpus,
            num_gpus=c.num_gpus,
            compute=ray.data.ActorPoolStrategy(size=c.concurrency),
        )
        ds = ds.drop_columns(["image", "caption"])
    total = sum(sh.read_stats(in_dir, s).get("successes", 0) for s in shards)
    blocks, sizes = [], []
    with Progress(total, desc="clean: features", enabled=show_progress) as bar:
        for bundle in ds.iter_internal_ref_bundles():  # block refs and row counts, not rows
            blocks += bundle.block_refs
            sizes += [m.num_rows or 0 for m in bundle.metadata]
            bar.update(bundle.num_rows() or 0)
    return blocks, sizes


# ----------------------------------------------------------------------------- plan (Ray)


def _partitions(rows: int) -> int:
    from vlm.runtime import cluster_cpus

    # ~1 M rows per reduce task; past 500 partitions the tasks grow instead (maps x partitions stays
    # within exchange.MAX_REFS with ~10 M-row map tasks at LAION-5B's 5.8 B rows).
    return max(1, int(cluster_cpus()), min(500, -(-rows // 1_000_000)))


def plan(in_dir: Path, out: Path, shards: list[int], cfg: CleanConfig, *, show_progress: bool = True) -> dict:
    """Decide every sample once, over all shards in (shard, key) order; decisions go to `OUT/_plan/`."""
    t0 = time.time()
    steps = cfg.build_steps()
    blocks, sizes = compute_features(in_dir, shards, cfg, steps, show_progress)
    t_features = time.time() - t0
    partitions = _partitions(sum(sizes))
    state = cp.plan_blocks(blocks, steps, partitions=partitions, sizes=sizes, num_cpus=cfg.ray.num_cpus_per_task)
    written = cp.write_plan(state, out, shards, [s.name for s in steps], partitions=partitions)
    summary = {
        "shards": shards,
        "count": written["count"],
        "kept": written["kept"],
        "step_stats": {s.name: s.stats.to_dict() for s in steps},
        "features_s": round(t_features, 3),
    }
    if "clipscore" in cfg.steps:
        summary["clipscore_histogram"] = _histogram_summary(written["hist"], steps)
    return summary


def _histogram_summary(hist, steps: list[cl.Step]) -> dict:
    """The CLIP score histogram (fine bins over [-1, 1]) and the cutoff, for the plan file."""
    step = next(s for s in steps if s.name == "clipscore")
    nonzero = [i for i, c in enumerate(hist) if c]
    lo, hi = (nonzero[0], nonzero[-1] + 1) if nonzero else (0, 0)
    width = 2.0 / cp.HIST_BINS
    return {
        "lo": -1.0 + lo * width,
        "bin_width": width,
        "counts": [int(c) for c in hist[lo:hi]],
        "cutoff": step.cutoff if step.cfg.mode == "top_fraction" else step.cfg.threshold,
    }


# ----------------------------------------------------------------------------- write (Ray)


def write_shard(in_dir: Path, out: Path, shard: int) -> dict:
    """Write one output shard from its input shard and its planned decisions; the task body."""
    t0 = time.time()
    decisions = cp.read_plan_shard(out, shard)
    samples = []
    for item in fs.read_input_shard(in_dir, shard):
        d = decisions.get(item["key"])
        if d is None:
            raise InputError(f"input sample {item['key']} is not in the clean plan; the input changed since planning")
        item["row"]["dropped_by"] = d["dropped_by"]
        samples.append(item | {"keep": d["keep"], "reason": d["reason"], "caption": None, "meta": d["meta"]})
    step_counts = Counter(d["dropped_by"] for d in decisions.values() if d["dropped_by"])
    return fs.write_filtered_shard(
        out,
        shard,
        samples,
        stage=STAGE,
        extra_stats={"dropped_by_step": dict(sorted(step_counts.items()))},
        duration_s=time.time() - t0,
    )


# ----------------------------------------------------------------------------- the stage


class CleanStage(shard_stage.ShardDirStage):
    name = STAGE

    def check(self) -> None:
        super().check()
        if "clipscore" in self.cfg.steps:  # the actors load it; fail fast here
            cl.check_checkpoint(self.cfg.clipscore.checkpoint, self.cfg.clipscore.preset)

    def content_hash(self) -> str:
        return content_hash(self.cfg)

    def plan(self, plan_dir: Path, show_progress: bool) -> dict:
        return plan(self.in_dir, self.out, self.input_shards, self.cfg, show_progress=show_progress)

    def process_shard(self, shard: int, retry: bool = False) -> dict:
        return write_shard(self.in_dir, self.out, shard)

    def task_resources(self) -> tuple[int | None, float]:
        return self.cfg.ray.concurrency, self.cfg.ray.num_cpus_per_task

    def finish_totals(self, totals: dict, plan: dict) -> dict:
        return totals | {"step_stats": plan["step_stats"]}

    def extra_metrics(self, totals: dict) -> dict[str, float]:
        return {f"step_{name}_dropped": st["dropped"] for name, st in totals["step_stats"].items()}

    def log_artifacts(self, run, shards: list[int], manifest: dict) -> None:
        hist = storage.read_json(shard_stage.plan_path(self.out)).get("clipscore_histogram")
        if hist and hist["counts"]:
            run.log_image(score_histogram(hist), "clipscore_histogram.png")
        sheet = _dropped_sheet(self.out, shards, self.cfg.tracking.gallery_samples)
        if sheet is not None:
            run.log_image(sheet, "dropped_examples.png")

    @staticmethod
    def summary_lines(manifest: dict) -> list[str]:
        stats = manifest["totals"].get("step_stats", {})
        steps = " -> ".join(f"{name} (-{st['dropped']})" for name, st in stats.items())
        return [f"steps: {steps}"] if steps else []


clean = shard_stage.entrypoint(
    CleanStage,
    "Run the clean stage over a shard directory. Returns the manifest (this invocation's figures under `run`).",
)


def summary_table(manifest: dict) -> str:
    """The table printed when clean ends."""
    return shard_stage.summary_table(CleanStage, manifest)


# ----------------------------------------------------------------------------- reporting


def score_histogram(hist: dict, bars: int = 50):
    """A PIL image: the CLIP score distribution of the samples that reached the step, and the cutoff.

    `hist`: the plan's `clipscore_histogram` (counts in fine bins from `lo`), merged into `bars`.
    """
    import numpy as np

    from vlm import plots

    counts = np.asarray(hist["counts"], np.int64)
    merge = max(1, -(-len(counts) // bars))
    counts = np.pad(counts, (0, -len(counts) % merge)).reshape(-1, merge).sum(axis=1)
    width = hist["bin_width"] * merge
    fig, ax = plots.figure((6, 3.5))
    ax.bar(hist["lo"] + width * np.arange(len(counts)), counts, width=width, align="edge", color="#4c72b0")
    cutoff = hist.get("cutoff")
    if cutoff is not None:
        ax.axvline(cutoff, color="#c44e52", linestyle="--", label=f"cutoff {cutoff:.3f}")
        ax.legend()
    ax.set_xlabel("CLIP image-text cosine")
    ax.set_ylabel("samples")
    ax.set_title(f"CLIP score ({int(counts.sum())} samples)")
    return plots.to_image(fig)


def _dropped_sheet(out: Path, shards: list[int], limit: int):
    """Dropped images captioned with their reason class, a few per reason, for auditing."""
    import io

    from PIL import Image

    from vlm.data.contact_sheet import contact_sheet

    if limit <= 0:
        return None
    per_reason: Counter = Counter()
    samples = []
    dropped_dir = sh.at(out, fs.DROPPED_DIR)
    for shard in shards:
        if len(samples) >= limit or not storage.is_file(sh.tar_path(dropped_dir, shard)):
            continue
        for key, files in sorted(sh.read_tar_samples(sh.tar_path(dropped_dir, shard)).items()):
            reason = json.loads(files.get("json", b"{}")).get(STAGE, {}).get("reason", "")
            cls = fs.reason_class(reason)
            image = next((files[e] for e in cl.IMAGE_EXTS if e in files), None)
            if image is None or per_reason[cls] >= max(1, limit // 4):
                continue
            try:
                img = Image.open(io.BytesIO(image)).convert("RGB")
            except Exception:
                continue
            per_reason[cls] += 1
            caption = files.get("txt", b"").decode("utf-8", "replace")
            samples.append((img, f"{reason} | {caption!r}", key))
            if len(samples) >= limit:
                break
    return contact_sheet(samples) if samples else None
