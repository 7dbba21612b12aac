"""The one filesystem layer for data paths: local paths and object-store URLs alike.

Every stage reads and writes its inputs and outputs through these functions, never through
`os.path`/`pathlib` directly, so `s3://bucket/prefix` (and any URL pyarrow.fs knows: gs://,
hdfs://, abfs://) works wherever a local directory does. The backend is `pyarrow.fs`, the
filesystem layer Ray Data and Ray Train already use; one is built per scheme + endpoint and
cached. Credentials and endpoint come from the standard AWS variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_REGION / AWS_DEFAULT_REGION,
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL for S3-compatible stores such as MinIO or moto).

Publishing on object storage: there is no rename, but a PUT of one object is atomic (readers
see the old object, none, or the whole new one), so `write_bytes` is one PUT and a shard's
stats object, written last, still marks it complete. Local writes go to a temp name, fsync,
rename, as before.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vlm.errors import InputError

# ----------------------------------------------------------------------------- paths


def is_url(path: str | Path) -> bool:
    """True for `scheme://...` paths other than file:// (those are local)."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def _local(path: str | Path) -> str:
    s = str(path)
    return s[len("file://") :] if s.startswith("file://") else s


def normalize(path: str | Path) -> str:
    """The canonical spelling: an absolute local path, or the URL without a trailing slash."""
    if is_url(path):
        s = str(path)
        scheme, rest = s.split("://", 1)
        return f"{scheme.lower()}://{rest.rstrip('/')}" if rest.rstrip("/") else s
    return str(Path(_local(path)).expanduser().resolve())


def join(base: str | Path, *parts: str) -> str:
    """`base/part/...` for a local path or a URL (always '/')."""
    if is_url(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return str(Path(_local(base)).joinpath(*parts))


def basename(path: str | Path) -> str:
    return posixpath.basename(str(path).rstrip("/")) if is_url(path) else Path(_local(path)).name


def parent(path: str | Path) -> str:
    if is_url(path):
        return posixpath.dirname(str(path).rstrip("/"))
    return str(Path(_local(path)).parent)


def scheme(path: str | Path) -> str:
    return str(path).split("://", 1)[0].lower() if is_url(path) else "file"


# ----------------------------------------------------------------------------- filesystems


def _env(*names: str) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def s3_endpoint() -> str | None:
    """The S3 endpoint from the standard variables (None: AWS itself)."""
    return _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


@functools.lru_cache(maxsize=16)
def _s3(endpoint: str | None, region: str | None, key: str | None, secret: str | None, token: str | None):
    import pyarrow.fs as pafs

    kwargs: dict[str, Any] = {
        "connect_timeout": 5,
        "request_timeout": 60,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=5),
    }
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
        kwargs["force_virtual_addressing"] = False
    if region:
        kwargs["region"] = region
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=token)
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem():
    """The S3 filesystem for the current AWS variables (cached per endpoint and credentials)."""
    return _s3(
        s3_endpoint(),
        _env("AWS_REGION", "AWS_DEFAULT_REGION") or ("us-east-1" if s3_endpoint() else None),
        _env("AWS_ACCESS_KEY_ID"),
        _env("AWS_SECRET_ACCESS_KEY"),
        _env("AWS_SESSION_TOKEN"),
    )


def resolve(path: str | Path):
    """(pyarrow filesystem, path inside it) for a local path or URL."""
    import pyarrow.fs as pafs

    if not is_url(path):
        return pafs.LocalFileSystem(), normalize(path)
    s = normalize(path)
    if scheme(s) in ("s3", "s3a"):
        return s3_filesystem(), s.split("://", 1)[1]
    try:
        return pafs.FileSystem.from_uri(s)
    except pa_errors() + (ValueError,) as exc:
        raise InputError(f"{s}: unsupported storage URL ({exc})") from None


def filesystem(path: str | Path):
    """The pyarrow filesystem of `path` (for Ray Data's `filesystem=`, Ray Train's storage)."""
    return resolve(path)[0]


def fs_path(path: str | Path) -> str:
    """`path` as its filesystem spells it (a URL without its scheme; a local path absolute)."""
    return resolve(path)[1]


def pa_errors() -> tuple[type[BaseException], ...]:
    import pyarrow as pa

    return (OSError, pa.ArrowException)


# ----------------------------------------------------------------------------- queries


def _info(path: str | Path):
    fs, p = resolve(path)
    try:
        return fs.get_file_info(p)
    except pa_errors() as exc:
        raise StorageError.of(path, exc) from None


