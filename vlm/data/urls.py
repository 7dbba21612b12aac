"""Streaming readers for URL lists as LAION, CC3M and friends ship them.

Inputs can be far larger than memory (img2dataset issue 338), so every format is read in
record batches and yielded as lists of dicts; nothing holds a whole file.

Web-scraped lists carry the odd row that is not UTF-8 (one 0xff byte in a caption). Such a row
is skipped, counted and reported with its line number; only a file where more than
`input.max_bad_row_fraction` of the rows are bad is refused. Captions longer than
`input.max_caption_chars` are cut there and flagged in a `caption_truncated` column.

Inputs are local paths or object-store URLs (`s3://bucket/laion/part-*.parquet`): a URL is read
through `vlm.storage` (the same pyarrow filesystem, streamed), so nothing needs a shared or local
copy. Local inputs are carried as `Path`, URLs as their normalized `str`.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vlm import storage
from vlm.errors import InputError

log = logging.getLogger(__name__)

FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt")
TRUNCATED_COL = "caption_truncated"  # added to every row's carried columns
_LINES_SHOWN = 10  # bad-row line numbers named in a warning or error
_LINES_KEPT = 1000  # bad-row locations a reader keeps for its caller


@dataclass
class InputConfig:
    url_col: str = "url"
    caption_col: str | None = "caption"  # null: no captions (txt inputs never have one)
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl", "txt"] = "auto"  # auto: from suffix
    carry_columns: list[str] | None = None  # extra input columns kept in metadata; null: all
    column_names: list[str] | None = None  # for csv/tsv without a header line (CC3M's tsv)
    batch_rows: int = 8192  # rows per read batch; bounds driver memory
    # Rows that are not valid UTF-8 are skipped with a warning naming their lines; a file where
    # more than this fraction of rows is bad is refused (it is likely in another encoding).
    max_bad_row_fraction: float = 0.01
    # Longer captions are cut to this many characters (flagged in `caption_truncated`), so one
    # runaway caption does not land in KEY.txt, KEY.json and the parquet at full size; null: no cap.
    max_caption_chars: int | None = 4096

    def validate(self) -> None:
        if not self.url_col:
            raise ValueError("input.url_col must not be empty")
        if self.batch_rows <= 0:
            raise ValueError("input.batch_rows must be > 0")
        if not 0.0 <= self.max_bad_row_fraction <= 1.0:
            raise ValueError(f"input.max_bad_row_fraction must be in [0, 1], got {self.max_bad_row_fraction}")
        if self.max_caption_chars is not None and self.max_caption_chars <= 0:
            raise ValueError(f"input.max_caption_chars must be > 0 or null, got {self.max_caption_chars}")


@dataclass
class _FileRows:
    """What one file's reader has seen: rows kept and the line numbers of rows skipped."""

    rows: int = 0
    bad_lines: list[int] = field(default_factory=list)
    bad: int = 0

    def skip(self, line: int) -> None:
        self.bad += 1
        if len(self.bad_lines) < _LINES_KEPT:
            self.bad_lines.append(line)


def expand_inputs(spec: str | list[str]) -> list[Path | str]:
    """Paths from a file, a directory (all known formats in it), a glob, or a list of those;
    each a local path or a URL (`s3://b/lists/part-*.parquet`, `s3://b/lists/`).

    Raises:
        InputError: nothing matches, or a URL's bucket or endpoint is not there (one line, naming it).
    """
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    paths: list[Path | str] = []
    for item in specs:
        item = str(item)
        if storage.is_url(item):
            paths.extend(_expand_url(item))
        elif any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise InputError(f"no input files match {item}")
            paths.extend(Path(m) for m in matches if Path(m).is_file())
        elif Path(item).is_dir():
            found = sorted(p for p in Path(item).iterdir() if p.is_file() and _suffix_format(p) is not None)
            if not found:
                raise InputError(f"input directory {item} holds no {'/'.join(FORMATS)} files")
            paths.extend(found)
        elif Path(item).is_file():
            paths.append(Path(item))
        else:
            raise InputError(f"input file not found: {item}")
    if not paths:
        raise InputError(f"no input files found for {spec}")
    return paths


def _expand_url(item: str) -> list[str]:
    """A URL input: one object, a glob in its last component, or a prefix holding list files."""
    url = storage.normalize(item)
    if any(ch in url for ch in "*?["):
        matches = storage.expand(url)
        if not matches:
            _check_bucket(url)
            raise InputError(f"no input files match {url}")
        return matches
    if storage.is_file(url):
        return [url]
    if storage.is_dir(url):
        found = [p for p in storage.glob(url, "*") if _suffix_format(p) is not None and storage.is_file(p)]
        if not found:
            raise InputError(f"input directory {url} holds no {'/'.join(FORMATS)} files")
        return found
    _check_bucket(url)
    raise InputError(f"input file not found: {url}")


