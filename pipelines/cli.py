"""The `vlm` command: thin parsing in front of the stages.

Every subcommand takes `--config FILE` and trailing dotted `key=value` overrides; knobs live in
the config tree, not in flags. User errors (bad config, missing input, unreachable Ray) print
one line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from vlm.errors import VlmError

EXIT_USER_ERROR = 2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show Ray workers' output and other libraries' notices"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="download URL lists into WebDataset shards (Ray Data)")
    p.add_argument("--input", required=True, help="URL list file, directory or glob (parquet/csv/tsv/jsonl/txt)")
    p.add_argument("--output", required=True, help="output directory for shards")
    p.add_argument("--retry-failed", action="store_true", help="re-download only samples that failed retryably")
    _add_config_args(p)

    p = sub.add_parser("clean", help="basic filters, exact + near dedup, CLIP score over shards (Ray Data)")
    p.add_argument("--input", required=True, help="shard directory (output of ingest)")
    p.add_argument("--output", required=True, help="output directory for cleaned shards")
    _add_config_args(p)

    p = sub.add_parser("capfilt", help="BLIP CapFilt: synthetic captions + ITM filter over shards (Ray Data actors)")
    p.add_argument("--input", required=True, help="shard directory (output of ingest or clean)")
    p.add_argument("--output", required=True, help="output directory for cleaned shards")
    _add_config_args(p)

    train = sub.add_parser("train", help="train a model on Ray Train + DeepSpeed")
    models = train.add_subparsers(dest="model", required=True)
    p = models.add_parser("clip", help="contrastive CLIP pretraining (open_clip)")
    p.add_argument("--data", required=True, help="shard directory, glob, or comma-separated list")
    p.add_argument("--output", default=None, help="run directory (default: outputs/train-clip)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    _add_config_args(p)
    p = models.add_parser("flamingo", help="Flamingo: resampler + gated cross-attention into a frozen LM")
    p.add_argument("--data", required=True, help="shard directory, glob, or comma-separated list")
    p.add_argument("--output", default=None, help="run directory (default: outputs/train-flamingo)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    _add_config_args(p)
    p = models.add_parser("blip", help="BLIP CapFilt captioner (LM loss) or filter (ITC + ITM) on clean pairs")
    p.add_argument("--task", required=True, choices=["captioner", "filter"], help="which CapFilt model to train")
    p.add_argument("--data", required=True, help="shard directory, glob, or comma-separated list")
    p.add_argument("--output", default=None, help="run directory (default: outputs/train-blip-TASK)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    _add_config_args(p)

    plan = sub.add_parser("plan", help="per-GPU memory plan for a model under each ZeRO stage")
    plans = plan.add_subparsers(dest="model", required=True)
    p = plans.add_parser("flamingo", help="Flamingo: params, grads, optimizer, activations per GPU")
    p.add_argument("--preset", required=True, help="tiny, tiny-llama, flamingo-3b, flamingo-9b")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--no-grad-checkpointing", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="model fields, e.g. lm_name_or_path=DIR")

    p = sub.add_parser("demo", help="the whole mission as one pipeline on embedded defaults, against a local web")
    p.add_argument("--output", default="demo_out", help="where the demo writes (default: demo_out)")
    p.add_argument("--force", action="store_true", help="rerun every stage, done or not")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="pipeline overrides, e.g. urls.params.n=1000")

    pipe = sub.add_parser("pipeline", help="run a pipeline of stages from one YAML (configs/pipelines/)")
    pipes = pipe.add_subparsers(dest="action", required=True)
    p = pipes.add_parser("run", help="run the stages that are not done yet, in dependency order")
    p.add_argument("file", help="pipeline YAML, e.g. configs/pipelines/demo.yaml")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="rerun STAGE and everything after it")
    p.add_argument("--only", metavar="STAGE", help="run only STAGE (its inputs must be done)")
    p.add_argument("--force", action="store_true", help="rerun every stage, done or not")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="output=DIR, STAGE.params.K=V, STAGE.cfg.key=V")

    p = sub.add_parser("web", help="serve the local test web (digits + failures) on 127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--n", type=int, default=1000, help="URLs to write with --write-urls")
    p.add_argument("--write-urls", help="write a URL list (suffix picks the format)")
    p.add_argument("--noisy-fraction", type=float, default=0.0)

    p = sub.add_parser("submit", help="run a vlm command as a Ray job on a cluster (Job Submission API)")
    _add_job_address(p)
    p.add_argument("--no-wait", action="store_true", help="print the job id and return instead of tailing logs")
    p.add_argument("--working-dir", help="code shipped with the job (default: the project root)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="environment variable for the job")
    p.add_argument("--pip", action="append", default=[], metavar="REQ", help="pip requirement installed for the job")
    p.add_argument("--job-id", help="submission id (default: generated)")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- vlm COMMAND ... (everything after --)")

    jobs = sub.add_parser("jobs", help="list, inspect, follow or stop Ray jobs")
    actions = jobs.add_subparsers(dest="action", required=True)
    _add_job_address(actions.add_parser("list", help="jobs on the cluster, newest last"))
    for name, text in (("status", "a job's status"), ("logs", "a job's logs"), ("stop", "stop a running job")):
        p = actions.add_parser(name, help=text)
        p.add_argument("job_id", metavar="JOB")
        _add_job_address(p)
        if name == "logs":
            p.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")

    runs = sub.add_parser("runs", help="MLflow runs")
    run_actions = runs.add_subparsers(dest="action", required=True)
    p = run_actions.add_parser("compare", help="runs side by side: differing params, key metrics, loss curves")
    p.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="runs to compare")
    p.add_argument("--experiment", action="append", default=[], help="all runs of this experiment (repeatable)")
    p.add_argument("--parent", help="the nested stage runs of this pipeline run")
    p.add_argument("--last", type=int, help="only the N most recent of the selected runs")
    p.add_argument("--metric", action="append", default=[], help="another metric to show (repeatable)")
    p.add_argument("--output", help="write an HTML report here (and its loss plot beside it as .png)")
    return parser


def _add_job_address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address", help="Ray dashboard, http://HOST:8265 (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, else local)"
    )


def _shard_stage(args, config_cls, run, summary_table, **extra) -> int:
    """Run a shard stage from its command line; print its summary table, output and MLflow run."""
    from vlm import storage, tracking
    from vlm.config import load_config

    cfg = load_config(config_cls, args.config, args.overrides)
    manifest = run(args.input, args.output, cfg, address=args.address, show_progress=not args.quiet, **extra)
    print(summary_table(manifest))
    print(f"output: {storage.normalize(args.output)}  ({manifest['num_shards']} shard(s), _SUCCESS written)")
    if manifest.get("mlflow_run_id"):
        print(f"mlflow run: {manifest['mlflow_run_id']}  (view: {tracking.ui_hint(manifest['mlflow_run_id'])})")
    return 0


def _cmd_ingest(args) -> int:
    from pipelines.ingest import IngestConfig, ingest, summary_table

    return _shard_stage(args, IngestConfig, ingest, summary_table, retry_failed=args.retry_failed)


def _cmd_clean(args) -> int:
    from pipelines.clean import CleanConfig, clean, summary_table

    return _shard_stage(args, CleanConfig, clean, summary_table)


def _cmd_capfilt(args) -> int:
    from pipelines.capfilt import CapfiltConfig, capfilt, summary_table

    return _shard_stage(args, CapfiltConfig, capfilt, summary_table)


def _cmd_train(args) -> int:
    from vlm import tracking
    from vlm.config import load_config

    output = args.output or f"outputs/train-{args.model}"
    if args.model == "clip":
        from pipelines.train_clip import TrainClipConfig, train_clip

        cfg = load_config(TrainClipConfig, args.config, args.overrides)
        name = cfg.model.preset
        result = train_clip(args.data, output, cfg, resume=args.resume, address=args.address)
    elif args.model == "blip":
        from pipelines.train_blip import TrainBlipConfig, train_blip

        cfg = load_config(TrainBlipConfig, args.config, [*args.overrides, f"task={args.task}"])
        name = f"blip-{cfg.task} ({cfg.blip.backend} {cfg.blip.preset})"
        output = args.output or f"outputs/train-blip-{cfg.task}"
        result = train_blip(args.data, output, cfg, resume=args.resume, address=args.address)
    else:
        from pipelines.train_flamingo import TrainFlamingoConfig, train_flamingo

        cfg = load_config(TrainFlamingoConfig, args.config, args.overrides)
        name = f"flamingo-{cfg.model_preset}"
        result = train_flamingo(args.data, output, cfg, resume=args.resume, address=args.address)
    print(f"trained {name} for {result['steps']} steps; model exported to {result['export']}")
    for key, value in sorted(result["eval"].items()):
        if key != "step" and isinstance(value, (int, float)):
            print(f"  {key:<24} {value:.4f}")
    if result.get("mlflow_run_id"):
        print(f"mlflow run: {result['mlflow_run_id']}  (view: {tracking.ui_hint(result['mlflow_run_id'])})")
    return 0


def _cmd_plan(args) -> int:
    from vlm.config import parse_overrides
    from vlm.models.flamingo.plan import format_plan, plan_flamingo

    plans = plan_flamingo(
        args.preset,
        args.nodes,
        args.gpus_per_node,
        gpu_memory_gib=args.gpu_memory_gib,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        grad_checkpointing=not args.no_grad_checkpointing,
        overrides=parse_overrides(args.overrides),
    )
    print(format_plan(plans, title=" ".join([f"flamingo preset {args.preset}", *args.overrides])))
    return 0


def _cmd_demo(args) -> int:
    from pipelines.demo import run_demo

    return run_demo(args)


def _cmd_pipeline(args) -> int:
    from pipelines.runner import load_pipeline, run_pipeline, summary_table
    from vlm import tracking

    pipeline = load_pipeline(args.file, args.overrides)
    print(f"pipeline {pipeline.name}: {len(pipeline.stages)} stages -> {pipeline.output}")
    result = run_pipeline(pipeline, from_stage=args.from_stage, only=args.only, force=args.force, address=args.address)
    print()
    print(summary_table(result))
    print(f"pipeline {pipeline.name} took {result['duration_s']:.0f}s; mlflow run: {result['mlflow_run_id']}")
    print(f"  view: {tracking.ui_hint(result['mlflow_run_id'])}")
    if result["failed"]:
        first = result["failed"][0]
        print(
            f"vlm pipeline: error: stage {first!r} failed: {result['stages'][first]['error']} "
            "(rerun the same command to continue from there)",
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_web(args) -> int:
    from vlm.testbed.web import main as web_main

    argv = ["--port", str(args.port), "--n", str(args.n), "--noisy-fraction", str(args.noisy_fraction)]
    if args.write_urls:
        argv += ["--write-urls", args.write_urls]
    return web_main(argv) or 0


def _cmd_submit(args) -> int:
    from pipelines.jobs import submit_command

    return submit_command(args)


def _cmd_jobs(args) -> int:
    from pipelines.jobs import jobs_command

    return jobs_command(args)


def _cmd_runs(args) -> int:
    from pipelines.compare import compare_runs

    result = compare_runs(
        run_ids=args.run_ids,
        experiments=args.experiment,
        parent=args.parent,
        last=args.last,
        extra_metrics=args.metric,
        output=args.output,
    )
    print(result["table"])
    if result["html"]:
        plot = f" and {result['png']}" if result["png"] else " (no loss history to plot)"
        print(f"report: {result['html']}{plot}")
    return 0


COMMANDS = {
    "ingest": _cmd_ingest,
    "train": _cmd_train,
    "plan": _cmd_plan,
    "demo": _cmd_demo,
    "pipeline": _cmd_pipeline,
    "capfilt": _cmd_capfilt,
    "clean": _cmd_clean,
    "web": _cmd_web,
    "submit": _cmd_submit,
    "jobs": _cmd_jobs,
    "runs": _cmd_runs,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options too (`pipeline run F --only S k=v`); argparse
    # stops filling a positional list at the first option, so collect the rest here.
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.parse_args(argv)  # argparse's own error for what is really unknown
        args.overrides = [*(args.overrides or []), *extra]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from vlm.logs import quiet_libraries, set_console

    set_console(verbose=args.verbose, quiet=args.quiet)
    quiet_libraries()
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    try:
        return COMMANDS[args.command](args)
    except VlmError as exc:
        print(f"vlm {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"vlm {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
