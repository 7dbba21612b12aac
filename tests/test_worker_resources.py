"""What a training worker's process gets besides the model: glibc malloc settings and a CPU cap on
the Ray Data decoding that shares the machine with it."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vlm.config import ConfigError, load_config
from vlm.train.config import ScalingConfig
from vlm.train.malloc import keep_freed_memory

REPO = Path(__file__).resolve().parent.parent

# Allocates 64 MiB in 100 KiB chunks with malloc, touches every page, frees everything, three
# times; prints the minor page faults of the last round. Below glibc's default mmap threshold
# (128 KiB), so the chunks come from the heap, and freeing them leaves 64 MiB free at its top.
_CHURN = textwrap.dedent(
    """
    import ctypes, resource, sys
    sys.path.insert(0, {repo!r})
    from vlm.train.malloc import keep_freed_memory
    keep = int(sys.argv[1])
    print("set" if keep_freed_memory(keep) else "unset")
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    chunk, n = 100 << 10, 640
    ptrs = (ctypes.c_void_p * n)()  # allocated before the chunks, so none of ours sits above them
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for i in range(n):
            ptrs[i] = libc.malloc(chunk)
            libc.memset(ptrs[i], 1, chunk)
        for i in reversed(range(n)):
            libc.free(ptrs[i])
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(faults)
    """
)

glibc_only = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)


def _churn_faults(tmp_path: Path, keep_mb: int) -> tuple[str, int]:
    script = tmp_path / "churn.py"
    script.write_text(_CHURN.format(repo=str(REPO)))
    out = subprocess.run([sys.executable, str(script), str(keep_mb)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    state, faults = out.stdout.split()
    return state, int(faults)


@glibc_only
def test_kept_memory_is_reused_without_page_faults(tmp_path):
    # glibc's default trims the freed 64 MiB off the heap, and the next round faults every page in
    # again (16k pages); with the worker's setting the pages stay and the round faults almost none.
    state, default_faults = _churn_faults(tmp_path, 0)
    assert state == "unset"
    assert default_faults > 8000
    state, kept_faults = _churn_faults(tmp_path, 1024)
    assert state == "set"
    assert kept_faults < 500


def test_zero_leaves_malloc_alone():
    assert keep_freed_memory(0) is None


def test_scaling_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="scaling.malloc_keep_mb"):
        load_config(ScalingConfig, None, ["malloc_keep_mb=-1"])
    with pytest.raises(ConfigError, match="scaling.data_cpus"):
        load_config(ScalingConfig, None, ["data_cpus=0"])


def test_data_cpu_limit(monkeypatch):
    from pipelines import training
    from vlm import runtime

    explicit = ScalingConfig(num_workers=1, data_cpus=3)
    assert training.data_cpu_limit(explicit) == 3.0
    monkeypatch.setattr(runtime, "local_cores", lambda: None)  # a cluster: Ray Data's own default
    assert training.data_cpu_limit(ScalingConfig(num_workers=1)) is None
    monkeypatch.setattr(runtime, "local_cores", lambda: 8)  # a local Ray on 8 cores
    assert training.data_cpu_limit(ScalingConfig(num_workers=2, cpus_per_worker=3)) == 2.0
    assert training.data_cpu_limit(ScalingConfig(num_workers=4, cpus_per_worker=2)) == 1.0  # never 0


def test_loop_spec_carries_the_malloc_setting(tmp_path):
    from pipelines import training
    from pipelines.train_clip import TrainClipConfig

    cfg = load_config(TrainClipConfig, None, ["scaling.malloc_keep_mb=256"])
    spec = training.loop_spec(cfg, {}, 8, tmp_path, None)
    assert spec.malloc_keep_mb == 256
    assert training.loop_spec(load_config(TrainClipConfig, None, []), {}, 8, tmp_path, None).malloc_keep_mb == 1024


def test_single_rank_zero_note():
    from pipelines import training
    from pipelines.train_clip import TrainClipConfig
    from pipelines.train_flamingo import TrainFlamingoConfig

    def note(cls, *overrides):
        return training.single_rank_zero_note(load_config(cls, None, list(overrides)))

    one = "scaling.num_workers=1"
    assert "deepspeed.zero_stage=2 with scaling.num_workers=1" in note(TrainClipConfig, one)
    assert "deepspeed.zero_stage=3" in note(TrainFlamingoConfig, one)  # Flamingo's default stage
    assert note(TrainClipConfig) is None  # 2 workers by default: ZeRO partitions over them
    assert note(TrainClipConfig, one, "deepspeed.zero_stage=0") is None
    assert note(TrainClipConfig, one, "deepspeed.offload_optimizer=true") is None  # saves memory on one rank
    assert note(TrainFlamingoConfig, one, "deepspeed.offload_params=true") is None
