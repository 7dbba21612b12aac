"""Flamingo training sequences: image-text pairs packed into interleaved sequences, and MMC4 documents.

Both sources end in the same fixed-shape arrays, so the training worker only runs the model:
- `images` float32 (B, T_img, 1, 3, S, S): the sequence's images in text order, zero-padded to T_img;
- `input_ids` int64 (B, L), `attention_mask` int64 (B, L): right-padded with the pad id;
- `labels` int64 (B, L): input_ids, with -100 on padding, on `<image>` tokens and on prompt text.
Every `<image>` token in a row has a real image behind it (the model rejects more tokens than images;
zero-padded image slots are never referred to).

Pairs (`FlamingoPreprocess`, a Ray Data batch transform over WebDataset rows). Each pair becomes
`<image>{prompt} {caption}<|endofchunk|>` — the format `generate.few_shot_prompt` builds at eval time —
and consecutive pairs are packed into one sequence of up to `images_per_sequence` images and
`max_length` tokens, so every sequence holds 0-shot, 1-shot, ... examples of captioning (as Flamingo's
M3W/interleaved data does; Alayrac et al. 2022, Sec. 2.4). Only caption tokens and `<|endofchunk|>`
are trained on: the prompt is given at eval time, and predicting `<|endofchunk|>` teaches the model
to stop.

MMC4 documents (`mmc4_sequence`, `collate_mmc4`; Zhu et al. 2023, "Multimodal C4"), accepted as:
    {"text_list": ["sentence 0", "sentence 1", ...],
     "image_info": [{"matched_text_index": 1,             # sentence the image goes before
                     "image_bytes": b"..." | "image_base64": "..." | "image_index": 0,
                     "matched_sim": 0.31}, ...],          # optional; images under `min_sim` are dropped
     "images": [b"...", ...]}                             # optional; what "image_index" refers to
Images are placed as OpenFlamingo does (`<image>` before its matched sentence, `<|endofchunk|>` closing
the text of each image and the document): "s0<image>s1 s2<|endofchunk|><image>s3<|endofchunk|>". At most
`images_per_sequence` images are kept (in text order); sentences of dropped images stay as plain text.
All text is trained on. Rows longer than `max_length` are cut, and images whose `<image>` was cut go too.
"""

from __future__ import annotations

import base64
import functools
import json
import random
import re
from dataclasses import dataclass, field

import numpy as np

from vlm.data.clip_data import PairDataConfig, load_rgb, pick_caption, to_chw, to_text
from vlm.models.flamingo.build import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
from vlm.models.flamingo.tokenizer import NONCE_WORDS

IGNORE = -100  # label of positions without loss (torch's cross_entropy ignore_index)


@dataclass
class FlamingoDataConfig(PairDataConfig):
    images_per_sequence: int = 8  # T_img: pairs packed into one sequence (and MMC4 images kept)
    max_length: int = 128  # L: tokens per sequence
    prompt: str = "Output:"  # text between <image> and the caption; not trained on ("" for none)
    mmc4_min_sim: float | None = None  # MMC4: drop images whose matched_sim is below this
    # Novel-mapping sequences (learning a task from the prompt; `novel_mapping`): this fraction of sequences
    # draws a fresh random mapping class -> nonce word, and each pair whose caption names one of
    # `novel_classes` is captioned by its class's word alone. 0 (or no classes): captions stay as they are.
    # Such a sequence is bursty (Chan et al. 2022: in-context learning emerges when classes recur within a
    # context): its pairs are drawn from 2 .. images_per_sequence // 2 classes of the batch, so most of its
    # words can be known from an earlier image of the same class.
    novel_fraction: float = 0.0
    novel_classes: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.images_per_sequence < 1 or self.max_length < 8:
            raise ValueError("data.images_per_sequence must be >= 1 and data.max_length >= 8")
        if not 0.0 <= self.novel_fraction <= 1.0:
            raise ValueError(f"data.novel_fraction must be in [0, 1], got {self.novel_fraction}")
        if self.novel_fraction > 0 and len(set(self.novel_classes)) < 2:
            raise ValueError("data.novel_fraction > 0 needs data.novel_classes: at least two class words")
        if len(set(self.novel_classes)) > len(NONCE_WORDS):
            raise ValueError(f"data.novel_classes: at most {len(NONCE_WORDS)} classes")


