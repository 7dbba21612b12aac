"""Keep Ray Data's scheduling loop from spinning while its pipeline is backpressured.

Ray Data 2.60's streaming executor (a thread in the process that iterates a dataset; for Ray
Train, in the streaming-split coordinator that feeds the workers) blocks only in `ray.wait` on
running tasks, for up to 0.1 s. Once the pipeline has filled its object-store budget and waits
for the consumer to take blocks, no task runs and the loop goes round without waiting: one
core busy doing nothing. Any run whose data outgrow the budget gets there once its buffers are
full. Measured: a slow consumer of an 8 MiB-budget pipeline, 0.95 cores in the iterating
process (tests/test_ray_exec.py); tiny CLIP training on 2 cores with a 32 MiB budget, the
coordinator at 0.6-0.7 cores beside the training worker.

`IdleLoopThrottle` is a Ray Data execution callback: after a scheduling step in which nothing
changed (per operator: tasks submitted, finished and running, inputs received, outputs taken,
blocks queued) it sleeps `IDLE_SLEEP_S`, so an event arriving meanwhile is handled at most that
much later. With it: 0.22 cores in the same test, and an unthrottled consumer reads as fast as
before. It reads executor internals of Ray 2.60 (pinned in pyproject.toml); where they are
missing it does nothing. `vlm.runtime` installs it on every process's Ray Data context.
"""

from __future__ import annotations

import time

from ray.data._internal.execution.execution_callback import ExecutionCallback

IDLE_SLEEP_S = 0.01  # pause after a step in which nothing changed


def progress(executor) -> tuple | None:
    """What a scheduling step can change: per operator, tasks submitted/finished/running, inputs
    received, outputs taken, blocks queued. None if this Ray version does not expose them."""
    topology = getattr(executor, "_topology", None)
    if not topology:
        return None
    try:
        return tuple(
            (
                op.metrics.num_tasks_submitted,
                op.metrics.num_tasks_finished,
                op.metrics.num_inputs_received,
                op.metrics.num_outputs_taken,
                op.num_active_tasks(),
                state.output_queue.num_blocks,
            )
            for op, state in topology.items()
        )
    except AttributeError:
        return None


class IdleLoopThrottle(ExecutionCallback):
    """Sleeps `IDLE_SLEEP_S` after a scheduling step that changed nothing (module docstring)."""

    throttled_steps = 0  # counted per process, for tests and diagnostics

    def __init__(self):
        self._last: tuple | None = None

    def on_execution_step(self, executor) -> None:
        now = progress(executor)
        if now is not None and now == self._last:
            type(self).throttled_steps += 1
            time.sleep(IDLE_SLEEP_S)
        self._last = now


def install(context) -> None:
    """Register the throttle on a Ray Data `DataContext` (datasets made from it carry it along)."""
    if IdleLoopThrottle not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(IdleLoopThrottle)
