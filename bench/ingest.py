"""Ingest throughput: `vlm ingest` against img2dataset on the same URL list.

A local web (`vlm.testbed.web`) runs in its own process and serves a few thousand distinct
images of web-like sizes (256..1024 px, JPEG and PNG 3:1) from a warm in-memory cache. The
same URL list then goes through

* img2dataset (Python API, multiprocessing distributor, webdataset output), and
* `vlm ingest` (Ray Data, webdataset shards),

with the same process count, shard size, resize settings and a generous number of concurrent
downloads for both. Each tool runs as its own command; the wall time of the whole command is
what a user waits for and is the headline figure. Beside it: the shard span (first shard start
to last shard end, from each tool's `*_stats.json`), vlm's own printed throughput (after Ray
start-up), the CPU-seconds of each tool's whole process tree, and how much CPU other processes
on the machine took meanwhile (so a run disturbed by someone else's job says so).

    python bench/ingest.py                      # 3000 URLs, both tools, once
    python bench/ingest.py --n 300 --repeats 3  # a quick look, best and median of 3
    python bench/ingest.py --wait-quiet 600     # on a shared machine: wait for idle CPUs first

Prints a table and writes `bench/results/ingest.json`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "bench" / "results" / "ingest.json"
TOOLS = ("vlm", "img2dataset")
# Web-like sizes and a web-like format mix (make_url_rows picks uniformly from each list).
SIZES = ((256, 256), (512, 384), (640, 480), (800, 600), (1024, 768), (1024, 1024))
FORMATS = ("jpg", "jpg", "jpg", "png")
TARGET_RATIO = 1.5


# ----------------------------------------------------------------------------- server process


def serve_main(argv: list[str]) -> int:
    """`_serve`: write the URL list, print the base URL, serve until SIGTERM."""
    p = argparse.ArgumentParser(prog="ingest.py _serve")
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
        cmd = [sys.executable, str(Path(__file__).resolve()), "_serve", "--urls", str(self.urls)]
        cmd += ["--n", str(n), "--seed", str(seed), "--cache-mb", str(cache_mb)]
        self._log_fh = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log_fh, cwd=REPO)
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=120)
        if not line or not line[0].strip():
            self.stop()
            raise RuntimeError(f"local web did not start; see {self.log}:\n{_tail(self.log)}")
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


def _self_cpu_s() -> float:
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


# ----------------------------------------------------------------------------- tools


def img2dataset_main(argv: list[str]) -> int:
    """`_img2dataset`: one img2dataset run (its own process: it spawns its pool)."""
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


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _machine_cpu() -> tuple[float, float] | None:
    """(busy, of which niced) CPU-seconds the whole machine has spent so far, from /proc/stat.

    Niced time is kept apart: a job at nice 10+ only fills cycles our runs leave idle (its
    weight is a few percent of a nice-0 process), so it says little about interference.
    """
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    # user nice system idle iowait irq softirq steal
    busy = sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0)
    tick = os.sysconf("SC_CLK_TCK")
    return busy / tick, fields[1] / tick


class TreeCpu:
    """CPU-seconds of a process and all its descendants, sampled from /proc while it runs; and,
    less often, of every other process on the machine, by nice level.

    Ray's workers are never reaped by the command's own process tree, so getrusage() misses
    them; sampling sees every process (less its last `interval` before it exits). The other
    processes tell whether someone else's normal-priority work competed with the run (niced
    jobs barely do; /proc/stat can't tell, as it books niced jobs' system time as normal).
    """

    def __init__(self, pid: int, interval: float = 0.1, exclude: tuple[int, ...] = (), others_every: int = 5):
        self.pid = pid
        self.interval = interval
        self.seen: dict[tuple[int, float], float] = {}
        self.labels: dict[tuple[int, float], str] = {}
        self.peak_procs = 0
        self.exclude = set(exclude)  # pids that are neither the tool nor "others" (web, bench)
        self.others: dict[tuple[int, float], list] = {}  # key -> [cpu at first sight, last cpu, nice]
        self.others_every = others_every
        self._t_start = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        tick = 0
        while not self._stop.is_set():
            if tick % self.others_every == 0:
                self._sample_others(psutil)
            tick += 1
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            self.peak_procs = max(self.peak_procs, len(procs))
            for proc in procs:
                try:
                    with proc.oneshot():
                        t = proc.cpu_times()
                        key = (proc.pid, proc.create_time())
                        self.seen[key] = t.user + t.system
                        # Re-read each time: a spawned child shows its parent's command line
                        # between fork and exec, and a Ray worker is "IDLE" between tasks.
                        label = _proc_label(proc.cmdline())
                        if label not in ("?", "ray::IDLE") or key not in self.labels:
                            self.labels[key] = label
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            self._stop.wait(self.interval)
        self._sample_others(psutil)

    def _sample_others(self, psutil) -> None:
        for proc in psutil.process_iter(["pid", "create_time", "nice", "cpu_times"]):
            info = proc.info
            if info["pid"] in self.exclude or info["cpu_times"] is None or info["create_time"] is None:
                continue
            key = (info["pid"], info["create_time"])
            cpu = info["cpu_times"].user + info["cpu_times"].system
            entry = self.others.get(key)
            if entry is None:
                born_during = info["create_time"] >= self._t_start
                self.others[key] = [0.0 if born_during else cpu, cpu, info["nice"] or 0]
            else:
                entry[1], entry[2] = cpu, info["nice"] or 0

    def others_cpu_s(self, niced: bool) -> float:
        """CPU-seconds of processes outside the tool's tree (and `exclude`) during the run, at
        nice > 0 (`niced`) or at nice <= 0."""
        return sum(
            last - first
            for key, (first, last, nice) in self.others.items()
            if key not in self.seen and (nice > 0) == niced
        )

    @property
    def cpu_s(self) -> float | None:
        return sum(self.seen.values()) if self.seen else None

    def by_process(self) -> dict[str, float]:
        """CPU-seconds per kind of process (summed over processes of that kind), largest first."""
        totals: dict[str, float] = {}
        for key, cpu in self.seen.items():
            label = self.labels.get(key, "?")
            totals[label] = totals.get(label, 0.0) + cpu
        return {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def _proc_label(cmdline: list[str]) -> str:
    """A short name for a process: its program, or the script / module a Python runs."""
    if not cmdline:
        return "?"
    if len(cmdline) == 1 and " " in cmdline[0]:  # a process title set with setproctitle
        return cmdline[0].split()[0][:40]
    prog = os.path.basename(cmdline[0])
    if prog.startswith("python"):
        rest = [a for a in cmdline[1:] if not a.startswith("-")]
        if "-m" in cmdline[1:]:
            return "python -m " + cmdline[cmdline.index("-m") + 1]
        if "-c" in cmdline[1:]:
            return "python -c"
        return "python " + os.path.basename(rest[0]) if rest else prog
    return prog[:40]


def _run(cmd: list[str], log: Path, env: dict, cwd: Path, timeout: float, exclude: tuple[int, ...] = ()) -> dict:
    """Run a command to completion: wall time, its own CPU-seconds (it and the descendants it
    waited for) and the whole machine's busy CPU-seconds meanwhile."""
    with open(log, "wb") as fh:
        cpu0 = _machine_cpu()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        with TreeCpu(proc.pid, exclude=(os.getpid(), *exclude)) as tree:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"{' '.join(cmd[:4])} ... timed out after {timeout:g}s; log {log}") from None
        wall = time.perf_counter() - t0
        cpu1 = _machine_cpu()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {rc}; log {log}:\n{_tail(log)}")
    return {
        "wall_s": wall,
        "tool_cpu_s": tree.cpu_s,
        "tool_peak_processes": tree.peak_procs,
        "tool_cpu_s_by_process": tree.by_process(),
        "others_normal_priority_cpu_s": round(tree.others_cpu_s(niced=False), 2),
        "others_niced_cpu_s": round(tree.others_cpu_s(niced=True), 2),
        "machine_cpu_s": None if cpu0 is None or cpu1 is None else cpu1[0] - cpu0[0],
        "machine_niced_cpu_s": None if cpu0 is None or cpu1 is None else cpu1[1] - cpu0[1],
        "load_after": round(os.getloadavg()[0], 2),
    }


