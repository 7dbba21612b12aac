"""Streaming readers for URL lists as LAION, CC3M and friends ship them.

Inputs can be far larger than memory (img2dataset issue 338), so every format is read in
record batches and yielded as lists of dicts; nothing holds a whole file.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vlm.errors import InputError

FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt")


@dataclass
class InputConfig:
    url_col: str = "url"
    caption_col: str | None = "caption"  # null: no captions (txt inputs never have one)
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl", "txt"] = "auto"  # auto: from suffix
    carry_columns: list[str] | None = None  # extra input columns kept in metadata; null: all
    column_names: list[str] | None = None  # for csv/tsv without a header line (CC3M's tsv)
    batch_rows: int = 8192  # rows per read batch; bounds driver memory

    def validate(self) -> None:
        if not self.url_col:
            raise ValueError("input.url_col must not be empty")
        if self.batch_rows <= 0:
            raise ValueError("input.batch_rows must be > 0")


def expand_inputs(spec: str | list[str]) -> list[Path]:
    """Paths from a file, a directory (all known formats in it), a glob, or a list of those."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    paths: list[Path] = []
    for item in specs:
        item = str(item)
        if any(ch in item for ch in "*?["):
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


def _suffix_format(path: Path) -> str | None:
    name = path.name.lower()
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


def input_format(path: Path, cfg: InputConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    fmt = _suffix_format(path)
    if fmt is None:
        raise InputError(f"cannot tell the format of {path} from its suffix; set input.format")
    return fmt


def file_digest(path: Path) -> dict:
    """Identity of an input file: resolved path, size and the sha256 of its content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return {"path": str(Path(path).resolve()), "size": os.stat(path).st_size, "sha256": digest.hexdigest()}


def iter_rows(paths: list[Path], cfg: InputConfig) -> Iterator[list[dict]]:
    """Yield batches of rows {url, caption, extra: {...}} from all input files, in order."""
    for path in paths:
        fmt = input_format(path, cfg)
        reader = {"parquet": _parquet, "csv": _csv, "tsv": _csv, "jsonl": _jsonl, "txt": _txt}[fmt]
        first = True
        for batch in reader(path, cfg, fmt):
            if first:
                _check_columns(path, batch, cfg, fmt)
                first = False
            yield [_row(r, cfg) for r in batch]


def check_inputs(paths: list[Path], cfg: InputConfig) -> None:
    """Fail early (before any cluster work) on unreadable files or missing columns."""
    for path in paths:
        fmt = input_format(path, cfg)
        reader = {"parquet": _parquet, "csv": _csv, "tsv": _csv, "jsonl": _jsonl, "txt": _txt}[fmt]
        for batch in reader(path, cfg, fmt):
            _check_columns(path, batch, cfg, fmt)
            break


def _check_columns(path: Path, batch: list[dict], cfg: InputConfig, fmt: str) -> None:
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
    return {
        "url": None if url is None else str(url).strip(),
        "caption": None if caption is None else str(caption),
        "extra": extra,
    }


def _parquet(path: Path, cfg: InputConfig, fmt: str) -> Iterator[list[dict]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise InputError(f"cannot read parquet {path}: {exc}") from None
    for batch in pf.iter_batches(batch_size=cfg.batch_rows):
        yield batch.to_pylist()


def _csv(path: Path, cfg: InputConfig, fmt: str) -> Iterator[list[dict]]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    delimiter = "\t" if fmt == "tsv" else ","
    # Every column as string: type inference per block would give the same column different
    # types in different batches, and URL lists carry ids that must not become floats.
    try:
        names = cfg.column_names
        header = names or pacsv.open_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter)).schema.names
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=1 << 22, column_names=names),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in header}),
        )
    except Exception as exc:
        raise InputError(f"cannot read {fmt} {path}: {str(exc).splitlines()[0]}") from None
    for batch in reader:
        yield batch.to_pylist()


def _jsonl(path: Path, cfg: InputConfig, fmt: str) -> Iterator[list[dict]]:
    batch: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{lineno}: each line must be a JSON object")
            batch.append(record)
            if len(batch) >= cfg.batch_rows:
                yield batch
                batch = []
    if batch:
        yield batch


def _txt(path: Path, cfg: InputConfig, fmt: str) -> Iterator[list[dict]]:
    batch: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            url = line.strip()
            if not url:
                continue
            batch.append({cfg.url_col: url})
            if len(batch) >= cfg.batch_rows:
                yield batch
                batch = []
    if batch:
        yield batch
