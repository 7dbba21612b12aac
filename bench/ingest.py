"""Ingest throughput: `vlm ingest` against img2dataset on the same URL list.

A local web (`vlm.testbed.web`) runs in its own process and serves a few thousand distinct
images of web-like sizes (256..1024 px, JPEG and PNG 3:1) from a warm in-memory cache. The
same URL list then goes through

* img2dataset (Python API, multiprocessing distributor, webdataset output), and
* `vlm ingest` (Ray Data, webdataset shards) to local disk, and
* `vlm ingest` to a local S3 (moto's server on 127.0.0.1, reached through the standard AWS
  variables as a user's bucket would be): the `vlm-s3` row, whose img/s over the disk row's
  is the cost of object storage (goal >= 0.9: uploads overlap downloads),

with the same process count, shard size, resize settings and a generous number of concurrent
downloads for both. Each tool runs as its own command; the wall time of the whole command is
what a user waits for and is the headline figure. Beside it: the shard span (first shard start
to last shard end, from each tool's `*_stats.json`), vlm's own printed throughput (after Ray
start-up), the CPU-seconds of each tool's whole process tree, and how much CPU other processes
on the machine took meanwhile (so a run disturbed by someone else's job says so).

    python bench/ingest.py                      # 3000 URLs, every tool, once
    python bench/ingest.py --tools vlm,vlm-s3   # local disk vs the local S3 only
    python bench/ingest.py --n 300 --repeats 3  # a quick look, best and median of 3
    python bench/ingest.py --wait-quiet 600     # on a shared machine: wait for idle CPUs first

The local web is bench/_ingest_web.py, the process-tree CPU accounting bench/_proc_tree.py.

Prints a table and writes `bench/results/ingest.json`.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, machine_info, report
from _ingest_web import SIZES, S3Server, Server, img2dataset_main, read_urls, self_cpu_s, wait_quiet, warm
from _proc_tree import run_measured

DEFAULT_JSON = RESULTS / "ingest.json"
TOOLS = ("vlm", "vlm-s3", "img2dataset")
PACKAGES = ("pillow", "img2dataset", "ray", "aiohttp", "opencv-python-headless", "numpy", "pyarrow")
TARGET_RATIO = 1.5
TARGET_S3_RATIO = 0.9  # vlm-s3 / vlm (local disk), img/s


# ----------------------------------------------------------------------------- tools


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
        if tool == "vlm-s3":
            continue  # the same imports as vlm's
        subprocess.run([sys.executable, "-c", code[tool]], env=_base_env(), capture_output=True, check=False)


def run_img2dataset(args, urls: Path, out: Path, log: Path, exclude: tuple[int, ...] = ()) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_img2dataset", "--urls", str(urls), "--output", str(out)]
    cmd += ["--processes", str(args.processes), "--threads", str(args.i2d_threads)]
    cmd += ["--shard-size", str(args.shard_size), "--image-size", str(args.image_size)]
    cmd += ["--resize-mode", args.resize_mode]
    timing = run_measured(cmd, log, _base_env(), out.parent, args.timeout, exclude)
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


def run_vlm(
    args,
    urls: Path,
    out: Path | str,
    log: Path,
    workdir: Path,
    exclude: tuple[int, ...] = (),
    s3: S3Server | None = None,
) -> dict:
    """One `vlm ingest` command to `out`: a local directory, or an s3:// URL on the local S3 `s3`."""
    import pyarrow.fs as pafs

    from vlm import storage

    env = _base_env()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    if s3 is not None:
        env.update(s3.env())
    cmd = [sys.executable, "-m", "pipelines.cli", "-q", "ingest", "--input", str(urls), "--output", str(out)]
    cmd += vlm_overrides(args)
    timing = run_measured(cmd, log, env, workdir, args.timeout, exclude)
    manifest = storage.read_json(storage.join(out, "manifest.json"))
    m = _THROUGHPUT.search(log.read_text(errors="replace"))
    # Shard span as for img2dataset: a shard ends when its stats file (written last) is
    # written, and began `duration_s` earlier (measured by its writer). On S3 the end is the
    # stats object's Last-Modified (whole seconds).
    starts, ends, durations = [], [], []
    fs, root = storage.resolve(out)
    infos = fs.get_file_info(pafs.FileSelector(root))
    for info in sorted((i for i in infos if i.base_name.endswith("_stats.json")), key=lambda i: i.path):
        st = storage.read_json(storage.join(out, info.base_name))
        end = info.mtime.timestamp()
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
        fixed = [r["wall_s"] - r["span_s"] for r in mine if not math.isnan(r.get("span_s", math.nan))]
        entry["fixed_s_median"] = statistics.median(fixed) if fixed else None  # start-up + shutdown
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
    if "vlm" in out and "vlm-s3" in out:
        d, r = out["vlm"], out["vlm-s3"]

        def s3_ratio(key: str) -> float | None:
            return r[key] / d[key] if d.get(key) and r.get(key) else None

        out["ratio_s3_over_disk"] = {
            "wall_median": s3_ratio("images_per_s_wall_median"),
            "span_median": s3_ratio("images_per_s_span_median"),
            "printed_median": s3_ratio("images_per_s_printed_median"),
            "target": TARGET_S3_RATIO,
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
    for tool in ("img2dataset", "vlm", "vlm-s3"):
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
    r = summary.get("ratio_s3_over_disk")
    if r:
        lines.append(
            f"vlm-s3/vlm (local S3 over local disk): wall {_fmt(r['wall_median'], '.2f', 'x')}, span "
            f"{_fmt(r['span_median'], '.2f', 'x')}, printed {_fmt(r['printed_median'], '.2f', 'x')}"
        )
        verdict = "met" if (r["printed_median"] or 0) >= TARGET_S3_RATIO else "NOT met"
        lines.append(f"target vlm-s3 >= {TARGET_S3_RATIO}x vlm on local disk (printed img/s, median): {verdict}")
    for tool in ("vlm", "vlm-s3"):
        v = summary.get(tool)
        if v and v.get("fixed_s_median") is not None:
            lines.append(
                f"{tool} fixed cost (wall - shard span: Ray start, MLflow run, scheduling, shutdown): "
                f"{v['fixed_s_median']:.1f}s (goal < 4s)"
            )
        if v and v.get("images_per_s_printed_median") is not None:
            lines.append(
                f"{tool}'s own printed throughput (after Ray start-up, incl. MLflow run start and Ray Data "
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
    p.add_argument(
        "--tools", default="vlm,vlm-s3,img2dataset", help="comma-separated: vlm, vlm-s3 (to a local S3), img2dataset"
    )
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
    server = s3 = None
    bucket = ""
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
        if "vlm-s3" in args.tools:
            s3 = S3Server(workdir)
            os.environ.update(s3.env())  # this process reads the S3 run's manifest and stats
            bucket = s3.bucket("vlm-bench-ingest")
            print(f"local S3 {s3.endpoint}: bucket {bucket}", flush=True)
        for rep in range(args.repeats):
            order = args.tools if rep % 2 == 0 else list(reversed(args.tools))
            for tool in order:
                out = f"{bucket}/{tool}-{rep}" if tool == "vlm-s3" else workdir / f"{tool}-{rep}"
                if tool != "vlm-s3":
                    shutil.rmtree(out, ignore_errors=True)
                log = workdir / f"{tool}-{rep}.log"
                waited = wait_quiet(args.wait_quiet, (server.proc.pid,))
                load = os.getloadavg()[0]
                note = f", waited {waited:.0f}s for quiet" if waited >= 2 else ""
                print(f"[{rep + 1}/{args.repeats}] {tool} (load {load:.2f}{note}) ...", end=" ", flush=True)
                s3_cpu0 = s3.cpu_s() if s3 else 0.0
                side0 = server.cpu_s() + self_cpu_s() + s3_cpu0
                if tool == "vlm":
                    res = run_vlm(args, server.urls, out, log, workdir, (server.proc.pid,))
                elif tool == "vlm-s3":
                    res = run_vlm(args, server.urls, out, log, workdir, (server.proc.pid, s3.proc.pid), s3)
                else:
                    res = run_img2dataset(args, server.urls, out, log, (server.proc.pid,))
                s3_cpu = (s3.cpu_s() if s3 else 0.0) - s3_cpu0
                side = server.cpu_s() + self_cpu_s() + s3_cpu + s3_cpu0 - side0
                if tool == "vlm-s3":
                    res["s3_server_cpu_s"] = round(s3_cpu, 2)  # the storage service's share (remote on a cluster)
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
                    if tool == "vlm-s3":
                        from vlm import storage

                        storage.rmtree(out)
                    else:
                        shutil.rmtree(out, ignore_errors=True)
    finally:
        if server is not None:
            server.stop()
        if s3 is not None:
            s3.stop()

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
    result = {
        "benchmark": "ingest",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(PACKAGES),
        "settings": settings,
        "local_web": web,
        "summary": summary,
        "runs": runs,
        "table": text,
    }
    report(args.json, result, text)
    if args.keep or args.workdir:
        print(f"{'outputs and logs' if args.keep else 'logs'} kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
