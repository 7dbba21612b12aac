"""Ingest stage: URL lists -> WebDataset shards + parquet + stats, as a Ray Data job.

1. Plan (driver, streaming): read the input in record batches, drop exact duplicate URLs, and
   cut the rows into shard input files `_work/inputs/{shard}.parquet`; keys follow the input
   order, so they are the same on every run. The plan is reused by reruns.
2. Fetch (Ray Data): one task per incomplete shard runs `download_shard` (many connections,
   decode on threads) and publishes the shard with its stats file last.
3. Finish: `_SUCCESS` + `manifest.json`, an MLflow run with counts, rates and a contact sheet,
   and a summary table.
A rerun skips complete shards and redoes incomplete ones; `--retry-failed` redoes only the
samples whose failure was retryable (timeouts, resets, 5xx, 429), keeping everything else.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vlm.config import config_hash, to_dict, write_config
from vlm.data import download as dl
from vlm.data import shards as sh
from vlm.data.download import DownloadConfig
from vlm.data.images import ImageConfig
from vlm.data.urls import InputConfig, check_inputs, expand_inputs, file_digest, iter_rows
from vlm.errors import InputError
from vlm.tracking import TrackingConfig, tracking_defaults

WORK_DIR = "_work"
PLAN_FILE = "plan.json"


@dataclass
class OutputConfig:
    samples_per_shard: int = 10_000

    def validate(self) -> None:
        if not 1 <= self.samples_per_shard <= 10_000:
            raise ValueError("output.samples_per_shard must be in 1..10000 (keys hold 4 index digits)")


@dataclass
class RayConfig:
    concurrency: int | None = None  # shards in flight at once; null: the cluster's CPU count
    num_cpus_per_shard: float = 1.0  # CPUs reserved per shard task
    decode_threads: int = 2  # decode/resize threads per shard task


@dataclass
class IngestConfig:
    input: InputConfig = field(default_factory=InputConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=tracking_defaults("ingest"))


def content_hash(cfg: IngestConfig) -> str:
    """Digest of the settings that decide what the output contains (not how fast it is made)."""
    d = cfg.download
    content = {
        # batch_rows is read speed; max_bad_row_fraction only decides whether a run starts (the
        # rows it skips are skipped whatever the limit), so neither changes the output.
        "input": to_dict(cfg.input) | {"batch_rows": None, "max_bad_row_fraction": None},
        "image": to_dict(cfg.image),
        "samples_per_shard": cfg.output.samples_per_shard,
        "optout": [d.respect_optouts, sorted(d.disallowed_header_directives), d.user_agent_token],
        "allow_private_networks": d.allow_private_networks,
        "max_bytes": d.max_bytes,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- planning


def _url_digest(url: str) -> int:
    return int.from_bytes(hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _write_shard_input(work: Path, shard: int, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "key": [r["key"] for r in rows],
            "url": [r["url"] for r in rows],
            "caption": pa.array([r["caption"] for r in rows], pa.string()),
            "status": pa.array([r["status"] for r in rows], pa.string()),
            "error_message": pa.array([r["error_message"] for r in rows], pa.string()),
            "extra": [json.dumps(r["extra"], default=str) for r in rows],
        }
    )
    path = work / f"{sh.shard_name(shard)}.parquet"
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def plan(out: Path, paths: list[Path], cfg: IngestConfig) -> dict:
    """Cut the input into shard input files (or reuse a matching plan). Returns the plan."""
    work = out / WORK_DIR / "inputs"
    plan_path = out / WORK_DIR / PLAN_FILE
    fingerprint = {
        "content_hash": content_hash(cfg),
        "inputs": [file_digest(p) for p in paths],
    }
    if plan_path.is_file():
        existing = json.loads(plan_path.read_text())
        if {k: existing.get(k) for k in fingerprint} == fingerprint:
            return existing
        if sh.complete_shards(out):
            raise InputError(
                f"output {out} holds shards of a different input or config; use a new --output "
                "(or delete it to start over)"
            )
    elif sh.complete_shards(out):
        raise InputError(f"output {out} holds shards but no ingest plan; use a new --output")
    work.mkdir(parents=True, exist_ok=True)
    per_shard = cfg.output.samples_per_shard
    seen: set[int] = set()
    buf: list[dict] = []
    shard = total = dups = 0
    rows = iter_rows(paths, cfg.input)
    for batch in rows:
        for row in batch:
            url = row["url"] or ""
            status = error = None
            digest = _url_digest(url)
            if url and digest in seen:
                status, error = dl.SKIPPED_DUPLICATE, "duplicate url in input"
                dups += 1
            else:
                seen.add(digest)
            buf.append(
                {
                    "key": sh.sample_key(shard, len(buf)),
                    "url": url,
                    "caption": row["caption"],
                    "status": status,
                    "error_message": error,
                    "extra": row["extra"],
                }
            )
            total += 1
            if len(buf) == per_shard:
                _write_shard_input(work, shard, buf)
                shard += 1
                buf = []
    if buf:
        _write_shard_input(work, shard, buf)
        shard += 1
    if total == 0:
        raise InputError(f"input holds no rows: {', '.join(str(p) for p in paths)}")
    result = fingerprint | {
        "num_shards": shard,
        "num_rows": total,
        "duplicates": dups,
        "skipped_rows": rows.skipped_rows,
        "skipped_lines": [f"{p}:{line}" for p, line in rows.skipped_lines],
        "truncated_captions": rows.truncated_captions,
    }
    sh.atomic_write_json(plan_path, result)
    return result


def read_shard_input(out: Path, shard: int) -> list[dict]:
    import pyarrow.parquet as pq

    rows = pq.read_table(out / WORK_DIR / "inputs" / f"{sh.shard_name(shard)}.parquet").to_pylist()
    for row in rows:
        row["extra"] = json.loads(row["extra"])
    return rows


# ----------------------------------------------------------------------------- per shard (Ray worker)


def _retry_reuse(out: Path, shard: int) -> dict:
    """Samples of a complete shard to keep as they are: all but the retryable failures."""
    import pyarrow.parquet as pq

    rows = pq.read_table(sh.parquet_path(out, shard)).to_pylist()
    files = sh.read_tar_samples(sh.tar_path(out, shard))
    return {
        r["key"]: (r, files.get(r["key"], {}))
        for r in rows
        if not (r["status"] == dl.FAILED_TO_DOWNLOAD and r.get("retryable"))
    }


def shard_has_retryable(out: Path, shard: int) -> bool:
    import pyarrow.parquet as pq

    table = pq.read_table(sh.parquet_path(out, shard), columns=["status", "retryable"])
    return any(
        s == dl.FAILED_TO_DOWNLOAD and r for s, r in zip(table["status"].to_pylist(), table["retryable"].to_pylist())
    )


def run_shard(out: Path, shard: int, cfg: IngestConfig, retry: bool, progress_actor=None) -> dict:
    """Process one shard end to end; the body of each Ray Data task."""
    items = read_shard_input(out, shard)
    reuse = None
    if retry and sh.is_complete(out, shard):
        reuse = _retry_reuse(out, shard)
        sh.stats_path(out, shard).unlink()  # incomplete from here until republished
    elif not sh.is_complete(out, shard):
        sh.remove_shard(out, shard)  # leftovers of an interrupted run
    report = None
    if progress_actor is not None:
        report = lambda counts: progress_actor.add.remote(counts)  # noqa: E731
    from vlm.data.shard_download import download_shard

    return download_shard(
        out, shard, items, cfg.download, cfg.image, decode_threads=cfg.ray.decode_threads, reuse=reuse, progress=report
    )


# ----------------------------------------------------------------------------- driver


def _progress_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Progress:
        def __init__(self):
            self.counts: Counter = Counter()

        def add(self, counts: dict) -> None:
            self.counts.update(counts)

        def get(self) -> dict:
            return dict(self.counts)

    return Progress.remote()


def _run_shards(out: Path, todo: list[tuple[int, bool]], cfg: IngestConfig, total_todo: int, show_progress: bool):
    """Run shard tasks on Ray Data, drawing a per-sample progress bar. Returns stats list."""
    import ray
    import ray.data
    from tqdm import tqdm

    from vlm.runtime import cluster_cpus

    actor = _progress_actor()
    concurrency = cfg.ray.concurrency or max(1, int(cluster_cpus() / cfg.ray.num_cpus_per_shard))
    concurrency = min(concurrency, len(todo))

    def task(row: dict) -> dict:
        stats = run_shard(out, row["shard"], cfg, row["retry"], actor)
        return {"stats": json.dumps(stats)}

    ds = ray.data.from_items([{"shard": s, "retry": r} for s, r in todo], override_num_blocks=len(todo))
    ds = ds.map(
        task,
        num_cpus=cfg.ray.num_cpus_per_shard,
        compute=ray.data.TaskPoolStrategy(size=concurrency),
    )

    results: list[dict] = []
    error: list[BaseException] = []

    def consume() -> None:
        try:
            for row in ds.iter_rows():
                results.append(json.loads(row["stats"]))
        except BaseException as exc:  # re-raised in the driver thread
            error.append(exc)

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    bar = tqdm(total=total_todo, unit="img", desc="ingest", disable=not show_progress, file=sys.stderr, smoothing=0.1)
    done = 0
    while worker.is_alive():
        worker.join(timeout=0.5)
        try:
            counts = ray.get(actor.get.remote(), timeout=5)
        except Exception:
            continue
        n = sum(counts.values())
        if n > done:
            bar.update(n - done)
            done = n
        ok = counts.get(dl.SUCCESS, 0)
        bar.set_postfix(ok=f"{100 * ok / max(n, 1):.0f}%", shards=f"{len(results)}/{len(todo)}", refresh=False)
    bar.update(max(0, total_todo - done) if not error else 0)
    bar.close()
    ray.kill(actor)
    if error:
        raise error[0]
    return results


def _totals(out: Path, num_shards: int) -> dict:
    status: Counter = Counter()
    errors: Counter = Counter()
    nbytes = 0
    for shard in range(num_shards):
        stats = sh.read_stats(out, shard)
        status.update(stats["status_counts"])
        errors.update(stats["error_counts"])
        nbytes += stats["bytes"]
    count = sum(status.values())
    return {
        "count": count,
        "successes": status.get(dl.SUCCESS, 0),
        "success_rate": status.get(dl.SUCCESS, 0) / max(count, 1),
        "status_counts": dict(sorted(status.items())),
        "error_counts": dict(errors.most_common(20)),
        "bytes": nbytes,
    }


def ingest(
    input_spec: str | list[str],
    output: str | Path,
    cfg: IngestConfig,
    *,
    retry_failed: bool = False,
    address: str | None = None,
    show_progress: bool = True,
    parent_run_id: str | None = None,
) -> dict:
    """Run the ingest stage. Returns the manifest (with this invocation's throughput added)."""
    from vlm import tracking
    from vlm.runtime import init_ray

    paths = expand_inputs(input_spec)
    check_inputs(paths, cfg.input)
    where = init_ray(address, dashboard=False)  # before writing anything: a bad address leaves no trace
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    the_plan = plan(out, paths, cfg)
    n = the_plan["num_shards"]
    write_config(cfg, out / "config.yaml")

    complete = set(sh.complete_shards(out))
    todo = [(s, False) for s in range(n) if s not in complete]
    if retry_failed:
        todo += [(s, True) for s in sorted(complete) if s < n and shard_has_retryable(out, s)]
    todo.sort()

    t0 = time.time()
    with tracking.start_run(
        cfg.tracking.experiment,
        cfg.tracking.run_name or f"ingest-{out.name}",
        tags={"stage": "ingest", "output": str(out.resolve()), "retry_failed": retry_failed},
        parent_run_id=parent_run_id,
    ) as run:
        if run:
            run.log_config(cfg)
            run.log_params({"input_files": len(paths), "num_shards": n, "content_hash": the_plan["content_hash"]})
        new_stats: list[dict] = []
        if todo:
            sh.clear_success(out)
            total_todo = 0
            for s, _retry in todo:
                total_todo += (
                    cfg.output.samples_per_shard
                    if s < n - 1
                    else the_plan["num_rows"] - s * cfg.output.samples_per_shard
                )
            new_stats = _run_shards(out, todo, cfg, total_todo, show_progress)
        elapsed = time.time() - t0
        missing = [s for s in range(n) if not sh.is_complete(out, s)]
        if missing:
            raise RuntimeError(f"ingest finished with incomplete shards: {missing[:10]}")
        totals = _totals(out, n)
        fetched_ok = sum(st["fetched_successes"] for st in new_stats)
        run_metrics = {
            "images_per_s": fetched_ok / elapsed if new_stats else 0.0,
            "duration_s": elapsed,
            "shards_processed": len(new_stats),
        }
        manifest = {
            "stage": "ingest",
            "config_hash": config_hash(cfg, exclude=("ray", "tracking")),
            "content_hash": the_plan["content_hash"],
            "inputs": the_plan["inputs"],
            "shards": [f"{sh.shard_name(s)}.tar" for s in range(n)],
            "num_shards": n,
            "totals": totals
            | {
                "input_rows_skipped": the_plan.get("skipped_rows", 0),
                "captions_truncated": the_plan.get("truncated_captions", 0),
            },
            "mlflow_run_id": run.run_id if run else None,
        }
        sh.write_success(out, manifest)
        if run:
            metrics = {
                "success_rate": totals["success_rate"],
                "samples": totals["count"],
                "successes": totals["successes"],
                "bytes": totals["bytes"],
                "input_rows_skipped": the_plan.get("skipped_rows", 0),
                "captions_truncated": the_plan.get("truncated_captions", 0),
                **{f"count_{k}": v for k, v in totals["status_counts"].items()},
                **run_metrics,
            }
            run.log_metrics(metrics)
            run.log_dict(manifest, "manifest.json")
            sheet = _contact_sheet(out, n, cfg.tracking.gallery_samples)
            if sheet is not None:
                run.log_image(sheet, "contact_sheet.png")
    return manifest | {"run": run_metrics, "where": where}


def _contact_sheet(out: Path, num_shards: int, limit: int):
    import io

    from PIL import Image

    from vlm.data.contact_sheet import contact_sheet

    samples = []
    for shard in range(num_shards):
        if len(samples) >= limit:
            break
        for key, files in sorted(sh.read_tar_samples(sh.tar_path(out, shard)).items()):
            ext = next((e for e in files if e in ("jpg", "png", "webp")), None)
            if ext is None:
                continue
            img = Image.open(io.BytesIO(files[ext]))
            samples.append((img, files.get("txt", b"").decode("utf-8", "replace"), key))
            if len(samples) >= limit:
                break
    return contact_sheet(samples) if samples else None


def summary_table(manifest: dict) -> str:
    """The table printed when ingest ends."""
    totals = manifest["totals"]
    count = max(totals["count"], 1)
    lines = [f"{'status':<22}{'count':>10}{'share':>9}"]
    lines.append("-" * 41)
    for status, value in sorted(totals["status_counts"].items(), key=lambda kv: -kv[1]):
        lines.append(f"{status:<22}{value:>10}{100 * value / count:>8.1f}%")
    lines.append("-" * 41)
    lines.append(f"{'total':<22}{totals['count']:>10}")
    if totals.get("input_rows_skipped"):
        lines.append(
            f"input rows skipped (not UTF-8): {totals['input_rows_skipped']} (lines listed in _work/plan.json)"
        )
    if totals.get("captions_truncated"):
        lines.append(f"captions truncated to input.max_caption_chars: {totals['captions_truncated']}")
    run = manifest.get("run", {})
    if run.get("shards_processed"):
        lines.append(
            f"throughput: {run['images_per_s']:.1f} images/s over {run['duration_s']:.1f}s "
            f"({run['shards_processed']} shard(s) processed)"
        )
    else:
        lines.append("nothing to do: every shard was already complete")
    if totals["error_counts"]:
        lines.append("top errors:")
        for err, value in list(totals["error_counts"].items())[:8]:
            lines.append(f"  {value:>6}  {err}")
    return "\n".join(lines)