@dataclass
class Sequence:
    """One training row before padding: token ids, labels, and its images (3, S, S) in text order."""

    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)


@functools.lru_cache(maxsize=4)
def flamingo_tokenizer(lm_name_or_path: str | None):
    """The tokenizer of a Flamingo whose LM is `lm_name_or_path` (None: the offline one), with Flamingo's
    tokens added; built once per process."""
    from vlm.models.flamingo.build import add_flamingo_tokens
    from vlm.models.flamingo.tokenizer import offline_tokenizer

    if lm_name_or_path is None:  # as build.build_tokenizer decides
        tokenizer = offline_tokenizer()
    else:
        from transformers import AutoTokenizer

        from vlm.models import local_copy

        tokenizer = AutoTokenizer.from_pretrained(local_copy(lm_name_or_path))  # a URL: downloaded once
    add_flamingo_tokens(tokenizer)
    return tokenizer


def class_of(caption: str, classes: list[str]) -> int | None:
    """Index in `classes` of the first class word `caption` contains (whole word, any case); None if none."""
    pattern, index = _class_pattern(tuple(classes))
    match = pattern.search(caption)
    return None if match is None else index[match.group(1).lower()]


@functools.lru_cache(maxsize=8)
def _class_pattern(classes: tuple[str, ...]) -> tuple[re.Pattern, dict[str, int]]:
    index = {c.lower(): i for i, c in reversed(list(enumerate(classes)))}  # a repeated word: its first index
    words = sorted(index, key=len, reverse=True)  # longest first: "sixteen" before "six"
    return re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE), index


def novel_mapping(captions: list[str], classes: list[str], rng: random.Random) -> list[str]:
    """One sequence's captions under a fresh random mapping class -> nonce word (from `NONCE_WORDS`).

    A caption naming a class becomes that class's word; a caption naming none is left as it is. Within the
    sequence the mapping is consistent, across sequences it is random: the word of an image is only known
    from an earlier image of the same class in the same sequence, so learning it is learning from context.
    """
    words = rng.sample(NONCE_WORDS, len(classes))
    out = []
    for caption in captions:
        c = class_of(caption, classes)
        out.append(caption if c is None else words[c])
    return out


