"""`vlm runs compare`: chosen MLflow runs side by side, and an HTML report with their loss curves.

Every stage logs the same names (DESIGN.md), so one table fits ingest, cleaning and training
runs: the params that differ between the runs (the resolved configs are flattened params, so
"what changed" is exactly these), then a few key metrics, each the run's latest value as the
MLflow UI shows it. The report is one HTML file (table + plot inlined, so it travels alone) with
the plot also written beside it as a PNG.
"""

from __future__ import annotations

import base64
import html
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vlm import storage, tracking
from vlm.errors import InputError

# (column, names tried in order): the names the stages actually log. CLIP's evaluation is
# logged by the training loop as `eval/<metric>`; the cleaning stages log `kept_fraction`.
KEY_METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("zeroshot_top1", ("eval/zeroshot_top1", "zeroshot_top1")),
    ("loss", ("loss",)),
    ("acc", ("acc",)),
    ("samples_per_s", ("samples_per_s",)),
    ("kept_fraction", ("kept_fraction",)),
    ("success_rate", ("success_rate",)),
    ("images_per_s", ("images_per_s",)),
)
LOSS_METRIC = "loss"
PARENT_TAG = "mlflow.parentRunId"
MAX_RUNS = 1000  # per search; a comparison of more runs than this is not a table anyone reads


@dataclass
class Comparison:
    """The table: one column per run; rows of run info, differing params and metrics."""

    runs: list  # mlflow.entities.Run, in display order
    experiments: dict[str, str]  # experiment id -> name
    info_rows: list[tuple[str, list[str]]] = field(default_factory=list)
    param_rows: list[tuple[str, list[str | None]]] = field(default_factory=list)
    metric_rows: list[tuple[str, list[float | None]]] = field(default_factory=list)
    same_params: int = 0  # params logged with one value by every run (not shown)


def _client():
    tracking._quiet_mlflow()
    import mlflow

    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:"):
        path = Path(uri.split("sqlite:///", 1)[-1])
        if not path.is_file():
            raise InputError(f"no MLflow store at {uri} (run a stage first, or set MLFLOW_TRACKING_URI)")
    return mlflow.MlflowClient(tracking_uri=uri), uri


def _experiment_names(client) -> dict[str, str]:
    from mlflow.entities import ViewType

    return {e.experiment_id: e.name for e in client.search_experiments(view_type=ViewType.ALL)}


def select_runs(
    client,
    *,
    run_ids: list[str] = (),
    experiments: list[str] = (),
    parent: str | None = None,
    last: int | None = None,
) -> list:
    """The runs to compare, newest first unless given by id (then in the order given).

    Args:
        run_ids: explicit run ids.
        experiments: experiment names; all their active runs.
        parent: a pipeline run id; its nested child runs (tag `mlflow.parentRunId`).
        last: keep only the N most recent runs of what experiments/parent select (with no
            selector at all: the N most recent runs of every experiment).
    """
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    uri = tracking.tracking_uri()
    names = _experiment_names(client)
    chosen: list = []
    for run_id in run_ids:
        try:
            chosen.append(client.get_run(run_id))
        except MlflowException:
            raise InputError(f"no MLflow run with id {run_id!r} at {uri}") from None

    searched: list = []
    order = ["attributes.start_time DESC"]
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = ", ".join(sorted(names.values())) or "none"
            raise InputError(f"no MLflow experiment named {name!r} at {uri} (experiments: {known})")
        runs = client.search_runs(
            [exp.experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=MAX_RUNS, order_by=order
        )
        if parent:
            runs = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent]
        if not runs:
            raise InputError(f"MLflow experiment {name!r} has no runs" + (f" under parent {parent}" if parent else ""))
        searched += runs
    if parent and not experiments:
        try:
            client.get_run(parent)
        except MlflowException:
            raise InputError(f"no MLflow run with id {parent!r} at {uri}") from None
        searched = client.search_runs(
            list(names),
            filter_string=f"tags.`{PARENT_TAG}` = '{parent}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=MAX_RUNS,
            order_by=order,
        )
        if not searched:
            raise InputError(f"MLflow run {parent} has no child runs (is it a pipeline run?)")
    if not (run_ids or experiments or parent):
        searched = client.search_runs(
            list(names), run_view_type=ViewType.ACTIVE_ONLY, max_results=last or 10, order_by=order
        )
        if not searched:
            raise InputError(f"no MLflow runs at {uri}")
    searched.sort(key=lambda r: r.info.start_time or 0, reverse=True)
    if last is not None:
        searched = searched[:last]
    seen: set[str] = set()
    out = []
    for run in chosen + searched:
        if run.info.run_id not in seen:
            seen.add(run.info.run_id)
            out.append(run)
    return out


