"""CLIP training with no shared directory: shards read from the local S3 server (moto, its own process),
Ray Train's checkpoints, the run's files and the export written to it, a killed run resumed from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pipelines.train_clip import TrainClipConfig, train_clip
from vlm import storage
from vlm.config import load_config
from vlm.errors import InputError
from vlm.testbed.digit_shards import write_digit_shards

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

SMALL = [
    "scaling.num_workers=2",
    "scaling.cpus_per_worker=1",
    "train.global_batch_size=32",
    "train.log_every=2",
    "train.checkpoint_every=2",
    "optim.lr=2e-3",
    "optim.warmup_steps=2",
    "deepspeed.zero_stage=3",
    "eval.limit=20",
]


def cfg_for(*overrides: str) -> TrainClipConfig:
    return load_config(TrainClipConfig, None, [*SMALL, *overrides])


@pytest.fixture(scope="module")
def s3_shards(s3, tmp_path_factory):
    """Digit shards in ingest's layout, uploaded to a fresh bucket; the local copy is removed."""
    local = tmp_path_factory.mktemp("digits")
    write_digit_shards(local, 192, samples_per_shard=96, image_size=32)
    url = s3.bucket() + "/shards"
    storage.copy_dir(local, url)
    for path in local.iterdir():
        path.unlink()
    return url


def _registered_step(out: str) -> int:
    """The latest checkpoint Ray Train has registered in its run snapshot on S3 (0: none yet)."""
    try:
        runs = storage.listdir(storage.join(out, "ray"))
        for run in runs:
            snap = storage.join(out, "ray", run, "checkpoint_manager_snapshot.json")
            if storage.is_file(snap):
                latest = storage.read_json(snap).get("latest_checkpoint_result")
                if latest:
                    return int(latest["metrics"]["step"])
    except (InputError, FileNotFoundError, json.JSONDecodeError):
        pass
    return 0


def _metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    import mlflow

    client = mlflow.MlflowClient(uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _embeddings(model, tokenizer):
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokenizer(["a handwritten seven", "the digit 2", "x"]))


