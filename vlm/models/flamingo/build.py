"""Build Flamingo from a FlamingoConfig: vision tower, LM, tokenizer with Flamingo's tokens, freezing.

Added tokens. `<image>` marks where an image sits in the text, `<|endofchunk|>` ends the text that
belongs to an image (OpenFlamingo's convention), and `<pad>` is added when the tokenizer has none.
Instead of resizing the LM's embedding matrices, the model splits them (`DecoupledEmbedding`,
`DecoupledLinear` in model.py): the pretrained table stays whole and frozen, a separate small table
holds the added rows and is the only embedding parameter that trains. The optimizer and DeepSpeed ZeRO-3
see two ordinary parameters; there are no gradient hooks that would have to know how ZeRO-3 partitions
a shared matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlm import storage
from vlm.errors import ConfigError, InputError
from vlm.models import local_copy
from vlm.models.flamingo.config import FlamingoConfig
from vlm.models.flamingo.lm import find_decoder_layers
from vlm.models.flamingo.model import Flamingo, check_embeddings
from vlm.models.flamingo.tokenizer import offline_tokenizer
from vlm.models.flamingo.vision import build_vision_tower

MEDIA_TOKEN = "<image>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<pad>"


@dataclass(frozen=True)
class FlamingoTokens:
    """Ids of Flamingo's tokens; ids num_base_tokens .. num_base_tokens + num_new_tokens - 1 are the added rows."""

    media_token_id: int
    end_of_chunk_token_id: int
    pad_token_id: int
    num_base_tokens: int
    num_new_tokens: int


def hf_config(values: dict):
    """A transformers config from a dict with "model_type" (as `FlamingoConfig.lm_config` holds it)."""
    from transformers import AutoConfig

    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def lm_config(cfg: FlamingoConfig):
    """The transformers config of the LM. A local `lm_name_or_path` directory's own config.json (the weights are
    built from it), else `cfg.lm_config` (no download), else the hub's. InputError (one line) if unreadable."""
    from transformers import AutoConfig

    path = cfg.lm_name_or_path
    if path is not None and storage.is_url(path):  # an LM directory on object storage (s3://...)
        if not storage.is_dir(path):
            raise InputError(f"model.lm_name_or_path: no LM directory at {path}")
        path = local_copy(path)
    if cfg.lm_config is not None and not (path is not None and Path(path).is_dir()):
        try:
            return hf_config(cfg.lm_config)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"model.lm_config is not a transformers config: {_first_line(exc)}") from None
    # A hub id is "name" or "org/name"; anything else that names no directory is a path that is not there.
    if not Path(path).is_dir() and (Path(path).is_absolute() or path.startswith((".", "~")) or path.count("/") > 1):
        raise InputError(f"model.lm_name_or_path: no LM directory at {path}")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the LM config of model.lm_name_or_path={path}: {_first_line(exc)}") from None


def build_lm(cfg: FlamingoConfig) -> nn.Module:
    """Pretrained weights from `cfg.lm_name_or_path` (local dir or hub id), else a random LM from `lm_config`."""
    from transformers import AutoModelForCausalLM

    if cfg.lm_name_or_path is not None:
        return AutoModelForCausalLM.from_pretrained(local_copy(cfg.lm_name_or_path))
    return AutoModelForCausalLM.from_config(lm_config(cfg))


def check_lm(cfg: FlamingoConfig) -> None:
    """One line (ConfigError / InputError) unless Flamingo can wrap the configured LM: its config and tokenizer
    load, it is a causal LM whose decoder layers and embeddings are found, and its embedding has a row for every
    tokenizer id. The LM is built on the meta device from its config: no weights are read. For the driver, so
    that a wrong LM fails before any worker starts."""
    from transformers import AutoModelForCausalLM

    arch = lm_config(cfg)
    try:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(arch)
        find_decoder_layers(lm)
        rows = check_embeddings(lm)[0].num_embeddings
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"Flamingo cannot wrap the LM ({arch.model_type}): {_first_line(exc)}") from None
    try:
        tokenizer = build_tokenizer(cfg)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"cannot load the tokenizer of model.lm_name_or_path={cfg.lm_name_or_path}: {_first_line(exc)}"
        ) from None
    base = add_flamingo_tokens(tokenizer).num_base_tokens
    if base > rows:
        raise ConfigError(f"the LM's tokenizer has {base} tokens but its embedding only {rows} rows")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def build_tokenizer(cfg: FlamingoConfig):
    """The LM's own tokenizer when it has a path; the offline byte-level BPE for config-built LMs."""
    if cfg.lm_name_or_path is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(local_copy(cfg.lm_name_or_path))
    return offline_tokenizer()


