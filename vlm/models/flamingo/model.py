"""Flamingo's modules, bottom-up: Perceiver Resampler, media centering (optional, not in the paper),
masked gated cross-attention, the LM layer wrapper, the split embedding for added tokens, and the
top-level model.

Follows Alayrac et al. 2022, "Flamingo: a Visual Language Model for Few-Shot Learning" (Sec. 2.1-2.3,
Fig. 4-5) and the layer layout of OpenFlamingo (Awadalla et al. 2023). Only `nn.Module`s live here;
building from a config, tokenizers and parameter counting are in `build.py`.

Shapes: B batch, T images per sequence, F frames per image, V patch tokens per frame, n latents,
L text tokens, D widths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlm.models.flamingo.config import FlamingoConfig
from vlm.models.flamingo.lm import decoder_hidden_size, find_decoder_layers, wrap_decoder_layers
from vlm.models.flamingo.vision import patch_tokens, prepare_vision_tower


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """Pre-norm GELU MLP used by the resampler and the cross-attention blocks."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latents attend to [visual features ; latents] (Flamingo Fig. 5: keys/values include the latents)."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # x: (B, T, N, D) visual features, latents: (B, T, n, D) -> (B, T, n, D)
        b, t = x.shape[:2]
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)  # (B, T, n, h*d)
        k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)  # (B, T, N+n, h*d) each
        q, k, v = (rearrange(z, "b t s (h d) -> (b t) h s d", h=self.heads) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B*T, h, n, d)
        out = rearrange(out, "(b t) h n d -> b t n (h d)", b=b, t=t)
        return self.to_out(out)


class PerceiverResampler(nn.Module):
    """Maps a variable number of patch tokens per image to `num_latents` visual tokens."""

    def __init__(self, config: FlamingoConfig, dim: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(config.num_latents, dim) * 0.02)  # (n, D)
        self.frame_embs = nn.Parameter(torch.randn(config.max_num_frames, dim) * 0.02)  # (F_max, D)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(dim, config.resampler_dim_head, config.resampler_heads),
                    feed_forward(dim, config.resampler_ff_mult),
                ]
            )
            for _ in range(config.resampler_depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, F, V, D) -> (B, T, n, D)
        b, t, f = x.shape[:3]
        if f > self.frame_embs.shape[0]:
            raise ValueError(f"{f} frames per image but max_num_frames is {self.frame_embs.shape[0]}")
        x = x + self.frame_embs[:f, None, :]  # frame embedding broadcast over patches
        x = rearrange(x, "b t f v d -> b t (f v) d")
        latents = repeat(self.latents, "n d -> b t n d", b=b, t=t)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


class MediaCentering(nn.Module):
    """Subtracts the mean visual token over images: the batch mean in training (real images only), a running
    mean of it in eval. BatchNorm's centering, without its scaling; one mean per latent.

    Why: the visual tokens of every image share a large common part (in the tiny digits setup ~85% of their
    second moment). Through it, cross-attention can act as an image-independent bias on the text, and the
    gradients of the many caption tokens that do not depend on the image (templates, "a photo of the") pull
    it that way, swamping the one token per caption that does (the digit). Without the common part, only
    image-dependent signal reaches the LM, and only image-dependent text pulls on it.
    """

    def __init__(self, num_latents: int, dim: int, momentum: float = 0.05):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(num_latents, dim))  # (n, D)

    def forward(self, media: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        # media: (B, T, n, D), image_mask: (B, T) True for real (not padding) images -> (B, T, n, D)
        if not self.training:
            return media - self.running_mean.to(media.dtype)
        weight = torch.ones(media.shape[:2], device=media.device) if image_mask is None else image_mask.float()
        weight = weight[..., None, None].to(media.dtype)  # (B, T, 1, 1)
        mean = (media * weight).sum(dim=(0, 1)) / weight.sum().clamp(min=1)  # (n, D)
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
        return media - mean


class MaskedCrossAttention(nn.Module):
    """Text queries attend to media latents; each token sees only the latest image at or before it.

    Tokens before the first `<image>` see no image and get an exact zero output.
    """

    def __init__(self, dim: int, dim_visual: int, dim_head: int, heads: int, only_attend_immediate_media: bool):
        super().__init__()
        self.heads = heads
        self.scale = dim_head**-0.5
        self.only_attend_immediate_media = only_attend_immediate_media
        inner = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, media: torch.Tensor, media_locations: torch.Tensor) -> torch.Tensor:
        # x: (B, L, D), media: (B, T, n, Dv), media_locations: (B, L) bool, True at <image> tokens
        t, n = media.shape[1:3]
        q = self.to_q(self.norm(x))  # (B, L, h*d)
        k, v = self.to_kv(rearrange(media, "b t n d -> b (t n) d")).chunk(2, dim=-1)  # (B, T*n, h*d) each
        q, k, v = (rearrange(z, "b s (h d) -> b h s d", h=self.heads) for z in (q, k, v))
        sim = torch.einsum("bhld,bhsd->bhls", q * self.scale, k)  # (B, h, L, T*n)

        text_time = media_locations.long().cumsum(dim=-1)  # (B, L): 1-based index of the latest image, 0 = none
        media_time = repeat(torch.arange(1, t + 1, device=x.device), "t -> (t n)", n=n)  # (T*n,)
        if self.only_attend_immediate_media:
            allowed = text_time[:, None, :, None] == media_time  # (B, 1, L, T*n)
        else:
            allowed = text_time[:, None, :, None] >= media_time
        sim = sim.masked_fill(~allowed, -torch.finfo(sim.dtype).max)
        attn = sim.softmax(dim=-1)
        # A row with nothing allowed would otherwise spread uniformly over all images.
        attn = attn.masked_fill((text_time == 0)[:, None, :, None], 0.0)
        out = torch.einsum("bhls,bhsd->bhld", attn, v)  # (B, h, L, d)
        return self.to_out(rearrange(out, "b h l d -> b l (h d)"))


