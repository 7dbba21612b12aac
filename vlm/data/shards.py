"""Shard layout shared by every data stage (see DESIGN.md, "Data contracts").

`DIR/{shard:05d}.tar` (WebDataset: KEY.jpg, KEY.txt, KEY.json), `DIR/{shard:05d}.parquet` (one
row per input sample, failures included) and `DIR/{shard:05d}_stats.json`, written last and
atomically: a shard is complete iff its stats file exists. `DIR/_SUCCESS` + `DIR/manifest.json`
mark a whole output. These follow img2dataset's conventions so webdataset, open_clip's
`--train-data` and img2dataset users' scripts read our shards unchanged.

`DIR` is a local directory or an object-store URL (`s3://bucket/prefix`): every read and write
goes through `vlm.storage`. Path helpers return a `Path` for a local `DIR` and a `str` URL
otherwise. On object storage there is no rename: a tar is spooled to a local temp file and
uploaded whole, and each small file is one PUT, so the stats object still appears last.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vlm import storage

SUCCESS_FILE = "_SUCCESS"
MANIFEST_FILE = "manifest.json"
PLAN_DIR = "_plan"  # a stage's persisted plan under its output (pipelines.shard_stage, vlm.data.clean_plan)
# Fault injection for crash/resume tests: a process that has published this many shards stops
# (hangs) right there, so a test can SIGKILL it at a known point however fast the machine is.
HANG_AFTER_SHARDS_ENV = "VLM_TEST_HANG_AFTER_SHARDS"
_published_in_process = 0


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


def sample_key(shard: int, index: int) -> str:
    """Deterministic key: shard and position of the sample in the input order."""
    return f"{shard:05d}{index:04d}"


def location(path: str | Path) -> Path | str:
    """How stages carry a data directory: a `Path` when local, the normalized URL otherwise."""
    return storage.normalize(path) if storage.is_url(path) else Path(path)


def display(path: str | Path) -> str:
    """A data directory as logs and tags name it: the absolute path or the URL."""
    return storage.normalize(path)


def at(out: str | Path, name: str) -> Path | str:
    """`out/name`: a Path for a local directory, a str for a URL."""
    return storage.join(out, name) if storage.is_url(out) else Path(out) / name


def tar_path(out: str | Path, shard: int) -> Path | str:
    return at(out, f"{shard_name(shard)}.tar")


def parquet_path(out: str | Path, shard: int) -> Path | str:
    return at(out, f"{shard_name(shard)}.parquet")


def stats_path(out: str | Path, shard: int) -> Path | str:
    return at(out, f"{shard_name(shard)}_stats.json")


def is_complete(out: str | Path, shard: int) -> bool:
    return storage.is_file(stats_path(out, shard))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Readers see the old file or the whole new one (temp + fsync + rename; one PUT on a URL)."""
    storage.write_bytes(path, data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    storage.write_json(path, obj)


def remove_shard(out: str | Path, shard: int) -> None:
    """Delete a shard's files, stats first so it reads as incomplete at every moment."""
    for path in (stats_path(out, shard), tar_path(out, shard), parquet_path(out, shard)):
        storage.delete(path)
    if storage.is_url(out):  # writers spool locally and upload whole: no temp objects to clear
        return
    for tmp in Path(out).glob(f".{shard_name(shard)}*.tmp*"):  # temp files of killed writers
        tmp.unlink(missing_ok=True)


class ShardWriter:
    """Writes one shard: samples stream into a temp tar; `close` publishes tar, parquet, stats.

    Samples may arrive in any order (downloads finish out of order); the parquet is sorted by
    key so its content is the same for the same input.
    """

    def __init__(self, out: str | Path, shard: int, primary: bool = True):
        self.out = out if storage.is_url(out) else Path(out)
        self.shard = shard
        self.primary = primary  # False for side outputs (`_dropped/`) written beside a shard
        if storage.is_url(out):  # spooled locally, uploaded whole by `close`
            fd, tmp = tempfile.mkstemp(prefix=f"vlm-{shard_name(shard)}-", suffix=".tar")
            os.close(fd)
            self._tmp_tar = Path(tmp)
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            self._tmp_tar = self.out / f".{shard_name(shard)}.tar.tmp{os.getpid()}"
        self._tar = tarfile.open(self._tmp_tar, "w", format=tarfile.USTAR_FORMAT)
        self.rows: list[dict] = []
        self.bytes_written = 0
        self._t0 = time.time()
        self._mtime = 0  # fixed mtime: identical samples give identical tar members

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = self._mtime
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))
        self.bytes_written += len(data)

    def write_sample(self, key: str, image: bytes, ext: str, caption: str | None, meta: dict) -> None:
        """Add one successful sample's files to the tar (its parquet row comes via `add_row`)."""
        self._add_member(f"{key}.{ext}", image)
        if caption is not None:
            self._add_member(f"{key}.txt", caption.encode("utf-8"))
        self._add_member(f"{key}.json", json.dumps(meta, sort_keys=True, default=str).encode())

    def write_files(self, key: str, files: dict[str, bytes]) -> None:
        """Copy a sample's existing files unchanged (retry runs keep their successes)."""
        for ext in sorted(files, key=lambda e: (e in ("txt", "json"), e)):
            self._add_member(f"{key}.{ext}", files[ext])

    def add_row(self, row: dict) -> None:
        self.rows.append(row)

    def abort(self) -> None:
        try:
            self._tar.close()
        finally:
            self._tmp_tar.unlink(missing_ok=True)

    def close(self, extra_stats: dict | None = None) -> dict:
        """Publish the shard: tar, then parquet, then stats (the completion marker)."""
        import pyarrow as pa

        self._tar.close()
        try:
            storage.upload_file(self._tmp_tar, tar_path(self.out, self.shard))
        finally:
            self._tmp_tar.unlink(missing_ok=True)
        rows = sorted(self.rows, key=lambda r: r["key"])
        table = pa.Table.from_pylist(rows) if rows else pa.table({"key": pa.array([], pa.string())})
        write_parquet(parquet_path(self.out, self.shard), table)
        stats = shard_stats(rows, self.shard, self.bytes_written, time.time() - self._t0)
        stats.update(extra_stats or {})
        atomic_write_json(stats_path(self.out, self.shard), stats)
        if self.primary:
            _maybe_hang_after_publish()
        return stats