@pytest.mark.timeout(480)
def test_killed_s3_run_resumes_from_s3_and_exports_there(s3, s3_shards, ray_local, mlflow_store, tmp_path, monkeypatch):
    """ZeRO-3 on 2 workers from s3:// shards to an s3:// output: kill the driver after a checkpoint is
    registered on S3, `--resume` continues from it in the same MLflow run and survives a killed worker, and
    the export lands in the bucket, loads in open_clip from a downloaded copy and equals the final DeepSpeed
    checkpoint (also on S3)."""
    import open_clip

    from vlm.models.clip.build import load_export, register_presets
    from vlm.train.loop import consolidate_zero_checkpoint

    monkeypatch.chdir(tmp_path)  # a URL taken for a local path would show up here as ./s3:/...
    bucket = s3.bucket()
    out = f"{bucket}/runs/clip"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "-q", "train", "clip", "--data", s3_shards, "--output", out]
        + ["--address", ray_local.get_runtime_context().gcs_address, *SMALL, "train.max_steps=12"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and _registered_step(out) < 2 and proc.poll() is None:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = _registered_step(out)
    assert 2 <= killed_at < 12, f"killed at step {killed_at}: no checkpoint registered before the kill, or none left"
    first_run = storage.read_json(f"{out}/train_state.json")["mlflow_run_id"]
    time.sleep(2)  # let Ray reap the dead job's workers before starting new ones

    # The resumed run loses a worker too (SIGKILL, found by its pid object on S3) after a further checkpoint:
    # Ray Train restarts the group from the latest checkpoint it registered on S3.
    pid_file = f"{out}/_workers/rank1.pid"
    old_pid, killed = int(storage.read_text(pid_file)), {}

    def kill_a_worker():
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                pid = int(storage.read_text(pid_file))
            except (FileNotFoundError, InputError, ValueError):
                pid = old_pid
            step = _registered_step(out)
            if pid != old_pid and step >= killed_at + 2:
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, step=step)
                return
            time.sleep(0.3)

    thread = threading.Thread(target=kill_a_worker, daemon=True)
    thread.start()
    result = train_clip(s3_shards, out, cfg_for("train.max_steps=16", "train.max_failures=2"), resume=True)
    thread.join(timeout=5)
    assert killed, "the resumed run's worker was never killed"
    assert int(storage.read_text(pid_file)) != killed["pid"]  # a new worker took over
    assert result["mlflow_run_id"] == first_run and result["steps"] == 16
    resumed = [v for _, v in _metric_history(mlflow_store, first_run, "resumed_from_step")]
    assert len(resumed) >= 2 and resumed[0] >= killed_at and resumed[-1] >= killed["step"], (resumed, killed)
    steps = [s for s, _ in _metric_history(mlflow_store, first_run, "loss")]
    assert steps[-1] == 16 and steps.count(16) == 1
    import mlflow

    client = mlflow.MlflowClient(mlflow_store)  # the S3 export and config, logged as the local ones are
    logged = {a.path for a in client.list_artifacts(first_run, "model/export")} | {
        a.path for a in client.list_artifacts(first_run)
    }
    assert {"model/export/open_clip_model.safetensors", "config.yaml"} <= logged, logged

    # Everything is in the bucket: the run's files, each rank's ZeRO-3 shard of the final checkpoint, the export.
    keys = s3.keys(out)
    prefix = out[len("s3://") :].split("/", 1)[1] + "/"
    names = {k[len(prefix) :] for k in keys}
    for name in ("train_state.json", "config.yaml", "deepspeed.json", "eval.json", "_workers/rank1.pid"):
        assert name in names, (name, sorted(names))
    assert {"export/open_clip_model.safetensors", "export/open_clip_config.json"} <= names
    assert result["export"] == f"{out}/export"
    final = result["checkpoint"]
    assert final.startswith(f"{out}/ray/") and final.endswith("step_00000016"), final
    ckpt = final[len(out) + 1 :]
    for rank in (0, 1):
        assert any(n.startswith(f"{ckpt}/state/") and f"rank_{rank}_" in n for n in names), (rank, sorted(names))
    assert list(tmp_path.iterdir()) == []  # nothing written to a local output directory

    # The export loads in open_clip from a downloaded copy and equals the S3 checkpoint consolidated to fp32.
    by_url, tok = load_export(result["export"])
    with storage.local_dir(result["export"]) as local:
        by_dir = open_clip.create_model(f"local-dir:{local}").eval()
    with storage.local_dir(final) as local:
        sd_file = consolidate_zero_checkpoint(local, tmp_path / "consolidated.safetensors")
    from safetensors.torch import load_file

    consolidated = load_file(str(sd_file))
    consolidated["logit_scale"] = consolidated["logit_scale"].reshape(())
    register_presets()
    from_ckpt = open_clip.create_model("vlm-clip-tiny").eval()
    from_ckpt.load_state_dict(consolidated)
    for x, y, z in zip(_embeddings(by_url, tok), _embeddings(by_dir, tok), _embeddings(from_ckpt, tok)):
        torch.testing.assert_close(x, y)
        torch.testing.assert_close(x, z)


BEFORE_RAY = """
import json, sys
import ray
from pipelines.train_clip import TrainClipConfig, train_clip
from vlm.config import load_config
from vlm.errors import InputError

data, out = sys.argv[1:3]
try:
    train_clip(data, out, load_config(TrainClipConfig, None, sys.argv[3:]))
    print(json.dumps({"error": None}))
except InputError as exc:
    print(json.dumps({"error": str(exc), "ray_started": ray.is_initialized()}))
"""


def _train_in_fresh_process(data: str, out: str) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", BEFORE_RAY, data, out, *SMALL],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, RAY_ADDRESS=""),
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_missing_bucket_is_one_line_before_ray(s3, s3_shards):
    """A missing output or data bucket: one InputError naming it, raised before Ray starts; nothing created."""
    missing = "s3://vlm-no-such-bucket-for-training"
    got = _train_in_fresh_process(s3_shards, f"{missing}/runs/x")
    assert got["error"] and "bucket" in got["error"] and "does not exist" in got["error"], got
    assert "\n" not in got["error"] and got["ray_started"] is False, got
    out = s3.bucket() + "/runs/x"
    got = _train_in_fresh_process(f"{missing}/shards", out)
    assert got["error"] and missing in got["error"] and "\n" not in got["error"], got
    assert got["ray_started"] is False, got
    assert s3.keys(out) == []  # the output's write probe left nothing behind


def test_cli_refuses_a_missing_output_bucket_with_exit_2(s3, s3_shards):
    res = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "-q", "train", "clip", "--data", s3_shards]
        + ["--output", "s3://vlm-no-such-bucket-for-training/runs/x", *SMALL],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, RAY_ADDRESS=""),
        cwd=ROOT,
    )
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "vlm-no-such-bucket-for-training" in lines[0] and "does not exist" in lines[0], lines


