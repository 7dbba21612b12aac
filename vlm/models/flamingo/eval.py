"""Few-shot captioning accuracy of Flamingo on held-out handwritten digits (Alayrac et al. 2022, Sec. 3).

For each query image the prompt holds k in-context examples, each an image with its caption in the
training format (`<image>Output: a handwritten digit seven<|endofchunk|>`), then the query image and the
prompt (`<image>Output:`). The model decodes greedily a few tokens; the answer is right when the first
digit it names (a word "seven" or a numeral "7") is the query's digit. The digits are the held-out split
(never in training shards), rendered and resized as ingest stores images, like the CLIP zero-shot eval.
Queries are balanced over the ten digits (the held-out split's first images are mostly odd digits, so a
model that always answers "nine" would look good on them); chance is 0.1. Examples come from a pool of
other held-out digits, disjoint from the queries; for one query, the k=4 examples are the first four of its
k=8 examples, so the shot counts differ only in context.

Next to generation, the same prompts are scored as classification the way Flamingo scores closed-set
tasks (Sec. 3, "we score each class by its log-likelihood"): every class caption, the CLIP eval's digit
templates filled with the digit's name (`CLASS_TEMPLATES`), is scored by the log-likelihood of its tokens
and `<|endofchunk|>` after the prompt; a digit's score is the log-sum-exp over its templates, and the
prediction is the best-scoring digit (`fewshot_{k}_rank_acc`). It does not depend on which caption style
greedy decoding happens to pick first. Neither score reads the query's caption.
"""

from __future__ import annotations

import random
import re

import torch

from vlm.data.flamingo_data import pil_pixels
from vlm.models.flamingo.build import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
from vlm.models.flamingo.generate import generate
from vlm.testbed.digits import DIGIT_NAMES

# The CLIP zero-shot templates (vlm.models.clip.zeroshot.DIGIT_TEMPLATES), without their final period,
# which training captions do not have.
CLASS_TEMPLATES = (
    "a handwritten digit {}",
    "a photo of the digit {}",
    "the number {} written by hand",
    "a picture of a hand-drawn {}",
    "handwritten {} on paper",
)
_DIGIT_RE = re.compile(r"\b(" + "|".join(DIGIT_NAMES) + r"|[0-9])\b", re.IGNORECASE)
POOL_SIZE = 64  # held-out digits kept aside as in-context examples


def named_digit(text: str) -> int | None:
    """The first digit a text names, by word or numeral; None if it names none."""
    match = _DIGIT_RE.search(text)
    if match is None:
        return None
    word = match.group(1).lower()
    return int(word) if word.isdigit() else DIGIT_NAMES.index(word)


def pair_text(caption: str, prompt: str) -> str:
    """One example as training formats it (vlm.data.flamingo_data.pair_tokens)."""
    return f"{MEDIA_TOKEN}{prompt} {caption}{END_OF_CHUNK_TOKEN}" if prompt else f"{MEDIA_TOKEN}{caption}"


def balanced_queries(labels, n: int) -> list[int]:
    """The first `n` indices taken round-robin over the labels 0-9, in set order within each label."""
    by_label = [[i for i, y in enumerate(labels) if int(y) == d] for d in range(10)]
    order = [group[j] for j in range(max(map(len, by_label))) for group in by_label if j < len(group)]
    return order[:n]