def bursty_pick(classes: list[int | None], n: int, rng: random.Random) -> list[int]:
    """Up to `n` row indices (distinct, random order) drawn from 2 .. max(2, n // 2) of the classes present in
    `classes` (rows of class None are never drawn); [] if no row has a class."""
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(classes):
        if c is not None:
            by_class.setdefault(c, []).append(i)
    if not by_class:
        return []
    chosen = rng.sample(sorted(by_class), min(rng.randint(2, max(2, n // 2)), len(by_class)))
    rows = [i for c in chosen for i in by_class[c]]
    rng.shuffle(rows)
    return rows[:n]


def first_seen_later(captions: list[str]) -> list[bool]:
    """True for a caption an earlier pair of the sequence already had: in a novel-mapping sequence only those
    words can be known (from context); a class's first word is random and is context only, not a target."""
    seen: set[str] = set()
    out = []
    for caption in captions:
        out.append(caption in seen)
        seen.add(caption)
    return out


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []


def _start(tokenizer) -> list[int]:
    """What the tokenizer puts before any text (a BOS for Llama-style tokenizers; nothing for GPT-2's)."""
    return list(tokenizer("", add_special_tokens=True).input_ids)


def pair_tokens(tokenizer, caption: str, prompt: str) -> tuple[list[int], list[int]]:
    """(ids, labels) of `<image>{prompt} {caption}<|endofchunk|>`; only caption and end-of-chunk are labelled."""
    media, eoc = tokenizer.convert_tokens_to_ids([MEDIA_TOKEN, END_OF_CHUNK_TOKEN])
    head = [media] + _ids(tokenizer, prompt)
    body = _ids(tokenizer, f" {caption}" if prompt else caption) + [eoc]
    return head + body, [IGNORE] * len(head) + body


def pack_pairs(
    tokenizer,
    images: list[np.ndarray],
    captions: list[str],
    images_per_sequence: int,
    max_length: int,
    prompt: str,
    trained: list[bool] | None = None,
) -> list[Sequence]:
    """Greedily pack consecutive (image (3, S, S), caption) pairs into sequences of at most
    `images_per_sequence` images and `max_length` tokens. A pair longer than a whole row is cut.
    `trained[i]` False: pair i is context only (no labels)."""
    start = _start(tokenizer)
    seqs: list[Sequence] = []
    cur = Sequence(list(start), [IGNORE] * len(start))
    for i, (image, caption) in enumerate(zip(images, captions)):
        ids, labels = pair_tokens(tokenizer, caption, prompt)
        if trained is not None and not trained[i]:
            labels = [IGNORE] * len(labels)
        full = len(cur.images) >= images_per_sequence or len(cur.ids) + len(ids) > max_length
        if cur.images and full:
            seqs.append(cur)
            cur = Sequence(list(start), [IGNORE] * len(start))
        room = max_length - len(cur.ids)
        cur.ids += ids[:room]  # only a lone over-long pair is cut; its <image> comes first, so it stays
        cur.labels += labels[:room]
        cur.images.append(image)
    if cur.images:
        seqs.append(cur)
    return seqs


def _image_bytes(info: dict, doc: dict) -> bytes:
    if info.get("image_bytes") is not None:
        return info["image_bytes"]
    if info.get("image_base64") is not None:
        return base64.b64decode(info["image_base64"])
    if info.get("image_index") is not None:
        return doc["images"][int(info["image_index"])]
    raise ValueError("an MMC4 image_info entry needs image_bytes, image_base64 or image_index")


def mmc4_sequence(
    doc: dict, tokenizer, data: FlamingoDataConfig, image_size: int, rng: random.Random | None = None
) -> Sequence:
    """One MMC4 document (format in the module docstring) -> a Sequence of at most `max_length` tokens."""
    rng = rng or random.Random(0)
    media, eoc = tokenizer.convert_tokens_to_ids([MEDIA_TOKEN, END_OF_CHUNK_TOKEN])
    infos = [
        info
        for info in doc.get("image_info", [])
        if data.mmc4_min_sim is None or info.get("matched_sim", 1.0) >= data.mmc4_min_sim
    ]
    infos = sorted(infos, key=lambda info: int(info["matched_text_index"]))[: data.images_per_sequence]
    by_sentence: dict[int, list[dict]] = {}
    for info in infos:
        by_sentence.setdefault(int(info["matched_text_index"]), []).append(info)

    seq = Sequence(_start(tokenizer), [])
    seq.labels = [IGNORE] * len(seq.ids)
    pending: list[dict] = []  # image infos in token order
    after_break = True  # no space before text that follows the start, an <image> or an <|endofchunk|>
    in_chunk = False
    for i, sentence in enumerate(doc["text_list"]):
        for info in by_sentence.get(i, []):
            if in_chunk:
                seq.ids.append(eoc)
                seq.labels.append(eoc)
            seq.ids.append(media)
            seq.labels.append(IGNORE)
            pending.append(info)
            after_break, in_chunk = True, True
        text = _ids(tokenizer, sentence if after_break else f" {sentence}")
        seq.ids += text
        seq.labels += text
        after_break = False
    if in_chunk:
        seq.ids.append(eoc)
        seq.labels.append(eoc)
    seq.ids, seq.labels = seq.ids[: data.max_length], seq.labels[: data.max_length]
    kept = seq.ids.count(media)  # images whose <image> survived the cut
    decoded = [
        load_rgb(_image_bytes(info, doc), image_size, data.augment, rng, data.crop_scale_min) for info in pending
    ]
    seq.images = list(to_chw(decoded[:kept])) if kept else []
    return seq


def collate_mmc4(docs: list[dict], tokenizer, data: FlamingoDataConfig, image_size: int) -> dict[str, np.ndarray]:
    """MMC4 documents -> the training arrays (one row per document)."""
    rng = random.Random()
    seqs = [mmc4_sequence(doc, tokenizer, data, image_size, rng) for doc in docs]
    return to_arrays(seqs, tokenizer.pad_token_id, data.images_per_sequence, data.max_length, image_size)


def to_arrays(
    seqs: list[Sequence], pad_id: int, images_per_sequence: int, max_length: int, image_size: int
) -> dict[str, np.ndarray]:
    """Pad Sequences to the fixed-shape arrays described in the module docstring."""
    b = len(seqs)
    input_ids = np.full((b, max_length), pad_id, dtype=np.int64)
    attention_mask = np.zeros((b, max_length), dtype=np.int64)
    labels = np.full((b, max_length), IGNORE, dtype=np.int64)
    images = np.zeros((b, images_per_sequence, 1, 3, image_size, image_size), dtype=np.float32)  # (B, T, F, C, H, W)
    for row, seq in enumerate(seqs):
        n = len(seq.ids)
        input_ids[row, :n] = seq.ids
        attention_mask[row, :n] = 1
        labels[row, :n] = seq.labels
        if seq.images:
            images[row, : len(seq.images), 0] = np.stack(seq.images)
    return {"images": images, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pil_pixels(images: list, image_size: int) -> np.ndarray:
    """PIL images -> float32 (N, 3, S, S) as training sees them without augmentation (center crop, resize)."""
    from PIL import Image

    out = []
    for img in images:
        w, h = img.size
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        out.append(img.convert("RGB").resize((image_size, image_size), Image.BICUBIC, box=box))
    return to_chw(out)


def shard_captions(shards: list[str], caption_source: str, limit: int | None = None, seed: int = 0) -> list[str]:
    """Training captions of WebDataset shards, chosen as `FlamingoPreprocess` chooses them, in shard order.

    Reads only the `.txt` and `.json` members (no image bytes; a shard is streamed, locally or from
    object storage); stops after `limit` samples.
    """
    import tarfile

    from vlm import storage

    rng = random.Random(seed)
    out: list[str] = []
    for path in shards:
        texts: dict[str, dict[str, bytes]] = {}
        with storage.open_input(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if member.isfile() and ext in ("txt", "json"):
                    texts.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key in sorted(texts):
            meta = json.loads(to_text(texts[key]["json"])) if "json" in texts[key] else None
            caption = pick_caption(to_text(texts[key].get("txt")), meta, caption_source, rng)
            if caption:
                out.append(caption)
            if limit is not None and len(out) >= limit:
                return out
    return out


class FlamingoPreprocess:
    """Ray Data `map_batches` transform: WebDataset pair rows -> packed sequence arrays (fewer rows out).

    Passed as an instance (Ray Data runs it as tasks); the tokenizer is cached per worker process.
    Packing happens within a batch, so use a batch size that is a multiple of `images_per_sequence`.
    """

    def __init__(self, lm_name_or_path: str | None, image_size: int, data: FlamingoDataConfig, skips=None):
        self.lm_name_or_path = lm_name_or_path
        self.size = image_size
        self.cfg = data
        self.skips = skips  # vlm.data.skips counter: rows that do not decode are left out and reported

    def __call__(self, batch: dict) -> dict:
        from vlm.data.skips import decode_rows

        rng = random.Random()
        tokenizer = flamingo_tokenizer(self.lm_name_or_path)

        def decode(data, txt, meta):
            image = load_rgb(data, self.size, self.cfg.augment, rng, self.cfg.crop_scale_min)
            return image, pick_caption(txt, meta, self.cfg.caption_source, rng)

        rows = decode_rows(batch, decode, self.skips)
        pixels = list(to_chw([image for image, _ in rows])) if rows else []
        captions = [caption for _, caption in rows]
        cfg, n = self.cfg, self.cfg.images_per_sequence
        classes = [class_of(c, cfg.novel_classes) for c in captions] if cfg.novel_fraction > 0 else []
        seqs = []
        for start in range(0, len(captions), n):  # one sequence's pairs at a time, so a mapping stays in its sequence
            rows = list(range(start, min(start + n, len(captions))))
            chunk = [captions[i] for i in rows]
            trained = None
            if cfg.novel_fraction > 0 and rng.random() < cfg.novel_fraction:
                rows = bursty_pick(classes, n, rng) or rows  # a few of the batch's classes, each recurring
                chunk = novel_mapping([captions[i] for i in rows], cfg.novel_classes, rng)
                trained = first_seen_later(chunk)
            seqs += pack_pairs(tokenizer, [pixels[i] for i in rows], chunk, n, cfg.max_length, cfg.prompt, trained)
        return to_arrays(seqs, tokenizer.pad_token_id, self.cfg.images_per_sequence, self.cfg.max_length, self.size)