def add_flamingo_tokens(tokenizer) -> FlamingoTokens:
    """Add <image>, <|endofchunk|> (and <pad> if missing) to the tokenizer; idempotent.

    The added tokens must end up as the tokenizer's last ids, which is where tokenizers put new tokens.
    """
    # add_tokens(special_tokens=True) is the same call in transformers 4 and 5 (the special-token dict keys differ)
    tokenizer.add_tokens([MEDIA_TOKEN, END_OF_CHUNK_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    media, eoc = tokenizer.convert_tokens_to_ids([MEDIA_TOKEN, END_OF_CHUNK_TOKEN])
    new_ids = {media, eoc}
    if tokenizer.pad_token == PAD_TOKEN:
        new_ids.add(tokenizer.pad_token_id)
    first = min(new_ids)
    if sorted(new_ids) != list(range(first, len(tokenizer))):
        raise ValueError(f"Flamingo's tokens {sorted(new_ids)} are not the last ids of a tokenizer of {len(tokenizer)}")
    return FlamingoTokens(media, eoc, tokenizer.pad_token_id, first, len(new_ids))


def assemble(cfg: FlamingoConfig, vision: nn.Module, lm: nn.Module, tokens: FlamingoTokens) -> Flamingo:
    """Flamingo around given towers, frozen for training, with gradient checkpointing as configured."""
    model = Flamingo(
        cfg,
        vision,
        lm,
        media_token_id=tokens.media_token_id,
        num_base_tokens=tokens.num_base_tokens,
        num_new_tokens=tokens.num_new_tokens,
    )
    model.freeze_for_training()
    if cfg.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    return model


def build_flamingo(cfg: FlamingoConfig, tokenizer=None) -> tuple[Flamingo, object]:
    """(model, tokenizer) ready to train: Flamingo's tokens added, vision and LM frozen.

    Args:
        cfg: the model config.
        tokenizer: a tokenizer to use instead of the LM's own / the offline one; Flamingo's tokens are added.
    """
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg)
    tokens = add_flamingo_tokens(tokenizer)
    vision = build_vision_tower(cfg.vision_model, cfg.vision_checkpoint)
    lm = build_lm(cfg)
    return assemble(cfg, vision, lm, tokens), tokenizer


def count_parameters(cfg: FlamingoConfig, tokenizer=None) -> dict[str, int]:
    """Parameter counts by part, from the model built on the meta device (no memory, no download).

    Keys: vision, lm (both frozen), resampler, xattn, new_token_embeddings (the added rows, input and
    output, tied rows counted once), total, trainable. Without a tokenizer the LM config's whole vocab
    counts as base and three tokens are assumed added (<image>, <|endofchunk|>, <pad>).
    """
    from transformers import AutoModelForCausalLM

    lm_cfg = lm_config(cfg)
    if tokenizer is not None:
        tokens = add_flamingo_tokens(tokenizer)
    else:
        base = lm_cfg.get_text_config().vocab_size
        tokens = FlamingoTokens(base, base + 1, base + 2, base, 3)
    with torch.device("meta"):
        vision = build_vision_tower(cfg.vision_model)
        lm = AutoModelForCausalLM.from_config(lm_cfg)
        model = assemble(cfg, vision, lm, tokens)

    def unique(modules) -> dict[int, nn.Parameter]:
        return {id(p): p for m in modules for p in m.parameters()}

    all_params = unique([model])
    vision_params = unique([model.vision_encoder])
    resampler_params = unique([model.resampler])
    xattn_params = unique(layer.gated_xattn for layer in model.flamingo_layers())
    new_params = unique([model.lm.get_input_embeddings().new, model.lm.get_output_embeddings().new])
    lm_params = {k: p for k, p in unique([model.lm]).items() if k not in xattn_params and k not in new_params}

    def n(params: dict[int, nn.Parameter]) -> int:
        return sum(p.numel() for p in params.values())

    return {
        "vision": n(vision_params),
        "lm": n(lm_params),
        "resampler": n(resampler_params),
        "xattn": n(xattn_params),
        "new_token_embeddings": n(new_params),
        "total": n(all_params),
        "trainable": n({k: p for k, p in all_params.items() if p.requires_grad}),
    }


EXPORT_WEIGHTS = "flamingo_model.safetensors"  # every parameter: loads without the vision/LM checkpoints
EXPORT_TRAINABLE = "flamingo_trainable.safetensors"  # only what training changed (resampler, xattn, new rows)
EXPORT_CONFIG = "flamingo_config.json"


def export_flamingo(
    state_dict: dict[str, torch.Tensor],
    cfg: FlamingoConfig,
    tokenizer,
    out_dir,
    trainable: list[str] | None = None,
) -> None:
    """Write a self-contained export: weights (fp32 safetensors), config JSON and the tokenizer.

    The config is written with `vision_checkpoint` cleared (the vision weights are in the export) and
    with the LM's transformers config in `lm_config`.
    """
    import dataclasses
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A copy only where storage is shared (tied weights: safetensors refuses those), not of the whole model.
    tensors, seen = {}, set()
    for k, v in state_dict.items():
        t = v.detach().to(torch.float32).contiguous()
        storage = t.untyped_storage().data_ptr()
        tensors[k] = t.clone() if storage in seen else t
        seen.add(storage)
    save_file(tensors, str(out / EXPORT_WEIGHTS), metadata={"format": "vlm-flamingo"})
    if trainable is not None:
        save_file({k: tensors[k] for k in trainable if k in tensors}, str(out / EXPORT_TRAINABLE))
    # The LM's architecture goes in too (the config its weights were built from), so loading needs neither the
    # LM's directory nor the hub.
    lm_arch = lm_config(cfg).to_dict()
    model_cfg = dataclasses.asdict(dataclasses.replace(cfg, vision_checkpoint=None, lm_config=lm_arch))
    meta = {"format": "vlm-flamingo", "model": model_cfg, "trainable": sorted(trainable or [])}
    (out / EXPORT_CONFIG).write_text(json.dumps(meta, indent=2))
    tokenizer.save_pretrained(str(out))


def load_flamingo_export(path) -> tuple[Flamingo, object]:
    """(model in eval mode, tokenizer) from an `export_flamingo` directory (a path or URL); no other files
    are read."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(local_copy(str(path)))
    meta = json.loads((path / EXPORT_CONFIG).read_text())
    cfg = FlamingoConfig(**meta["model"])
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokens = add_flamingo_tokens(tokenizer)
    # Built from the exported LM config, not from lm_name_or_path: every weight comes from the export.
    model = assemble(
        cfg, build_vision_tower(cfg.vision_model), AutoModelForCausalLM.from_config(hf_config(cfg.lm_config)), tokens
    )
    model.load_state_dict(load_file(str(path / EXPORT_WEIGHTS)), strict=True)
    return model.eval(), tokenizer


def gate_values(state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
    """tanh of each cross-attention block's gates, by the index of the LM layer it precedes:
    {"attn_l1": ..., "ff_l1": ..., ...} (a state dict of a Flamingo, or of its trainable part)."""
    out: dict[str, float] = {}
    for key in state_dict:
        if key.endswith(".gated_xattn.attn_gate"):
            layer = [part for part in key.split(".") if part.isdigit()][-1]
            for gate in ("attn", "ff"):
                value = state_dict[key.replace("attn_gate", f"{gate}_gate")]
                out[f"{gate}_l{layer}"] = float(value.float().tanh().reshape(-1)[0])
    return dict(sorted(out.items(), key=lambda item: (int(item[0].split("_l")[1]), item[0])))