def _check_bucket(url: str) -> None:
    """Name a missing bucket as such (a missing object in it reads the same as one without it)."""
    bucket = f"{storage.scheme(url)}://{storage.fs_path(url).split('/', 1)[0]}"
    if bucket != url and not storage.exists(bucket):
        raise InputError(f"input {url}: bucket {bucket.split('://', 1)[1]} does not exist")


def _suffix_format(path: Path | str) -> str | None:
    name = storage.basename(path).lower()
    for suffix, fmt in (
        (".parquet", "parquet"),
        (".csv", "csv"),
        (".tsv", "tsv"),
        (".jsonl", "jsonl"),
        (".json", "jsonl"),
        (".txt", "txt"),
    ):
        if name.endswith(suffix):
            return fmt
    return None


def input_format(path: Path | str, cfg: InputConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    fmt = _suffix_format(path)
    if fmt is None:
        raise InputError(f"cannot tell the format of {path} from its suffix; set input.format")
    return fmt


def file_digest(path: Path | str) -> dict:
    """Identity of an input file: resolved path (or URL), size and the sha256 of its content
    (a URL's bytes streamed through `vlm.storage`: the same digest as a local copy)."""
    digest = hashlib.sha256()
    with _open(path) as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    if storage.is_url(path):
        return {"path": storage.normalize(path), "size": storage.size(path), "sha256": digest.hexdigest()}
    return {"path": str(Path(path).resolve()), "size": os.stat(path).st_size, "sha256": digest.hexdigest()}


@contextmanager
def _open(path: Path | str) -> Iterator:
    """A buffered binary reader of a local file or URL (`readline`, iteration, `read`)."""
    if not storage.is_url(path):
        with open(path, "rb") as f:
            yield f
        return
    with storage.open_input(path) as raw:
        yield io.BufferedReader(raw, buffer_size=1 << 22)


class RowReader(Iterator[list[dict]]):
    """Batches of rows {url, caption, extra: {...}} from all input files, in order.

    An iterator (one pass, streaming); as it goes it counts what it skipped and cut:
    `skipped_rows` (rows that are not valid UTF-8), `skipped_lines` (their (path, line), the
    first thousand) and `truncated_captions`. Raises InputError at the end of a file whose
    share of bad rows exceeds `max_bad_row_fraction`.
    """

    def __init__(self, paths: list[Path | str], cfg: InputConfig):
        self.paths = list(paths)
        self.cfg = cfg
        self.skipped_rows = 0
        self.skipped_lines: list[tuple[Path | str, int]] = []
        self.truncated_captions = 0
        self._batches = self._read()

    def __next__(self) -> list[dict]:
        return next(self._batches)

    def _read(self) -> Iterator[list[dict]]:
        cfg = self.cfg
        for path in self.paths:
            fmt = input_format(path, cfg)
            seen = _FileRows()
            first = True
            for batch in _READERS[fmt](path, cfg, fmt, seen):
                if first:
                    _check_columns(path, batch, cfg, fmt)
                    first = False
                rows = [_row(r, cfg) for r in batch]
                self.truncated_captions += sum(r["extra"][TRUNCATED_COL] for r in rows)
                yield rows
            self._file_done(path, seen)

    def _file_done(self, path: Path | str, seen: _FileRows) -> None:
        if not seen.bad:
            return
        self.skipped_rows += seen.bad
        self.skipped_lines.extend((path, line) for line in seen.bad_lines[: _LINES_KEPT - len(self.skipped_lines)])
        total = seen.rows + seen.bad
        lines = ", ".join(map(str, seen.bad_lines[:_LINES_SHOWN])) + (" ..." if seen.bad > _LINES_SHOWN else "")
        plural = "s" if seen.bad > 1 else ""
        what = f"{seen.bad} of {total} row{'s' if total != 1 else ''} not valid UTF-8 (line{plural} {lines})"
        if seen.bad > self.cfg.max_bad_row_fraction * total:
            raise InputError(
                f"{path}: {what}, more than input.max_bad_row_fraction={self.cfg.max_bad_row_fraction:g}; "
                "is the file in another encoding?"
            )
        log.warning("%s: skipped %s", path, what)


def iter_rows(paths: list[Path | str], cfg: InputConfig) -> RowReader:
    """Yield batches of rows {url, caption, extra: {...}} from all input files, in order."""
    return RowReader(paths, cfg)


def check_inputs(paths: list[Path | str], cfg: InputConfig) -> None:
    """Fail early (before any cluster work) on unreadable files or missing columns."""
    for path in paths:
        fmt = input_format(path, cfg)
        for batch in _READERS[fmt](path, cfg, fmt, _FileRows()):
            _check_columns(path, batch, cfg, fmt)
            break


def _check_columns(path: Path | str, batch: list[dict], cfg: InputConfig, fmt: str) -> None:
    if not batch:
        return
    columns = list(batch[0].keys())
    if cfg.url_col not in columns:
        raise InputError(f"{path}: no url column '{cfg.url_col}' (columns: {', '.join(columns)}); set input.url_col")
    if fmt != "txt" and cfg.caption_col and cfg.caption_col not in columns:
        raise InputError(
            f"{path}: no caption column '{cfg.caption_col}' (columns: {', '.join(columns)}); "
            "set input.caption_col (or null)"
        )


def _row(record: dict, cfg: InputConfig) -> dict:
    url = record.get(cfg.url_col)
    caption = record.get(cfg.caption_col) if cfg.caption_col else None
    skip = {cfg.url_col, cfg.caption_col}
    if cfg.carry_columns is None:
        extra = {k: v for k, v in record.items() if k not in skip}
    else:
        extra = {k: record.get(k) for k in cfg.carry_columns}
    caption = None if caption is None else str(caption)
    limit = cfg.max_caption_chars
    extra[TRUNCATED_COL] = caption is not None and limit is not None and len(caption) > limit
    if extra[TRUNCATED_COL]:
        caption = caption[:limit]
    return {"url": None if url is None else str(url).strip(), "caption": caption, "extra": extra}


@contextmanager
def _arrow_source(path: Path | str) -> Iterator:
    """What pyarrow's readers open: a local path as is, a URL as a seekable file from storage."""
    if not storage.is_url(path):
        yield str(path)
        return
    with storage.open_input(path) as f:
        yield f


def _parquet(path: Path | str, cfg: InputConfig, fmt: str, seen: _FileRows) -> Iterator[list[dict]]:
    import pyarrow.parquet as pq

    with _arrow_source(path) as src:
        try:
            pf = pq.ParquetFile(src)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"cannot read parquet {path}: {exc}") from None
        for batch in pf.iter_batches(batch_size=cfg.batch_rows):
            seen.rows += batch.num_rows
            yield batch.to_pylist()


