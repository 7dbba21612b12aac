"""The CUDA paths: bf16 selection, NCCL, pinned transfers, GPU actor pools, device-side normalization, the
memory plan against a measured peak. Marked `gpu`; each skips cleanly where CUDA is absent (CPU machines
and CI), and runs for real on a GPU machine (`pytest -m gpu tests/test_gpu.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]


def test_precision_auto_is_bf16_on_a_gpu():
    """`deepspeed.precision: auto` turns bf16 on for a GPU run (and pins offload buffers), fp32 without GPUs."""
    from vlm.train.config import DeepSpeedConfig, LoopConfig, OptimConfig, deepspeed_config, resolve_precision

    ds = DeepSpeedConfig(zero_stage=3, precision="auto", offload_optimizer=True)
    assert torch.cuda.is_bf16_supported(), "every GPU this project targets (A100, H100, H200) has bf16"
    assert resolve_precision(ds, use_gpu=True) == "bf16"
    assert resolve_precision(ds, use_gpu=False) == "fp32"
    cfg = deepspeed_config(OptimConfig(), ds, LoopConfig(global_batch_size=8), 1, use_gpu=True)
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert cfg["zero_optimization"]["offload_optimizer"]["pin_memory"] is True


def _backend_probe(config: dict) -> None:
    import ray.train
    import ray.train.torch

    x = torch.ones(4, device=ray.train.torch.get_device())
    torch.distributed.all_reduce(x)
    ray.train.report({"backend": torch.distributed.get_backend(), "device": str(x.device), "sum": float(x.sum().cpu())})


def test_ray_train_gpu_workers_use_nccl(ray_local):
    """A `scaling.use_gpu` TorchTrainer gives each worker a CUDA device and the NCCL process group."""
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _backend_probe,
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=True, resources_per_worker={"CPU": 1}),
    )
    result = trainer.fit()
    assert result.error is None
    assert result.metrics["backend"] == "nccl"
    assert result.metrics["device"].startswith("cuda")
    assert result.metrics["sum"] == 4.0


def test_ray_data_batches_arrive_on_the_gpu_through_pinned_memory(ray_local):
    """iter_torch_batches(device=cuda, pin_memory=True), as a GPU worker reads, delivers the same uint8 images."""
    import ray.data

    images = np.random.default_rng(0).integers(0, 256, (16, 3, 8, 8), dtype=np.uint8)
    ds = ray.data.from_items([{"image": im} for im in images])
    got = list(ds.iterator().iter_torch_batches(batch_size=8, device="cuda", pin_memory=True))
    assert [b["image"].device.type for b in got] == ["cuda", "cuda"]
    assert torch.equal(torch.cat([b["image"] for b in got]).cpu(), torch.from_numpy(images))


def test_dataloader_pinned_batches_copy_to_the_gpu():
    """A pin_memory DataLoader (bench/_clip_loops.py's plain+DataLoader feed) yields pinned batches that copy
    to the GPU without blocking."""
    data = torch.arange(64, dtype=torch.float32).reshape(16, 4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=8, pin_memory=True)
    (first,) = next(iter(loader))
    assert first.is_pinned()
    on_gpu = first.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), data[:8])


def test_normalize_runs_on_the_device():
    """CLIP's uint8 -> normalized images happen on the GPU, in the training dtype, matching the CPU result."""
    from vlm.data.clip_data import normalize

    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    on_gpu = normalize(images.cuda(), torch.bfloat16)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.bfloat16
    torch.testing.assert_close(on_gpu.float().cpu(), normalize(images), atol=0.02, rtol=0.01)


def _digit_rows(n: int) -> dict:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from capfilt import digit_batch
    finally:
        sys.path.remove(str(REPO / "bench"))
    return digit_batch(n)


def test_capfilt_pools_with_num_gpus_caption_on_the_gpu(ray_local):
    """captioner/filter pools with `num_gpus` run their BLIP models on the GPU Ray gives the actor."""
    import ray.data

    from pipelines.capfilt import PoolConfig, _bound, _pool_args
    from vlm.config import to_dict
    from vlm.data.capfilt import CaptionerStep, FilterStep
    from vlm.models.blip.config import BlipConfig

    blip = to_dict(BlipConfig(preset="tiny", min_length=4, max_length=4))
    pool = _pool_args(PoolConfig(actors=1, batch_size=8, num_gpus=0.5))
    assert pool["num_gpus"] == 0.5

    def with_device(step_cls, attr):
        base = _bound(step_cls, blip)

        def call(self, batch):
            out = base.__call__(self, batch)
            out[f"{attr}_device"] = np.array([str(getattr(self, attr).device)] * len(out["key"]))
            return out

        return type(step_cls.__name__, (base,), {"__call__": call})

    rows = _digit_rows(16)
    ds = ray.data.from_items([{k: rows[k][i] for k in rows} for i in range(16)])
    ds = ds.map_batches(with_device(CaptionerStep, "captioner"), batch_format="numpy", **pool)
    ds = ds.map_batches(with_device(FilterStep, "filter"), batch_format="numpy", **pool)
    out = ds.take_all()
    assert len(out) == 16
    assert all(r["captioner_device"].startswith("cuda") for r in out)
    assert all(r["filter_device"].startswith("cuda") for r in out)


def test_clipscore_pool_with_num_gpus_scores_on_the_gpu(ray_local, tmp_path):
    """The clean stage's ClipScorer actors given `num_gpus` score on the GPU, with finite cosines."""
    import ray.data

    from vlm.data.cleaning import ClipScorer
    from vlm.models.clip.build import CLIPModelConfig, build_clip, export_clip, model_config

    model = build_clip(CLIPModelConfig(preset="vlm-clip-tiny"))[0]
    export_clip(model.state_dict(), model_config("vlm-clip-tiny"), tmp_path / "export", "vlm-clip-tiny")
    base = ClipScorer.bound(str(tmp_path / "export"))

    def call(self, batch):
        out = base.__call__(self, batch)
        out["device"] = np.array([str(self.device)] * len(out["key"]))
        return out

    probe = type("ClipScorer", (base,), {"__call__": call})
    rows = _digit_rows(32)
    items = [{"key": rows["key"][i], "image": rows["jpg"][i], "caption": rows["txt"][i]} for i in range(32)]
    ds = ray.data.from_items(items)
    out = ds.map_batches(
        probe, batch_size=16, batch_format="numpy", num_gpus=0.5, compute=ray.data.ActorPoolStrategy(size=1)
    ).take_all()
    assert len(out) == 32
    assert all(r["device"].startswith("cuda") for r in out)
    assert all(np.isfinite(r["clip_score"]) and -1 <= r["clip_score"] <= 1 for r in out)


@pytest.mark.timeout(900)
def test_plan_predicts_the_measured_flamingo_peak(tmp_path):
    """`vlm plan flamingo` (ZeRO-2, bf16, one GPU) is within 0.4-1.25x of torch.cuda.max_memory_allocated for a
    1.1B Llama-layout LM + ViT-L-14 trained by a DeepSpeed engine built from vlm's deepspeed_config (what the
    plan leaves out, DeepSpeed's buckets and the allocator's rounding, is what its 0.9 headroom is for)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import _gpu_flamingo
    finally:
        sys.path.remove(str(REPO / "bench"))
    sizes = {
        "flamingo": {"preset": "flamingo-3b", "micro": 1, "steps": 2, "stages": [2], "images": 2, "length": 256},
        "threads": 4,
    }
    flamingo, plans = _gpu_flamingo.flamingo_rows(sizes, tmp_path, True)
    assert flamingo["stages"]["2"]["precision"] == "bfloat16"
    assert flamingo["stages"]["2"]["tokens_per_s"] > 0
    ratio = plans["2"]["measured_over_predicted"]
    assert 0.4 <= ratio <= 1.25, plans["2"]


def test_zero_shot_eval_runs_on_a_gpu_model():
    """CLIP's digit eval (zero-shot + retrieval) takes a model on the GPU: inputs follow the model's device."""
    from open_clip.transform import image_transform

    from vlm.models.clip.build import CLIPModelConfig, build_clip
    from vlm.models.clip.zeroshot import digits_eval_set, evaluate

    model, tokenizer, _ = build_clip(CLIPModelConfig(preset="vlm-clip-tiny"))
    data = digits_eval_set(64, 20)
    preprocess = image_transform(32, is_train=False)
    on_cpu = evaluate(model, tokenizer, preprocess, data)["metrics"]
    on_gpu = evaluate(model.cuda(), tokenizer, preprocess, data)["metrics"]
    assert set(on_gpu) == set(on_cpu)
    for key, value in on_cpu.items():
        assert on_gpu[key] == pytest.approx(value, abs=0.06), key  # same model: same answers up to TF32 ties


def test_auto_device_in_ray_follows_the_gpus_ray_assigned(ray_local):
    """ "auto" is cuda in the driver and in a GPU actor, cpu in an actor given no GPU (Ray leaves GPUs visible
    to it), so a `num_gpus: 0` CapFilt or clipscore pool on a GPU node stays on the CPU."""
    import ray

    from vlm.devices import auto_device

    @ray.remote
    class Probe:
        def device(self) -> str:
            from vlm.models.blip.build import resolve_device

            return f"{auto_device()} {resolve_device('auto').type}"

    assert auto_device() == "cuda"
    cpu_actor, gpu_actor = Probe.options(num_gpus=0).remote(), Probe.options(num_gpus=0.5).remote()
    assert ray.get(cpu_actor.device.remote(), timeout=120) == "cpu cpu"
    assert ray.get(gpu_actor.device.remote(), timeout=120) == "cuda cuda"
