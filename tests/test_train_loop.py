"""The generic loop's DeepSpeed adjustments, checked against DeepSpeed's own behaviour in one process."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from vlm.train.config import DeepSpeedConfig, LoopConfig, OptimConfig, deepspeed_config, param_groups


@pytest.fixture(scope="module")
def one_rank_world():
    """A one-process gloo world for DeepSpeed engines, torn down after the module."""
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    torch.distributed.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _engine(grad_clip: float, stage: int = 0):
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    optim = OptimConfig(lr=0.1, grad_clip=grad_clip, warmup_steps=0)
    cfg = deepspeed_config(optim, DeepSpeedConfig(zero_stage=stage), LoopConfig(global_batch_size=4, max_steps=10), 1)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=cfg)
    return engine


def _steps(engine, n: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(1)
    for _ in range(n):
        x = torch.randn(4, 8) * 50  # large gradients: the clip is active
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
    return [p.detach().clone() for p in engine.module.parameters()]


def test_fused_clip_updates_like_deepspeeds_clip(one_rank_world):
    """With ZeRO off in fp32, the fused clip gives the parameters DeepSpeed's own clip gives."""
    from vlm.train.loop import use_fused_fp32_clip

    reference = _steps(_engine(grad_clip=0.5))
    fused = _engine(grad_clip=0.5)
    assert use_fused_fp32_clip(fused)
    got = _steps(fused)
    for a, b in zip(reference, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    unclipped = _steps(_engine(grad_clip=0.0))
    assert any(not torch.allclose(a, b) for a, b in zip(reference, unclipped)), "the clip never acted"


def test_fused_clip_leaves_zero_and_no_clip_alone(one_rank_world):
    """ZeRO stages clip in their own optimizers; a run without clipping has nothing to replace."""
    from vlm.train.loop import use_fused_fp32_clip

    assert not use_fused_fp32_clip(_engine(grad_clip=0.5, stage=2))
    assert not use_fused_fp32_clip(_engine(grad_clip=0.0))


def test_no_warmup_starts_at_the_full_rate(one_rank_world):
    """optim.warmup_steps=0 (DeepSpeed's scheduler rejects 0 warmup steps) runs at the full rate after the
    first step (DeepSpeed's scheduler starts every run at 0 before it)."""
    engine = _engine(grad_clip=0.0)
    _steps(engine, n=1)
    assert engine.get_lr()[0] == pytest.approx(0.1, rel=0.01)  # cosine decay over 10 steps has barely begun


@pytest.mark.skipif(not os.path.exists("/proc/thread-self/schedstat"), reason="needs Linux schedstat")
def test_cpu_wait_counts_time_a_busy_neighbour_takes():
    """cpu_wait_fraction's source: a thread sharing its one CPU with a busy process waits ~half the time."""
    import subprocess
    import sys
    import threading
    import time

    from vlm.train.sched import thread_cpu_wait_s

    def spin_fraction(seconds: float) -> float:
        w0, t0 = thread_cpu_wait_s(), time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            pass
        return (thread_cpu_wait_s() - w0) / (time.perf_counter() - t0)

    got = {}

    def pinned():
        # Only this thread (and the child it starts, which inherits its mask) goes on one CPU.
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        got["alone"] = spin_fraction(0.5)
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.3)  # let it start
            got["crowded"] = spin_fraction(1.0)
        finally:
            busy.kill()
            busy.wait()

    t = threading.Thread(target=pinned)
    t.start()
    t.join(timeout=30)
    assert got["crowded"] > 0.3 and got["crowded"] > got["alone"] + 0.2, got
