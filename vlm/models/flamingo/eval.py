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
"""

from __future__ import annotations

import random
import re

import torch

from vlm.data.digits import DIGIT_NAMES
from vlm.data.flamingo_data import pil_pixels
from vlm.models.flamingo.build import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
from vlm.models.flamingo.generate import generate

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
) -> dict[str, float]:
    """{"fewshot_{k}_acc": accuracy} for each k in `shots`, over `limit` held-out digits.

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
            if samples is not None:
                samples.append((k, label, out))
    model.train(was_training)
    n = max(len(queries), 1)
    return {f"fewshot_{k}_acc": correct[k] / n for k in shots}
