"""Symmetric contrastive (InfoNCE) loss with negatives from the whole global batch.

Features from every rank are all-gathered *with* gradients (open_clip's `gather_with_grad`):
`torch.distributed.nn.functional.all_gather` backpropagates into each rank's own features, so
after the data-parallel gradient average the gradients equal single-process training on the
global batch. `local_loss` computes only this rank's rows of the logit matrix (less compute,
same gradients after averaging, as in open_clip).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def gather_features(image: torch.Tensor, text: torch.Tensor, rank: int, world: int, with_grad: bool = True):
    """All-gather (B, D) features from every rank into (world*B, D), keeping ours differentiable."""
    if world <= 1:
        return image, text
    import torch.distributed as dist

    if with_grad:
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():  # deprecated in favour of a private API; still correct
            warnings.simplefilter("ignore", FutureWarning)
            return torch.cat(all_gather(image), 0), torch.cat(all_gather(text), 0)
    gathered_i = [torch.zeros_like(image) for _ in range(world)]
    gathered_t = [torch.zeros_like(text) for _ in range(world)]
    dist.all_gather(gathered_i, image)
    dist.all_gather(gathered_t, text)
    gathered_i[rank], gathered_t[rank] = image, text  # only local rows carry gradients
    return torch.cat(gathered_i, 0), torch.cat(gathered_t, 0)


def clip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    rank: int = 0,
    world: int = 1,
    local_loss: bool = False,
    gather_with_grad: bool = True,
) -> dict[str, torch.Tensor]:
    """CLIP loss over normalized (B, D) features. Returns {"loss", "acc"} (acc: image->text top-1)."""
    scale = logit_scale.reshape(())
    all_image, all_text = gather_features(image, text, rank, world, gather_with_grad)
    if local_loss:
        logits_i = scale * image @ all_text.T  # (B, world*B)
        logits_t = scale * text @ all_image.T
        labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
    else:
        logits_i = scale * all_image @ all_text.T  # (world*B, world*B)
        logits_t = logits_i.T
        labels = torch.arange(all_image.shape[0], device=image.device)
    loss = (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2
    with torch.no_grad():
        acc = (logits_i.argmax(-1) == labels).float().mean()
    return {"loss": loss, "acc": acc}