def test_flamingo_takes_its_vision_checkpoint_and_pretrained_lm_from_s3(s3, s3_shards, tmp_path):
    """A CLIP export in a bucket is Flamingo's vision_checkpoint; with an s3:// output the caption-pretrained LM
    is uploaded there (marker last) and the model builds from those URLs, as workers do (no Ray needed)."""
    import open_clip

    from pipelines.train_flamingo import TrainFlamingoConfig, check_vision_checkpoint, model_config, pretrain_lm
    from vlm.data.flamingo_data import flamingo_tokenizer
    from vlm.models.clip.build import export_clip
    from vlm.models.clip.build import model_config as clip_model_config
    from vlm.models.flamingo import build_flamingo
    from vlm.models.flamingo.text_lm import is_done

    bucket = s3.bucket()
    clip_cfg = clip_model_config("vlm-clip-tiny")
    torch.manual_seed(0)
    clip = open_clip.CLIP(**clip_cfg)
    export_clip(clip.state_dict(), clip_cfg, tmp_path / "clip", "vlm-clip-tiny")
    storage.copy_dir(tmp_path / "clip", f"{bucket}/clip-export")
    overrides = ["lm_pretrain.steps=2", "lm_pretrain.seq_len=64", "lm_pretrain.max_captions=32"]
    cfg = load_config(TrainFlamingoConfig, None, [f"vision_checkpoint={bucket}/clip-export", *overrides])
    mcfg = model_config(cfg)
    assert mcfg.vision_checkpoint == f"{bucket}/clip-export/open_clip_model.safetensors"
    assert mcfg.vision_model == clip_cfg
    check_vision_checkpoint(mcfg)

    out = f"{bucket}/runs/flamingo"
    mcfg, metrics = pretrain_lm([s3_shards + "/00000.tar"], out, cfg, mcfg)
    assert mcfg.lm_name_or_path == f"{out}/lm" and is_done(mcfg.lm_name_or_path)
    assert metrics["lm_pretrain_captions"] == 32
    names = {k.rsplit("/lm/", 1)[1] for k in s3.keys(f"{out}/lm")}
    assert {"_SUCCESS", "config.json", "model.safetensors"} <= names, names
    model, _ = build_flamingo(mcfg)
    assert flamingo_tokenizer(mcfg.lm_name_or_path).convert_tokens_to_ids("<image>") == model.media_token_id
    visual = {k.removeprefix("visual."): v for k, v in clip.state_dict().items() if k.startswith("visual.")}
    for name, value in model.vision_encoder.state_dict().items():
        torch.testing.assert_close(value, visual[name])


def test_blip_export_in_a_bucket_loads_as_pretrained(s3, tmp_path):
    """A BLIP export uploaded to S3 loads as `pretrained` (what CapFilt and a fine-tuning run start from)."""
    from vlm.models.blip.build import build_captioner, export_pretrained
    from vlm.models.blip.config import BlipConfig

    model, processor = build_captioner(BlipConfig(preset="small"))
    export_pretrained(model, processor, tmp_path / "captioner")
    url = s3.bucket() + "/blip/captioner"
    storage.copy_dir(tmp_path / "captioner", url)
    loaded, _ = build_captioner(BlipConfig(pretrained=url))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_shard_discovery_on_s3(s3, s3_shards, tmp_path):
    """A bucket prefix or glob lists its tars; a tar whose stats object is not there yet (a writer still
    uploading, or killed) is left out; shards on two storages, or a prefix that is not there: one line."""
    from pipelines.training import find_shards

    complete = [f"{s3_shards}/00000.tar", f"{s3_shards}/00001.tar"]
    assert find_shards(s3_shards) == complete
    assert find_shards(f"{s3_shards}/0000[0].tar") == complete[:1]
    url = s3.bucket() + "/shards"
    storage.copy_dir(s3_shards, url)
    storage.write_bytes(f"{url}/00002.tar", storage.read_bytes(complete[0]))  # no 00002_stats.json
    assert find_shards(url) == [f"{url}/00000.tar", f"{url}/00001.tar"]
    (tmp_path / "local.tar").write_bytes(b"")
    with pytest.raises(InputError, match="mixes storage"):
        find_shards(f"{url},{tmp_path}")
    with pytest.raises(InputError, match="does not exist"):
        find_shards(f"{url}-missing")
