"""Zero-shot classification and image-text retrieval for CLIP models (as in the CLIP paper).

Class names x prompt templates -> normalized mean text embedding per class -> classifier.
The built-in eval set is the held-out handwritten digits (never served by the local web),
rendered and resized the way ingest stores images, so the eval sees what training saw.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from vlm.testbed.digits import DIGIT_NAMES, caption_for, heldout_indices, load_digit_images, render_digit

DIGIT_TEMPLATES = [
    "a handwritten digit {}.",
    "a photo of the digit {}.",
    "the number {} written by hand.",
    "a picture of a hand-drawn {}.",
    "handwritten {} on paper.",
]


@dataclass
class EvalSet:
    images: list  # PIL images
    labels: np.ndarray  # (N,)
    captions: list[str]  # one clean caption per image, for retrieval
    classnames: list[str]
    templates: list[str]


def digits_eval_set(image_size: int = 64, limit: int | None = None, seed: int = 0) -> EvalSet:
    """Held-out digits rendered at web-like sizes, then resized like ingest (border mode, jpg)."""
    from io import BytesIO

    from vlm.data.images import ImageConfig, process_image

    _, labels = load_digit_images()
    idx = heldout_indices()[:limit] if limit else heldout_indices()
    rng = random.Random(seed)
    cfg = ImageConfig(image_size=image_size, resize_mode="border")
    images, captions = [], []
    from PIL import Image

    for i in idx:
        w, h = rng.choice([(256, 256), (512, 384), (300, 400), (640, 480)])
        buf = BytesIO()
        render_digit(int(i), w, h, seed=int(i)).save(buf, format="JPEG", quality=90)
        out = process_image(buf.getvalue(), cfg)
        images.append(Image.open(BytesIO(out.data)).convert("RGB"))
        captions.append(caption_for(int(labels[i]), rng))
    return EvalSet(images, labels[idx].copy(), captions, list(DIGIT_NAMES), list(DIGIT_TEMPLATES))


@torch.inference_mode()
def encode_images(model, preprocess, images, batch_size: int = 128) -> torch.Tensor:
    device = next(model.parameters()).device  # the model may sit on a GPU; features come back on the CPU
    feats = []
    for i in range(0, len(images), batch_size):
        batch = torch.stack([preprocess(im) for im in images[i : i + batch_size]]).to(device)
        feats.append(model.encode_image(batch, normalize=True).float().cpu())
    return torch.cat(feats)


@torch.inference_mode()
def encode_texts(model, tokenizer, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    device = next(model.parameters()).device
    feats = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[i : i + batch_size]).to(device)
        feats.append(model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(feats)


@torch.inference_mode()
def zero_shot_classifier(model, tokenizer, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """(D, C): per class, the normalized mean of its normalized prompt embeddings."""
    weights = []
    for name in classnames:
        emb = encode_texts(model, tokenizer, [t.format(name) for t in templates])
        mean = emb.mean(0)
        weights.append(mean / mean.norm())
    return torch.stack(weights, dim=1)


def evaluate(model, tokenizer, preprocess, data: EvalSet) -> dict:
    """Zero-shot top-1/top-5, confusion matrix and retrieval R@1/5/10 both ways."""
    model.eval()
    img = encode_images(model, preprocess, data.images)  # (N, D)
    clf = zero_shot_classifier(model, tokenizer, data.classnames, data.templates)  # (D, C)
    logits = img @ clf
    labels = torch.as_tensor(data.labels)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    top1 = (top[:, 0] == labels).float().mean().item()
    top5 = (top == labels[:, None]).any(1).float().mean().item()
    n_cls = len(data.classnames)
    confusion = np.zeros((n_cls, n_cls), dtype=np.int64)
    for t, p in zip(labels.tolist(), top[:, 0].tolist()):
        confusion[t, p] += 1
    txt = encode_texts(model, tokenizer, data.captions)
    metrics = {"zeroshot_top1": top1, "zeroshot_top5": top5}
    metrics.update(retrieval_recall(img, txt))
    return {"metrics": metrics, "confusion": confusion}


def retrieval_recall(img: torch.Tensor, txt: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """R@K for image->text and text->image where pair i matches i."""
    sim = img @ txt.T
    target = torch.arange(sim.shape[0])
    out = {}
    for name, s in (("image_to_text", sim), ("text_to_image", sim.T)):
        ranks = s.topk(max(ks), dim=1).indices
        for k in ks:
            out[f"{name}_R@{k}"] = (ranks[:, :k] == target[:, None]).any(1).float().mean().item()
    return out


def confusion_plot(confusion: np.ndarray, classnames: list[str], title: str = "zero-shot confusion"):
    """A PIL image of the confusion matrix (rows: true, columns: predicted)."""
    from vlm import plots

    fig, ax = plots.figure((5.5, 5))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classnames)), classnames, rotation=45, ha="right")
    ax.set_yticks(range(len(classnames)), classnames)
    for i in range(confusion.shape[0]):
        for j in range(confusion.shape[1]):
            if confusion[i, j]:
                color = "white" if confusion[i, j] > confusion.max() / 2 else "black"
                ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7, color=color)
    acc = np.trace(confusion) / max(confusion.sum(), 1)
    ax.set_title(f"{title} (top-1 {100 * acc:.1f}%)")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return plots.to_image(fig)
