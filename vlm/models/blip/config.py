"""BLIP / BLIP-2 captioner and filter settings, and the named model sizes they are built at.

The generation and filter defaults are BLIP's CapFilt ones (Li et al. 2022, "BLIP: Bootstrapping
Language-Image Pre-training", sec. 3.3 and 4.2): nucleus sampling with p = 0.9 for diverse
synthetic captions, repetition penalty 1.1, the prompt "a picture of ", and an ITM filter that
keeps a caption whose match probability is at least 0.5.

This file imports nothing heavy, so stage configs can use `BlipConfig` without torch/transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["PRESETS", "BlipConfig", "ModelPreset", "TextSize", "VisionSize", "get_preset"]


@dataclass(frozen=True)
class VisionSize:
    """A ViT image encoder."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp: int


@dataclass(frozen=True)
class TextSize:
    """A transformer over text: BLIP's BERT encoder/decoder, BLIP-2's Q-Former, or its OPT LM."""

    width: int
    layers: int
    heads: int
    mlp: int
    max_positions: int = 512


@dataclass(frozen=True)
class ModelPreset:
    """One named size. BLIP: vision + BERT `text`. BLIP-2: vision + `qformer` + causal LM `text`."""

    vision: VisionSize
    text: TextSize
    embed_dim: int = 256  # width of the ITC projections (HF `image_text_hidden_size`)
    qformer: TextSize | None = None  # BLIP-2 only; also the BLIP-2 filter's text encoder
    num_query_tokens: int = 32  # BLIP-2 only: learned queries the Q-Former feeds the LM
    # Init std of a model built from scratch (HF's initializer_range). BERT's 0.02 suits width 768; at
    # width 64 it makes each layer's output ~0.16 of its input, and image -> text signal (cross-attention
    # of cross-attention) starts so weak that training from scratch sits on a plateau for thousands of steps.
    init_std: float = 0.02


_TINY_VISION = VisionSize(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp=64)
_TINY_TEXT = TextSize(width=32, layers=2, heads=2, mlp=64, max_positions=128)
# `small`: 32 px images in 4 patches of 16 (a ViT learns digit shapes from few patches much faster on a
# CPU), width 64, init std ~0.6/sqrt(width). Trains from scratch in about a minute on 2 cores.
_SMALL_VISION = VisionSize(image_size=32, patch_size=16, width=64, layers=2, heads=2, mlp=256)
_SMALL_TEXT = TextSize(width=64, layers=2, heads=2, mlp=256, max_positions=128)
_BERT_BASE = TextSize(width=768, layers=12, heads=12, mlp=3072, max_positions=512)

PRESETS: dict[str, dict[str, ModelPreset]] = {
    "blip": {
        # CPU, seconds: for tests and the offline demo (trained by `vlm train blip`).
        "tiny": ModelPreset(vision=_TINY_VISION, text=_TINY_TEXT, embed_dim=16),
        # CPU, about a minute to train from scratch: the demo's captioner and filter (configs/train/blip-*).
        "small": ModelPreset(vision=_SMALL_VISION, text=_SMALL_TEXT, embed_dim=32, init_std=0.08),
        # BLIP ViT-B/16 + BERT-base (Salesforce/blip-image-captioning-base, blip-itm-base-coco).
        "base": ModelPreset(
            vision=VisionSize(image_size=384, patch_size=16, width=768, layers=12, heads=12, mlp=3072),
            text=_BERT_BASE,
        ),
        # BLIP ViT-L/16 + BERT-base (Salesforce/blip-image-captioning-large, blip-itm-large-coco).
        "large": ModelPreset(
            vision=VisionSize(image_size=384, patch_size=16, width=1024, layers=24, heads=16, mlp=4096),
            text=_BERT_BASE,
        ),
    },
    "blip2": {
        "tiny": ModelPreset(vision=_TINY_VISION, text=_TINY_TEXT, embed_dim=16, qformer=_TINY_TEXT, num_query_tokens=4),
        "small": ModelPreset(
            vision=_SMALL_VISION,
            text=_SMALL_TEXT,
            embed_dim=32,
            qformer=_SMALL_TEXT,
            num_query_tokens=4,
            init_std=0.08,
        ),
        # EVA ViT-g/14 + BERT-base Q-Former (32 queries) + OPT-2.7b (Salesforce/blip2-opt-2.7b).
        "opt-2.7b": ModelPreset(
            vision=VisionSize(image_size=224, patch_size=14, width=1408, layers=39, heads=16, mlp=6144),
            text=TextSize(width=2560, layers=32, heads=32, mlp=10240, max_positions=2048),
            qformer=_BERT_BASE,
            num_query_tokens=32,
        ),
    },
}


def get_preset(backend: str, name: str) -> ModelPreset:
    """The preset `name` of `backend`; ValueError naming the choices if unknown."""
    if backend not in PRESETS:
        raise ValueError(f"blip.backend must be one of {', '.join(PRESETS)}, got {backend!r}")
    presets = PRESETS[backend]
    if name not in presets:
        raise ValueError(f"unknown {backend} preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]


@dataclass
class BlipConfig:
    """Captioner + filter of the CapFilt stage (the `blip` config section)."""

    backend: Literal["blip", "blip2"] = "blip"
    pretrained: str | None = None  # captioner: local save_pretrained dir or hub id; None => build `preset`
    filter_pretrained: str | None = None  # ITM filter, likewise (a separate checkpoint, as in BLIP)
    preset: str = "tiny"  # a name in PRESETS[backend]; random init unless trained (`vlm train blip`)
    image_size: int | None = None  # preset-built models only; None => the preset's
    device: str = "auto"  # "auto" => cuda if available, else cpu
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    seed: int = 0  # init of preset-built models and the captioner's sampling

    # Generation (BLIP CapFilt: nucleus sampling).
    prompt: str = "a picture of "  # fed as a text prefix, stripped from the captions
    num_captions: int = 1  # K synthetic captions per image
    do_sample: bool = True  # False => beam search with num_beams
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    min_length: int = 5  # caption tokens, not counting the prompt
    max_length: int = 30  # caption tokens, not counting the prompt
    num_beams: int = 3  # beam search only (do_sample false); raised to num_captions if smaller
    max_text_length: int = 40  # tokens a text is truncated to for the filter and training

    # Filter.
    itm_threshold: float = 0.5  # keep a caption scoring >= this
    score: Literal["itm", "itc"] = "itm"  # itm: P(match) from the ITM head; itc: cosine similarity

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is out of range."""
        get_preset(self.backend, self.preset)
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(f"blip.image_size must be > 0, got {self.image_size}")
        if self.num_captions < 1:
            raise ValueError(f"blip.num_captions must be >= 1, got {self.num_captions}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"blip.top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"blip.repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_length <= self.max_length or self.max_length < 1:
            raise ValueError(
                f"blip.min_length/max_length must satisfy 0 <= min <= max, max >= 1; got {self.min_length}, "
                f"{self.max_length}"
            )
        if self.num_beams < 1:
            raise ValueError(f"blip.num_beams must be >= 1, got {self.num_beams}")
        if self.max_text_length < 2:
            raise ValueError(f"blip.max_text_length must be >= 2, got {self.max_text_length}")
        if self.score not in ("itm", "itc"):
            raise ValueError(f"blip.score must be itm or itc, got {self.score!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"blip.dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
