"""Download, process and write one shard: the unit of work (and of resume) of ingest.

Downloads run concurrently on an asyncio loop; decoding/resizing/encoding runs on a small
thread pool (PIL releases the GIL while it decodes, resizes and encodes), so a worker keeps
its network and its CPU busy at once. Callable without Ray; `pipelines/ingest.py` maps it
over shards with Ray Data.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vlm.data import download as dl
from vlm.data.images import ImageConfig, ImageError, process_image
from vlm.data.shards import ShardWriter
from vlm.data.urls import TRUNCATED_COL

ProgressFn = Callable[[dict], None]  # called with {status: count} increments


def _base_row(item: dict) -> dict:
    return {
        "key": item["key"],
        "url": item["url"],
        "caption": item["caption"],
        # The URL reader cut the caption at input.max_caption_chars; ours, so every shard has it.
        "caption_truncated": bool((item.get("extra") or {}).get(TRUNCATED_COL, False)),
        "status": None,
        "error_message": None,
        "retryable": False,
        "http_status": None,
        "attempts": 0,
        "width": None,
        "height": None,
        "original_width": None,
        "original_height": None,
        "sha256": None,
        "bytes": None,
    }


def _carry(row: dict, extra: dict) -> dict:
    for name, value in (extra or {}).items():
        if name not in row:  # input columns never overwrite ours
            row[name] = value
    return row


def download_shard(
    out: Path | str,
    shard: int,
    items: list[dict],
    dl_cfg: dl.DownloadConfig,
    img_cfg: ImageConfig,
    *,
    decode_threads: int = 2,
    reuse: dict[str, tuple[dict, dict[str, bytes]]] | None = None,
    progress: ProgressFn | None = None,
    progress_interval_s: float = 0.5,
) -> dict:
    """Fetch every item of one shard and publish the shard (tar, parquet, stats last) under `out`,
    a local directory or a URL (`ShardWriter` spools the tar locally and uploads it whole).

    Args:
        items: planned rows, `{key, url, caption, extra, status}`; `status` is preset for rows
            the planner already decided (duplicates, unsafe urls) and None for rows to fetch.
        reuse: for `--retry-failed`: samples to keep as they are, `{key: (parquet_row, files)}`.
    Returns:
        The shard's stats dict.
    """
    writer = ShardWriter(out, shard)
    try:
        stats = asyncio.run(
            _run(writer, items, dl_cfg, img_cfg, decode_threads, reuse or {}, progress, progress_interval_s)
        )
    except BaseException:
        writer.abort()
        raise
    return stats


async def _run(writer, items, dl_cfg, img_cfg, decode_threads, reuse, progress, interval) -> dict:
    loop = asyncio.get_running_loop()
    pending_counts: dict[str, int] = {}
    last_report = time.monotonic()
    t0 = time.monotonic()
    new_ok = 0

    def report(status: str, force: bool = False) -> None:
        nonlocal last_report
        if status:
            pending_counts[status] = pending_counts.get(status, 0) + 1
        now = time.monotonic()
        if progress and pending_counts and (force or now - last_report >= interval):
            progress(dict(pending_counts))
            pending_counts.clear()
            last_report = now

    def finish(row: dict, extra: dict, image=None) -> None:
        _carry(row, extra)
        if image is not None:
            writer.write_sample(row["key"], image.data, image.ext, row["caption"], dict(row))
        writer.add_row(row)
        report(row["status"])

    to_fetch = []
    for item in items:
        if item["key"] in reuse:
            row, files = reuse[item["key"]]
            if row["status"] == dl.SUCCESS:
                writer.write_files(row["key"], files)
            writer.add_row(row)
            report(row["status"])
        elif item.get("status"):
            row = _base_row(item)
            row["status"] = item["status"]
            row["error_message"] = item.get("error_message")
            finish(row, item.get("extra"))
        else:
            to_fetch.append(item)

    pool = ThreadPoolExecutor(max_workers=max(1, decode_threads), thread_name_prefix="decode")
    sem = asyncio.Semaphore(dl_cfg.connections)

    async def one(item: dict, downloader: dl.Downloader) -> None:
        nonlocal new_ok
        # The semaphore covers decoding too, so at most `connections` bodies are in memory.
        async with sem:
            row = _base_row(item)
            result = await downloader.fetch(item["url"])
            row["attempts"] = result.attempts
            row["http_status"] = result.http_status
            if result.status != dl.SUCCESS:
                row.update(status=result.status, error_message=result.error, retryable=result.retryable)
                finish(row, item.get("extra"))
                return
            data = result.data
            row["sha256"] = hashlib.sha256(data).hexdigest()
            row["bytes"] = len(data)
            try:
                image = await loop.run_in_executor(pool, process_image, data, img_cfg)
            except ImageError as exc:
                row.update(status=dl.FAILED_TO_RESIZE, error_message=str(exc))
                finish(row, item.get("extra"))
                return
        new_ok += 1
        row.update(
            status=dl.SUCCESS,
            width=image.width,
            height=image.height,
            original_width=image.original_width,
            original_height=image.original_height,
        )
        finish(row, item.get("extra"), image)

    try:
        async with dl.Downloader(dl_cfg) as downloader:
            await asyncio.gather(*(one(item, downloader) for item in to_fetch))
    finally:
        pool.shutdown(wait=True)
    report("", force=True)
    elapsed = time.monotonic() - t0
    return writer.close(
        {
            "fetched": len(to_fetch),
            "fetched_successes": new_ok,
            "reused": len(reuse),
            "fetch_duration_s": round(elapsed, 3),
        }
    )