def _metric(run, names: tuple[str, ...]) -> float | None:
    for name in names:
        if name in run.data.metrics:
            return run.data.metrics[name]
    return None


def build_comparison(client, runs: list, extra_metrics: list[str] = ()) -> Comparison:
    """Rows of run info, the params whose values differ between runs, and the key metrics."""
    exps = _experiment_names(client)
    comp = Comparison(runs=runs, experiments=exps)
    comp.info_rows = [
        ("run name", [r.info.run_name or "" for r in runs]),
        ("experiment", [exps.get(r.info.experiment_id, r.info.experiment_id) for r in runs]),
        ("run id", [r.info.run_id for r in runs]),
        ("status", [r.info.status for r in runs]),
    ]
    keys = sorted(set().union(*(r.data.params for r in runs)))
    for key in keys:
        values = [r.data.params.get(key) for r in runs]
        if len(set(values)) > 1:
            comp.param_rows.append((key, values))
        else:
            comp.same_params += 1
    wanted = list(KEY_METRICS) + [(m, (m,)) for m in extra_metrics if m not in {k for k, _ in KEY_METRICS}]
    for label, names in wanted:
        values = [_metric(r, names) for r in runs]
        if any(v is not None for v in values):
            comp.metric_rows.append((label, values))
    return comp


def _fmt_metric(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _short(text: str | None, width: int) -> str:
    if text is None:
        return "-"
    if len(text) <= width:
        return text
    head = (width - 3) // 2  # keep both ends: differing paths often differ at the end
    return text[:head] + "..." + text[len(text) - (width - 3 - head) :]


def format_table(comp: Comparison, width: int = 28) -> str:
    """The comparison as fixed-width text: a column per run."""
    rows: list[tuple[str, list[str]]] = [(k, [_short(v, width) for v in vals]) for k, vals in comp.info_rows]
    rows = [(k, [v[:12] if k == "run id" else v for v in vals]) for k, vals in rows]
    sections = [("", rows)]
    if comp.param_rows:
        sections.append(("params that differ", [(k, [_short(v, width) for v in vals]) for k, vals in comp.param_rows]))
    if comp.metric_rows:
        sections.append(("metrics (latest)", [(k, [_fmt_metric(v) for v in vals]) for k, vals in comp.metric_rows]))
    all_rows = [r for _, rs in sections for r in rs]
    label_w = max(len(k) for k, _ in all_rows)
    col_w = [max(len(vals[i]) for _, vals in all_rows) for i in range(len(comp.runs))]
    lines = []
    for title, rs in sections:
        if title:
            lines.append(f"-- {title} " + "-" * max(0, label_w + sum(col_w) + 2 * len(col_w) - len(title) - 4))
        for key, vals in rs:
            lines.append("  ".join([key.ljust(label_w)] + [v.ljust(w) for v, w in zip(vals, col_w)]).rstrip())
    if not comp.param_rows:
        lines.append(f"(all {comp.same_params} params are the same in every run)")
    elif comp.same_params:
        lines.append(f"({comp.same_params} params with the same value in every run not shown)")
    return "\n".join(lines)


def _label(run) -> str:
    return f"{run.info.run_name or 'run'} ({run.info.run_id[:8]})"


def loss_plot(client, runs: list, path: str | Path, metric: str = LOSS_METRIC) -> Path | None:
    """A PNG of each run's `metric` history against step, one line per run; None if no run has it."""
    from vlm import plots

    histories = []
    for run in runs:
        points = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run.info.run_id, metric))
        if points:
            histories.append((run, [p[0] for p in points], [p[2] for p in points]))
    if not histories:
        return None
    fig, ax = plots.figure((8, 4.5))
    for run, steps, values in histories:
        ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=_label(run))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    plots.to_png(fig, path)
    path = Path(path)
    return path


