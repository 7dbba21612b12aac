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

import functools
import random
import re

import torch

from vlm.data.flamingo_data import pil_pixels
from vlm.models.flamingo.build import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
from vlm.models.flamingo.generate import generate
from vlm.models.flamingo.tokenizer import NONCE_WORDS
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
    """The first `n` indices taken round-robin over the labels 0-9, in set order within each label; past the
    end of the set the order starts again (a query image then comes back with other in-context examples)."""
    by_label = [[i for i, y in enumerate(labels) if int(y) == d] for d in range(10)]
    order = [group[j] for j in range(max(map(len, by_label))) for group in by_label if j < len(group)]
    return [order[i % len(order)] for i in range(n)] if order else []


def split_queries(labels, limit: int) -> tuple[list[int], list[int]]:
    """(queries, pool): `POOL_SIZE` held-out images kept as in-context examples (balanced over the digits) and
    `limit` balanced queries from the others (cycling through them when `limit` is larger)."""
    pool = balanced_queries(labels, POOL_SIZE)
    taken = set(pool)
    rest = [i for i in range(len(labels)) if i not in taken]
    return [rest[i] for i in balanced_queries([labels[i] for i in rest], limit)], pool


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


@functools.lru_cache(maxsize=2)
def _held_out_set(stored_size: int):
    """The held-out digits at `stored_size` (vlm.models.clip.zeroshot.digits_eval_set, ~2.4 s to render), once
    per process: both k-shot evals and the prompt gallery read it."""
    from vlm.models.clip.zeroshot import digits_eval_set

    return digits_eval_set(stored_size)


def _eval_images(model, shots, stored_size: int):
    """(held-out digit set, its pixels (N, 3, S, S) at the vision tower's size); checks the model takes the
    largest prompt's images."""
    if max(shots) + 1 > model.config.max_num_media:
        raise ValueError(
            f"{max(shots)}-shot prompts need {max(shots) + 1} images; max_num_media is {model.config.max_num_media}"
        )
    size = model.vision_encoder.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    data = _held_out_set(stored_size)
    return data, torch.from_numpy(pil_pixels(data.images, size))


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
    generate_limit: int | None = None,
) -> dict[str, float]:
    """{"fewshot_{k}_acc": accuracy} for each k in `shots`, over `limit` held-out digits; with `ranking`,
    also {"fewshot_{k}_rank_acc": accuracy} of log-likelihood ranking of the class captions.

    Args:
        stored_size: size the held-out digits are stored at before the model's resize (as ingest stores them).
        samples: if a list, (k, digit, generated text) of every decoded query is appended to it.
        generate_limit: decode only the first this many queries (decoding costs a forward pass per token; ranking
            one per prompt); None: all of them.
    """
    data, pixels = _eval_images(model, shots, stored_size)
    queries, pool = split_queries(data.labels, limit)
    was_training = model.training
    model.eval()
    correct = {k: 0 for k in shots}
    ranked = {k: 0 for k in shots}
    decoded = len(queries) if generate_limit is None else min(generate_limit, len(queries))
    class_captions = [t.format(name) for name in DIGIT_NAMES for t in CLASS_TEMPLATES]  # digit-major
    rng = random.Random(seed)
    for n_query, q in enumerate(queries):
        order = rng.sample(pool, max(shots))
        for k in shots:
            examples = order[:k]
            text = "".join(pair_text(data.captions[i], prompt) for i in examples) + MEDIA_TOKEN + prompt
            images = pixels[examples + [q]][:, None]  # (k+1, 1, 3, S, S)
            label = int(data.labels[q])
            if n_query < decoded:
                out = generate(model, tokenizer, images, text, max_new_tokens=max_new_tokens)
                correct[k] += named_digit(out) == label
                if samples is not None:
                    samples.append((k, label, out))
            if ranking:
                scores = class_log_likelihoods(model, tokenizer, images, text, class_captions)
                per_digit = scores.view(len(DIGIT_NAMES), len(CLASS_TEMPLATES)).logsumexp(dim=1)  # (10,)
                ranked[k] += int(per_digit.argmax()) == label
    model.train(was_training)
    n = max(len(queries), 1)
    metrics = {f"fewshot_{k}_acc": correct[k] / max(decoded, 1) for k in shots}
    if ranking:
        metrics.update({f"fewshot_{k}_rank_acc": ranked[k] / n for k in shots})
    return metrics


def novel_examples(pool_labels: dict[int, list[int]], label: int, k: int, rng: random.Random) -> list[int]:
    """k in-context example indices for a query of class `label`: one of its class and k - 1 of other classes
    (distinct while there are enough), in random order. 0 for k = 0."""
    if k == 0:
        return []
    others = [c for c in pool_labels if c != label]
    rng.shuffle(others)
    classes = [label] + [others[i % len(others)] for i in range(k - 1)]
    examples = [rng.choice(pool_labels[c]) for c in classes]
    rng.shuffle(examples)
    return examples


