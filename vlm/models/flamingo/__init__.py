"""Flamingo (Alayrac et al. 2022): frozen CLIP ViT + Perceiver Resampler + gated cross-attention in a frozen LM."""

from vlm.models.flamingo.build import build_flamingo, count_parameters
from vlm.models.flamingo.config import FLAMINGO_PRESETS, FlamingoConfig, flamingo_preset
from vlm.models.flamingo.generate import few_shot_prompt, generate
from vlm.models.flamingo.model import Flamingo

__all__ = [
    "FLAMINGO_PRESETS",
    "Flamingo",
    "FlamingoConfig",
    "build_flamingo",
    "count_parameters",
    "few_shot_prompt",
    "flamingo_preset",
    "generate",
]