def _base_env() -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a local run for both tools, never someone's cluster
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"  # img2dataset imports albumentations: no update check
    env["PYTHONUNBUFFERED"] = "1"
    return env


def warm_imports(tools: list[str]) -> None:
    """Import each tool's modules once, untimed, so neither timed run reads them cold from disk."""
    code = {
        "vlm": "import pipelines.ingest, vlm.data.shard_download, ray.data, mlflow",
        "img2dataset": "import img2dataset",
    }
    for tool in tools:
        subprocess.run([sys.executable, "-c", code[tool]], env=_base_env(), capture_output=True, check=False)


def run_img2dataset(args, urls: Path, out: Path, log: Path, exclude: tuple[int, ...] = ()) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_img2dataset", "--urls", str(urls), "--output", str(out)]
    cmd += ["--processes", str(args.processes), "--threads", str(args.i2d_threads)]
    cmd += ["--shard-size", str(args.shard_size), "--image-size", str(args.image_size)]
    cmd += ["--resize-mode", args.resize_mode]
    timing = _run(cmd, log, _base_env(), out.parent, args.timeout, exclude)
    stats = [json.loads(Path(f).read_text()) for f in sorted(glob.glob(str(out / "*_stats.json")))]
    span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats) if stats else float("nan")
    return {
        "successes": sum(s["successes"] for s in stats),
        "count": sum(s["count"] for s in stats),
        "shards": len(stats),
        **timing,
        "span_s": span,
        "shard_durations_s": [round(s["duration"], 2) for s in stats],
    }


