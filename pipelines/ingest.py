"""Ingest stage: URL lists -> WebDataset shards + parquet + stats, as a Ray Data job.

The shard-stage driver (`pipelines.shard_stage`) runs it; this module supplies:
1. Plan: the driver streams the input in record batches and cuts the rows into shard input
   files `_plan/inputs/{shard}.parquet` (with each URL's digest); keys follow the input order,
   so they are the same on every run. Then a Ray job (`mark_duplicate_urls`, a hash exchange)
   marks every URL seen earlier in the input as a duplicate, rewriting only the shard inputs
   that hold one: the driver's memory does not grow with the rows. Reruns reuse the plan.
2. Fetch (per shard, a Ray Data task): `download_shard` (many connections, decode on threads)
   publishes the shard with its stats file last.
3. Reporting: counts by status, success rate, bytes, a contact sheet.
A rerun skips complete shards and redoes incomplete ones; `--retry-failed` redoes only the
samples whose failure was retryable (timeouts, resets, 5xx, 429), keeping everything else.

Inputs and output may be local paths or object-store URLs (`s3://bucket/laion/part-*.parquet`
-> `s3://bucket/laion-256`): URL lists, the plan's shard inputs and the shards themselves are
read and written through `vlm.storage`, so no node needs a shared directory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from pipelines import shard_stage
from vlm import storage
from vlm.config import to_dict
from vlm.data import download as dl
from vlm.data import shards as sh
from vlm.data.download import DownloadConfig
from vlm.data.images import ImageConfig
from vlm.data.urls import InputConfig, check_inputs, expand_inputs, file_digest, iter_rows
from vlm.errors import InputError
from vlm.tracking import TrackingConfig, tracking_defaults

INPUTS_DIR = "inputs"  # under the plan dir: one parquet of input rows per shard
DIGEST = "url_digest"  # shard-input column: the URL's 8-byte digest (null: no URL), read by the dedup job
_INPUT_COLUMNS = ("key", "url", "caption", "status", "error_message", "extra")  # what a shard task reads
# Rows per task of the duplicate-URL job (16 bytes each in a block; ~60 in a reduce's group-by).
_MAX_ROWS_PER_TASK = 4_000_000
_MIN_ROWS_PER_TASK = 100_000


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
    return shard_stage.digest(
        {
            # batch_rows is read speed; max_bad_row_fraction only decides whether a run starts (the
            # rows it skips are skipped whatever the limit), so neither changes the output.
            "input": to_dict(cfg.input) | {"batch_rows": None, "max_bad_row_fraction": None},
            "image": to_dict(cfg.image),
            "samples_per_shard": cfg.output.samples_per_shard,
            "optout": [d.respect_optouts, sorted(d.disallowed_header_directives), d.user_agent_token],
            "allow_private_networks": d.allow_private_networks,
            "max_bytes": d.max_bytes,
        }
    )


# ----------------------------------------------------------------------------- planning


def _url_digest(url: str) -> int:
    return int.from_bytes(hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _input_path(work: Path | str, shard: int) -> Path | str:
    return sh.at(work, f"{sh.shard_name(shard)}.parquet")


def _write_shard_input(work: Path | str, shard: int, rows: list[dict]) -> None:
    import pyarrow as pa

    table = pa.table(
        {
            "key": [r["key"] for r in rows],
            "url": [r["url"] for r in rows],
            "caption": pa.array([r["caption"] for r in rows], pa.string()),
            "status": pa.array([None] * len(rows), pa.string()),
            "error_message": pa.array([None] * len(rows), pa.string()),
            "extra": [json.dumps(r["extra"], default=str) for r in rows],
            DIGEST: pa.array([r["digest"] for r in rows], pa.uint64()),
        }
    )
    sh.write_parquet(_input_path(work, shard), table)


def cut_inputs(plan_dir: Path | str, paths: list[Path | str], cfg: IngestConfig) -> dict:
    """Cut the input rows into shard input files under `plan_dir`, then mark duplicate URLs.

    The cut streams (one shard's rows in memory); the duplicates are found by a Ray job over
    the written files (`mark_duplicate_urls`), so the driver's memory does not grow with the rows.
    """
    work = sh.at(plan_dir, INPUTS_DIR)
    storage.makedirs(work)
    per_shard = cfg.output.samples_per_shard
    buf: list[dict] = []
    shard = total = 0
    rows = iter_rows(paths, cfg.input)
    for batch in rows:
        for row in batch:
            url = row["url"] or ""
            buf.append(
                {
                    "key": sh.sample_key(shard, len(buf)),
                    "url": url,
                    "caption": row["caption"],
                    "extra": row["extra"],
                    "digest": _url_digest(url) if url else None,  # no URL: never a duplicate
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
    return {
        "shards": list(range(shard)),
        "num_rows": total,
        "duplicates": mark_duplicate_urls(work, list(range(shard)), per_shard, total),
        "skipped_rows": rows.skipped_rows,
        "skipped_lines": [f"{p}:{line}" for p, line in rows.skipped_lines],
        "truncated_captions": rows.truncated_captions,
    }


# ----------------------------------------------------------------------------- duplicate URLs (Ray job)


def _tasks_for(rows: int, cpus: int) -> int:
    """Tasks for one step of the dedup job: a task per MAX rows, and the cluster's CPUs in use
    once there are MIN rows per task (a small input stays a handful of tasks: issue 19's fixed cost)."""
    return max(1, -(-rows // _MAX_ROWS_PER_TASK), min(cpus, -(-rows // _MIN_ROWS_PER_TASK)))


def _digest_block(shards: list[int], work: Path | str, per_shard: int):
    """One block of the dedup job: (url_digest, order) of the rows of `shards` that have a URL;
    order = shard * per_shard + row, the input order."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from vlm.data.exchange import concat

    parts = []
    for shard in shards:
        digest = sh.read_parquet(_input_path(work, shard), columns=[DIGEST]).column(DIGEST).combine_chunks()
        order = pa.array(np.arange(len(digest), dtype=np.int64) + shard * per_shard)
        parts.append(pa.table({DIGEST: digest, "order": order}).filter(pc.is_valid(digest)))
    return concat(parts)


def _with_shard(table, per_shard: int):
    import pyarrow as pa

    return table.append_column("shard", pa.array(table.column("order").to_numpy() // per_shard))


def _mark_in_shards(table, _p: int, work: Path | str, per_shard: int) -> int:
    """Rewrite each shard input holding duplicates (rows `order` of `table`), marked as skipped."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    order = table.column("order").to_numpy()
    shard_of = table.column("shard").to_numpy()
    for shard in np.unique(shard_of):
        path = _input_path(work, int(shard))
        rows = sh.read_parquet(path)
        mask = np.zeros(rows.num_rows, dtype=bool)
        mask[order[shard_of == shard] - shard * per_shard] = True
        for column, value in (("status", dl.SKIPPED_DUPLICATE), ("error_message", "duplicate url in input")):
            marked = pc.if_else(pa.array(mask), pa.scalar(value, pa.string()), rows.column(column))
            rows = rows.set_column(rows.schema.get_field_index(column), column, marked)
        sh.write_parquet(path, rows)
    return len(order)


def mark_duplicate_urls(work: Path | str, shards: list[int], per_shard: int, rows: int) -> int:
    """Mark every row whose URL occurred earlier in the input as `skipped_duplicate`; returns the count.

    The decisions of one walk over the rows in input order with a set of seen URL digests,
    made by Ray tasks: read tasks turn groups of shard inputs into (digest, order) blocks,
    `first_occurrence` finds the later rows of each digest, and a second exchange (by shard)
    brings them to the tasks that rewrite the shard inputs holding them. The driver holds
    object refs (tasks x partitions) and the shard list, never a row.
    """
    import ray

    from vlm.data import exchange
    from vlm.data.global_dedup import first_occurrence
    from vlm.runtime import cluster_cpus

    cpus = cluster_cpus()
    step = -(-len(shards) // min(len(shards), _tasks_for(rows, cpus)))
    groups = [shards[i : i + step] for i in range(0, len(shards), step)]
    blocks = exchange.run_tasks(_digest_block, groups, work, per_shard)
    partitions = _tasks_for(rows, cpus)
    later = first_occurrence(blocks, digest=DIGEST, order="order", partitions=partitions)
    counts = exchange.exchange(
        later,
        by="shard",
        partitions=min(len(shards), partitions),
        map_fn=_with_shard,
        map_args=(per_shard,),
        reduce_fn=_mark_in_shards,
        reduce_args=(work, per_shard),
    )
    return int(sum(ray.get(counts)))


def read_shard_input(out: Path | str, shard: int) -> list[dict]:
    path = _input_path(sh.at(sh.at(out, shard_stage.PLAN_DIR), INPUTS_DIR), shard)
    rows = sh.read_parquet(path, columns=list(_INPUT_COLUMNS)).to_pylist()
    for row in rows:
        row["extra"] = json.loads(row["extra"])
    return rows


# ----------------------------------------------------------------------------- per shard (Ray worker)


def _retry_reuse(out: Path | str, shard: int) -> dict:
    """Samples of a complete shard to keep as they are: all but the retryable failures."""
    rows = sh.read_parquet(sh.parquet_path(out, shard)).to_pylist()
    files = sh.read_tar_samples(sh.tar_path(out, shard))
    return {
        r["key"]: (r, files.get(r["key"], {}))
        for r in rows
        if not (r["status"] == dl.FAILED_TO_DOWNLOAD and r.get("retryable"))
    }


def shard_has_retryable(out: Path | str, shard: int) -> bool:
    table = sh.read_parquet(sh.parquet_path(out, shard), columns=["status", "retryable"])
    return any(
        s == dl.FAILED_TO_DOWNLOAD and r for s, r in zip(table["status"].to_pylist(), table["retryable"].to_pylist())
    )


def run_shard(out: Path | str, shard: int, cfg: IngestConfig, retry: bool) -> dict:
    """Process one shard end to end (callable without Ray); returns its stats."""
    items = read_shard_input(out, shard)
    reuse = None
    if retry and sh.is_complete(out, shard):
        reuse = _retry_reuse(out, shard)
        storage.delete(sh.stats_path(out, shard))  # incomplete from here until republished
    elif not sh.is_complete(out, shard):
        sh.remove_shard(out, shard)  # leftovers of an interrupted run
    from vlm.data.shard_download import download_shard

    return download_shard(
        out, shard, items, cfg.download, cfg.image, decode_threads=cfg.ray.decode_threads, reuse=reuse
    )


# ----------------------------------------------------------------------------- the stage


class IngestStage(shard_stage.ShardStage):
    name = "ingest"
    kept_label = dl.SUCCESS
    dropped_prefix = ""

    def __init__(self, cfg: IngestConfig, input_spec: str | list[str], output: str | Path):
        super().__init__(cfg, input_spec, output)
        self.paths = expand_inputs(input_spec)

    def check(self) -> None:
        check_inputs(self.paths, self.cfg.input)

    def inputs(self) -> list[dict]:
        return [{"path": d["path"], "digest": d["sha256"]} for d in map(file_digest, self.paths)]

    def content_hash(self) -> str:
        return content_hash(self.cfg)

    def plan(self, plan_dir: Path | str, show_progress: bool) -> dict:
        return cut_inputs(plan_dir, self.paths, self.cfg)

    def process_shard(self, shard: int, retry: bool = False) -> dict:
        return run_shard(self.out, shard, self.cfg, retry)

    def retry_shards(self, complete: list[int]) -> list[int]:
        return [s for s in complete if shard_has_retryable(self.out, s)]

    def shard_sizes(self, plan: dict, shards: list[int]) -> dict[int, int]:
        per, rows = self.cfg.output.samples_per_shard, plan["num_rows"]
        return {s: min(per, rows - s * per) for s in shards}

    def task_resources(self) -> tuple[int | None, float]:
        return self.cfg.ray.concurrency, self.cfg.ray.num_cpus_per_shard

    def images(self, stats: dict) -> int:
        return int(stats.get("fetched_successes", 0))

    def finish_totals(self, totals: dict, plan: dict) -> dict:
        for key in ("fetched", "fetched_successes", "reused"):
            totals.pop(key, None)
        status = dict(sorted(totals.get("status_counts", {}).items()))
        errors = totals.get("error_counts", {})
        ok = status.get(dl.SUCCESS, 0)
        count = totals.get("count", 0)
        return totals | {
            "successes": ok,
            "kept": ok,
            "dropped": count - ok,
            "success_rate": ok / max(count, 1),
            "status_counts": status,
            "reason_counts": {k: v for k, v in status.items() if k != dl.SUCCESS},
            "error_counts": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:20]),
            "input_rows_skipped": plan.get("skipped_rows", 0),
            "captions_truncated": plan.get("truncated_captions", 0),
        }

    def extra_metrics(self, totals: dict) -> dict[str, float]:
        return {k: totals[k] for k in ("success_rate", "bytes", "input_rows_skipped", "captions_truncated")}

    def log_artifacts(self, run, shards: list[int], manifest: dict) -> None:
        sheet = _contact_sheet(self.out, shards, self.cfg.tracking.gallery_samples)
        if sheet is not None:
            run.log_image(sheet, "contact_sheet.png")

    @staticmethod
    def summary_lines(manifest: dict) -> list[str]:
        totals, lines = manifest["totals"], []
        if totals.get("input_rows_skipped"):
            lines.append(
                f"input rows skipped (not UTF-8): {totals['input_rows_skipped']} "
                f"(lines listed in {shard_stage.PLAN_DIR}/{shard_stage.PLAN_FILE})"
            )
        if totals.get("captions_truncated"):
            lines.append(f"captions truncated to input.max_caption_chars: {totals['captions_truncated']}")
        if totals["error_counts"]:
            lines.append("top errors:")
            lines += [f"  {value:>6}  {err}" for err, value in list(totals["error_counts"].items())[:8]]
        return lines


ingest = shard_stage.entrypoint(
    IngestStage,
    """Run the ingest stage over URL list files (a path, glob or list). Returns the manifest, with
    this invocation's figures under `run`; `retry_failed` also redoes retryable failures.""",
)


def summary_table(manifest: dict) -> str:
    """The table printed when ingest ends."""
    return shard_stage.summary_table(IngestStage, manifest)


def _contact_sheet(out: Path | str, shards: list[int], limit: int):
    import io

    from PIL import Image

    from vlm.data.contact_sheet import contact_sheet

    samples = []
    for shard in shards:
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