def exists(path: str | Path) -> bool:
    import pyarrow.fs as pafs

    return _info(path).type != pafs.FileType.NotFound


def is_file(path: str | Path) -> bool:
    import pyarrow.fs as pafs

    return _info(path).type == pafs.FileType.File


def is_dir(path: str | Path) -> bool:
    import pyarrow.fs as pafs

    return _info(path).type == pafs.FileType.Directory


def size(path: str | Path) -> int:
    return int(_info(path).size)


def listdir(path: str | Path) -> list[str]:
    """Names directly under `path` (files and directories), sorted; [] if it does not exist."""
    import pyarrow.fs as pafs

    fs, p = resolve(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=False))
    except pa_errors() as exc:
        raise StorageError.of(path, exc) from None
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def glob(path: str | Path, pattern: str) -> list[str]:
    """Full paths of the entries directly under `path` whose name matches `pattern` (fnmatch)."""
    return [join(path, n) for n in listdir(path) if fnmatch.fnmatchcase(n, pattern)]


def expand(pattern: str | Path) -> list[str]:
    """A path or glob (`s3://b/laion/part-*.parquet`, `data/*.csv`) -> the matching files, sorted.
    Wildcards in the last component only for URLs; locally any `glob` pattern."""
    s = str(pattern)
    if not any(c in s for c in "*?["):
        return [s] if is_file(s) else []
    if is_url(s):
        return sorted(p for p in glob(parent(s), basename(s)) if is_file(p))
    import glob as _glob

    return sorted(p for p in _glob.glob(str(Path(s).expanduser())) if Path(p).is_file())


def walk_sizes(path: str | Path) -> list[tuple[str, int]]:
    """(relative path, size) of every file under a directory or prefix, sorted."""
    import pyarrow.fs as pafs

    fs, p = resolve(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=True))
    except pa_errors() as exc:
        raise StorageError.of(path, exc) from None
    root = p.rstrip("/") + "/"
    return sorted((i.path[len(root) :], int(i.size)) for i in infos if i.type == pafs.FileType.File)


# ----------------------------------------------------------------------------- reads


def read_bytes(path: str | Path) -> bytes:
    fs, p = resolve(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except pa_errors() as exc:
        if _not_found(exc):
            raise FileNotFoundError(f"{path}: no such file") from None
        raise StorageError.of(path, exc) from None


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str | Path) -> Any:
    return json.loads(read_bytes(path))


@contextmanager
def open_input(path: str | Path) -> Iterator[Any]:
    """A seekable binary file for reading (parquet, tar)."""
    if not is_url(path):
        with open(normalize(path), "rb") as f:
            yield f
        return
    fs, p = resolve(path)
    try:
        f = fs.open_input_file(p)
    except pa_errors() as exc:
        if _not_found(exc):
            raise FileNotFoundError(f"{path}: no such file") from None
        raise StorageError.of(path, exc) from None
    with f:
        yield f


# ----------------------------------------------------------------------------- writes


