"""Build open_clip CLIP models from named presets and export them so open_clip reloads them.

Presets are open_clip's own configs (ViT-B-32, ViT-B-16, ViT-L-14, RN50, ...) plus ours,
shipped as open_clip JSON configs in `model_configs/` and registered with open_clip, so an
export loads with plain `open_clip.create_model("vlm-clip-tiny", pretrained=file)` once
`open_clip.add_model_config(<that folder>)` has run, or with
`open_clip.create_model("local-dir:<export dir>")` without anything of ours.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from vlm import storage
from vlm.errors import ConfigError

CONFIG_DIR = Path(__file__).with_name("model_configs")
EXPORT_WEIGHTS = "open_clip_model.safetensors"
EXPORT_CONFIG = "open_clip_config.json"
_registered = False


@dataclass
class CLIPModelConfig:
    preset: str = "vlm-clip-tiny"  # an open_clip model name (ViT-B-32, RN50, ...) or one of ours
    checkpoint: str | None = None  # an open_clip checkpoint file (or export dir) to start from; a path or URL
    grad_checkpointing: bool = False


def register_presets() -> None:
    """Make our JSON presets known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(str(CONFIG_DIR))
        _registered = True


def list_presets() -> list[str]:
    import open_clip

    register_presets()
    return open_clip.list_models()


def model_config(preset: str) -> dict:
    """The open_clip model config dict of a preset; ConfigError naming the choices if unknown."""
    import open_clip

    register_presets()
    cfg = open_clip.get_model_config(preset)
    if cfg is None:
        ours = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ConfigError(
            f"unknown CLIP preset '{preset}'; ours: {', '.join(ours)}; open_clip's: ViT-B-32, ViT-B-16, "
            "ViT-L-14, RN50, ... (open_clip.list_models())"
        )
    return cfg


def checkpoint_file(checkpoint: str) -> str:
    """The weights file of a checkpoint given as a file or an export dir (a path or URL);
    ConfigError (one line) if there is none."""
    path = storage.join(checkpoint, EXPORT_WEIGHTS) if storage.is_dir(checkpoint) else str(checkpoint)
    if not storage.is_file(path):
        raise ConfigError(f"CLIP checkpoint not found: {checkpoint}")
    return path


def build_clip(cfg: CLIPModelConfig):
    """Returns (model, tokenizer, model_cfg). Weights from `cfg.checkpoint` if given (a URL is
    downloaded to a temporary file for open_clip, which reads local files)."""
    import open_clip

    model_cfg = model_config(cfg.preset)
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # open_clip's "random init" notice
    if cfg.checkpoint:
        with storage.local_file(checkpoint_file(cfg.checkpoint)) as weights:
            model = open_clip.create_model(cfg.preset, pretrained=str(weights))
    else:
        model = open_clip.create_model(cfg.preset)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    tokenizer = open_clip.get_tokenizer(cfg.preset)
    return model, tokenizer, model_cfg


def export_clip(state_dict: dict[str, torch.Tensor], model_cfg: dict, out_dir: str | Path, preset: str) -> Path:
    """Write `open_clip_model.safetensors` + `open_clip_config.json` (open_clip's local-dir layout)."""
    from safetensors.torch import save_file

    from vlm.data.shards import atomic_write_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state_dict.items()}
    tmp = out / f".{EXPORT_WEIGHTS}.tmp"
    save_file(tensors, str(tmp), metadata={"preset": preset, "format": "open_clip"})
    tmp.replace(out / EXPORT_WEIGHTS)
    size = model_cfg["vision_cfg"].get("image_size", 224)
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "size": size,
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
        "preset": preset,
    }
    atomic_write_bytes(out / EXPORT_CONFIG, json.dumps(config, indent=2).encode())
    return out


def load_export(path: str | Path):
    """Load an export with open_clip alone (the `local-dir:` schema; an export at a URL is
    downloaded to a temporary directory first). Returns (model, tokenizer)."""
    import open_clip

    with storage.local_dir(path) as local:
        model = open_clip.create_model(f"local-dir:{local}")
        cfg = json.loads((local / EXPORT_CONFIG).read_text())
    register_presets()
    tokenizer = open_clip.get_tokenizer(cfg.get("preset") or "ViT-B-32")
    return model.eval(), tokenizer