@torch.no_grad()
def class_log_likelihoods(model, tokenizer, images: torch.Tensor, prompt_text: str, captions: list[str]):
    """(len(captions),) summed log-probabilities of each `" " + caption + <|endofchunk|>` after `prompt_text`.

    One batched forward; `images` (T, F, C, H, W) are encoded once and shared by every row.
    """
    device = next(model.parameters()).device
    eoc = tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN)
    context = tokenizer(prompt_text).input_ids
    tails = [tokenizer(f" {c}", add_special_tokens=False).input_ids + [eoc] for c in captions]
    n, length = len(tails), len(context) + max(map(len, tails))
    ids = torch.full((n, length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    targets = torch.full((n, length), -100, dtype=torch.long)
    for row, tail in enumerate(tails):
        end = len(context) + len(tail)
        ids[row, :end] = torch.tensor(context + tail)
        mask[row, :end] = 1
        targets[row, len(context) : end] = torch.tensor(tail)
    ids, mask, targets = ids.to(device), mask.to(device), targets.to(device)
    images = images[None].to(device)  # (1, T, F, C, H, W)
    media = model.encode_images(images)  # (1, T, n, Dv)
    rows_images = images.expand(n, *images.shape[1:])  # (N, T, F, C, H, W), no copy
    rows_media = media.expand(n, *media.shape[1:])  # (N, T, n, Dv), no copy
    logits = model(rows_images, ids, mask, media=rows_media)["logits"].float()  # (N, L, V)
    logp = logits[:, :-1].log_softmax(-1)  # position i predicts token i + 1
    tgt = targets[:, 1:]  # (N, L-1)
    picked = logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0]  # (N, L-1)
    return (picked * (tgt != -100)).sum(dim=1).cpu()


@torch.no_grad()
def fewshot_digit_accuracy(
    model,
    tokenizer,
    *,
    shots: tuple[int, ...] | list[int] = (0, 4, 8),
    limit: int = 50,
    stored_size: int = 64,
    prompt: str = "Output:",
    max_new_tokens: int = 16,
    seed: int = 0,
    samples: list | None = None,
    ranking: bool = True,
) -> dict[str, float]:
    """{"fewshot_{k}_acc": accuracy} for each k in `shots`, over `limit` held-out digits; with `ranking`,
    also {"fewshot_{k}_rank_acc": accuracy} of log-likelihood ranking of the class captions.

    Args:
        stored_size: size the held-out digits are stored at before the model's resize (as ingest stores them).
        samples: if a list, (k, digit, generated text) of every query is appended to it.
    """
    from vlm.models.clip.zeroshot import digits_eval_set

    if max(shots) + 1 > model.config.max_num_media:
        raise ValueError(
            f"{max(shots)}-shot prompts need {max(shots) + 1} images; max_num_media is {model.config.max_num_media}"
        )
    size = model.vision_encoder.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    data = digits_eval_set(stored_size)
    pixels = torch.from_numpy(pil_pixels(data.images, size))  # (N, 3, S, S)
    queries = balanced_queries(data.labels, min(limit, len(data.labels) - POOL_SIZE))
    taken = set(queries)
    pool = [i for i in range(len(data.labels)) if i not in taken][:POOL_SIZE]
    was_training = model.training
    model.eval()
    correct = {k: 0 for k in shots}
    ranked = {k: 0 for k in shots}
    class_captions = [t.format(name) for name in DIGIT_NAMES for t in CLASS_TEMPLATES]  # digit-major
    rng = random.Random(seed)
    for q in queries:
        order = rng.sample(pool, max(shots))
        for k in shots:
            examples = order[:k]
            text = "".join(pair_text(data.captions[i], prompt) for i in examples) + MEDIA_TOKEN + prompt
            images = pixels[examples + [q]][:, None]  # (k+1, 1, 3, S, S)
            out = generate(model, tokenizer, images, text, max_new_tokens=max_new_tokens)
            label = int(data.labels[q])
            correct[k] += named_digit(out) == label
            if ranking:
                scores = class_log_likelihoods(model, tokenizer, images, text, class_captions)
                per_digit = scores.view(len(DIGIT_NAMES), len(CLASS_TEMPLATES)).logsumexp(dim=1)  # (10,)
                ranked[k] += int(per_digit.argmax()) == label
            if samples is not None:
                samples.append((k, label, out))
    model.train(was_training)
    n = max(len(queries), 1)
    metrics = {f"fewshot_{k}_acc": correct[k] / n for k in shots}
    if ranking:
        metrics.update({f"fewshot_{k}_rank_acc": ranked[k] / n for k in shots})
    return metrics
