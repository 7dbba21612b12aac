"""Up-front check of WebDataset shards before a training run starts Ray.

A bad shard found by Ray Data mid-run (a `ReadError` in a read task, a batch that never comes) is a
worker failure to Ray Train, which restarts the worker group `train.max_failures` times before it
gives up with pages of traceback. These checks read only the tar headers (seconds for thousands of
samples) and answer in one line naming the shard:
- the file is a tar archive, and no member runs past the end of the file (a truncated copy), and the
  archive ends with its end-of-archive block;
- it holds WebDataset samples (`KEY.<ext>` members grouped by key, as Ray's `read_webdataset` groups
  them) with an image and a caption member;
- all shards together hold at least one global batch of such samples.
What is inside a member is seen only when decoded; that is vlm.data.skips's part.

A shard on object storage (s3://...) is not scanned member by member (a ranged GET per header would
cost more than the read itself): its first header block and its end-of-archive block are read (two
small ranged GETs, which catch a foreign or truncated upload), and its samples are counted from the
`{shard}_stats.json` beside it (`successes`, as img2dataset and our stages write); a shard without
one is read once, sequentially.
"""

from __future__ import annotations

import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from vlm import storage
from vlm.data.clip_data import IMAGE_EXTS
from vlm.errors import InputError

CAPTION_EXTS = ("txt", "json")
_KEY = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # KEY.ext, as read_webdataset's _base_plus_ext
_BLOCK = 512


@dataclass
class ShardCount:
    path: str
    samples: int  # samples with an image and a caption member
    incomplete: int  # samples missing one of them (left out in training, and counted as skipped)


def _open_error(path: str, exc: BaseException) -> InputError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return InputError(f"shard {path} is not a readable tar archive ({reason})")


def _is_plain_tar(path: str) -> bool:
    """False for a compressed tar (gzip, bz2, xz, zstd magic): its offsets are not file offsets."""
    with open(path, "rb") as f:
        return _is_plain_head(f.read(6))


def _is_plain_head(head: bytes) -> bool:
    return not head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd"))


def count_shard(path: str) -> ShardCount:
    """Samples of one shard; InputError (one line naming it) if it is unreadable, truncated, or holds
    files but no samples (a tar of something else). An empty archive is a valid shard with 0 samples:
    every download of it failed, or a filter dropped them all."""
    if storage.is_url(path):
        counted = _count_remote(path)
        if counted is not None:  # 0 successes: every download of the shard failed, a valid empty shard
            return counted
        import io

        return _count_tar(path, io.BytesIO(storage.read_bytes(path)))
    return _count_tar(path, None)


def _count_remote(path: str) -> ShardCount | None:
    """Head and tail blocks of a remote tar, samples from its stats file; None when it has none."""
    try:
        total = storage.size(path)
        with storage.open_input(path) as f:
            head = f.read(_BLOCK)
            f.seek(max(0, total - 2 * _BLOCK))
            tail = f.read(2 * _BLOCK)
    except FileNotFoundError:
        raise InputError(f"shard {path} does not exist") from None
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")):
        return None  # compressed: counted by reading it
    if head != b"\0" * _BLOCK:  # all zeros: an empty archive
        try:
            tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
        except tarfile.HeaderError as exc:
            raise _open_error(path, exc) from None
    if total % _BLOCK or tail != b"\0" * (2 * _BLOCK):
        raise InputError(f"shard {path} is truncated: the archive ends without its end-of-archive block")
    stats_file = path[: -len(".tar")] + "_stats.json" if path.endswith(".tar") else None
    if not stats_file or not storage.is_file(stats_file):
        return None
    try:
        stats = storage.read_json(stats_file)
        return ShardCount(path, int(stats["successes"]), 0)
    except (ValueError, KeyError, TypeError):
        return None


def _count_tar(path: str, fileobj) -> ShardCount:
    size = os.path.getsize(path) if fileobj is None else len(fileobj.getbuffer())
    plain = _is_plain_tar(path) if fileobj is None else _is_plain_head(fileobj.getvalue()[:6])
    members: dict[str, set[str]] = {}
    names: list[str] = []
    try:
        with tarfile.open(path if fileobj is None else None, "r:" if plain else "r:*", fileobj=fileobj) as tar:
            for m in tar:
                if plain and m.offset_data + m.size > size:
                    raise InputError(f"shard {path} is truncated: member {m.name} runs past the end of the file")
                if not m.isreg():
                    continue
                names.append(m.name)
                match = _KEY.match(m.name)
                if match:
                    members.setdefault(match.group(1), set()).add(match.group(2).lower())
            end = tar.offset
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise _open_error(path, exc) from None
    if plain:
        if fileobj is None:
            with open(path, "rb") as f:
                f.seek(end)
                trailer = f.read(_BLOCK)
        else:
            trailer = fileobj.getvalue()[end : end + _BLOCK]
        if trailer != b"\0" * _BLOCK:
            last = f" after member {names[-1]}" if names else ""
            raise InputError(f"shard {path} is truncated: the archive ends{last} without its end-of-archive block")
    complete = sum(1 for exts in members.values() if exts & set(IMAGE_EXTS) and exts & set(CAPTION_EXTS))
    if complete == 0 and names:  # an empty archive is a valid shard (all its downloads failed)
        found = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") if names else "no files"
        raise InputError(
            f"shard {path} holds no WebDataset samples with an image ({'/'.join(IMAGE_EXTS)}) and a caption "
            f"({'/'.join(CAPTION_EXTS)}); found: {found}"
        )
    return ShardCount(path, complete, len(members) - complete)


def check_shards(shards: list[str], min_samples: int, what: str = "one global batch") -> list[ShardCount]:
    """Count every shard (`count_shard`, 8 at a time) and require `min_samples` samples in all of them."""
    with ThreadPoolExecutor(max_workers=min(8, len(shards) or 1)) as pool:
        counts = list(pool.map(count_shard, shards))
    total = sum(c.samples for c in counts)
    if total < min_samples:
        where = f"shard {shards[0]} holds" if len(shards) == 1 else f"the {len(shards)} shards ({shards[0]}, ...) hold"
        raise InputError(f"{where} {total} samples, fewer than {what} ({min_samples})")
    return counts
