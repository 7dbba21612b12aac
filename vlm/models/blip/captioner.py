"""Batched inference for CapFilt: `Captioner` writes synthetic captions, `Filter` scores captions.

Both wrap a model + processor from `build`; neither is an nn.Module. Each batch is one model
call: the captioner runs a single `generate` for all images with `num_return_sequences=K`; the
filter runs the vision encoder once per image and scores all its captions (original + K
synthetic) in one text pass, as BLIP's CapFilt does (Li et al. 2022, sec. 3.3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from vlm.models.blip.build import processor_inputs, resolve_device, torch_dtype
from vlm.models.blip.config import BlipConfig
from vlm.models.blip.matching import encode_images, image_features, itm_logits, paired_similarity, text_features

__all__ = ["Captioner", "Filter", "strip_prompt"]


def strip_prompt(text: str, prompt: str) -> str:
    """`text` without a leading `prompt` (case-insensitive, whitespace-trimmed)."""
    text, prompt = text.strip(), prompt.strip()
    if prompt and text.lower().startswith(prompt.lower()):
        text = text[len(prompt) :].strip()
    return text


def _device_of(device: str | torch.device | None, cfg: BlipConfig) -> torch.device:
    return resolve_device(cfg.device) if device is None else torch.device(device)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Seed torch's RNGs for the block only (the caller's RNG state is left as it was)."""
    if seed is None:
        yield
        return
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class Captioner:
    """Synthetic captions for a batch of images: BLIP's nucleus-sampled CapFilt captioner.

    Args:
        model: `BlipForConditionalGeneration` or `Blip2ForConditionalGeneration`.
        processor: its processor (BlipProcessor / Blip2Processor).
        cfg: generation settings (prompt, num_captions, top_p, ...).
        device: where to run; default `cfg.device`.
    """

    def __init__(self, model, processor, cfg: BlipConfig, device: str | torch.device | None = None):
        self.cfg = cfg
        self.device = _device_of(device, cfg)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.dtype = torch_dtype(cfg.dtype)

    def generate_kwargs(self) -> dict:
        """The `generate` arguments: lengths count caption tokens, the prompt excluded."""
        cfg, k = self.cfg, self.cfg.num_captions
        kwargs = dict(
            num_return_sequences=k,
            min_new_tokens=cfg.min_length,
            max_new_tokens=cfg.max_length,
            repetition_penalty=cfg.repetition_penalty,
        )
        if cfg.do_sample:
            kwargs.update(do_sample=True, top_p=cfg.top_p)
        else:
            kwargs.update(do_sample=False, num_beams=max(cfg.num_beams, k))
        return kwargs

    def caption(self, images: Sequence[Image.Image], *, seed: int | None = None) -> list[list[str]]:
        """K = cfg.num_captions captions per image (prompt stripped), from one `generate` call.

        Args:
            images: RGB PIL images.
            seed: seeds the sampling for this call only; same seed + same batch => same captions.
        """
        if not images:
            return []
        k = self.cfg.num_captions
        # The prompt without trailing space: BPE tokenizers would otherwise end it in a lone space token.
        prompt = self.cfg.prompt.rstrip()
        inputs = processor_inputs(self.processor, list(images), [prompt] * len(images))
        inputs = {name: t.to(self.device) for name, t in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode(), _seeded(seed, self.device):
            out = self.model.generate(**inputs, **self.generate_kwargs())  # (B * K, T), image-major
        texts = self.processor.tokenizer.batch_decode(out, skip_special_tokens=True)
        texts = [strip_prompt(t, prompt) for t in texts]
        return [texts[i * k : (i + 1) * k] for i in range(len(images))]


class Filter:
    """Scores (image, caption) pairs with the ITM head (P(match)) or ITC (cosine similarity).

    Args:
        model: `BlipForImageTextRetrieval` or `Blip2ForImageTextRetrieval`.
        processor: its processor.
        cfg: `score` ("itm" / "itc") and `max_text_length`.
        device: where to run; default `cfg.device`.
    """

    def __init__(self, model, processor, cfg: BlipConfig, device: str | torch.device | None = None):
        self.cfg = cfg
        self.device = _device_of(device, cfg)
        self.model = model.to(self.device).eval()
        self.processor = processor

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """Score of image i with text i, float32 (B,): ITM softmax[:, 1] in [0, 1], or ITC cosine."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        sets = self.score_sets(images, [[t] for t in texts])
        return np.array([s[0] for s in sets], dtype=np.float32)

    def score_sets(self, images: Sequence[Image.Image], texts: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Scores of every text in `texts[i]` against image i; each image is encoded once.

        Returns one float32 array per image, len(texts[i]) long (possibly empty).
        """
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} text lists")
        flat = [t for ts in texts for t in ts]
        if not flat:
            return [np.zeros(0, dtype=np.float32) for _ in texts]
        owner = torch.tensor([i for i, ts in enumerate(texts) for _ in ts], device=self.device)  # (M,)
        inputs = processor_inputs(self.processor, list(images), flat, max_length=self.cfg.max_text_length)
        with torch.inference_mode():
            image_embeds = encode_images(self.model, inputs["pixel_values"])  # (B, N, D)
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            if self.cfg.score == "itm":
                logits = itm_logits(self.model, image_embeds.index_select(0, owner), ids, mask)  # (M, 2)
                scores = logits.float().softmax(dim=-1)[:, 1]
            else:
                image_feat = image_features(self.model, image_embeds).index_select(0, owner)
                scores = paired_similarity(image_feat, text_features(self.model, ids, mask)).float()
        scores = scores.cpu().numpy()
        bounds = np.cumsum([0] + [len(ts) for ts in texts])
        return [scores[bounds[i] : bounds[i + 1]] for i in range(len(texts))]
