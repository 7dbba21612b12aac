"""Helpers every benchmark script under bench/ shares: the machine's description, CPU accounting
(`Phase`, `QuietWait`), fresh-process runs, quiet logging and the one way results are written
(`write_result`: the table(s) printed, the JSON under bench/results/ unless --json says otherwise).

Scripts run as `python bench/NAME.py`, so this directory is on sys.path and `import _common` works;
importing it also puts the repository root there, for `vlm` and `pipelines`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"

PRESET = "vlm-clip-tiny"  # the CLIP benchmarks' model
MAX_LOGIT_SCALE = 100.0  # ClipLossConfig.max_logit_scale
MALLOC_KEEP_MB = 1024  # ScalingConfig.malloc_keep_mb, vlm's default

# ----------------------------------------------------------------------------- CPU accounting


def _machine_busy_s() -> float | None:
    """CPU-seconds the whole machine has spent busy (all processes), from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _self_cpu_s() -> float:
    """CPU-seconds of this process and of its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def others_busy_cores(probe_s: float = 2.0) -> float | None:
    """Cores other processes keep busy, sampled while this process sleeps."""
    m0 = _machine_busy_s()
    time.sleep(probe_s)
    m1 = _machine_busy_s()
    return None if m0 is None or m1 is None else (m1 - m0) / probe_s


class QuietWait:
    """Waits for other processes to go quiet (< threshold cores) before a timed variant, from one
    budget of seconds for the whole benchmark, so a busy machine cannot stretch it without bound."""

    def __init__(self, budget_s: float, threshold: float = 0.3):
        self.left = budget_s
        self.threshold = threshold

    def __call__(self) -> float | None:
        start = time.monotonic()
        busy = others_busy_cores()
        while busy is not None and busy >= self.threshold and time.monotonic() - start < self.left:
            print(f"  (other processes busy: {busy:.2f} cores; waiting)", flush=True)
            time.sleep(8)
            busy = others_busy_cores()
        self.left = max(0.0, self.left - (time.monotonic() - start))
        return busy


class Phase:
    """Wall time, CPU time of this process (+ waited-for children) and the machine's busy CPU time."""

    def __init__(self, name: str, quiet: QuietWait | None = None):
        self.name = name
        self.quiet = quiet
        self.info: dict = {}

    def __enter__(self) -> Phase:
        self.others_before = self.quiet() if self.quiet is not None else None
        self.t0, self.c0, self.m0 = time.perf_counter(), _self_cpu_s(), _machine_busy_s()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        m1 = _machine_busy_s()
        cpu = _self_cpu_s() - self.c0
        busy = None if m1 is None or self.m0 is None else (m1 - self.m0) / wall
        self.info = {
            "wall_s": round(wall, 2),
            "others_busy_cores_before": None if self.others_before is None else round(self.others_before, 2),
            "own_cores": round(cpu / wall, 2),
            "machine_busy_cores": None if busy is None else round(busy, 2),
            # Only meaningful where all our work runs in this process or waited-for children (not Ray).
            "others_busy_cores": None if busy is None else round(max(0.0, busy - cpu / wall), 2),
        }


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PACKAGES = ("torch", "deepspeed", "ray", "open_clip_torch", "mlflow", "numpy", "pillow")


def machine_info(packages: tuple[str, ...] = PACKAGES) -> dict:
    """Cores, CPU model, memory, platform and the versions of `packages` (None: not installed)."""
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
    for pkg in packages:
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


def quiet_logs() -> None:
    import logging
    import warnings

    import torch

    if not torch.cuda.is_available():  # on a GPU machine DeepSpeed must pick its CUDA accelerator
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def check_positive(row: str, **values) -> None:
    """A row's figures must be finite and > 0: a zero rate means the step did not run."""
    for name, v in values.items():
        if v is None or not (math.isfinite(v) and v > 0):
            raise RuntimeError(f"{row}: {name} = {v!r}, expected > 0")


def tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file ("" if unreadable)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def in_subprocess(target, args: tuple) -> None:
    """Run `target(*args)` in a fresh (spawned) process; a non-zero exit is a RuntimeError."""
    import multiprocessing as mp

    proc = mp.get_context("spawn").Process(target=target, args=args)
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"the {target.__name__} subprocess failed (exit {proc.exitcode})")


def text_table(rows: list[tuple[str, ...]], left: int = 1) -> list[str]:
    """Rows of cells as aligned lines: the first `left` columns left-aligned, the rest right-aligned,
    a rule under the header row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        cells = (c.ljust(w) if j < left else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def report(path: str | Path, result: dict, text: str, total_s: float | None = None) -> Path:
    """Print a benchmark's table(s), write its JSON (parents created) and say where."""
    print()
    print(text)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {path}" + ("" if total_s is None else f" (total {total_s:.0f}s)"))
    return path
