"""How long the training thread waits for a CPU: the loop's `cpu_wait_fraction` metric.

A training worker shares its node with Ray Data's decoding tasks and Ray's daemons. When they
need more cores than the workers leave free, the training thread is ready to run but is not
running; that time shows in neither the step's compute nor its data wait. Linux counts it per
thread in /proc/<tid>/schedstat (the second field, nanoseconds); the loop logs it per log
window, and bench/train_clip.py reports it for every variant.
"""

from __future__ import annotations


def thread_cpu_wait_s() -> float | None:
    """Seconds the calling thread has spent runnable but not running (waiting for a CPU), from
    Linux's /proc/thread-self/schedstat; None where the kernel does not expose it."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None
