"""Connecting to Ray: a local Ray started by the command, or a cluster by address.

Embedded default: `ray.init()` starts a local instance sized from the machine, listening on
127.0.0.1 only. `RAY_ADDRESS`
(or `--address`) connects to a running cluster instead; an unreachable address fails fast
with a one-line `ClusterError` rather than hanging.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from vlm.errors import ClusterError

_started_here = False  # this process started the local Ray it is connected to


def _configure_ray_data() -> None:
    """This process's Ray Data context: the idle-loop throttle, and quiet progress output."""
    import ray.data

    from vlm.data.ray_exec import install

    ctx = ray.data.DataContext.get_current()
    install(ctx)  # no busy scheduling loop while a pipeline is backpressured (vlm/data/ray_exec.py)
    ctx.enable_progress_bars = False  # we draw our own, per sample, not per operator
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled" notice
    from vlm.logs import quiet_libraries

    quiet_libraries()


# Ray's switch for "this node is a laptop, not a cluster member" (its default on macOS and
# Windows): the node's address is the loopback one, and every server Ray starts (GCS, raylet,
# object manager, workers, dashboard and runtime-env agents) binds it. Off by default on Linux,
# where those bind all interfaces and the node's LAN address.
_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def _loopback_only() -> Iterator[None]:
    """Start a local Ray that listens on 127.0.0.1 only (nothing a neighbour on the network sees).

    The processes Ray spawns read the switch from their environment; this driver's own copy of it
    was read when ray was imported, so it is set for the start-up too, then both are restored
    (later `ray start` subprocesses, e.g. a cluster a test starts, are unaffected).
    """
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(_LOOPBACK_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOOPBACK_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_LOOPBACK_SWITCH, None)
        else:
            os.environ[_LOOPBACK_SWITCH] = saved_env


def _is_loopback_address(address: str) -> bool:
    target = address.split("://", 1)[1] if "://" in address else address
    host = target.rstrip("/").rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def log_to_driver() -> bool:
    """Ray workers' output on this console only with `vlm -v`: by default it stays in Ray's logs."""
    from vlm.logs import verbose

    return verbose()


def _reachable(address: str, timeout_s: float = 3.0) -> bool:
    """A TCP probe of host:port, so a typo'd address errors in seconds, not minutes."""
    if address in ("auto", "local"):
        return True
    target = address.split("://", 1)[1] if "://" in address else address
    host, _, port = target.rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return True  # let Ray interpret what we cannot
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def init_ray(address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = True) -> str:
    """Make sure this process is connected to Ray. Returns a short description of where.

    Args:
        address: cluster address; falls back to RAY_ADDRESS; none starts a local Ray.
        num_cpus: logical CPUs of a local Ray (default: twice the machine's cores, at least 4).
        dashboard: start a local Ray's dashboard (Ray Train needs its State API; ingest does not,
            and skips the seconds it costs to start).
    """
    global _started_here
    import ray

    if ray.is_initialized():
        _configure_ray_data()
        return "ray (already connected)"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        if not _reachable(address):
            raise ClusterError(
                f"cannot reach Ray at {address}: nothing is listening there (check --address / RAY_ADDRESS)"
            )
        # A Ray on loopback (one this machine's vlm started) only works for a driver whose own node
        # address is loopback too: otherwise it looks for its raylet at the LAN address.
        scope = _loopback_only() if _is_loopback_address(address) else contextlib.nullcontext()
        try:
            with scope:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=log_to_driver())
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ClusterError(f"cannot connect to Ray at {address}: {first}") from None
        where = f"ray cluster at {address}"
    else:
        if num_cpus is None:
            # Logical CPUs above the core count: Ray Data needs CPUs beside training workers
            # that hold one each, or it waits forever (DESIGN.md). Training runs cap Ray Data
            # at the real cores left (pipelines/training.data_cpu_limit), so that decoding does
            # not preempt the workers.
            num_cpus = max(4, 2 * (os.cpu_count() or 1))
        # The dashboard serves the State API that Ray Train's controller polls (and, later,
        # job submission); bound to loopback only, as is every other server of a local Ray.
        try:
            with _loopback_only():
                ray.init(
                    num_cpus=num_cpus,
                    include_dashboard=dashboard,
                    dashboard_host="127.0.0.1",
                    logging_level=logging.WARNING,
                    log_to_driver=log_to_driver(),
                )
        except Exception as exc:  # e.g. "node timed out during startup" on an overloaded machine
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ClusterError(f"could not start a local Ray: {first}") from None
        _started_here = True
        atexit.register(_shutdown_local)
        where = f"local ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"
    _configure_ray_data()
    return where


def _shutdown_local() -> None:
    """Stop the local Ray this process started, at exit, before Ray's own exit hook runs.

    Ray's hook (`shutdown(_exiting_interpreter=True)`) first sleeps 0.5 s so that workers' last
    messages reach the console; ours runs first (atexit is last-in, first-out) and skips that
    wait, part of issue 19's fixed cost. Workers' output is in Ray's logs (and on the console
    with `vlm -v`, whose runs keep Ray's hook and its wait).
    """
    import ray

    if ray.is_initialized() and not log_to_driver():
        ray.shutdown()


def local_cores() -> int | None:
    """This machine's cores when this process started the local Ray it uses (its logical CPU count
    is inflated; see init_ray), else None: on a cluster Ray's own CPU counts are the real ones."""
    import ray

    return (os.cpu_count() or 1) if _started_here and ray.is_initialized() else None


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def deepspeed_extensions_dir() -> str:
    """Point torch's JIT extension cache (DeepSpeed's CPU comm op) at this environment.

    The default cache, ~/.cache/torch_extensions, is shared by every checkout and venv of a user;
    its build command names the venv's paths, so two installs used in turn rebuilt the op (~100 s
    of both cores) on every switch. One cache per environment (`sys.prefix`) builds it once.
    An explicit TORCH_EXTENSIONS_DIR wins; an unwritable prefix keeps torch's default.
    """
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        path = os.path.join(sys.prefix, "torch_extensions")
        try:
            os.makedirs(path, exist_ok=True)
            if os.access(path, os.W_OK):
                os.environ["TORCH_EXTENSIONS_DIR"] = path
        except OSError:
            pass
    return os.environ.get("TORCH_EXTENSIONS_DIR", "")


def build_deepspeed_ops(verbose: bool = False) -> str | None:
    """Build (or load) DeepSpeed's shared-memory CPU comm op now, as `make setup` does, so no
    training run compiles. Returns the op's name, or None where it is not used (CUDA, non-Linux)."""
    deepspeed_extensions_dir()
    import torch

    if torch.cuda.is_available():
        return None  # GPU collectives go through NCCL; DeepSpeed does not load the shm op
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    builder = ShareMemCommBuilder()
    if not builder.is_compatible(verbose):
        return None
    builder.load(verbose=verbose)
    return builder.NAME


if __name__ == "__main__":
    # `python -m vlm.runtime build-ops`: the make setup step.
    if sys.argv[1:] != ["build-ops"]:
        sys.exit("usage: python -m vlm.runtime build-ops")
    name = build_deepspeed_ops()
    print(f"deepspeed op {name} ready in {deepspeed_extensions_dir()}" if name else "no deepspeed op to build")
