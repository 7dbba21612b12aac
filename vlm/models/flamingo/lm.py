"""Find and wrap the decoder-layer list of a Hugging Face causal LM.

transformers names the list differently per architecture; Flamingo only needs to replace some of its
entries in place (with `FlamingoLayer`s), leaving the LM's own forward untouched.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

# Attribute paths of the decoder-layer list, as `transformers` lays out its causal LMs.
KNOWN_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma, Phi, ...
    "model.decoder.layers",  # OPT
    "model.language_model.layers",  # multimodal wrappers (Gemma3, Llava-style) around a text model
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "transformer.layers",  # ChatGLM-style
    "transformer.blocks",  # MPT
    "gpt_neox.layers",  # GPT-NeoX, Pythia
)


def _resolve(root: nn.Module, path: str):
    obj = root
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def find_decoder_layers(lm: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, list) of the LM's decoder layers: the largest non-empty ModuleList at a known path."""
    found = [(path, obj) for path in KNOWN_LAYER_PATHS if isinstance(obj := _resolve(lm, path), nn.ModuleList)]
    found = [(path, obj) for path, obj in found if len(obj)]
    if not found:
        raise ValueError(
            f"cannot find the decoder layers of LM class {type(lm).__name__}; known paths: "
            + ", ".join(KNOWN_LAYER_PATHS)
        )
    return max(found, key=lambda item: len(item[1]))


def wrap_decoder_layers(lm: nn.Module, every_n: int, wrap: Callable[[nn.Module], nn.Module]) -> list[int]:
    """Replace layers N-1, 2N-1, ... of the LM in place with `wrap(layer)`; returns their indices."""
    _, layers = find_decoder_layers(lm)
    indices = [i for i in range(len(layers)) if (i + 1) % every_n == 0]
    for i in indices:
        layers[i] = wrap(layers[i])
    return indices


def decoder_hidden_size(lm: nn.Module) -> int:
    """Width of the residual stream the decoder layers read and write: the size a block inserted before one
    of them works at. It is the LM's `hidden_size`, not its embedding width; they differ where the LM projects
    embeddings in and out of the decoder (OPT-350m: word_embed_proj_dim 512, hidden_size 1024)."""
    config = getattr(lm, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "hidden_size", None)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"cannot tell the hidden size of LM class {type(lm).__name__} (no config.hidden_size)")
    return size
