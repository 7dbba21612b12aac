"""The frozen vision tower: an open_clip ViT whose patch tokens feed the Perceiver Resampler.

Flamingo uses the final-layer patch features of a contrastively pretrained ViT (the paper's NFNet;
OpenFlamingo's CLIP ViT-L/14). We return the last block's output after open_clip's `ln_post`, without
the CLS token and before the pooling projection: (N, V, Dv) with V = grid_h * grid_w, Dv = ViT width.
That is what OpenFlamingo takes (`visual(x)[1]` with `output_tokens=True`), and what we take too.
"""

from __future__ import annotations

import torch
from torch import nn


def _load_visual_weights(visual: nn.Module, checkpoint: str) -> None:
    """Load a full open_clip checkpoint's `visual.*` weights, or a vision-only state dict, strictly
    (a local file or a URL, downloaded once per process)."""
    from open_clip.factory import load_state_dict

    from vlm.models import local_copy

    state = load_state_dict(local_copy(checkpoint))
    if any(k.startswith("visual.") for k in state):
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    visual.load_state_dict(state, strict=True)


def build_vision_tower(vision_model: str | dict, checkpoint: str | None = None) -> nn.Module:
    """An open_clip vision tower from a model name or model config dict, weights from a local file if given.

    Names and dicts build only the vision tower (no text tower), so this also works under a meta-device
    context. "local-dir:" / "hf-hub:" names go through `open_clip.create_model` (schema paths carry weights).
    """
    import open_clip
    from open_clip.model import _build_vision_tower  # what CLIP.__init__ calls; public API builds both towers

    if isinstance(vision_model, str) and ":" in vision_model:
        visual = open_clip.create_model(vision_model, device=torch.get_default_device()).visual
    else:
        model_cfg = open_clip.get_model_config(vision_model) if isinstance(vision_model, str) else vision_model
        if model_cfg is None:
            raise ValueError(f"unknown open_clip model '{vision_model}'; see open_clip.list_models()")
        if "vision_cfg" not in model_cfg or "embed_dim" not in model_cfg:
            raise ValueError("an open_clip model config dict needs 'embed_dim' and 'vision_cfg'")
        visual = _build_vision_tower(
            model_cfg["embed_dim"], dict(model_cfg["vision_cfg"]), quick_gelu=model_cfg.get("quick_gelu", False)
        )
    prepare_vision_tower(visual)
    if checkpoint is not None:
        _load_visual_weights(visual, checkpoint)
    return visual


def prepare_vision_tower(visual: nn.Module) -> int:
    """Make the tower return its patch tokens (open_clip's `output_tokens`); returns their width Dv.

    ValueError for towers without plain ViT patch tokens. Idempotent.
    """
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"Flamingo needs an open_clip VisionTransformer tower, got {type(visual).__name__} "
            "(ResNet and timm towers are not supported)"
        )
    if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
        raise ValueError("Flamingo needs an open_clip ViT with 'tok' or 'avg' pooling and no attentional pooler")
    visual.output_tokens = True
    return visual.transformer.width


def patch_tokens(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) pixels -> (N, V, Dv) final-layer patch tokens (after ln_post, CLS excluded).

    Goes through the tower's `forward` (not `forward_intermediates`) so DeepSpeed ZeRO-3's module hooks
    gather its parameters as usual.
    """
    _, tokens = visual(pixels)  # (N, Dout) pooled, unused; (N, V, Dv) tokens
    return tokens
