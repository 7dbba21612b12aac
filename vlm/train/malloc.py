"""Keep a training worker's freed memory in the process instead of handing it back every step.

A CPU training step allocates and frees the same activation and gradient buffers every step.
glibc's malloc returns the top of the heap to the OS whenever more than `M_TRIM_THRESHOLD` is
free there, and serves requests above `M_MMAP_THRESHOLD` with a fresh `mmap`; both thresholds
adapt to what the process has freed so far. The next step then touches every returned page
again, and each touch is a page fault in which the kernel zeroes the page. How many depends on
the process's allocation history, which is why the same step ran at two speeds:

    tiny CLIP, batch 64, 1 thread, 2-core Xeon (bench/train_clip.py's step)
    plain loop in a fresh process      6.1k faults/step, 10 ms of 77 ms in the kernel
    the same step in vlm's Ray worker  9.8k faults/step, 15 ms of 90 ms in the kernel
    either one after keep_freed_memory()   0 faults/step,  0 ms in the kernel

Fixing both thresholds (a trim threshold large enough that the heap never shrinks between steps,
mmap only above 32 MiB) makes the worker reuse its pages: the resident size stays at the step's
peak, which training reaches again every step anyway. Only glibc has these knobs; elsewhere
this does nothing. On a GPU the host side of a step allocates little, so there it hardly
matters, but it costs nothing either.
"""

from __future__ import annotations

import ctypes
import platform
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest dynamic mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)


def keep_freed_memory(keep_mb: int) -> dict | None:
    """Set glibc's trim threshold to `keep_mb` MiB and its mmap threshold to 32 MiB, process-wide.

    Returns the values set, or None where nothing was done (`keep_mb` <= 0, not Linux/glibc, or
    glibc refused a value).
    """
    if keep_mb <= 0 or sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim = min(int(keep_mb) << 20, 2**31 - 1)  # mallopt takes an int
    # The mmap threshold first: setting either one switches off glibc's adaptive thresholds, and a
    # trim threshold alone would leave mmap at its 128 KiB default (every activation mmapped).
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(M_TRIM_THRESHOLD, trim) != 1:
        return None
    return {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": trim}
