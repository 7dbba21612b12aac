"""Flamingo configuration: one typed dataclass plus named size presets.

Sizes follow Alayrac et al. 2022 ("Flamingo: a Visual Language Model for Few-Shot Learning") and
the OpenFlamingo release (Awadalla et al. 2023): a frozen CLIP ViT, a Perceiver Resampler, and
gated cross-attention blocks inserted before every N-th layer of a frozen causal LM.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any

from vlm.errors import ConfigError


@dataclass
class FlamingoConfig:
    # --- vision (frozen) ---
    # An open_clip model name ("ViT-L-14", "local-dir:/path") or an open_clip model config dict
    # ({"embed_dim", "vision_cfg", "text_cfg"}, as in open_clip's model_configs/*.json).
    vision_model: str | dict = "ViT-L-14"
    vision_checkpoint: str | None = None  # local open_clip checkpoint file (full CLIP or vision-only); None = random
    vision_width: int | None = None  # inferred from the tower; set it only to assert the expected width

    # --- Perceiver Resampler (trainable); it works at the vision width ---
    resampler_depth: int = 6
    resampler_heads: int = 8
    resampler_dim_head: int = 64
    resampler_ff_mult: int = 4
    num_latents: int = 64  # visual tokens per image handed to the LM
    # Subtract a running mean (over images) from the visual tokens, BatchNorm's centering without scaling
    # (model.MediaCentering). Not in the paper; it lets a tiny LM learn from templated captions (see there).
    center_media: bool = False
    max_num_media: int = 32  # most images in one sequence (inputs beyond it are rejected)
    max_num_frames: int = 1  # rows of the learned frame (time) embedding; 1 for still images

    # --- gated cross-attention (trainable) ---
    cross_attn_every_n_layers: int = 4  # a block before decoder layers N-1, 2N-1, ... (OpenFlamingo's placement)
    xattn_heads: int = 8
    xattn_dim_head: int = 64
    xattn_ff_mult: int = 4
    only_attend_immediate_media: bool = True  # a token sees only the latest <image> at or before it (paper)

    # --- language model (frozen) ---
    # Weights come from `lm_name_or_path` (local dir or hub id) when set. `lm_config` is a transformers config
    # dict with "model_type"; it builds a random LM when there is no path, and it lets parameter counting
    # run without downloading anything. A local directory's own config.json wins over `lm_config` (the weights
    # are built from it), and `flamingo_preset` replaces a preset's LM as a unit: give one of the two fields
    # and the preset's other one is dropped.
    lm_name_or_path: str | None = None
    lm_config: dict | None = None
    freeze_lm_embeddings: bool = True  # True: only the rows of the added tokens train; False: all rows train
    gradient_checkpointing: bool = False  # on the LM's decoder layers and the cross-attention blocks

    def __post_init__(self) -> None:
        if self.lm_name_or_path is None and self.lm_config is None:
            raise ConfigError("FlamingoConfig needs lm_name_or_path or lm_config")
        if self.lm_config is not None and "model_type" not in self.lm_config:
            raise ConfigError("FlamingoConfig.lm_config needs a 'model_type' key (e.g. 'llama', 'gpt2')")
        for name in ("cross_attn_every_n_layers", "num_latents", "max_num_media", "max_num_frames", "resampler_depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"FlamingoConfig.{name} must be >= 1, got {getattr(self, name)}")


# Same architecture as the CLIP stage's `vlm-clip-tiny`, so a tiny CLIP checkpoint from that stage loads here.
_TINY_VISION = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
_TINY_XATTN = {
    "resampler_depth": 1,
    "resampler_heads": 2,
    "resampler_dim_head": 16,
    "resampler_ff_mult": 2,
    "num_latents": 4,
    "max_num_media": 8,
    "cross_attn_every_n_layers": 1,
    "xattn_heads": 2,
    "xattn_dim_head": 16,
    "xattn_ff_mult": 2,
}

FLAMINGO_PRESETS: dict[str, dict[str, Any]] = {
    # CPU debug sizes: build and train in seconds. The LM vocab only has to cover the offline tokenizer
    # (eos id 0, ~480 ids).
    "tiny": {
        "vision_model": _TINY_VISION,
        **_TINY_XATTN,
        "lm_config": {
            "model_type": "gpt2",
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 2,
            "n_positions": 256,
            "vocab_size": 512,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        },
    },
    "tiny-llama": {
        "vision_model": _TINY_VISION,
        **_TINY_XATTN,
        "lm_config": {
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "vocab_size": 512,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "tie_word_embeddings": False,
        },
    },
    # OpenFlamingo-3B layout (ViT-L/14, xattn every layer) on a 1.1B Llama-style LM (TinyLlama's shape).
    "flamingo-3b": {
        "vision_model": "ViT-L-14",
        "cross_attn_every_n_layers": 1,
        "lm_name_or_path": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
        "lm_config": {
            "model_type": "llama",
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 22,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "max_position_embeddings": 2048,
            "vocab_size": 32000,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
        },
    },
    # OpenFlamingo-9B layout (ViT-L/14, xattn every 4th layer) on a 7B Mistral-style LM.
    "flamingo-9b": {
        "vision_model": "ViT-L-14",
        "cross_attn_every_n_layers": 4,
        "lm_name_or_path": "mistralai/Mistral-7B-v0.1",
        "lm_config": {
            "model_type": "mistral",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "max_position_embeddings": 32768,
            "vocab_size": 32000,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "sliding_window": 4096,
            "tie_word_embeddings": False,
        },
    },
}


def flamingo_preset(name: str, **overrides: Any) -> FlamingoConfig:
    """The FlamingoConfig of a named preset, with field overrides; unknown names or fields are a ConfigError."""
    if name not in FLAMINGO_PRESETS:
        raise ConfigError(f"unknown Flamingo preset '{name}'; known: {', '.join(FLAMINGO_PRESETS)}")
    known = {f.name for f in fields(FlamingoConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown FlamingoConfig field '{unknown[0]}'")
    values = copy.deepcopy(FLAMINGO_PRESETS[name])
    # The two LM fields describe one LM: an LM given by path is not the preset's lm_config, and an lm_config
    # given alone is not the preset's hub LM. Keeping the other would build, count and export a different LM.
    for given, other in (("lm_name_or_path", "lm_config"), ("lm_config", "lm_name_or_path")):
        if overrides.get(given) is not None and other not in overrides:
            values.pop(other, None)
    values.update(overrides)
    return FlamingoConfig(**values)