def _maybe_hang_after_publish() -> None:
    global _published_in_process
    _published_in_process += 1
    limit = os.environ.get(HANG_AFTER_SHARDS_ENV)
    if limit and _published_in_process >= int(limit):
        while True:  # until killed
            time.sleep(60)


def shard_stats(rows: Iterable[dict], shard: int, nbytes: int, duration_s: float) -> dict:
    rows = list(rows)
    status = Counter(r["status"] for r in rows)
    errors = Counter(_error_class(r.get("error_message")) for r in rows if r.get("error_message"))
    return {
        "shard": shard,
        "count": len(rows),
        "successes": status.get("success", 0),
        "status_counts": dict(sorted(status.items())),
        "error_counts": dict(errors.most_common(50)),
        "bytes": nbytes,
        "duration_s": round(duration_s, 3),
    }


def _error_class(message: str) -> str:
    """Group error messages that differ only in details (sizes, urls, attempts) for the histogram."""
    head = re.split(r"[:(]", message, maxsplit=1)[0].strip()
    return head[:80] or message[:80]


def read_stats(out: str | Path, shard: int) -> dict:
    return storage.read_json(stats_path(out, shard))


def complete_shards(out: str | Path) -> list[int]:
    return sorted(int(storage.basename(p)[:5]) for p in storage.glob(out, "[0-9][0-9][0-9][0-9][0-9]_stats.json"))


def read_tar_samples(path: str | Path) -> dict[str, dict[str, bytes]]:
    """All samples of a shard tar as {key: {ext: bytes}} (one sequential read, local or URL)."""
    if storage.is_url(path):
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(path)), mode="r") as tar:
            return _samples(tar)
    with tarfile.open(path, "r") as tar:
        return _samples(tar)


def _samples(tar: tarfile.TarFile) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for member in tar:
        if not member.isfile():
            continue
        key, _, ext = member.name.partition(".")
        samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def write_parquet(path: str | Path, table) -> None:
    """A pyarrow Table as one parquet file, written atomically (one PUT on a URL), local or URL."""
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue())


def read_parquet(path: str | Path, columns: list[str] | None = None):
    """A shard's (or plan's) parquet as a pyarrow Table, local or URL."""
    import pyarrow.parquet as pq

    with storage.open_input(path) as f:
        return pq.read_table(f, columns=columns)


def check_output_dir(output: str | Path) -> Path | str:
    """The resolved output directory (or normalized URL); InputError (one line, before any work)
    if it cannot be one: a file at the path or above it, a directory this process cannot write
    into; for a URL a missing bucket, an unreachable endpoint or denied credentials."""
    from vlm.errors import InputError

    if storage.is_url(output):
        return storage.check_writable(output)
    out = Path(output).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} is a file, not a directory")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"cannot create output {out}: {probe} is a file, not a directory")
    try:  # os.access says yes to root on a read-only mount; a real write says what will happen
        os.rmdir(tempfile.mkdtemp(prefix=".vlm-write-check-", dir=probe))
    except OSError as exc:
        raise InputError(f"cannot write output {out}: {probe} is not writable ({exc.strerror})") from None
    return out


def write_success(out: str | Path, manifest: dict) -> None:
    """Mark a stage's output whole: manifest first, then the _SUCCESS marker."""
    atomic_write_json(at(out, MANIFEST_FILE), manifest)
    atomic_write_bytes(at(out, SUCCESS_FILE), b"")


def clear_success(out: str | Path) -> None:
    storage.delete(at(out, SUCCESS_FILE))


def read_manifest(out: str | Path) -> dict | None:
    """The manifest of a whole output, or None if the output is not marked whole."""
    if not storage.is_file(at(out, SUCCESS_FILE)) or not storage.is_file(at(out, MANIFEST_FILE)):
        return None
    return storage.read_json(at(out, MANIFEST_FILE))