class GatedCrossAttentionBlock(nn.Module):
    """Cross-attention + FFN, each behind a tanh gate initialised at 0, so the block starts as the identity."""

    def __init__(self, config: FlamingoConfig, dim: int, dim_visual: int):
        super().__init__()
        self.attn = MaskedCrossAttention(
            dim, dim_visual, config.xattn_dim_head, config.xattn_heads, config.only_attend_immediate_media
        )
        self.ff = feed_forward(dim, config.xattn_ff_mult)
        # Shape (1,), not a scalar: DeepSpeed ZeRO cannot partition 0-dim parameters.
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, media: torch.Tensor, media_locations: torch.Tensor) -> torch.Tensor:
        # x: (B, L, D) -> (B, L, D)
        x = self.attn(x, media, media_locations) * self.attn_gate.tanh() + x
        return self.ff(x) * self.ff_gate.tanh() + x


class FlamingoLayer(nn.Module):
    """An LM decoder layer preceded by a gated cross-attention block.

    The layer's call signature differs between architectures (Llama: hidden_states + position_embeddings
    kwargs; GPT-2: positional cache/mask), so every argument is passed through untouched and whatever the
    layer returns is returned. The media are set by `Flamingo` through `condition()` before each LM call.
    """

    def __init__(self, gated_xattn: GatedCrossAttentionBlock, decoder_layer: nn.Module):
        super().__init__()
        self.gated_xattn = gated_xattn
        self.decoder_layer = decoder_layer
        self.media: torch.Tensor | None = None  # (B, T, n, Dv)
        self.media_locations: torch.Tensor | None = None  # (B, L) bool
        # Named like transformers' per-layer flag, so the LM's own checkpointing switch sets it too.
        self.gradient_checkpointing = False

    def condition(self, media: torch.Tensor | None, media_locations: torch.Tensor | None) -> None:
        """Set (or clear, with None) the media latents and <image> positions for the next forward."""
        self.media = media
        self.media_locations = media_locations

    def __getattr__(self, name: str):
        # LM forwards read per-layer attributes (e.g. `attention_type` for sliding-window layers).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "decoder_layer":
                raise
            return getattr(self.decoder_layer, name)

    def forward(self, *args, **kwargs):
        if self.media is None or self.media_locations is None:
            raise RuntimeError("FlamingoLayer called without media; Flamingo.forward conditions it first")
        args = list(args)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, L, D)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            hidden = checkpoint(self.gated_xattn, hidden, self.media, self.media_locations, use_reentrant=False)
        else:
            hidden = self.gated_xattn(hidden, self.media, self.media_locations)
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = hidden
        else:
            args[0] = hidden
        return self.decoder_layer(*args, **kwargs)


def embedding_scale(embedding: nn.Embedding) -> float:
    """The factor an embedding module multiplies its rows by in forward (Gemma's sqrt(hidden_size)); 1.0 for a
    plain lookup. Measured on a few rows, so any scaled lookup is recognised; ValueError for any other transform,
    since rows added beside it could not match. On the meta device (counting only) nothing can be measured: 1.0."""
    if type(embedding).forward is nn.Embedding.forward or embedding.weight.is_meta:
        return 1.0
    with torch.no_grad():
        ids = torch.arange(min(8, embedding.num_embeddings), device=embedding.weight.device)
        rows = embedding.weight[ids].float()  # (8, D)
        out = embedding(ids).float()  # (8, D)
        scale = float((out * rows).sum() / (rows * rows).sum().clamp(min=1e-30))
        if not torch.allclose(out, rows * scale, rtol=1e-2, atol=1e-6 * scale):
            raise ValueError(
                f"the LM's input embedding {type(embedding).__name__} is not a (scaled) row lookup; "
                "Flamingo cannot add token rows beside it"
            )
    return scale


