"""Held-out evaluation of a BLIP captioner / filter export on the handwritten digits, as CapFilt uses them.

The captioner captions held-out digits with `Captioner` (CapFilt's nucleus sampling) and is scored by the
fraction of captions naming the right digit. The filter scores a correct, a wrong-digit and a spam
caption per image with `Filter` (CapFilt's ITM/ITC score) and is scored as a noise detector: precision
and recall of "score < threshold means noisy" against those known labels, ROC AUC, and the best
threshold. BLIP (Li et al. 2022, sec. 3.3) measures its bootstrapped models by their downstream effect;
on the digits the noise is known, so it is measured directly.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np

from vlm.models.blip.config import BlipConfig


@dataclass
class BlipEvalConfig:
    digits: bool = True  # evaluate the export on the held-out handwritten digits
    image_size: int = 64  # size the held-out digits are stored at (as ingest stores training data)
    limit: int | None = None  # evaluate on N held-out digits (balanced over the ten); null: all 299
    batch_size: int = 64
    gallery: int = 24  # captioner: images in the gallery logged to MLflow
    seed: int = 0  # captioner sampling and the filter's noisy captions


def _heldout(eval_cfg: BlipEvalConfig):
    """(PIL images, labels) of the held-out digits, stored as ingest stores them; balanced if limited."""
    from vlm.models.clip.zeroshot import digits_eval_set
    from vlm.models.flamingo.eval import balanced_queries

    data = digits_eval_set(eval_cfg.image_size)
    order = balanced_queries(data.labels, eval_cfg.limit) if eval_cfg.limit else range(len(data.images))
    return [data.images[i] for i in order], [int(data.labels[i]) for i in order]


def evaluate_captioner(export_dir, blip: BlipConfig, eval_cfg: BlipEvalConfig, run=None) -> dict:
    """Caption held-out digits as CapFilt does (`Captioner`, nucleus sampling); fraction naming the digit."""
    from vlm.data.contact_sheet import contact_sheet
    from vlm.models.blip.build import build_captioner
    from vlm.models.blip.captioner import Captioner
    from vlm.models.flamingo.eval import named_digit

    cfg = dataclasses.replace(blip, pretrained=str(export_dir), image_size=None)
    model, processor = build_captioner(cfg)
    captioner = Captioner(model, processor, cfg)
    images, labels = _heldout(eval_cfg)
    captions: list[list[str]] = []
    for i in range(0, len(images), eval_cfg.batch_size):
        captions += captioner.caption(images[i : i + eval_cfg.batch_size], seed=eval_cfg.seed + i)
    named = [[named_digit(c) for c in caps] for caps in captions]
    flat = [(n, label) for ns, label in zip(named, labels) for n in ns]
    texts = [c for caps in captions for c in caps]
    metrics = {
        "caption_digit_acc": float(np.mean([n == label for n, label in flat])),
        "caption_names_a_digit": float(np.mean([n is not None for n, _ in flat])),
        "caption_distinct": len(set(texts)) / max(len(texts), 1),
        "caption_words": float(np.mean([len(t.split()) for t in texts])),
        "num_images": len(images),
    }
    if run is not None:
        tiles = [
            (im, caps[0], f"digit {label} {'ok' if ns[0] == label else 'WRONG'}")
            for im, caps, ns, label in zip(images, captions, named, labels)
        ]
        run.log_image(contact_sheet(tiles[: eval_cfg.gallery], cols=6, tile=128), "caption_gallery.png")
        lines = [f"{label}\t{c}" for caps, label in zip(captions, labels) for c in caps]
        run.log_text("\n".join(lines) + "\n", "captions.txt")
    return metrics


def noisy_caption_sets(labels: list[int], seed: int = 0) -> list[tuple[str, str, str]]:
    """(correct, wrong-digit, spam) captions per label, from the same generators as the demo's web."""
    from vlm.testbed.digits import caption_for, noisy_caption_for

    rng = random.Random(seed)
    # noisy_caption_for draws a wrong digit or spam; spam is whatever is no clean caption of any digit.
    clean = {caption_for(d, random.Random(s)) for d in range(10) for s in range(400)}
    sets = []
    for label in labels:
        wrong = caption_for((label + rng.randint(1, 9)) % 10, rng)
        spam = noisy_caption_for(label, rng)
        while spam in clean:
            spam = noisy_caption_for(label, rng)
        sets.append((caption_for(label, rng), wrong, spam))
    return sets


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half (the ROC AUC)."""
    diff = positive[:, None] - negative[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / max(diff.size, 1))


def noise_detection(scores: np.ndarray, threshold: float) -> dict:
    """Metrics of "caption is noisy" = score < threshold, from (N, 3) scores (correct, wrong, spam)."""
    flagged = scores < threshold
    tp, fp = int(flagged[:, 1:].sum()), int(flagged[:, 0].sum())
    precision = tp / max(tp + fp, 1)
    recall = tp / flagged[:, 1:].size
    return {
        "noise_precision": precision,
        "noise_recall": recall,
        "noise_f1": 2 * precision * recall / max(precision + recall, 1e-12),
        "wrong_digit_recall": float(flagged[:, 1].mean()),
        "spam_recall": float(flagged[:, 2].mean()),
        "correct_kept": float(1.0 - flagged[:, 0].mean()),
    }


def best_threshold(scores: np.ndarray) -> float:
    """The threshold (midpoint between observed scores) with the best noise-detection F1."""
    values = np.unique(scores)
    candidates = np.r_[(values[:-1] + values[1:]) / 2, values[-1] + 1e-6] if len(values) > 1 else values
    return float(max(candidates, key=lambda t: noise_detection(scores, float(t))["noise_f1"]))


def score_histogram(scores: np.ndarray, threshold: float, title: str):
    """A PIL image: score histograms of correct, wrong-digit and spam captions, threshold marked."""
    from vlm import plots

    fig, ax = plots.figure((6.5, 4))
    lo, hi = min(0.0, float(scores.min())), max(1.0, float(scores.max()))
    bins = np.linspace(lo, hi, 41)
    for col, name, color in ((0, "correct", "tab:green"), (1, "wrong digit", "tab:orange"), (2, "spam", "tab:red")):
        ax.hist(scores[:, col], bins=bins, alpha=0.55, label=name, color=color)
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel("filter score")
    ax.set_ylabel("captions")
    ax.set_title(title, fontsize=10)
    ax.legend()
    return plots.to_image(fig)


def evaluate_filter(export_dir, blip: BlipConfig, eval_cfg: BlipEvalConfig, run=None) -> dict:
    """Score correct / wrong-digit / spam captions of held-out digits with `Filter` (as CapFilt does);
    precision and recall of noise detection at `blip.itm_threshold`, AUC, and the best threshold."""
    from vlm.models.blip.build import build_filter
    from vlm.models.blip.captioner import Filter

    cfg = dataclasses.replace(blip, filter_pretrained=str(export_dir), image_size=None)
    model, processor = build_filter(cfg)
    scorer = Filter(model, processor, cfg)
    images, labels = _heldout(eval_cfg)
    sets = noisy_caption_sets(labels, eval_cfg.seed)
    scores: list[np.ndarray] = []
    for i in range(0, len(images), eval_cfg.batch_size):
        scores += scorer.score_sets(images[i : i + eval_cfg.batch_size], sets[i : i + eval_cfg.batch_size])
    s = np.stack(scores)  # (N, 3): correct, wrong digit, spam
    best = best_threshold(s)
    metrics = {
        **noise_detection(s, blip.itm_threshold),
        "auc": auc(s[:, 0], s[:, 1:].ravel()),
        "auc_wrong_digit": auc(s[:, 0], s[:, 1]),
        "auc_spam": auc(s[:, 0], s[:, 2]),
        "best_threshold": best,
        **{f"best_{k}": v for k, v in noise_detection(s, best).items() if k in ("noise_precision", "noise_recall")},
        "score_correct_mean": float(s[:, 0].mean()),
        "score_wrong_digit_mean": float(s[:, 1].mean()),
        "score_spam_mean": float(s[:, 2].mean()),
        "num_images": len(images),
    }
    if run is not None:
        title = (
            f"{blip.score} scores on {len(images)} held-out digits: noise precision "
            f"{metrics['noise_precision']:.2f}, recall {metrics['noise_recall']:.2f}, AUC {metrics['auc']:.3f}"
        )
        run.log_image(score_histogram(s, blip.itm_threshold, title), "filter_scores.png")
        lines = [f"{label}\t{c:.3f}\t{w:.3f}\t{p:.3f}\t{t}" for label, (c, w, p), t in zip(labels, s, sets)]
        run.log_text("label\tcorrect\twrong\tspam\tcaptions\n" + "\n".join(lines) + "\n", "filter_scores.tsv")
    return metrics