def render_html(comp: Comparison, png: Path | None, uri: str) -> str:
    """A standalone HTML page: the table and the (inlined) loss plot."""
    e = html.escape
    head = "".join(f"<th>{e(_label(r))}</th>" for r in comp.runs)
    body = []
    for title, rows, fmt in (
        ("", comp.info_rows, lambda v: e(v or "")),
        ("params that differ", comp.param_rows, lambda v: "-" if v is None else e(v)),
        ("metrics (latest)", comp.metric_rows, _fmt_metric),
    ):
        if title and rows:
            body.append(f'<tr class="section"><th colspan="{len(comp.runs) + 1}">{e(title)}</th></tr>')
        for key, vals in rows:
            body.append(f"<tr><th>{e(key)}</th>" + "".join(f"<td>{fmt(v)}</td>" for v in vals) + "</tr>")
    if png is not None:
        data = base64.b64encode(Path(png).read_bytes()).decode()
        plot = f'<img alt="{LOSS_METRIC} curves" src="data:image/png;base64,{data}">'
    else:
        plot = f"<p>No run logged a <code>{LOSS_METRIC}</code> history.</p>"
    note = f"{comp.same_params} params with the same value in every run are not shown."
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>vlm runs compare</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-family: monospace; }}
tr.section th {{ background: #eee; font-family: sans-serif; }}
</style></head><body>
<h1>Run comparison</h1>
<p>MLflow store: <code>{e(uri)}</code>. {e(note)}</p>
<table><tr><th></th>{head}</tr>
{chr(10).join(body)}
</table>
<h2>{LOSS_METRIC}</h2>
{plot}
</body></html>
"""


def compare_runs(
    run_ids: list[str] = (),
    *,
    experiments: list[str] = (),
    parent: str | None = None,
    last: int | None = None,
    extra_metrics: list[str] = (),
    output: str | Path | None = None,
) -> dict:
    """Select runs, build the table and, with `output`, write the HTML report and its PNG.

    Returns {"table": str, "comparison": Comparison, "html": Path | None, "png": Path | None}.
    """
    if last is not None and last < 1:
        raise InputError("--last must be at least 1")
    client, uri = _client()
    runs = select_runs(client, run_ids=list(run_ids), experiments=list(experiments), parent=parent, last=last)
    comp = build_comparison(client, runs, list(extra_metrics))
    result = {"table": format_table(comp), "comparison": comp, "html": None, "png": None}
    if output and storage.is_url(output):  # written locally, then uploaded side by side
        url = storage.normalize(output)
        url = url if url.lower().endswith((".html", ".htm")) else url + ".html"
        storage.check_writable(storage.parent(url))
        with tempfile.TemporaryDirectory(prefix="vlm-compare-") as tmp:
            html_path, png = _write_report(client, runs, comp, uri, Path(tmp) / storage.basename(url))
            png_url = None
            if png is not None:
                png_url = url.rsplit(".", 1)[0] + ".png"
                storage.upload_file(png, png_url)
            storage.upload_file(html_path, url)
        result.update(html=url, png=png_url)
    elif output:
        html_path, png = _write_report(client, runs, comp, uri, Path(output))
        result.update(html=html_path, png=png)
    return result


def _write_report(client, runs, comp: Comparison, uri: str, html_path: Path) -> tuple[Path, Path | None]:
    if html_path.suffix.lower() not in (".html", ".htm"):
        html_path = html_path.with_suffix(html_path.suffix + ".html")
    png = loss_plot(client, runs, html_path.with_suffix(".png"))
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(render_html(comp, png, uri))
    return html_path, png
