"""The large Flamingo path on this machine: a ~1B-parameter Llama-layout LM, ZeRO-3 + CPU offload, 2 workers.

Issue 16's real-size smoke: an LM the size users start from (Llama layout, 1.1B parameters,
random weights saved with `save_pretrained` beside the offline tokenizer, as a user's LM
directory would be) wrapped by `vlm train flamingo` for one optimizer step under DeepSpeed
ZeRO-3 with optimizer and parameter offload on 2 Ray Train workers, then the export (the weights
gathered a chunk at a time on rank 0) and the k-shot eval reloading it. It measures what the
smoke must prove, that the large path fits and runs, and compares the memory with `vlm plan`:

* the wall time, the training step's time, the exit status;
* the peak RSS of every process of the run (the CLI, Ray, each training worker), sampled every
  0.5 s, and of the whole tree;
* `vlm plan flamingo` for the same model and layout: its CPU bytes per node for ZeRO-3 with
  optimizer + parameter offload (bf16 weights, as on GPUs), and the same model states in fp32
  (what a CPU run holds).

    python bench/flamingo_1b.py                  # builds the LM under a temp dir (~4.4 GB, 20 s)
    python bench/flamingo_1b.py --lm-dir DIR     # an LM directory of your own

Prints a table and writes `bench/results/flamingo_1b.json`. Needs ~20 GB of free memory.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import RESULTS, machine_info, report, text_table

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = RESULTS / "flamingo_1b.json"
GIB = 2**30
# TinyLlama-1.1B's layout: hidden 2048, 22 layers, 32 heads (4 KV heads), MLP 5632, vocab 32000.
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
RUN = [
    "model.cross_attn_every_n_layers=4",  # OpenFlamingo's placement for 1B-3B LMs
    "scaling.num_workers=2",
    "scaling.cpus_per_worker=1",
    "train.global_batch_size=2",
    "train.max_steps=1",
    "train.log_every=1",
    "data.max_length=64",
    "data.images_per_sequence=2",
    "deepspeed.zero_stage=3",
    "deepspeed.offload_optimizer=true",
    "deepspeed.offload_params=true",
    "eval.limit=2",  # the export -> reload -> k-shot path, not its accuracy (random weights)
    "eval.shots=[0,2]",
    "eval.ranking=false",
    "eval.max_new_tokens=2",
]


def build_lm(out: Path) -> dict:
    """A random Llama-layout LM and the offline tokenizer, written as a user's LM directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlm.models.flamingo.tokenizer import offline_tokenizer

    t0 = time.time()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(**LLAMA_1B))
    params = sum(p.numel() for p in lm.parameters())
    lm.save_pretrained(str(out), safe_serialization=True)
    offline_tokenizer().save_pretrained(str(out))
    return {"lm_params": params, "build_s": round(time.time() - t0, 1)}


