"""CPU accounting of a command's whole process tree (bench/ingest.py): each tool runs as its own command;
`run_measured` gives its wall time, the CPU-seconds of every process it started (sampled from /proc
while it runs, as descendants may exit before the end), and what other processes took meanwhile.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

from _common import tail


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


def run_measured(
    cmd: list[str], log: Path, env: dict, cwd: Path, timeout: float, exclude: tuple[int, ...] = ()
) -> dict:
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
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {rc}; log {log}:\n{tail(log)}")
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
