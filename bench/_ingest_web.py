"""bench/ingest.py's local web: a server process (its own GIL) serving web-like images from a warm cache,
its URL list, the local S3 (moto's server) for the S3 row, and the CPU-quiet wait a shared machine needs
before timing, and the img2dataset child run (`ingest.py _img2dataset`).

    python bench/_ingest_web.py --urls URLS.parquet --n 3000   # what `Server` starts: prints the base URL
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from _common import REPO, tail

# Web-like sizes and a web-like format mix (make_url_rows picks uniformly from each list).
SIZES = ((256, 256), (512, 384), (640, 480), (800, 600), (1024, 768), (1024, 1024))
FORMATS = ("jpg", "jpg", "jpg", "png")


def serve_main(argv: list[str]) -> int:
    """The server process: write the URL list, print the base URL, serve until SIGTERM."""
    p = argparse.ArgumentParser(prog="bench/_ingest_web.py")
    p.add_argument("--urls", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-mb", type=int, default=2048)
    args = p.parse_args(argv)

    from vlm.testbed import media, url_lists, web

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    server = web.LocalWeb(seed=args.seed)
    # The default body cache (128 MiB) holds a few hundred of these images; a benchmark needs
    # every body cached so the server never re-renders while a tool is being timed.
    server._cache = media.ByteLRU(max_bytes=args.cache_mb * 2**20)
    server.start()
    try:
        rows = url_lists.make_url_rows(
            server.base_url, args.n, seed=args.seed, failures=False, variants=False, sizes=SIZES, formats=FORMATS
        )
        # Only what both tools read: img2dataset keeps url + caption, vlm would carry the rest.
        url_lists.write_url_list([{"url": r["url"], "caption": r["caption"]} for r in rows], args.urls)
        print(server.base_url, flush=True)
        while not stop.wait(3600):
            pass
    finally:
        server.stop()
    return 0


class Server:
    """The local web in a child process (its own GIL), with its URL list written."""

    def __init__(self, workdir: Path, n: int, seed: int, cache_mb: int):
        self.urls = workdir / "urls.parquet"
        self.log = workdir / "server.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--urls", str(self.urls)]
        cmd += ["--n", str(n), "--seed", str(seed), "--cache-mb", str(cache_mb)]
        self._log_fh = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log_fh, cwd=REPO)
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=120)
        if not line or not line[0].strip():
            self.stop()
            raise RuntimeError(f"local web did not start; see {self.log}:\n{tail(self.log)}")
        self.base_url = line[0].decode().strip()

    def cpu_s(self) -> float:
        """CPU-seconds the server process has used so far (0 if unreadable)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        except (OSError, ValueError, IndexError):
            return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_fh.close()


class S3Server:
    """A local S3-compatible server (moto's server mode, its own process) on 127.0.0.1, and the standard
    AWS variables a `vlm ingest` process needs to write to it, as it would to a user's bucket."""

    def __init__(self, workdir: Path, timeout_s: float = 60):
        from vlm.testbed.s3 import free_port, start_moto

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log_fh = open(workdir / "s3.log", "wb")
        try:
            self.proc = start_moto(self.port, log=self._log_fh, timeout_s=timeout_s)
        except RuntimeError as exc:
            self._log_fh.close()
            raise RuntimeError(f"{exc}; see {workdir}/s3.log") from None

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def bucket(self, name: str) -> str:
        """Create bucket `name` (a PUT, as `aws s3 mb` does); returns its s3:// URL."""
        req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        urllib.request.urlopen(req, timeout=30).close()
        return f"s3://{name}"

    def cpu_s(self) -> float:
        return Server.cpu_s(self)

    def stop(self) -> None:
        Server.stop(self)


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _normal_priority_cpu_s(exclude: set[int]) -> float | None:
    """CPU-seconds so far of all processes at nice <= 0 but `exclude` (None without psutil)."""
    try:
        import psutil
    except ImportError:
        return None
    total = 0.0
    for proc in psutil.process_iter(["pid", "nice", "cpu_times"]):
        info = proc.info
        if info["pid"] in exclude or info["cpu_times"] is None or (info["nice"] or 0) > 0:
            continue
        total += info["cpu_times"].user + info["cpu_times"].system
    return total


def wait_quiet(max_wait_s: float, exclude: tuple[int, ...] = (), busy_below: float = 0.15, need_s: float = 10.0):
    """Wait until other normal-priority processes (niced jobs don't count: they barely compete)
    have used < `busy_below` of the CPUs for `need_s` seconds, or until `max_wait_s` is spent:
    a shared machine may never be quiet. Returns the seconds waited."""
    t0 = time.time()
    skip = {os.getpid(), *exclude}
    quiet_since = None
    last = _normal_priority_cpu_s(skip)
    cores = os.cpu_count() or 1
    while max_wait_s > 0 and last is not None and time.time() - t0 < max_wait_s:
        time.sleep(1.0)
        now = _normal_priority_cpu_s(skip)
        if now is None:
            break
        # Processes that exit take their CPU with them: clamp the difference at 0.
        frac = max(0.0, now - last) / cores
        last = now
        if frac < busy_below:
            quiet_since = quiet_since or time.time()
            if time.time() - quiet_since >= need_s:
                break
        else:
            quiet_since = None
    return time.time() - t0


def read_urls(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["url"])["url"].to_pylist()


def warm(urls: list[str], threads: int = 8) -> dict:
    """Fetch every URL once so every body sits in the server's cache; checks all are 200."""

    def get(url: str) -> tuple[int, str]:
        with urllib.request.urlopen(url, timeout=120) as r:
            return len(r.read()), r.headers.get("Content-Type", "")

    t0 = time.time()
    sizes: dict[str, list[int]] = {}
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for nbytes, ctype in pool.map(get, urls):
            sizes.setdefault(ctype, []).append(nbytes)
    first = time.time() - t0
    # A second pass over a sample shows the cache is warm (no re-rendering).
    sample = urls[:: max(1, len(urls) // 200)]
    t1 = time.time()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(get, sample))
    second = time.time() - t1
    total = sum(sum(v) for v in sizes.values())
    return {
        "urls": len(urls),
        "warm_s": round(first, 1),
        "rewarm_sample_per_s": round(len(sample) / max(second, 1e-9)),
        "bytes_total": total,
        "bytes_mean": round(total / max(len(urls), 1)),
        "by_type": {k: {"count": len(v), "bytes_mean": round(sum(v) / len(v))} for k, v in sorted(sizes.items())},
    }


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))


# ----------------------------------------------------------------------------- img2dataset


def img2dataset_main(argv: list[str]) -> int:
    """`ingest.py _img2dataset`: one img2dataset run (its own process: it spawns its pool)."""
    p = argparse.ArgumentParser(prog="ingest.py _img2dataset")
    p.add_argument("--urls", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--processes", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--shard-size", type=int, required=True)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--resize-mode", required=True)
    args = p.parse_args(argv)

    from img2dataset import download

    download(
        url_list=args.urls,
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="webdataset",
        output_folder=args.output,
        processes_count=args.processes,
        thread_count=args.threads,
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        encode_format="jpg",
        encode_quality=95,
        number_sample_per_shard=args.shard_size,
        distributor="multiprocessing",
        timeout=10,
        retries=0,
        # [] means "check no X-Robots-Tag directive" (None would mean its default list).
        disallowed_header_directives=[],
        enable_wandb=False,
        # The output folder is always new. ("overwrite" is broken in 1.47: it makes
        # OUTPUT/_tmp, then deletes OUTPUT with it, and every shard fails to find its input.)
        incremental_mode="incremental",
    )
    return 0
