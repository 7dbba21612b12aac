"""Image-text contrastive (ITC) features and matching (ITM) logits of the HF BLIP / BLIP-2 filters.

The HF retrieval models' `forward` computes ITM or ITC for one (image, text) batch at a time,
running the vision encoder each call. CapFilt scores 1 + K captions per image and training needs
ITC and ITM on the same images (with hard negatives), so these functions split the forward
into its parts: encode each image once, then score any number of texts against it. They
compute exactly what `BlipForImageTextRetrieval.forward` / `Blip2ForImageTextRetrieval.forward`
compute, so checkpoints trained elsewhere score the same here.

    BLIP    ITC: cos(vision_proj(ViT [CLS]), text_proj(BERT [CLS]))
            ITM: itm_head(BERT [CLS] cross-attending the ViT tokens)
    BLIP-2  ITC: max over the 32 queries of cos(vision_projection(Q-Former query), text_projection(text [CLS]))
            ITM: itm_head(Q-Former queries, attending the text and the ViT tokens), averaged over queries
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "encode_images",
    "image_features",
    "is_blip2",
    "itm_logits",
    "paired_similarity",
    "similarity",
    "text_features",
]


def is_blip2(model) -> bool:
    """True for a BLIP-2 retrieval model (Q-Former with query tokens), False for BLIP."""
    return hasattr(model, "query_tokens")


def _ones(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[:-1], dtype=torch.long, device=x.device)


def _strip_image_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    # A BLIP-2 processor with num_query_tokens prepends that many <image> ids; the Q-Former's
    # text path never sees them (as in Blip2ForImageTextRetrieval.forward).
    if model.config.image_token_index is not None:
        q = model.config.num_query_tokens
        return input_ids[:, q:], attention_mask[:, q:]
    return input_ids, attention_mask


def encode_images(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """ViT token embeddings (B, N, Dv) that `image_features` and `itm_logits` take."""
    pixel_values = pixel_values.to(device=model.device, dtype=model.dtype)
    return model.vision_model(pixel_values=pixel_values).last_hidden_state


def _query_outputs(model, image_embeds: torch.Tensor) -> torch.Tensor:
    queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (B, Q, Dq)
    out = model.qformer(
        query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=_ones(image_embeds)
    )
    return out.last_hidden_state  # (B, Q, Dq)


def image_features(model, image_embeds: torch.Tensor) -> torch.Tensor:
    """L2-normalised ITC image features: BLIP (B, E); BLIP-2 (B, Q, E), one per query."""
    if is_blip2(model):
        queries = _query_outputs(model, image_embeds)
        queries = queries.to(model.vision_projection.weight.dtype)
        return F.normalize(model.vision_projection(queries), dim=-1)
    return F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)


def text_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised ITC text features (B, E), from the unimodal text encoder's [CLS]."""
    input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
    if is_blip2(model):
        input_ids, attention_mask = _strip_image_tokens(model, input_ids, attention_mask)
        embeds = model.embeddings(input_ids=input_ids)  # (B, T, Dq)
        hidden = model.qformer(query_embeds=embeds, query_length=0, attention_mask=attention_mask).last_hidden_state
        hidden = hidden.to(model.text_projection.weight.dtype)
        return F.normalize(model.text_projection(hidden[:, 0, :]), dim=-1)
    hidden = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return F.normalize(model.text_proj(hidden[:, 0, :]), dim=-1)


def similarity(image_feat: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every image with every text (B_img, B_txt); BLIP-2: best query."""
    if image_feat.dim() == 3:
        return torch.einsum("iqe,te->itq", image_feat, text_feat).amax(dim=-1)
    return image_feat @ text_feat.t()


def paired_similarity(image_feat: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of image i with text i (B,); BLIP-2: best query."""
    if image_feat.dim() == 3:
        return torch.einsum("bqe,be->bq", image_feat, text_feat).amax(dim=-1)
    return (image_feat * text_feat).sum(dim=-1)


def itm_logits(
    model, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """ITM logits (B, 2) of image i with text i; softmax[:, 1] is P(match)."""
    input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
    if is_blip2(model):
        input_ids, attention_mask = _strip_image_tokens(model, input_ids, attention_mask)
        queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (B, Q, Dq)
        q = queries.shape[1]
        embeds = model.embeddings(input_ids=input_ids, query_embeds=queries)  # (B, Q + T, Dq)
        mask = torch.cat([_ones(queries), attention_mask], dim=1)  # (B, Q + T)
        hidden = model.qformer(
            query_embeds=embeds,
            query_length=q,
            attention_mask=mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=_ones(image_embeds),
        ).last_hidden_state
        hidden = hidden.to(model.itm_head.weight.dtype)
        return model.itm_head(hidden[:, :q, :]).mean(dim=1)
    hidden = model.text_encoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=_ones(image_embeds),
    ).last_hidden_state
    return model.itm_head(hidden[:, 0, :])