def vlm_overrides(args) -> list[str]:
    return [
        "download.allow_private_networks=true",
        f"download.connections={args.vlm_connections}",
        f"download.per_host_connections={args.vlm_per_host or args.vlm_connections}",
        "download.retries=0",
        "download.timeout_s=10",
        "download.respect_optouts=false",
        f"image.image_size={args.image_size}",
        f"image.resize_mode={args.resize_mode}",
        "image.encode_format=jpg",
        "image.encode_quality=95",
        f"output.samples_per_shard={args.shard_size}",
        f"ray.concurrency={args.processes}",
        f"ray.decode_threads={args.vlm_decode_threads}",
        "input.caption_col=caption",
    ]


_THROUGHPUT = re.compile(r"throughput:\s*([0-9.]+)\s*images/s over\s*([0-9.]+)s")


def run_vlm(args, urls: Path, out: Path, log: Path, workdir: Path, exclude: tuple[int, ...] = ()) -> dict:
    env = _base_env()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "pipelines.cli", "-q", "ingest", "--input", str(urls), "--output", str(out)]
    cmd += vlm_overrides(args)
    timing = _run(cmd, log, env, workdir, args.timeout, exclude)
    manifest = json.loads((out / "manifest.json").read_text())
    m = _THROUGHPUT.search(log.read_text(errors="replace"))
    # Shard span as for img2dataset: a shard ends when its stats file (written last) is
    # written, and began `duration_s` earlier (measured by its writer).
    starts, ends, durations = [], [], []
    for f in sorted(glob.glob(str(out / "*_stats.json"))):
        st = json.loads(Path(f).read_text())
        end = os.path.getmtime(f)
        starts.append(end - st["duration_s"])
        ends.append(end)
        durations.append(round(st["duration_s"], 2))
    return {
        "successes": manifest["totals"]["successes"],
        "count": manifest["totals"]["count"],
        "shards": manifest["num_shards"],
        **timing,
        "span_s": max(ends) - min(starts) if ends else float("nan"),
        "shard_durations_s": durations,
        "printed_s": float(m.group(2)) if m else float("nan"),
        "printed_images_per_s": float(m.group(1)) if m else float("nan"),
        "status_counts": manifest["totals"]["status_counts"],
    }


