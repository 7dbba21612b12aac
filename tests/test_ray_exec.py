"""Ray Data's scheduling loop does not spin while a backpressured pipeline waits for its consumer."""

from __future__ import annotations

import time

import numpy as np

from vlm.data.ray_exec import IdleLoopThrottle, progress


def _backpressured_cpu(ray, throttle: bool) -> float:
    """CPU cores this process (Ray Data's executor thread included) burns while a slow consumer
    reads a pipeline held at an 8 MiB object-store budget."""
    import ray.data
    from ray.data import ExecutionResources

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.resource_limits, list(ctx.custom_execution_callback_classes))
    try:
        ctx.execution_options.resource_limits = ExecutionResources.for_limits(object_store_memory=8 * 2**20)
        if not throttle:
            ctx.custom_execution_callback_classes.remove(IdleLoopThrottle)

        def rows(batch):
            return {"x": np.ones((len(batch["id"]), 32 * 1024), dtype=np.float64)}  # 256 KiB a row

        ds = ray.data.range(2000, override_num_blocks=100).map_batches(rows, batch_size=4)
        it = iter(ds.iter_batches(batch_size=4, prefetch_batches=1))
        for _ in range(15):  # let the pipeline fill its budget
            next(it)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(30):
            next(it)
            time.sleep(0.05)
        return (time.process_time() - c0) / (time.perf_counter() - t0)
    finally:
        ctx.execution_options.resource_limits, ctx.custom_execution_callback_classes[:] = saved


def test_backpressured_pipeline_does_not_spin(ray_local):
    """With the throttle the executor sleeps instead of looping: well under a core, steps throttled."""
    before = IdleLoopThrottle.throttled_steps
    throttled = _backpressured_cpu(ray_local, throttle=True)
    assert IdleLoopThrottle.throttled_steps > before
    unthrottled = _backpressured_cpu(ray_local, throttle=False)
    assert throttled < 0.5, f"{throttled:.2f} cores with the throttle ({unthrottled:.2f} without)"


def test_progress_is_none_without_a_topology():
    """An executor that exposes no topology is never throttled."""

    class Bare:
        _topology = None

    assert progress(Bare()) is None