class TreeRss:
    """Peak RSS per process and of the whole tree under `pid`, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.5):
        import psutil

        self.root, self.interval = psutil.Process(pid), interval
        self.peak_total, self.peaks, self.names = 0, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                    label = _label(proc.cmdline())
                except psutil.Error:
                    continue
                total += rss
                if label != "ray::IDLE" or proc.pid not in self.names:  # a worker's title changes with its task
                    self.names[proc.pid] = label
                self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), rss)
            self.peak_total = max(self.peak_total, total)
            self._stop.wait(self.interval)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _label(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    if text.startswith("ray::"):
        return text.split()[0].split(".")[0]  # ray::RayTrainWorker.poll_status -> ray::RayTrainWorker
    return "vlm train flamingo" if "vlm" in text and "train" in text else Path(cmdline[0]).name if cmdline else "?"


def plan_figures(lm_dir: Path) -> dict:
    """`vlm plan flamingo` for this model on 1 node x 2 ranks: ZeRO-3 + optimizer and parameter offload."""
    from vlm.models.flamingo.plan import plan_flamingo

    overrides = {"lm_name_or_path": str(lm_dir), "cross_attn_every_n_layers": 4}
    plans = plan_flamingo("tiny", 1, 2, micro_batch=1, seq_len=64, overrides=overrides)
    p = next(p for p in plans if p.zero_stage == 3 and p.offload == "optimizer+params")
    params = p.trainable_params + p.frozen_params
    # fp32 on CPU: 4-byte weights (not 2), fp32 gradients of the trainable part, the same Adam state.
    fp32 = 4 * params + 4 * p.trainable_params + 12 * p.trainable_params
    return {
        "trainable_params": p.trainable_params,
        "frozen_params": p.frozen_params,
        "plan_cpu_per_node_gib": round(p.cpu_bytes_per_node / GIB, 2),
        "fp32_model_states_gib": round(fp32 / GIB, 2),
    }


def run(lm_dir: Path, work: Path) -> dict:
    from vlm.testbed.digit_shards import write_digit_shards

    shards = work / "shards"
    write_digit_shards(shards, 64, samples_per_shard=32, image_size=32)
    cmd = [
        str(ROOT / ".venv" / "bin" / "vlm") if (ROOT / ".venv" / "bin" / "vlm").exists() else "vlm",
        "train",
        "flamingo",
        "--data",
        str(shards),
        "--output",
        str(work / "run"),
        f"model.lm_name_or_path={lm_dir}",
        *RUN,
    ]
    log = work / "run.log"
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=work)
        rss = TreeRss(proc.pid)
        rc = proc.wait()
        rss.close()
    wall = time.time() - t0
    text = log.read_text(errors="replace")
    step_s = None  # the bar's first 1/1 line: it stays open through export and eval, so later ones are longer
    for piece in text.replace("\r", "\n").splitlines():
        if step_s is None and "1/1 [" in piece and "s/step" in piece:
            step_s = float(piece.split("s/step")[0].rsplit(",", 1)[-1].strip())
    peaks = {f"{rss.names[pid]} (pid {pid})": v for pid, v in rss.peaks.items()}
    workers = {k: v for k, v in peaks.items() if k.startswith("ray::RayTrainWorker")}
    return {
        "rc": rc,
        "wall_s": round(wall, 1),
        "step_s": step_s,
        "peak_tree_gib": round(rss.peak_total / GIB, 2),
        "peak_worker_gib": sorted((round(v / GIB, 2) for v in workers.values()), reverse=True),
        "peak_processes_gib": {k: round(v / GIB, 2) for k, v in sorted(peaks.items(), key=lambda kv: -kv[1])[:6]},
        "log_tail": text[-1500:] if rc else "",
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lm-dir", help="an LM directory (default: a random 1.1B Llama-layout LM built in a temp dir)")
    p.add_argument("--json", default=str(DEFAULT_JSON))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="vlm-flamingo-1b-") as tmp:
        work = Path(tmp)
        built = {}
        lm_dir = Path(args.lm_dir) if args.lm_dir else work / "lm"
        if not args.lm_dir:
            print("building a random 1.1B Llama-layout LM ...", flush=True)
            built = build_lm(lm_dir)
        planned = plan_figures(lm_dir)
        print("vlm train flamingo: ZeRO-3 + optimizer/param offload, 2 workers, 1 step ...", flush=True)
        measured = run(lm_dir, work)
    result = {"built": built, "plan": planned, "measured": measured, "overrides": RUN}
    rows = [
        ("exit status", str(measured["rc"])),
        ("wall (build workers, 1 step, export, eval)", f"{measured['wall_s']} s"),
        ("training step", f"{measured['step_s']} s" if measured["step_s"] else "-"),
        ("parameters, trainable", f"{planned['trainable_params'] / 1e6:.1f}M"),
        ("parameters, frozen (vision + LM)", f"{planned['frozen_params'] / 1e9:.2f}B"),
        ("peak RSS per training worker", ", ".join(f"{g} GiB" for g in measured["peak_worker_gib"])),
        ("peak RSS of the run's process tree", f"{measured['peak_tree_gib']} GiB"),
        ("vlm plan: CPU per node, ZeRO-3 + offload (bf16)", f"{planned['plan_cpu_per_node_gib']} GiB"),
        ("the same model states in fp32 (this CPU run)", f"{planned['fp32_model_states_gib']} GiB"),
    ]
    if measured["rc"]:
        print(measured["log_tail"], file=sys.stderr)
    report(args.json, result | {"machine": machine_info()}, "\n".join(text_table([("", "value"), *rows])))
    return 0 if measured["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