# ----------------------------------------------------------------------------- report


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("pillow", "img2dataset", "ray", "aiohttp", "opencv-python-headless", "numpy", "pyarrow"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gib = None
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def _ok_rate(r: dict, seconds_key: str) -> float | None:
    sec = r.get(seconds_key)
    return r["successes"] / sec if sec and not math.isnan(sec) else None


def summarize(runs: list[dict], tools: list[str]) -> dict:
    """Per tool: median and best images/s for the wall time and the shard span; the ratios."""
    out: dict = {}
    for tool in tools:
        mine = [r for r in runs if r["tool"] == tool]
        if not mine:
            continue
        entry: dict = {"runs": len(mine), "successes": [r["successes"] for r in mine]}
        for label, key in (("wall", "wall_s"), ("span", "span_s"), ("printed", "printed_s")):
            rates = [x for x in (_ok_rate(r, key) for r in mine) if x is not None]
            entry[f"{label}_s"] = [round(r[key], 2) for r in mine if r.get(key) is not None]
            entry[f"images_per_s_{label}_median"] = statistics.median(rates) if rates else None
            entry[f"images_per_s_{label}_best"] = max(rates) if rates else None
        for key in ("tool_cpu_s", "machine_cpu_s"):
            cpu = [r[key] / r["successes"] for r in mine if r.get(key) and r["successes"]]
            entry[f"{key[:-2]}_ms_per_image_median"] = 1000 * statistics.median(cpu) if cpu else None
            entry[key] = [round(r[key], 1) for r in mine if r.get(key) is not None]
        out[tool] = entry
    if "vlm" in out and "img2dataset" in out:
        v, i = out["vlm"], out["img2dataset"]

        def ratio(key: str) -> float | None:
            return v[key] / i[key] if v.get(key) and i.get(key) else None

        out["ratio_vlm_over_img2dataset"] = {
            "wall_median": ratio("images_per_s_wall_median"),
            "wall_best": ratio("images_per_s_wall_best"),
            "span_median": ratio("images_per_s_span_median"),
            "span_best": ratio("images_per_s_span_best"),
            "target": TARGET_RATIO,
        }
    return out


def _fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if x is None else format(x, spec) + suffix


def table(summary: dict, settings: dict) -> str:
    head = (
        f"{'tool':<12}{'ok':>6}{'wall s':>8}{'img/s wall':>12}{'best':>8}{'span s':>8}{'img/s span':>12}"
        f"{'best':>8}{'cpu s':>8}{'ms/img':>8}"
    )
    lines = [
        f"ingest benchmark: {settings['n']} URLs (jpg:png 3:1, 256..1024 px) -> {settings['image_size']} px "
        f"{settings['resize_mode']} jpg q95; {settings['processes']} processes, {settings['shards']} shards of "
        f"{settings['shard_size']}; median of {settings['repeats']}",
        head,
        "-" * len(head),
    ]
    for tool in ("img2dataset", "vlm"):
        s = summary.get(tool)
        if not s:
            continue
        lines.append(
            f"{tool:<12}{min(s['successes']):>6}{_fmt(statistics.median(s['wall_s'])):>8}"
            f"{_fmt(s['images_per_s_wall_median']):>12}{_fmt(s['images_per_s_wall_best']):>8}"
            f"{_fmt(statistics.median(s['span_s']) if s['span_s'] else None):>8}"
            f"{_fmt(s['images_per_s_span_median']):>12}{_fmt(s['images_per_s_span_best']):>8}"
            f"{_fmt(statistics.median(s['tool_cpu_s']) if s['tool_cpu_s'] else None):>8}"
            f"{_fmt(s['tool_cpu_ms_per_image_median'], '.2f'):>8}"
        )
    r = summary.get("ratio_vlm_over_img2dataset")
    if r:
        lines.append("-" * len(head))
        lines.append(
            f"{'vlm/i2d':<12}{'':>6}{'':>8}"
            f"{_fmt(r['wall_median'], '.2f', 'x'):>12}{_fmt(r['wall_best'], '.2f', 'x'):>8}{'':>8}"
            f"{_fmt(r['span_median'], '.2f', 'x'):>12}{_fmt(r['span_best'], '.2f', 'x'):>8}"
        )
        verdict = "met" if (r["wall_median"] or 0) >= TARGET_RATIO else "NOT met"
        lines.append(f"target vlm >= {TARGET_RATIO}x img2dataset (wall, median): {verdict}")
    v = summary.get("vlm")
    if v and v.get("images_per_s_printed_median") is not None:
        lines.append(
            f"vlm's own printed throughput (after Ray start-up, incl. MLflow run start and Ray Data "
            f"scheduling): {v['images_per_s_printed_median']:.1f} img/s"
        )
    lines.append(
        "wall: the whole command as a user runs it (vlm: incl. Ray start-up/shutdown; img2dataset: incl. its "
        "imports and pool spawn). span: first shard start to last shard end, from each tool's *_stats.json. "
        "cpu s: CPU-seconds of the tool's whole process tree (sampled; Ray's daemons and workers included), "
        "and per image (the local web's share is not in it)."
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(prog="bench/ingest.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=3000, help="URLs in the list (default 3000)")
    p.add_argument("--repeats", type=int, default=1, help="runs per tool; the table shows median and best")
    p.add_argument("--tools", default="vlm,img2dataset", help="comma-separated: vlm, img2dataset")
    p.add_argument("--resize-mode", default="border", help="border, keep_ratio, center_crop, ... (both tools)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--processes", type=int, default=cores, help="img2dataset processes = vlm ray.concurrency")
    p.add_argument("--shards-per-process", type=int, default=2, help="shard size = ceil(n / (processes * this))")
    p.add_argument("--i2d-threads", type=int, default=64, help="img2dataset thread_count (per process)")
    p.add_argument("--vlm-connections", type=int, default=64, help="vlm download.connections (per shard task)")
    p.add_argument(
        "--vlm-per-host",
        type=int,
        default=0,
        help="vlm download.per_host_connections (0: = connections; the local web is one host and "
        "img2dataset has no per-host cap)",
    )
    p.add_argument("--vlm-decode-threads", type=int, default=2, help="vlm ray.decode_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-mb", type=int, default=2048, help="local web body cache (must hold every image)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per tool run")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="S",
        help="before each timed run, wait up to S seconds for the machine's CPUs to be idle for 10 s "
        "(for shared machines; 0: don't wait)",
    )
    p.add_argument("--workdir", help="where URL list, outputs and logs go (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (outputs and logs)")
    p.add_argument("--json", default=str(DEFAULT_JSON), help=f"results file (default {DEFAULT_JSON})")
    args = p.parse_args(argv)
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = sorted(set(args.tools) - set(TOOLS))
    if unknown or not args.tools:
        p.error(f"--tools: unknown {unknown}; choose from {', '.join(TOOLS)}")
    if args.n <= 0 or args.repeats <= 0 or args.processes <= 0 or args.shards_per_process <= 0:
        p.error("--n, --repeats, --processes and --shards-per-process must be > 0")
    args.shard_size = max(1, math.ceil(args.n / (args.processes * args.shards_per_process)))
    if args.shard_size > 10_000:
        p.error(f"shard size {args.shard_size} > 10000 (vlm's limit); raise --shards-per-process")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_serve"]:
        return serve_main(argv[1:])
    if argv[:1] == ["_img2dataset"]:
        return img2dataset_main(argv[1:])
    args = parse_args(argv)

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vlm-bench-ingest-"))
    workdir.mkdir(parents=True, exist_ok=True)
    settings = {
        "n": args.n,
        "repeats": args.repeats,
        "tools": args.tools,
        "wait_quiet_s": args.wait_quiet,
        "image_size": args.image_size,
        "resize_mode": args.resize_mode,
        "encode": "jpg q95",
        "processes": args.processes,
        "shard_size": args.shard_size,
        "shards": math.ceil(args.n / args.shard_size),
        "source_sizes": [list(s) for s in SIZES],
        "source_formats": "jpg:png 3:1",
        "img2dataset": {
            "distributor": "multiprocessing",
            "processes_count": args.processes,
            "thread_count": args.i2d_threads,
            "output_format": "webdataset",
            "timeout": 10,
            "retries": 0,
            "disallowed_header_directives": [],
            "other": "defaults (extract_exif=True, compute_hash=sha256, downscale_interpolation=area)",
        },
        "vlm": {"overrides": vlm_overrides(args)},
    }
    print(f"work dir: {workdir}", flush=True)
    server = None
    runs: list[dict] = []
    try:
        t0 = time.time()
        server = Server(workdir, args.n, args.seed, args.cache_mb)
        urls = read_urls(server.urls)
        print(f"local web {server.base_url}: {len(urls)} URLs; warming its cache ...", flush=True)
        web = warm(urls)
        web["base_url"] = server.base_url
        print(
            f"  warm in {time.time() - t0:.0f}s: {web['bytes_total'] / 2**20:.0f} MiB, "
            f"mean {web['bytes_mean'] / 1024:.0f} KiB/image; cached re-fetch {web['rewarm_sample_per_s']}/s",
            flush=True,
        )
        warm_imports(args.tools)
        for rep in range(args.repeats):
            order = args.tools if rep % 2 == 0 else list(reversed(args.tools))
            for tool in order:
                out = workdir / f"{tool}-{rep}"
                shutil.rmtree(out, ignore_errors=True)
                log = workdir / f"{tool}-{rep}.log"
                waited = wait_quiet(args.wait_quiet, (server.proc.pid,))
                load = os.getloadavg()[0]
                note = f", waited {waited:.0f}s for quiet" if waited >= 2 else ""
                print(f"[{rep + 1}/{args.repeats}] {tool} (load {load:.2f}{note}) ...", end=" ", flush=True)
                side0 = server.cpu_s() + _self_cpu_s()
                if tool == "vlm":
                    res = run_vlm(args, server.urls, out, log, workdir, (server.proc.pid,))
                else:
                    res = run_img2dataset(args, server.urls, out, log, (server.proc.pid,))
                side = server.cpu_s() + _self_cpu_s() - side0
                res.update(tool=tool, repeat=rep, load_before=round(load, 2), web_and_bench_cpu_s=round(side, 2))
                res["waited_for_quiet_s"] = round(waited, 1)
                if res.get("machine_cpu_s") is not None and res.get("tool_cpu_s") is not None:
                    # Busy CPU that was neither the tool, nor the local web, nor this script.
                    res["others_cpu_s"] = round(res["machine_cpu_s"] - res["tool_cpu_s"] - side, 2)
                runs.append(res)
                print(
                    f"{res['successes']}/{res['count']} ok, wall {res['wall_s']:.1f}s = "
                    f"{_fmt(_ok_rate(res, 'wall_s'))} img/s; shard span {res['span_s']:.1f}s = "
                    f"{_fmt(_ok_rate(res, 'span_s'))} img/s",
                    flush=True,
                )
                if res["successes"] < args.n:
                    print(f"  warning: {args.n - res['successes']} images failed; see {log}", flush=True)
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        if server is not None:
            server.stop()

    summary = summarize(runs, args.tools)
    text = table(summary, settings)
    cores = os.cpu_count() or 1
    busy = [r for r in runs if (r.get("others_normal_priority_cpu_s") or 0) > 0.1 * cores * r["wall_s"]]
    if busy:
        what = ", ".join(f"{r['tool']} #{r['repeat'] + 1}: {r['others_normal_priority_cpu_s']:.0f}s" for r in busy)
        text += (
            f"\nnote: other normal-priority work competed for this machine's CPUs during some runs, so "
            f"those figures are low (its CPU-seconds: {what})"
        )
    niced = [r for r in runs if (r.get("others_niced_cpu_s") or 0) > 0.1 * cores * r["wall_s"] and r not in busy]
    if niced:
        what = ", ".join(f"{r['tool']} #{r['repeat'] + 1}: {r['others_niced_cpu_s']:.0f}s" for r in niced)
        text += f"\nnote: niced jobs filled idle CPU during some runs (CPU-seconds: {what})"
    print()
    print(text)
    result = {
        "benchmark": "ingest",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "settings": settings,
        "local_web": web,
        "summary": summary,
        "runs": runs,
        "table": text,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    if args.keep or args.workdir:
        print(f"{'outputs and logs' if args.keep else 'logs'} kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
