"""Few-shot prompting and decoding for Flamingo.

Prompts interleave images and text as in the paper's few-shot evaluation (Sec. 3):
"<image>Output: caption<|endofchunk|>" per in-context example, then "<image>Output:" for the query.
Decoding recomputes the text each step (no KV cache): Flamingo's cross-attention mask depends on
the full sequence of <image> positions, and for the tiny and evaluation-sized prompts this is cheap
enough. The images are encoded once per prompt. Decoding stops at <|endofchunk|> or eos.
"""

from __future__ import annotations

import torch

from vlm.models.flamingo.build import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
from vlm.models.flamingo.model import Flamingo


def few_shot_prompt(
    examples: list[tuple[torch.Tensor, str]], query_image: torch.Tensor, query_prefix: str = "Output:"
) -> tuple[str, torch.Tensor]:
    """(prompt, images (k+1, 1, C, H, W)) for k (image (C, H, W), text) examples and a query image."""
    text = "".join(f"{MEDIA_TOKEN}{query_prefix} {caption}{END_OF_CHUNK_TOKEN}" for _, caption in examples)
    text += f"{MEDIA_TOKEN}{query_prefix}"
    images = torch.stack([image for image, _ in examples] + [query_image])  # (k+1, C, H, W)
    return text, images[:, None]  # one frame per image


@torch.no_grad()
def generate(
    model: Flamingo,
    tokenizer,
    images: torch.Tensor,
    prompt: str,
    max_new_tokens: int = 20,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> str:
    """Continue `prompt` conditioned on `images`; returns the generated text only.

    Args:
        images: (T_img, F, C, H, W) for this prompt (a leading batch dim of 1 is accepted), in prompt order.
        temperature: 0 decodes greedily; > 0 samples from softmax(logits / temperature), top_k-filtered.
        generator: random source for sampling, for reproducible samples.

    Call `model.eval()` first; the mode is left as it is.
    """
    device = next(model.parameters()).device
    images = (images if images.ndim == 6 else images[None]).to(device)  # (1, T, F, C, H, W)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)  # (1, L)
    prompt_len = ids.shape[1]
    eoc_id = tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN)
    stop = {eoc_id, tokenizer.eos_token_id}
    media = model.encode_images(images)  # (1, T, n, Dv); every image of the prompt is real
    for _ in range(max_new_tokens):
        logits = model(images, ids, media=media)["logits"][:, -1].float()  # (1, V)
        logits[:, model.media_token_id] = -torch.inf  # an <image> here would have no image behind it
        if temperature <= 0:
            next_id = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -torch.inf)
            next_id = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
        if int(next_id) in stop:
            break
        ids = torch.cat([ids, next_id], dim=1)
    return tokenizer.decode(ids[0, prompt_len:], skip_special_tokens=True).strip()
