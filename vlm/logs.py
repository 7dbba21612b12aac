"""What reaches the console: our progress and results by default, library chatter only with -v.

`vlm -v` sets VLM_VERBOSE=1. Without it, Ray workers' and actors' output stays in Ray's log
directory (printed once per command; `ray_logs_dir()`), and the driver silences the notices that
other libraries print on every run (DeepSpeed's accelerator choice, torch's missing CUDA runtime,
Ray Data's deprecations). Warnings and errors of our own code are never hidden.
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "VLM_VERBOSE"
QUIET_ENV = "VLM_QUIET"  # `vlm -q`: no progress bars

# Loggers whose warnings are routine on every run, not something a user can act on.
_CHATTY = (
    "torch.utils.cpp_extension",  # "No CUDA runtime is found, using CUDA_HOME=..." on CPU machines
    "DeepSpeed",  # "Setting accelerator to CPU", "Attempting to get learning rate from scheduler ..."
    "ray.data",
    "ray.train",
    "ray.tune",
    "ray._private.authentication",  # "Token authentication is enabled ..." on every local start
)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def set_console(verbose: bool, quiet: bool) -> None:
    """The CLI's -v / -q, for this process and every process it starts (Ray workers inherit them)."""
    for name, on in ((VERBOSE_ENV, verbose), (QUIET_ENV, quiet)):
        if on:
            os.environ[name] = "1"
        else:
            os.environ.pop(name, None)


def progress_enabled() -> bool:
    return os.environ.get(QUIET_ENV, "") in ("", "0", "false")


def quiet_libraries() -> None:
    """Silence other libraries' routine notices in this process (a driver or a Ray worker)."""
    if verbose():
        return
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*exclude_resources.*deprecated")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\..*")


def ray_logs_dir() -> str | None:
    """The directory of this Ray session's worker logs, where a connected local Ray keeps them."""
    try:
        import ray

        node = ray._private.worker._global_node  # no public accessor for the session's log dir
        return node.get_logs_dir_path() if node is not None else None
    except Exception:
        return None