class DecoupledEmbedding(nn.Module):
    """The LM's frozen embedding for ids < num_base, a small trainable table for the ids Flamingo adds.

    Two plain `nn.Embedding`s called as submodules: no gradient hooks, so DeepSpeed ZeRO-3 can partition
    both and the optimizer only ever sees the new rows. Where the LM's embedding scales its rows in forward
    (Gemma: by sqrt(hidden_size)), the new rows are scaled by the same factor: they start at the statistics
    of the pretrained rows, weights and outputs alike (and so stay consistent when tied to the output head).
    """

    def __init__(self, base: nn.Embedding, num_base: int, num_new: int):
        super().__init__()
        self.base = base
        self.num_base = num_base
        self.scale = embedding_scale(base)  # a float, not a buffer: state dicts stay those of the two tables
        self.new = nn.Embedding(num_new, base.embedding_dim, device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():  # start the new rows at the statistics of the pretrained ones
            rows = base.weight[:num_base].float()
            init = rows.mean(0) + torch.randn(num_new, rows.shape[1], device=rows.device) * rows.std(0)
            self.new.weight.copy_(init.to(self.new.weight.dtype))

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: (B, L) -> (B, L, D)
        is_new = (ids >= self.num_base)[..., None]
        base = self.base(ids.clamp(max=self.num_base - 1))
        new = self.new((ids - self.num_base).clamp(min=0))
        if self.scale != 1.0:
            new = new * self.scale
        return torch.where(is_new, new, base)


class DecoupledLinear(nn.Module):
    """The LM's frozen output head for the first num_base ids, plus trainable rows for the added ids.

    With tied LM embeddings the new output rows share the new input rows, keeping the tie.
    """

    def __init__(self, base: nn.Linear, num_base: int, num_new: int, tied_to: nn.Embedding | None = None):
        super().__init__()
        self.base = base
        self.num_base = num_base
        self.new = nn.Linear(
            base.in_features, num_new, bias=base.bias is not None, device=base.weight.device, dtype=base.weight.dtype
        )
        if tied_to is not None:
            self.new.weight = tied_to.weight
        else:
            with torch.no_grad():
                rows = base.weight[:num_base].float()
                init = rows.mean(0) + torch.randn(num_new, rows.shape[1], device=rows.device) * rows.std(0)
                self.new.weight.copy_(init.to(self.new.weight.dtype))
        if self.new.bias is not None:
            nn.init.zeros_(self.new.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, L, D) -> (B, L, num_base + num_new); rows past num_base (vocab padding) are dropped
        return torch.cat([self.base(x)[..., : self.num_base], self.new(x)], dim=-1)


def check_embeddings(lm: nn.Module) -> tuple[nn.Embedding, nn.Linear]:
    """(input, output) embeddings of the LM; ValueError unless they are an nn.Embedding and an nn.Linear."""
    old_in, old_out = lm.get_input_embeddings(), lm.get_output_embeddings()
    if not isinstance(old_in, nn.Embedding) or not isinstance(old_out, nn.Linear):
        raise ValueError(f"LM class {type(lm).__name__} has no nn.Embedding input / nn.Linear output embeddings")
    return old_in, old_out


class Flamingo(nn.Module):
    """Frozen CLIP ViT -> Perceiver Resampler -> gated cross-attention inside a frozen causal LM.

    `lm` (a transformers causal LM) is modified in place: decoder layers are wrapped in `FlamingoLayer`s and
    the input/output embeddings are split into frozen old rows and trainable rows for the added tokens, whose
    ids are num_base_tokens .. num_base_tokens + num_new_tokens - 1.
    """

    def __init__(
        self,
        config: FlamingoConfig,
        vision_encoder: nn.Module,
        lm: nn.Module,
        *,
        media_token_id: int,
        num_base_tokens: int,
        num_new_tokens: int,
    ):
        super().__init__()
        self.config = config
        self.media_token_id = media_token_id
        self.vision_encoder = vision_encoder
        dim_visual = prepare_vision_tower(vision_encoder)
        if config.vision_width is not None and config.vision_width != dim_visual:
            raise ValueError(f"vision_width is {config.vision_width} in the config but the tower's is {dim_visual}")
        self.resampler = PerceiverResampler(config, dim_visual)
        self.media_center = MediaCentering(config.num_latents, dim_visual) if config.center_media else None

        old_in, old_out = check_embeddings(lm)
        if num_base_tokens > old_in.num_embeddings:
            raise ValueError(
                f"{num_base_tokens} base tokens but the LM has only {old_in.num_embeddings} embedding rows"
            )
        find_decoder_layers(lm)  # an unknown layout is the error to report, before anything about its sizes
        dim = decoder_hidden_size(lm)  # the blocks sit between decoder layers, at their width (not the embedding's)
        wrap_decoder_layers(
            lm,
            config.cross_attn_every_n_layers,
            lambda layer: FlamingoLayer(GatedCrossAttentionBlock(config, dim, dim_visual), layer),
        )
        tied = old_out.weight is old_in.weight
        new_in = DecoupledEmbedding(old_in, num_base_tokens, num_new_tokens)
        lm.set_input_embeddings(new_in)
        lm.set_output_embeddings(
            DecoupledLinear(old_out, num_base_tokens, num_new_tokens, tied_to=new_in.new if tied else None)
        )
        lm.config.vocab_size = num_base_tokens + num_new_tokens
        self.lm = lm

    def flamingo_layers(self) -> list[FlamingoLayer]:
        return [m for m in self.lm.modules() if isinstance(m, FlamingoLayer)]

    def freeze_for_training(self) -> None:
        """Vision and LM frozen; resampler, cross-attention blocks and the added token rows trainable."""
        self.requires_grad_(False)
        self.resampler.requires_grad_(True)
        for layer in self.flamingo_layers():
            layer.gated_xattn.requires_grad_(True)
        self.lm.get_input_embeddings().new.requires_grad_(True)
        self.lm.get_output_embeddings().new.requires_grad_(True)
        if not self.config.freeze_lm_embeddings:
            self.lm.get_input_embeddings().base.requires_grad_(True)
            self.lm.get_output_embeddings().base.requires_grad_(True)

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint the LM's decoder layers and the cross-attention blocks (the vision tower runs without grad)."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.lm, "activation_checkpointing_enable"):  # transformers >= 5 name; the old one is deprecated
            if enable:
                self.lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.lm.activation_checkpointing_disable()
        elif enable:
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            self.lm.gradient_checkpointing_disable()
        for layer in self.flamingo_layers():
            layer.gradient_checkpointing = enable

    def encode_images(self, images: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, F, C, H, W) pixels -> (B, T, n, Dv) visual tokens.

        image_mask (B, T) marks real images (not zero padding); only media centering uses it.
        """
        b, t, f = images.shape[:3]
        pixels = rearrange(images, "b t f c h w -> (b t f) c h w")
        pixels = pixels.to(next(self.vision_encoder.parameters()).dtype)
        with torch.no_grad():  # the vision tower is never trained in Flamingo
            tokens = patch_tokens(self.vision_encoder, pixels)  # (B*T*F, V, Dv)
        tokens = rearrange(tokens, "(b t f) v d -> b t f v d", b=b, t=t, f=f)
        media = self.resampler(tokens)  # (B, T, n, Dv)
        return media if self.media_center is None else self.media_center(media, image_mask)

    def check_inputs(self, images: torch.Tensor, input_ids: torch.Tensor) -> None:
        """ValueError if shapes disagree or a sequence has more <image> tokens than images."""
        if images.ndim != 6:
            raise ValueError(f"images must be (B, T_img, F, C, H, W), got shape {tuple(images.shape)}")
        if images.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{images.shape[0]} image rows but {input_ids.shape[0]} sequences")
        num_images = images.shape[1]
        if num_images > self.config.max_num_media:
            raise ValueError(f"{num_images} images per sequence but max_num_media is {self.config.max_num_media}")
        counts = (input_ids == self.media_token_id).sum(dim=1)
        over = (counts > num_images).nonzero()
        if len(over):
            i = int(over[0, 0])
            raise ValueError(f"sequence {i} has {int(counts[i])} <image> tokens but {num_images} images")

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        media: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """images (B, T, F, C, H, W), input_ids (B, L) -> {"loss": next-token CE or None, "logits": (B, L, V)}.

        labels are input_ids with -100 where no loss is wanted; they are shifted here. `media` (B, T, n, Dv),
        from `encode_images(images)`, skips encoding the images again (decoding calls the model per token).
        """
        self.check_inputs(images, input_ids)
        media_locations = input_ids == self.media_token_id  # (B, L)
        if media is None:
            # A row's first k images are real, k = its <image> count; the rest are zero padding.
            num_real = media_locations.sum(dim=1)  # (B,)
            image_mask = torch.arange(images.shape[1], device=images.device)[None, :] < num_real[:, None]  # (B, T)
            media = self.encode_images(images, image_mask)  # (B, T, n, Dv)
        layers = self.flamingo_layers()
        for layer in layers:
            layer.condition(media, media_locations)
        try:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        finally:
            for layer in layers:
                layer.condition(None, None)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                rearrange(logits[:, :-1].float(), "b l v -> (b l) v"),
                rearrange(labels[:, 1:], "b l -> (b l)"),
                ignore_index=-100,
            )
        return {"loss": loss, "logits": logits}