def makedirs(path: str | Path) -> None:
    """Create a local directory (and parents); object stores have no directories to make."""
    if not is_url(path):
        Path(normalize(path)).mkdir(parents=True, exist_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Publish `data` at `path` atomically: a local temp file + fsync + rename, or one PUT."""
    if not is_url(path):
        p = Path(normalize(path))
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        return
    fs, p = resolve(path)
    try:
        with fs.open_output_stream(p) as f:
            f.write(data)
    except pa_errors() as exc:
        raise StorageError.of(path, exc) from None


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def upload_file(local: str | Path, path: str | Path) -> None:
    """Publish a local file at `path` (rename locally, one streamed upload to a URL)."""
    if not is_url(path):
        os.replace(local, normalize(path))
        return
    fs, p = resolve(path)
    try:
        with open(local, "rb") as src, fs.open_output_stream(p) as dst:
            shutil.copyfileobj(src, dst, length=8 << 20)
    except pa_errors() as exc:
        raise StorageError.of(path, exc) from None


def delete(path: str | Path) -> None:
    """Remove one file; nothing if it is not there."""
    if not is_url(path):
        Path(normalize(path)).unlink(missing_ok=True)
        return
    fs, p = resolve(path)
    try:
        fs.delete_file(p)
    except FileNotFoundError:
        pass
    except pa_errors() as exc:
        if not _not_found(exc):
            raise StorageError.of(path, exc) from None


def rmtree(path: str | Path) -> None:
    """Remove a directory (or prefix) and everything under it; nothing if it is not there."""
    if not is_url(path):
        shutil.rmtree(normalize(path), ignore_errors=True)
        return
    fs, p = resolve(path)
    try:
        fs.delete_dir_contents(p, missing_dir_ok=True)
        fs.delete_dir(p)
    except pa_errors():
        pass


def copy_dir(src: str | Path, dst: str | Path) -> None:
    """Copy a directory tree between any two locations (upload, download or copy)."""
    import pyarrow.fs as pafs

    sfs, sp = resolve(src)
    dfs, dp = resolve(dst)
    makedirs(dst)
    try:
        pafs.copy_files(sp, dp, source_filesystem=sfs, destination_filesystem=dfs)
    except pa_errors() as exc:
        raise StorageError.of(dst, exc) from None


def download(path: str | Path, into: str | Path) -> Path:
    """Copy the file or directory tree at `path` to `into/<its name>`; returns that local path."""
    dst = Path(into) / basename(path)
    if is_dir(path):
        copy_dir(path, dst)
    else:
        dst.write_bytes(read_bytes(path))
    return dst


@contextmanager
def local_dir(path: str | Path) -> Iterator[Path]:
    """A local directory holding the tree at `path`: the path itself when local, else a
    temporary download (removed on exit). For loaders that need files on disk."""
    if not is_url(path):
        yield Path(normalize(path))
        return
    with tempfile.TemporaryDirectory(prefix="vlm-download-") as tmp:
        copy_dir(path, tmp)
        yield Path(tmp)


@contextmanager
def local_file(path: str | Path) -> Iterator[Path]:
    """A local copy of one file at `path` (the file itself when local)."""
    if not is_url(path):
        yield Path(normalize(path))
        return
    with tempfile.TemporaryDirectory(prefix="vlm-download-") as tmp:
        yield download(path, tmp)


# ----------------------------------------------------------------------------- errors, checks


class StorageError(InputError):
    """A storage call failed: one line naming the URL and the problem."""

    @classmethod
    def of(cls, path: str | Path, exc: BaseException) -> StorageError:
        return cls(f"{path}: {describe(exc)}")


def _not_found(exc: BaseException) -> bool:
    msg = str(exc)
    return isinstance(exc, FileNotFoundError) or "NO_SUCH_KEY" in msg or "Path does not exist" in msg


def describe(exc: BaseException) -> str:
    """pyarrow's multi-clause S3 error text -> the problem in a few words."""
    msg = str(exc)
    if "NO_SUCH_BUCKET" in msg or "bucket does not exist" in msg.lower():
        return "bucket does not exist"
    if "NETWORK_CONNECTION" in msg or "Could not connect" in msg or "resolve host" in msg:
        endpoint = s3_endpoint() or "the AWS endpoint"
        return f"cannot reach the storage endpoint {endpoint} (check AWS_ENDPOINT_URL and the network)"
    if "ACCESS_DENIED" in msg or "AccessDenied" in msg or "403" in msg or "InvalidAccessKeyId" in msg:
        return "access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE)"
    if "SignatureDoesNotMatch" in msg or "INVALID_ACCESS_KEY" in msg.upper():
        return "credentials rejected (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    first = msg.splitlines()[0] if msg else type(exc).__name__
    return first[:300]


def check_writable(path: str | Path) -> str:
    """A URL output: the bucket exists and accepts a write (a probe object, deleted at once).
    Returns the normalized URL; StorageError (one line) otherwise. Local paths: see
    `vlm.data.shards.check_output_dir`."""
    url = normalize(path)
    fs, p = resolve(url)
    bucket = p.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except pa_errors() as exc:
        raise StorageError.of(url, exc) from None
    import pyarrow.fs as pafs

    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{url}: bucket {bucket} does not exist")
    if is_file(url):
        raise InputError(f"output {url} is a file, not a directory")
    was_there = exists(url)
    probe = join(url, f".vlm-write-check-{os.getpid()}")
    write_bytes(probe, b"")
    delete(probe)
    if not was_there:  # pyarrow keeps an emptied prefix as a "dir/" marker object: a refused run leaves nothing
        rmtree(url)
    return url


def check_readable(path: str | Path) -> str:
    """A URL input exists (file or prefix); StorageError naming it otherwise."""
    url = normalize(path)
    if not exists(url):
        raise InputError(f"input {url} does not exist")
    return url