def _csv(path: Path | str, cfg: InputConfig, fmt: str, seen: _FileRows) -> Iterator[list[dict]]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    delimiter = "\t" if fmt == "tsv" else ","
    # Every column as bytes, made strings here: type inference per block would give the same
    # column different types in different batches, URL lists carry ids that must not become
    # floats, and a string column would fail the whole read on one row's bad byte.
    with _arrow_source(path) as head, _arrow_source(path) as src:
        try:
            names = cfg.column_names
            header = names or pacsv.open_csv(head, parse_options=pacsv.ParseOptions(delimiter=delimiter)).schema.names
            reader = pacsv.open_csv(
                src,
                read_options=pacsv.ReadOptions(block_size=1 << 22, column_names=names),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(column_types={n: pa.binary() for n in header}),
            )
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"cannot read {fmt} {path}: {str(exc).splitlines()[0]}") from None
        line = 1 if names else 2  # the first data row's line
        for batch in reader:
            batch, line = _utf8_rows(batch, line, seen)
            seen.rows += batch.num_rows
            yield batch.to_pylist()


def _utf8_rows(batch, line: int, seen: _FileRows):
    """`batch` with binary columns as strings, minus rows that are not UTF-8 (noted in `seen`).

    Returns the batch and the line number of the next batch's first row. Line numbers count
    newlines inside quoted values; blank lines the CSV parser drops are not counted.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    n = batch.num_rows
    newlines = np.zeros(n, dtype=np.int64)
    bad = np.zeros(n, dtype=bool)
    for col in batch.columns:
        newlines += pc.fill_null(pc.count_substring(col, "\n"), 0).to_numpy(zero_copy_only=False)
        try:
            col.cast(pa.string())
        except pa.ArrowInvalid:
            for i, value in enumerate(col.to_pylist()):
                if value is not None and not bad[i]:
                    try:
                        value.decode("utf-8")
                    except UnicodeDecodeError:
                        bad[i] = True
    starts = line + np.arange(n) + np.concatenate(([0], np.cumsum(newlines)[:-1]))
    for i in np.flatnonzero(bad):
        seen.skip(int(starts[i]))
    if bad.any():
        batch = batch.filter(pa.array(~bad))
    strings = pa.RecordBatch.from_arrays([c.cast(pa.string()) for c in batch.columns], names=batch.schema.names)
    return strings, line + n + int(newlines.sum())


def _text_lines(path: Path | str, seen: _FileRows) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, skipping (and noting) lines that are not UTF-8."""
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError:
                seen.skip(lineno)


def _jsonl(path: Path | str, cfg: InputConfig, fmt: str, seen: _FileRows) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for lineno, line in _text_lines(path, seen):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{lineno}: each line must be a JSON object")
        batch.append(record)
        seen.rows += 1
        if len(batch) >= cfg.batch_rows:
            yield batch
            batch = []
    if batch:
        yield batch


def _txt(path: Path | str, cfg: InputConfig, fmt: str, seen: _FileRows) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for _lineno, line in _text_lines(path, seen):
        url = line.strip()
        if not url:
            continue
        batch.append({cfg.url_col: url})
        seen.rows += 1
        if len(batch) >= cfg.batch_rows:
            yield batch
            batch = []
    if batch:
        yield batch


_READERS = {"parquet": _parquet, "csv": _csv, "tsv": _csv, "jsonl": _jsonl, "txt": _txt}
