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
from pathlib import Path

from vlm.errors import VlmError

EXIT_USER_ERROR = 2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="download URL lists into WebDataset shards (Ray Data)")
    p.add_argument("--input", required=True, help="URL list file, directory or glob (parquet/csv/tsv/jsonl/txt)")
    p.add_argument("--output", required=True, help="output directory for shards")
    p.add_argument("--retry-failed", action="store_true", help="re-download only samples that failed retryably")
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

    p = sub.add_parser("demo", help="the whole pipeline on embedded defaults, against a local web")
    p.add_argument("--output", default="demo_out", help="where the demo writes (default: demo_out)")
    p.add_argument("--n", type=int, default=3000, help="number of URLs the local web lists")
    p.add_argument("--port", type=int, default=8731, help="local web port (fixed, so reruns see the same URLs)")
    p.add_argument("--noisy-fraction", type=float, default=0.3, help="share of deliberately wrong captions")
    p.add_argument("--clip-steps", type=int, default=800, help="CLIP optimizer steps")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")

    p = sub.add_parser("web", help="serve the local test web (digits + failures) on 127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--n", type=int, default=1000, help="URLs to write with --write-urls")
    p.add_argument("--write-urls", help="write a URL list (suffix picks the format)")
    p.add_argument("--noisy-fraction", type=float, default=0.0)
    return parser


def _cmd_ingest(args) -> int:
    from pipelines.ingest import IngestConfig, ingest, summary_table
    from vlm import tracking
    from vlm.config import load_config

    cfg = load_config(IngestConfig, args.config, args.overrides)
    manifest = ingest(
        args.input, args.output, cfg, retry_failed=args.retry_failed, address=args.address, show_progress=not args.quiet
    )
    print(summary_table(manifest))
    print(f"output: {Path(args.output).resolve()}  ({manifest['num_shards']} shard(s), _SUCCESS written)")
    if manifest.get("mlflow_run_id"):
        print(f"mlflow run: {manifest['mlflow_run_id']}  (view: {tracking.ui_hint()})")
    return 0


def _cmd_train(args) -> int:
    from vlm import tracking
    from vlm.config import load_config

    output = args.output or f"outputs/train-{args.model}"
    if args.model == "clip":
        from pipelines.train_clip import TrainClipConfig, train_clip

        cfg = load_config(TrainClipConfig, args.config, args.overrides)
        name = cfg.model.preset
        result = train_clip(args.data, output, cfg, resume=args.resume, address=args.address)
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
        print(f"mlflow run: {result['mlflow_run_id']}  (view: {tracking.ui_hint()})")
    return 0


def _cmd_plan(args) -> int:
    from vlm.models.flamingo.plan import format_plan, plan_flamingo

    plans = plan_flamingo(
        args.preset,
        args.nodes,
        args.gpus_per_node,
        gpu_memory_gib=args.gpu_memory_gib,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        grad_checkpointing=not args.no_grad_checkpointing,
    )
    print(format_plan(plans, title=f"flamingo preset {args.preset}"))
    return 0


def _cmd_demo(args) -> int:
    from pipelines.demo import run_demo

    return run_demo(args)


def _cmd_web(args) -> int:
    from vlm.data.localweb import main as web_main

    argv = ["--port", str(args.port), "--n", str(args.n), "--noisy-fraction", str(args.noisy_fraction)]
    if args.write_urls:
        argv += ["--write-urls", args.write_urls]
    return web_main(argv) or 0


COMMANDS = {"ingest": _cmd_ingest, "train": _cmd_train, "plan": _cmd_plan, "demo": _cmd_demo, "web": _cmd_web}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
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
