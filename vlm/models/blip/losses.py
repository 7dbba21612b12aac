"""Training objectives of the CapFilt captioner and filter (`vlm train blip`), and their collate.

BLIP (Li et al. 2022, sec. 3.2-3.3) fine-tunes both from the pretrained model on clean pairs:

* captioner: language modelling of "a picture of " + caption given the image; the prompt and
  padding are masked out of the labels (BLIP's `decoder_targets[:, :prompt_length] = -100`).
* filter: image-text contrastive (ITC) over the batch + image-text matching (ITM) on a 3-way
  batch of positives and hard negatives, mined from the batch in proportion to the softmaxed
  ITC similarity (ALBEF's scheme, which BLIP keeps).

Differences from BLIP, on purpose: no momentum encoder / queue (ITC uses in-batch negatives
only), and the ITC temperature is fixed (HF's retrieval models have no temperature parameter;
0.07 is BLIP's initial value). Captions equal token for token count as positives of each
other, so duplicate captions in a batch are neither contrasted nor drawn as negatives; so do
samples given the same group id (BLIP's retrieval fine-tuning does this with the COCO image id,
whose five captions all match the image; for a labelled set such as the digits, the label).

The functions take the HF module (with DeepSpeed: `engine.module`) and call its parts, which
ZeRO-3's per-module parameter gathering handles.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image

from vlm.models.blip.build import processor_inputs
from vlm.models.blip.matching import encode_images, image_features, itm_logits, similarity, text_features

__all__ = ["captioner_loss", "collate_blip", "filter_loss", "positive_pairs", "sample_negatives"]


def _to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(io.BytesIO(bytes(image))) as im:
        return im.convert("RGB")


def _is_blip2(processor) -> bool:
    return hasattr(processor, "num_query_tokens")


def collate_blip(
    samples: Sequence[dict],
    processor,
    task: Literal["caption", "filter"],
    *,
    prompt: str = "a picture of ",
    max_length: int = 40,
) -> dict[str, torch.Tensor]:
    """Batch samples {"image": PIL image or encoded bytes, "text": caption} for one objective.

    Args:
        samples: dicts with `image` and `text`.
        processor: the model's processor (BlipProcessor / Blip2Processor).
        task: "caption" adds `labels` (prompt and padding -100) for `captioner_loss`;
            "filter" gives the plain pairs `filter_loss` takes.
        prompt: the captioner's text prefix, masked out of the labels.
        max_length: text tokens kept (a BLIP-2 processor's image tokens come on top).

    Returns:
        pixel_values (B, 3, H, W), input_ids (B, T), attention_mask (B, T) [, labels (B, T)].
    """
    if task not in ("caption", "filter"):
        raise ValueError(f"task must be caption or filter, got {task!r}")
    images = [_to_pil(s["image"]) for s in samples]
    texts = [str(s["text"]).strip() for s in samples]
    if task == "filter":
        return processor_inputs(processor, images, texts, max_length=max_length)

    tok = processor.tokenizer
    prompt = prompt.rstrip()  # tokenized alone it must be a prefix of the tokenized caption
    if _is_blip2(processor):
        # A causal LM learns to stop only if the targets end in eos (BERT's [SEP] does this for BLIP).
        captions = [f"{prompt} {t}{tok.eos_token}" for t in texts]
        batch = processor_inputs(processor, images, captions, max_length=max_length)
        # (image tokens) + bos + prompt
        prompt_len = (processor.num_query_tokens or 0) + len(tok(prompt).input_ids)
    else:
        batch = processor_inputs(processor, images, [f"{prompt} {t}" for t in texts], max_length=max_length)
        batch["input_ids"][:, 0] = tok.bos_token_id  # [CLS] -> [DEC], as BLIP's decoder input
        prompt_len = len(tok(prompt).input_ids) - 1  # [DEC] + prompt, without the trailing [SEP]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # (B, T)
    labels[:, :prompt_len] = -100
    batch["labels"] = labels
    return batch


def captioner_loss(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The captioning LM loss (mean over caption tokens) of a `collate_blip(..., "caption")` batch."""
    out = model(
        pixel_values=batch["pixel_values"].to(model.device, model.dtype),
        input_ids=batch["input_ids"].to(model.device),
        attention_mask=batch["attention_mask"].to(model.device),
        labels=batch["labels"].to(model.device),
    )
    return {"loss": out.loss}


def positive_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: texts i and j are the same tokens (the diagonal is always True)."""
    ids = input_ids.masked_fill(attention_mask == 0, -1)  # (B, T)
    return (ids[:, None, :] == ids[None, :, :]).all(dim=-1)


def sample_negatives(
    sim: torch.Tensor, positive: torch.Tensor, *, hard: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """For each row, one column index drawn among its negatives; -1 where the row has none.

    Args:
        sim: (B, B') similarity logits; row i's draw is weighted by softmax(sim[i]) when `hard`,
            uniform otherwise.
        positive: (B, B') bool; True entries are never drawn.
        generator: for reproducible draws (on sim's device).
    """
    with torch.no_grad():
        if hard:
            # + 1e-4 as BLIP: a negative whose softmax underflows can still be drawn.
            weights = sim.float().softmax(dim=1) + 1e-4
        else:
            weights = torch.ones_like(sim, dtype=torch.float32)
        weights = weights.masked_fill(positive, 0.0)
        valid = ~positive.all(dim=1)
        picks = torch.full((sim.shape[0],), -1, dtype=torch.long, device=sim.device)
        if valid.any():
            picks[valid] = torch.multinomial(weights[valid], 1, generator=generator).squeeze(1)
        return picks


def filter_loss(
    model,
    batch: dict[str, torch.Tensor],
    *,
    hard_negatives: bool = True,
    temperature: float = 0.07,
    generator: torch.Generator | None = None,
    groups: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """ITC + ITM loss of a BLIP / BLIP-2 retrieval model on a `collate_blip(..., "filter")` batch.

    Args:
        model: `BlipForImageTextRetrieval` or `Blip2ForImageTextRetrieval`.
        batch: pixel_values, input_ids, attention_mask of B matching pairs.
        hard_negatives: draw ITM negatives by ITC similarity (BLIP); False: uniformly.
        temperature: ITC softmax temperature.
        generator: makes the negative draws reproducible.
        groups: (B,) int group ids; pairs sharing an id >= 0 are positives of each other (never
            drawn as ITM negatives, contrasted as matches). None or -1: only identical captions.

    Returns:
        loss (itc_loss + itm_loss), itc_loss, itm_loss, itm_acc (detached).
    """
    ids = batch["input_ids"].to(model.device)
    mask = batch["attention_mask"].to(model.device)
    image_embeds = encode_images(model, batch["pixel_values"])  # (B, N, D)
    image_feat = image_features(model, image_embeds)  # (B, E) | (B, Q, E)
    text_feat = text_features(model, ids, mask)  # (B, E)

    sim_i2t = similarity(image_feat, text_feat).float() / temperature  # (B, B)
    sim_t2i = sim_i2t.t()
    positive = positive_pairs(ids, mask)  # (B, B), symmetric
    if groups is not None:
        g = groups.to(positive.device)
        positive = positive | ((g[:, None] == g[None, :]) & (g[:, None] >= 0))
    targets = positive.float() / positive.float().sum(dim=1, keepdim=True)
    itc_loss = -0.5 * (
        (F.log_softmax(sim_i2t, dim=1) * targets).sum(dim=1).mean()
        + (F.log_softmax(sim_t2i, dim=1) * targets).sum(dim=1).mean()
    )

    neg_image = sample_negatives(sim_t2i, positive, hard=hard_negatives, generator=generator)  # (B,) per text
    neg_text = sample_negatives(sim_i2t, positive, hard=hard_negatives, generator=generator)  # (B,) per image
    rows = torch.arange(ids.shape[0], device=ids.device)
    has_neg_image, has_neg_text = neg_image >= 0, neg_text >= 0
    # 3-way ITM batch: (image i, text i) = 1; (negative image, text j) = 0; (image i, negative text) = 0.
    pair_images = torch.cat([rows, neg_image[has_neg_image], rows[has_neg_text]])
    pair_texts = torch.cat([rows, rows[has_neg_image], neg_text[has_neg_text]])
    labels = torch.cat([torch.ones_like(rows), torch.zeros_like(pair_images[ids.shape[0] :])])  # (B + negatives,)
    logits = itm_logits(model, image_embeds[pair_images], ids[pair_texts], mask[pair_texts])  # (P, 2)
    itm_loss = F.cross_entropy(logits.float(), labels)
    itm_acc = (logits.argmax(dim=1) == labels).float().mean().detach()
    return {"loss": itc_loss + itm_loss, "itc_loss": itc_loss, "itm_loss": itm_loss, "itm_acc": itm_acc}
