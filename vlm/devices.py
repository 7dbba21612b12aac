"""The device a model-bearing step takes when its config says "auto" (CapFilt's BLIP steps, clipscore).

Ray leaves every GPU of a node visible to a task or actor that asked for none (Ray 2.60 sets
CUDA_VISIBLE_DEVICES only for GPU requests), so "CUDA is available" alone would put every CPU actor of
a pool with `num_gpus: 0` on a GPU node onto GPU 0, outside Ray's accounting. Inside Ray, "auto" is
therefore a GPU only where Ray assigned one; outside Ray, wherever CUDA is available.
"""

from __future__ import annotations


def auto_device() -> str:
    """The device name for "auto" (see the module doc): "cuda" or "cpu"."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    import ray

    if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        return "cuda" if ray.get_gpu_ids() else "cpu"
    return "cuda"
