"""`vlm demo`: the mission on embedded defaults, as one pipeline run (configs/pipelines/demo.yaml).

local web (digits, 30% wrong captions) -> ingest -> clean -> BLIP captioner + filter trained on a
clean subset -> CapFilt -> CLIP on raw and on CapFilt-cleaned shards -> Flamingo -> comparison.
It is `vlm pipeline run configs/pipelines/demo.yaml` plus a closing summary of the figures that
say whether cleaning paid off. A second run skips every stage that is done.
"""

from __future__ import annotations

from pathlib import Path

from vlm import storage, tracking

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "configs" / "pipelines" / "demo.yaml"


def _stage_info(out: str) -> dict:
    path = storage.join(out, "_stage.json")
    return storage.read_json(path) if out and storage.is_file(path) else {}


def _eval(out: str) -> dict:
    path = storage.join(out, "eval.json")
    return storage.read_json(path) if out and storage.is_file(path) else {}


def _pct(value) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "n/a"


def summary(pipeline, result: dict) -> str:
    """The figures the demo exists to show, from the stages' own outputs."""
    out = {name: s.output for name, s in pipeline.stages.items()}
    lines = [f"demo finished in {result['duration_s']:.0f}s ({len(result['failed'])} failed stage(s))"]
    if "capfilt" in out:
        manifest_path = storage.join(out["capfilt"], "manifest.json")
        if storage.is_file(manifest_path):
            m = storage.read_json(manifest_path)
            t = m["totals"]
            q = t.get("quality", {})
            lines.append(
                f"  CapFilt kept {t['kept']}/{t['count']} samples ({_pct(t['kept_fraction'])}); the filter flagged "
                f"wrong web captions with precision {_pct(q.get('precision'))}, recall {_pct(q.get('recall'))} "
                "(against the known noise labels)"
            )
    raw, cleaned = _eval(out.get("clip-raw", "")), _eval(out.get("clip-capfilt", ""))
    if raw and cleaned:
        lines.append(
            f"  CLIP zero-shot top-1 on held-out digits: raw {_pct(raw.get('zeroshot_top1'))} vs CapFilt-cleaned "
            f"{_pct(cleaned.get('zeroshot_top1'))}"
        )
    flamingo = _eval(out.get("flamingo", ""))
    shots = {k: v for k, v in flamingo.items() if k.startswith(("accuracy", "fewshot", "rank")) and "shot" in k}
    if shots:
        lines.append("  Flamingo on held-out digits: " + ", ".join(f"{k} {_pct(v)}" for k, v in sorted(shots.items())))
    novel = {k: v for k, v in flamingo.items() if k.startswith("novel_") and k.endswith("_acc")}
    if novel:
        lines.append(
            "  Flamingo, novel digit -> word mapping: " + ", ".join(f"{k} {_pct(v)}" for k, v in sorted(novel.items()))
        )
    report = storage.join(out["compare"], "report.html") if out.get("compare") else ""
    if report and storage.is_file(report):
        lines.append(f"  comparison report: {report}")
    lines.append(f"  outputs:     {pipeline.output}")
    lines.append(f"  mlflow runs: {tracking.tracking_uri()} (experiment {pipeline.experiment!r})")
    lines.append(f"  open the UI: {tracking.ui_hint(result.get('mlflow_run_id'))}")
    return "\n".join(lines)


def run_demo(args) -> int:
    from pipelines.runner import load_pipeline, run_pipeline, summary_table

    overrides = [f"output={args.output}", *args.overrides]
    pipeline = load_pipeline(PIPELINE, overrides)
    print(f"vlm demo: {len(pipeline.stages)} stages ({', '.join(pipeline.order())}) -> {pipeline.output}")
    result = run_pipeline(pipeline, force=args.force, address=args.address)
    print()
    print(summary_table(result))
    print()
    print(summary(pipeline, result))
    if result["failed"]:
        first = result["failed"][0]
        print(f"vlm demo: error: stage {first!r} failed: {result['stages'][first]['error']}")
        return 1
    return 0
