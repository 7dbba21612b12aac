"""Build or load the CapFilt captioner and filter (HF transformers BLIP / BLIP-2) with processors.

With `pretrained` / `filter_pretrained` set, models and processors load with `from_pretrained`
from a local directory (what `export_pretrained` writes, e.g. after `vlm train blip`), the same at a
URL (s3://..., downloaded once per process), or a hub id when online. Without, they are built at a named
preset size (`config.PRESETS`) with random weights seeded by `cfg.seed`, and processors whose tokenizers
are made offline (`tokenization`).

    backend  captioner                        filter
    blip     BlipForConditionalGeneration     BlipForImageTextRetrieval (ITM head + ITC projections)
    blip2    Blip2ForConditionalGeneration    Blip2ForImageTextRetrieval (Q-Former ITM + ITC)
             (ViT + Q-Former + OPT)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from vlm.models import local_copy
from vlm.models.blip.config import BlipConfig, ModelPreset, get_preset
from vlm.models.blip.tokenization import bert_tokenizer, opt_tokenizer
from vlm.models.scalars import reshape_scalar_params, restore_scalar_params

__all__ = [
    "build_captioner",
    "build_filter",
    "build_processor",
    "export_pretrained",
    "processor_inputs",
    "resolve_device",
    "torch_dtype",
]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """`auto` => cuda if this process may use a GPU (vlm.devices.auto_device), else cpu; anything else as
    torch spells it."""
    if name == "auto":
        from vlm.devices import auto_device

        return torch.device(auto_device())
    return torch.device(name)


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


# ---------------------------------------------------------------- processors


def _image_processor(image_size: int):
    from transformers import BlipImageProcessor

    # BLIP's preprocessing: bicubic resize to a square, CLIP mean/std (the class defaults).
    return BlipImageProcessor(size={"height": image_size, "width": image_size})


def _blip_processor(preset: ModelPreset, image_size: int):
    from transformers import BlipProcessor

    return BlipProcessor(_image_processor(image_size), bert_tokenizer(preset.text.max_positions))


def _blip2_processor(tokenizer, image_size: int, num_query_tokens: int):
    from transformers import Blip2Processor

    # Blip2Processor adds the `<image>` token to the tokenizer and prepends num_query_tokens of
    # them to every text; the model swaps their embeddings for the Q-Former outputs.
    return Blip2Processor(_image_processor(image_size), tokenizer, num_query_tokens=num_query_tokens)


def processor_inputs(processor, images: list, texts: list[str], *, max_length: int | None = None) -> dict:
    """`processor(images, texts)` as tensors, padded to the longest, text truncated to `max_length`.

    `max_length` counts text tokens; a BLIP-2 processor's prepended image tokens come on top.
    """
    kwargs: dict[str, Any] = {"padding": "longest", "return_tensors": "pt"}
    if max_length is not None:
        kwargs.update(truncation=True, max_length=max_length + (getattr(processor, "num_query_tokens", 0) or 0))
    return dict(processor(images=images, text=texts, **kwargs))


# ---------------------------------------------------------------- HF configs from presets


def _vision_kwargs(preset: ModelPreset, image_size: int) -> dict:
    v = preset.vision
    return dict(
        image_size=image_size,
        patch_size=v.patch_size,
        hidden_size=v.width,
        num_hidden_layers=v.layers,
        num_attention_heads=v.heads,
        intermediate_size=v.mlp,
        # HF's vision configs default to 1e-10 (their weights always come from a checkpoint): a ViT
        # built from scratch with it maps every image to the same features and never trains.
        initializer_range=preset.init_std,
    )


def _blip_hf_config(preset: ModelPreset, tokenizer, image_size: int):
    from transformers import BlipConfig as HFBlipConfig

    t = preset.text
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=t.width,
        num_hidden_layers=t.layers,
        num_attention_heads=t.heads,
        intermediate_size=t.mlp,
        max_position_embeddings=t.max_positions,
        bos_token_id=tokenizer.bos_token_id,  # [DEC]: the decoder's first token
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,  # generation stops at [SEP]
        pad_token_id=tokenizer.pad_token_id,
        label_smoothing=0.1,  # BLIP's captioning loss
        initializer_range=preset.init_std,
    )
    return HFBlipConfig(
        text_config=text_config,
        vision_config=_vision_kwargs(preset, image_size),
        image_text_hidden_size=preset.embed_dim,
        initializer_range=preset.init_std,
    )


def _qformer_kwargs(preset: ModelPreset, vocab_size: int, text_input: bool) -> dict:
    q = preset.qformer
    return dict(
        vocab_size=vocab_size,
        hidden_size=q.width,
        num_hidden_layers=q.layers,
        num_attention_heads=q.heads,
        intermediate_size=q.mlp,
        max_position_embeddings=q.max_positions,
        use_qformer_text_input=text_input,  # the filter runs text through the Q-Former; the captioner does not
        initializer_range=preset.init_std,
    )


def _blip2_hf_config(preset: ModelPreset, image_size: int, tokenizer, *, with_lm: bool):
    """Captioner config (`with_lm`: `tokenizer` is the OPT LM's) or filter config (the Q-Former's BERT)."""
    from transformers import Blip2Config

    t = preset.text
    text_config = dict(
        model_type="opt",
        hidden_size=t.width,
        num_hidden_layers=t.layers,
        num_attention_heads=t.heads,
        ffn_dim=t.mlp,
        max_position_embeddings=t.max_positions,
        word_embed_proj_dim=t.width,
        init_std=preset.init_std,
    )
    if with_lm:
        text_config.update(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    # The Q-Former reads text only in the filter; its vocabulary is then the BERT tokenizer's.
    qformer_vocab = 2 if with_lm else len(tokenizer)
    return Blip2Config(
        vision_config=_vision_kwargs(preset, image_size),
        qformer_config=_qformer_kwargs(preset, qformer_vocab, text_input=not with_lm),
        text_config=text_config,
        num_query_tokens=preset.num_query_tokens,
        image_text_hidden_size=preset.embed_dim,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        initializer_range=preset.init_std,
    )


# ---------------------------------------------------------------- build / load


def _seeded(cls, hf_config, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(hf_config)


def _load(cls, path: str, cfg: BlipConfig):
    from transformers import AutoProcessor

    if cfg.image_size is not None:
        raise ValueError("blip.image_size applies to preset-built models; a checkpoint brings its own")
    path = local_copy(path)  # an export on object storage (s3://...): downloaded once per process
    model = cls.from_pretrained(path, dtype=torch_dtype(cfg.dtype))
    processor = AutoProcessor.from_pretrained(path)
    return model.eval(), processor


def build_processor(cfg: BlipConfig, model: Literal["captioner", "filter"]):
    """The processor `build_captioner` / `build_filter` pair with their model, without building the model
    (what data-loading workers need): from the checkpoint when one is set, else made offline."""
    from transformers import AutoProcessor

    path = cfg.pretrained if model == "captioner" else cfg.filter_pretrained
    if path:
        return AutoProcessor.from_pretrained(local_copy(path))
    preset = get_preset(cfg.backend, cfg.preset)
    image_size = cfg.image_size or preset.vision.image_size
    if cfg.backend == "blip":
        return _blip_processor(preset, image_size)
    if model == "captioner":
        return _blip2_processor(opt_tokenizer(preset.text.max_positions), image_size, preset.num_query_tokens)
    # BLIP-2's filter reads text with the Q-Former, a BERT: WordPiece tokenizer, as HF's blip2-itm.
    return _blip2_processor(bert_tokenizer(preset.qformer.max_positions), image_size, preset.num_query_tokens)


def build_captioner(cfg: BlipConfig):
    """(model, processor): the captioner from `cfg.pretrained`, or built at `cfg.preset` size."""
    from transformers import Blip2ForConditionalGeneration, BlipForConditionalGeneration

    cls = BlipForConditionalGeneration if cfg.backend == "blip" else Blip2ForConditionalGeneration
    if cfg.pretrained:
        return _load(cls, cfg.pretrained, cfg)
    preset = get_preset(cfg.backend, cfg.preset)
    image_size = cfg.image_size or preset.vision.image_size
    processor = build_processor(cfg, "captioner")
    if cfg.backend == "blip":
        hf_config = _blip_hf_config(preset, processor.tokenizer, image_size)
    else:
        hf_config = _blip2_hf_config(preset, image_size, processor.tokenizer, with_lm=True)
    model = _seeded(cls, hf_config, cfg.seed)
    if cfg.backend == "blip2":
        # Saved in generation_config.json, so a reload samples with the same special ids.
        tok = processor.tokenizer
        model.generation_config.update(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
    return model.to(torch_dtype(cfg.dtype)).eval(), processor


def build_filter(cfg: BlipConfig):
    """(model, processor): the ITM/ITC filter from `cfg.filter_pretrained`, or built at `cfg.preset` size."""
    from transformers import Blip2ForImageTextRetrieval, BlipForImageTextRetrieval

    cls = BlipForImageTextRetrieval if cfg.backend == "blip" else Blip2ForImageTextRetrieval
    if cfg.filter_pretrained:
        return _load(cls, cfg.filter_pretrained, cfg)
    preset = get_preset(cfg.backend, cfg.preset)
    image_size = cfg.image_size or preset.vision.image_size
    processor = build_processor(cfg, "filter")
    if cfg.backend == "blip":
        hf_config = _blip_hf_config(preset, processor.tokenizer, image_size)
    else:
        hf_config = _blip2_hf_config(preset, image_size, processor.tokenizer, with_lm=False)
    return _seeded(cls, hf_config, cfg.seed).to(torch_dtype(cfg.dtype)).eval(), processor


def export_pretrained(model, processor, path: str | Path) -> Path:
    """`save_pretrained` model + processor into `path`, loadable as `pretrained` / `filter_pretrained`.

    Parameters held as shape [1] for DeepSpeed (`reshape_scalar_params`) are saved with their
    original shape [] and reshaped again afterwards, so training can go on.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    restored = restore_scalar_params(model)
    try:
        model.save_pretrained(out)
        processor.save_pretrained(out)
    finally:
        if restored:
            reshape_scalar_params(model)
    return out
