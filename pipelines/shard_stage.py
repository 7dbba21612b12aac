"""One driver for every shard stage (ingest, clean, capfilt): datatrove's executor shape.

A stage (a `ShardStage` subclass) supplies its typed config, its inputs with their digests, a
content hash of the settings that decide its output, a per-shard function `process_shard`
(callable without Ray) and, if it has one, a global `plan`. `run` owns the rest, once for all:

1. Check the output path (not a file, writable) and the stage's inputs before Ray starts.
2. Fingerprint `{"content_hash", "inputs": [{"path", "digest"}]}`; `OUT/_plan/plan.json` holds
   it with the plan. A matching plan is reused (a rerun makes the same decisions); another
   fingerprint over an output that holds complete shards is refused.
3. The plan (`stage.plan`, into `OUT/_plan/`), written last and atomically.
4. Skip complete shards (a shard is complete iff its stats file exists); `retry_failed` adds
   the complete shards `stage.retry_shards` names.
5. One Ray task per shard to do, running `process_shard` (`stage.execute` may replace it,
   as capfilt's actor pools do), with one progress bar.
6. One MLflow run (nested under the caller's `RunContext`), one manifest schema, one totals
   aggregator, one set of metric names and one summary table.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vlm import storage
from vlm.config import config_hash, write_config
from vlm.data import shards as sh
from vlm.data.filtered_shards import input_shards
from vlm.errors import InputError

PLAN_DIR = sh.PLAN_DIR
PLAN_FILE = "plan.json"
# Per-shard stats keys that are not counts: never summed into totals.
_NOT_COUNTS = {"shard", "stage", "kept_fraction", "duration_s", "fetch_duration_s"}


# ----------------------------------------------------------------------------- the contract


class ShardStage:
    """What a shard stage supplies. Subclasses set `name` and implement the abstract methods."""

    name = ""
    kept_label = "kept"  # the summary table's name for kept samples ("success" for ingest)
    dropped_prefix = "dropped: "  # and the prefix of its dropped rows

    def __init__(self, cfg: Any, input: Any, output: str | Path):
        self.cfg = cfg
        self.input = input
        self.out = sh.location(output)  # a Path, or the URL (s3://...) as a str

    # -- required
    def inputs(self) -> list[dict]:
        """`[{"path", "digest"}]`: what the stage reads, by content."""
        raise NotImplementedError

    def content_hash(self) -> str:
        """Digest of the settings that decide the output (not how fast it is made)."""
        raise NotImplementedError

    def process_shard(self, shard: int, retry: bool = False) -> dict:
        """Write one output shard (stats last); returns its stats. The body of each Ray task."""
        raise NotImplementedError

    # -- optional
    def check(self) -> None:
        """Validate inputs and config before Ray starts (raise InputError)."""

    def plan(self, plan_dir: Path, show_progress: bool) -> dict:
        """The global plan, written under `plan_dir`; returns its summary with `shards`."""
        raise NotImplementedError

    def retry_shards(self, complete: list[int]) -> list[int]:
        """Complete shards to redo under `retry_failed`."""
        return []

    def shard_sizes(self, plan: dict, shards: list[int]) -> dict[int, int]:
        """Samples per shard, for the progress bar."""
        return {s: 0 for s in shards}

    def task_resources(self) -> tuple[int | None, float]:
        """(shard tasks in flight or None for the cluster's CPUs, CPUs per task)."""
        return None, 1.0

    def execute(self, todo: list[tuple[int, bool]], plan: dict, bar: Progress) -> list[dict]:
        """Process the shards in `todo`; returns their stats. Default: a Ray task per shard (`map_shards`)."""
        return map_shards(self, todo, bar)

    def images(self, stats: dict) -> int:
        """Images this invocation processed in one shard (for `images_per_s`)."""
        return int(stats.get("count", 0))

    def finish_totals(self, totals: dict, plan: dict) -> dict:
        """Stage-specific totals from the summed shard stats and the plan."""
        return totals

    def extra_metrics(self, totals: dict) -> dict[str, float]:
        return {}

    def log_artifacts(self, run, shards: list[int], manifest: dict) -> None:
        pass

    @staticmethod
    def summary_lines(manifest: dict) -> list[str]:
        """Lines of the summary table after the counts."""
        return []

    def tags(self) -> dict[str, str]:
        return {}


class ShardDirStage(ShardStage):
    """A stage that reads a whole shard directory (clean, capfilt): one output shard per input."""

    def __init__(self, cfg: Any, input_dir: str | Path, output: str | Path):
        super().__init__(cfg, input_dir, output)
        self.in_dir = sh.location(input_dir)
        self._shards: list[int] | None = None

    @property
    def input_shards(self) -> list[int]:
        if self._shards is None:
            self._shards = input_shards(self.in_dir)
        return self._shards

    def check(self) -> None:
        from vlm.data.shard_check import check_shards

        self.input_shards  # noqa: B018  (raises InputError for an unfinished input)
        if sh.display(self.out) == sh.display(self.in_dir):
            raise InputError("--output must differ from --input")
        # Tar headers only: a truncated or foreign shard is one line naming it now, not a failed Ray task.
        check_shards([str(sh.tar_path(self.in_dir, s)) for s in self.input_shards], 0)

    def inputs(self) -> list[dict]:
        return [{"path": sh.display(self.in_dir), "digest": manifest_digest(self.in_dir)}]

    def plan(self, plan_dir: Path, show_progress: bool) -> dict:
        return {"shards": self.input_shards}

    def shard_sizes(self, plan: dict, shards: list[int]) -> dict[int, int]:
        return {s: sh.read_stats(self.in_dir, s).get("successes", 0) for s in shards}

    def tags(self) -> dict[str, str]:
        return {"input": sh.display(self.in_dir)}


def manifest_digest(shard_dir: Path) -> str:
    """Digest of a shard directory's manifest: a changed input makes a different plan."""
    return hashlib.sha256(storage.read_bytes(sh.at(shard_dir, sh.MANIFEST_FILE))).hexdigest()


def digest(content: Any) -> str:
    """A short digest of a JSON-able value (content hashes)."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- progress


class Progress:
    """The one progress bar of a shard stage: samples with rate and ETA, shards done."""

    def __init__(self, total: int, *, desc: str, shards: int = 0, unit: str = "img", enabled: bool = True):
        from tqdm import tqdm

        self.shards, self.shards_done = shards, 0
        self._bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, smoothing=0.1)

    def update(self, n: int = 0, shards: int = 0) -> None:
        self.shards_done += shards
        if self.shards:
            self._bar.set_postfix(shards=f"{self.shards_done}/{self.shards}", refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- checks and plan


def plan_path(out: Path | str) -> Path | str:
    return sh.at(sh.at(out, PLAN_DIR), PLAN_FILE)


def existing_plan(stage: ShardStage, fingerprint: dict) -> dict | None:
    """The persisted plan if it matches `fingerprint`; None if there is none to reuse.

    Raises:
        InputError: the output holds complete shards made from another input or config.
    """
    path = plan_path(stage.out)
    if storage.is_file(path):
        plan = storage.read_json(path)
        if {k: plan.get(k) for k in fingerprint} == fingerprint:
            return plan
        if sh.complete_shards(stage.out):
            raise InputError(
                f"output {stage.out} holds shards of a different input or config; use a new --output "
                "(or delete it to start over)"
            )
    elif sh.complete_shards(stage.out):
        raise InputError(f"output {stage.out} holds shards but no {stage.name} plan; use a new --output")
    return None


def make_plan(stage: ShardStage, fingerprint: dict, show_progress: bool) -> dict:
    plan_dir = sh.at(stage.out, PLAN_DIR)
    storage.rmtree(plan_dir)
    storage.makedirs(plan_dir)
    t0 = time.time()
    plan = fingerprint | stage.plan(plan_dir, show_progress) | {"stage": stage.name}
    plan["plan_s"] = round(time.time() - t0, 3)
    sh.atomic_write_json(plan_path(stage.out), plan)  # last: the plan is whole
    return plan


# ----------------------------------------------------------------------------- the shard map


def _shard_task(process, shard: int, retry: bool) -> dict:
    return process(shard, retry)


def map_shards(stage: ShardStage, todo: list[tuple[int, bool]], bar: Progress) -> list[dict]:
    """`stage.process_shard` over `todo` as Ray tasks, at most the stage's concurrency in flight;
    stats in completion order.

    Plain tasks, not a Ray Data map: one task per shard needs no streaming executor, whose
    start-up and scheduling loop were seconds of a small ingest (issue 19's fixed cost). A task
    whose worker dies is retried as Ray Data's would be; an error in a shard cancels the rest.
    """
    import ray

    from vlm.runtime import cluster_cpus

    size, cpus = stage.task_resources()
    size = max(1, min(size or int(cluster_cpus() / cpus), len(todo)))
    task = ray.remote(num_cpus=cpus, max_retries=3)(_shard_task)
    process = ray.put(stage.process_shard)  # the stage pickled once, not per task
    waiting, running, results = list(todo), [], []
    try:
        while waiting or running:
            while waiting and len(running) < size:
                shard, retry = waiting.pop(0)
                running.append(task.remote(process, shard, retry))
            done, running = ray.wait(running, num_returns=1)
            stats = ray.get(done[0])
            results.append(stats)
            bar.update(stats.get("count", 0), shards=1)
    finally:
        for ref in running:  # after an error (or Ctrl-C): no shard goes on writing
            ray.cancel(ref)
    return results


# ----------------------------------------------------------------------------- totals, metrics


def aggregate(stats: Iterable[dict]) -> dict:
    """Sum per-shard stats: numbers add up, dicts of numbers merge key by key."""
    totals: dict = {}
    for st in stats:
        _add(totals, st)
    return totals


def _add(into: dict, st: dict) -> None:
    for key, value in st.items():
        if key in _NOT_COUNTS or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            into[key] = into.get(key, 0) + value
        elif isinstance(value, dict):
            _add(into.setdefault(key, {}), value)


def _common_totals(totals: dict) -> dict:
    count = totals.setdefault("count", 0)
    kept = totals.setdefault("kept", count - totals.get("dropped", 0))
    totals.setdefault("dropped", count - kept)
    totals["kept_fraction"] = kept / count if count else 0.0
    reasons = totals.get("reason_counts", {})
    totals["reason_counts"] = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    return totals


def stage_metrics(manifest: dict, run_info: dict) -> dict[str, float]:
    """The metric names every shard stage logs, so runs compare in MLflow."""
    totals = manifest["totals"]
    metrics = {
        "samples": totals["count"],
        "kept": totals["kept"],
        "dropped": totals["dropped"],
        "kept_fraction": totals["kept_fraction"],
        "images_per_s": run_info["images_per_s"],
        "duration_s": run_info["duration_s"],
        "shards": manifest["num_shards"],
        "shards_processed": run_info["shards_processed"],
    }
    metrics.update({f"dropped_{cls}": n for cls, n in totals["reason_counts"].items()})
    return metrics


# ----------------------------------------------------------------------------- the driver


def run(
    stage: ShardStage,
    *,
    address: str | None = None,
    show_progress: bool = True,
    context=None,
    retry_failed: bool = False,
) -> dict:
    """Run a shard stage. Returns the manifest with this invocation's figures under `run`.

    Args:
        stage: the stage (config, inputs, per-shard function, optional plan).
        address: Ray address (None: RAY_ADDRESS, else a local Ray).
        show_progress: draw the progress bar.
        context: a `vlm.tracking.RunContext` nesting the stage's run under a caller's run.
        retry_failed: also redo the complete shards `stage.retry_shards` names.
    """
    from vlm import tracking
    from vlm.runtime import init_ray

    out, cfg = stage.out, stage.cfg
    sh.check_output_dir(out)
    stage.check()
    fingerprint = {"content_hash": stage.content_hash(), "inputs": stage.inputs()}
    plan = existing_plan(stage, fingerprint)
    # The MLflow run opens in a thread while Ray starts (both take seconds; neither needs the
    # other). Ray first, before writing anything: a bad address leaves no output and no run.
    pending = tracking.BackgroundRun(
        cfg.tracking.experiment,
        cfg.tracking.run_name or f"{stage.name}-{storage.basename(out)}",
        tags={"stage": stage.name, "output": sh.display(out), **stage.tags()},
        context=context,
    )
    try:
        where = init_ray(address, dashboard=False)
    except BaseException:
        pending.discard()
        raise
    storage.makedirs(out)
    write_config(cfg, sh.at(out, "config.yaml"))
    t0 = time.time()
    with pending as run_:
        if run_:
            run_.log_config(cfg)
        planned_now = plan is None
        if planned_now:
            plan = make_plan(stage, fingerprint, show_progress)
        shards = list(plan["shards"])
        if run_:
            run_.log_params(
                {
                    "num_shards": len(shards),
                    "content_hash": fingerprint["content_hash"],
                    "input_count": len(plan["inputs"]),
                }
            )
        complete = sorted(set(sh.complete_shards(out)) & set(shards))
        todo = [(s, False) for s in shards if s not in complete]
        if retry_failed:
            todo += [(s, True) for s in stage.retry_shards(complete)]
        todo.sort()
        new_stats: list[dict] = []
        if todo:
            sh.clear_success(out)
            sizes = stage.shard_sizes(plan, [s for s, _ in todo])
            with Progress(sum(sizes.values()), desc=stage.name, shards=len(todo), enabled=show_progress) as bar:
                new_stats = stage.execute(todo, plan, bar)
        elapsed = time.time() - t0
        missing = [s for s in shards if not sh.is_complete(out, s)]
        if missing:
            raise RuntimeError(f"{stage.name} finished with incomplete shards: {missing[:10]}")
        totals = _common_totals(stage.finish_totals(aggregate(sh.read_stats(out, s) for s in shards), plan))
        images = sum(stage.images(st) for st in new_stats)
        run_info = {
            "duration_s": elapsed,
            "planned": planned_now,
            "shards_processed": len(new_stats),
            "images_per_s": images / elapsed if new_stats and elapsed > 0 else 0.0,
        }
        manifest = {
            "stage": stage.name,
            "content_hash": fingerprint["content_hash"],
            "config_hash": config_hash(cfg, exclude=("ray", "tracking")),
            "inputs": fingerprint["inputs"],
            "shards": [f"{sh.shard_name(s)}.tar" for s in shards],
            "num_shards": len(shards),
            "totals": totals,
            "mlflow_run_id": run_.run_id if run_ else None,
        }
        sh.write_success(out, manifest)
        if run_:
            run_.log_metrics(stage_metrics(manifest, run_info) | stage.extra_metrics(totals))
            run_.log_dict(manifest, "manifest.json")
            stage.log_artifacts(run_, shards, manifest)
    return manifest | {"run": run_info, "where": where}


def entrypoint(stage_class: type[ShardStage], doc: str):
    """`stage(input, output, cfg, *, address, show_progress, context, retry_failed) -> manifest`:
    `run` of a new `stage_class(cfg, input, output)`; `retry_failed` where the stage has retries."""

    def run_stage(
        input, output, cfg, *, address: str | None = None, show_progress: bool = True, context=None, retry_failed=False
    ) -> dict:
        stage = stage_class(cfg, input, output)
        return run(stage, address=address, show_progress=show_progress, context=context, retry_failed=retry_failed)

    run_stage.__doc__ = doc
    return run_stage


def summary_table(stage: type[ShardStage], manifest: dict) -> str:
    """The table printed when a shard stage ends: kept and dropped by reason, then the run."""
    totals = manifest["totals"]
    count = max(totals["count"], 1)
    rows = [(stage.kept_label, totals["kept"])]
    rows += [(f"{stage.dropped_prefix}{cls}", n) for cls, n in totals["reason_counts"].items()]
    width = max(26, *(len(label) + 2 for label, _ in rows))
    rule = "-" * (width + 19)
    lines = [f"{'outcome':<{width}}{'count':>10}{'share':>9}", rule]
    lines += [f"{label:<{width}}{n:>10}{100 * n / count:>8.1f}%" for label, n in rows]
    lines += [rule, f"{'total':<{width}}{totals['count']:>10}"]
    lines += stage.summary_lines(manifest)
    run_info = manifest.get("run", {})
    if run_info.get("shards_processed"):
        lines.append(
            f"throughput: {run_info['images_per_s']:.1f} images/s over {run_info['duration_s']:.1f}s "
            f"({run_info['shards_processed']} shard(s) processed)"
        )
    else:
        lines.append("nothing to do: every shard was already complete")
    return "\n".join(lines)
