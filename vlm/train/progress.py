"""Training progress on the driver's console: one bar (step/total, loss, samples/s), not worker logs.

Ray Train workers' stdout reaches the console only with `vlm -v` (see vlm.logs); what a user
watches instead is this bar. Rank 0 reports each logged step to a `StepBoard` (a small Ray actor
the trainer driver starts) and a driver thread draws it with tqdm.
"""

from __future__ import annotations

import sys
import threading


class StepBoard:
    """The latest logged step of a run (a Ray actor: `step_board()` starts one)."""

    def __init__(self):
        self.latest: tuple[int, int, dict] | None = None

    def report(self, step: int, max_steps: int, metrics: dict) -> None:
        self.latest = (step, max_steps, metrics)

    def get(self) -> tuple[int, int, dict] | None:
        return self.latest


def step_board():
    """A new `StepBoard` actor of this driver (no CPU held)."""
    import ray

    return ray.remote(num_cpus=0)(StepBoard).remote()


def postfix(metrics: dict) -> str:
    shown = [(k, metrics.get(k)) for k in ("loss", "samples_per_s", "data_wait_fraction")]
    names = {"samples_per_s": "samples/s", "data_wait_fraction": "data wait"}
    return " ".join(f"{names.get(k, k)} {v:.4g}" for k, v in shown if isinstance(v, (int, float)))


class TrainProgress:
    """A tqdm bar fed from a `StepBoard` by a polling thread while the `with` block runs."""

    def __init__(self, board, max_steps: int, *, desc: str = "train", enabled: bool = True, poll_s: float = 0.5):
        from tqdm import tqdm

        self.board, self.poll_s = board, poll_s
        self._shown: int | None = None
        self.bar = tqdm(total=max_steps, desc=desc, unit="step", disable=not enabled, file=sys.stderr)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="train-progress", daemon=True)

    def _poll(self) -> None:
        import ray

        while not self._stop.wait(self.poll_s):
            try:
                latest = ray.get(self.board.get.remote(), timeout=5)
            except Exception:  # the bar must never take the run down
                continue
            if latest is not None and latest[0] != self._shown:
                self.show(*latest)

    def show(self, step: int, max_steps: int, metrics: dict) -> None:
        self._shown = step
        self.bar.total = max_steps
        self.bar.n = min(step, max_steps)
        self.bar.set_postfix_str(postfix(metrics), refresh=False)
        self.bar.refresh()

    def __enter__(self) -> TrainProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            import ray

            latest = ray.get(self.board.get.remote(), timeout=5)
            if latest is not None and latest[0] != self._shown:
                self.show(*latest)
        except Exception:
            pass
        self.bar.close()