@torch.no_grad()
def novel_mapping_accuracy(
    model,
    tokenizer,
    *,
    shots: tuple[int, ...] | list[int] = (0, 2, 4, 8),
    limit: int = 1000,
    stored_size: int = 64,
    prompt: str = "Output:",
    seed: int = 0,
    samples: list | None = None,
) -> dict[str, float]:
    """{"novel_{k}_acc": accuracy} for each k in `shots`: few-shot learning of a mapping only the prompt holds.

    Every prompt draws a fresh random mapping digit -> nonce word (`NONCE_WORDS`). Its k in-context examples
    are held-out digits captioned by their word (`<image>Output: dax<|endofchunk|>`): one of the query's digit
    and k - 1 of other digits, shuffled. The query is a held-out digit (`<image>Output:`), and the answer is
    the best of the prompt's ten words by the log-likelihood of `" word<|endofchunk|>"`. The model never saw
    these words with these digits, so 0-shot is at chance (0.1) by construction; above chance, the model read
    the query image, found the example of the same digit and copied its word.

    Args:
        samples: if a list, (k, example indices, example words, query index, right word, answer) per prompt
            is appended to it (indices into `digits_eval_set(stored_size)`).
    """
    data, pixels = _eval_images(model, shots, stored_size)
    labels = [int(y) for y in data.labels]
    queries, pool = split_queries(labels, limit)
    by_class: dict[int, list[int]] = {}
    for i in pool:
        by_class.setdefault(labels[i], []).append(i)
    was_training = model.training
    model.eval()
    correct = {k: 0 for k in shots}
    rng = random.Random(seed)
    for q in queries:
        words = rng.sample(NONCE_WORDS, 10)  # words[d]: digit d's word in this prompt
        label = labels[q]
        for k in shots:
            examples = novel_examples(by_class, label, k, rng)
            text = "".join(pair_text(words[labels[i]], prompt) for i in examples) + MEDIA_TOKEN + prompt
            images = pixels[examples + [q]][:, None]  # (k+1, 1, 3, S, S)
            answer = int(class_log_likelihoods(model, tokenizer, images, text, words).argmax())
            correct[k] += answer == label
            if samples is not None:
                samples.append((k, examples, [words[labels[i]] for i in examples], q, words[label], words[answer]))
    model.train(was_training)
    n = max(len(queries), 1)
    return {f"novel_{k}_acc": correct[k] / n for k in shots}


def kshot_plot(metrics: dict[str, float], shots, n: int):
    """Accuracy against the number of in-context examples, one line per task, with 95% intervals over `n`
    prompts and chance (0.1); a PIL image."""
    from vlm import plots

    fig, ax = plots.figure((6, 3.8))
    series = (
        ("novel_{}_acc", "novel mapping (ranking)"),
        ("fewshot_{}_rank_acc", "digit captioning (ranking)"),
        ("fewshot_{}_acc", "digit captioning (decoding)"),
    )
    for key, label in series:
        ks = [k for k in shots if key.format(k) in metrics]
        if not ks:
            continue
        acc = [metrics[key.format(k)] for k in ks]
        err = [1.96 * (a * (1 - a) / max(n, 1)) ** 0.5 for a in acc]
        ax.errorbar(ks, acc, yerr=err, marker="o", capsize=3, label=label)
    ax.axhline(0.1, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel("in-context examples (shots)")
    ax.set_ylabel("accuracy")
    ax.set_xticks(list(shots))
    ax.set_ylim(0, 1)
    ax.set_title(f"Flamingo k-shot, held-out digits ({n} prompts per point)", fontsize=10)
    ax.legend(fontsize=8)
    return plots.to_image(fig)


def prompt_gallery(samples: list, stored_size: int, rows: int = 6, shots: int = 4):
    """Novel-mapping prompts as pictures (a PIL image): per row the in-context images under their words, then
    the query with the model's answer (green if right, red with the right word if not). `samples` as
    `novel_mapping_accuracy` fills it; rows of `shots` examples (or the most below it) are drawn."""
    from vlm import plots

    ks = sorted({s[0] for s in samples if 0 < s[0] <= shots}) or sorted({s[0] for s in samples})
    picked = [s for s in samples if s[0] == ks[-1]][:rows]
    cols = ks[-1] + 1
    images = _held_out_set(stored_size).images
    fig, axes = plots.figure((1.3 * cols, 1.45 * len(picked)), nrows=len(picked), ncols=cols, squeeze=False)
    for row, (_, examples, words, query, right, answer) in zip(axes, picked):
        for ax, i, word in zip(row, examples + [query], words + [None]):
            ax.imshow(images[i])
            ax.set_xticks([])
            ax.set_yticks([])
            if word is not None:
                ax.set_title(word, fontsize=9)
            else:
                ok = answer == right
                ax.set_title(
                    f"-> {answer}" if ok else f"-> {answer} ({right})", fontsize=9, color="green" if ok else "red"
                )
                for side in ax.spines.values():
                    side.set_edgecolor("green" if ok else "red")
                    side.set_linewidth(2)
    fig.suptitle(f"{ks[-1]}-shot novel mapping: in-context examples, then the query", fontsize=10)
    return plots.to_image(fig)
