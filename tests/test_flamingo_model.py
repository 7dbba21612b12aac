"""Flamingo model: identity at init, media masking, freezing, training, generation, errors, counting."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

from vlm.models.flamingo.build import (
    add_flamingo_tokens,
    assemble,
    build_flamingo,
    build_lm,
    build_tokenizer,
    count_parameters,
)
from vlm.models.flamingo.config import flamingo_preset
from vlm.models.flamingo.generate import few_shot_prompt, generate
from vlm.models.flamingo.model import FlamingoLayer, MaskedCrossAttention
from vlm.models.flamingo.vision import build_vision_tower

TINY = ["tiny", "tiny-llama"]  # GPT-2 (tied embeddings) and Llama (untied) layouts
TEXT = "a photo<image>Output: seven<|endofchunk|>the digit<image>Output: two<|endofchunk|>"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(preset: str = "tiny", seed: int = 0):
    torch.manual_seed(seed)
    model, tok = build_flamingo(flamingo_preset(preset))
    return model.eval(), tok


def inputs(tok, text: str = TEXT, num_images: int = 2, seed: int = 1):
    ids = tok(text, return_tensors="pt").input_ids  # (1, L)
    images = torch.randn(1, num_images, 1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return images, ids


def media_positions(model, ids) -> list[int]:
    return (ids[0] == model.media_token_id).nonzero()[:, 0].tolist()


def open_gates(model) -> None:
    with torch.no_grad():
        for layer in model.flamingo_layers():
            layer.gated_xattn.attn_gate.fill_(1.0)
            layer.gated_xattn.ff_gate.fill_(1.0)


@pytest.mark.parametrize("preset", TINY)
def test_zero_gates_leave_lm_logits_unchanged(preset):
    """With gates at their init value 0, Flamingo's logits equal the frozen LM's on the same embeddings."""
    cfg = flamingo_preset(preset)
    torch.manual_seed(0)
    tok = build_tokenizer(cfg)
    tokens = add_flamingo_tokens(tok)
    lm = build_lm(cfg).eval()
    reference = copy.deepcopy(lm)
    model = assemble(cfg, build_vision_tower(cfg.vision_model), lm, tokens).eval()
    images, ids = inputs(tok)
    with torch.no_grad():
        got = model(images, ids)["logits"]
        # The added tokens have no rows in the reference LM, so feed it Flamingo's embeddings.
        want = reference(inputs_embeds=model.lm.get_input_embeddings()(ids)).logits
    n = tokens.num_base_tokens
    assert len(model.flamingo_layers()) == cfg.lm_config.get("n_layer", cfg.lm_config.get("num_hidden_layers"))
    assert torch.allclose(got[..., :n], want[..., :n], atol=1e-5)


def test_token_cross_attends_only_to_latest_image():
    """The cross-attention output after image 1's <image> ignores image 0; between the images it depends on it."""
    model, tok = tiny_model()
    open_gates(model)
    images, ids = inputs(tok)
    first, second = media_positions(model, ids)
    outputs = []
    attn = next(m for m in model.modules() if isinstance(m, MaskedCrossAttention))  # first layer: text-only input
    hook = attn.register_forward_hook(lambda mod, args, out: outputs.append(out[0]))
    perturbed = images.clone()
    perturbed[:, 0] = torch.randn_like(perturbed[:, 0])
    with torch.no_grad():
        model(images, ids)
        model(perturbed, ids)
    hook.remove()
    base, changed = outputs  # (L, D) each
    assert torch.equal(base[:first], torch.zeros_like(base[:first]))
    assert torch.allclose(base[second:], changed[second:], atol=1e-6)
    assert not torch.allclose(base[first:second], changed[first:second], atol=1e-4)


def test_later_image_does_not_reach_earlier_tokens():
    """Perturbing image 1 leaves logits before its <image> token unchanged and changes those after it."""
    model, tok = tiny_model()
    open_gates(model)
    images, ids = inputs(tok)
    _, second = media_positions(model, ids)
    perturbed = images.clone()
    perturbed[:, 1] = torch.randn_like(perturbed[:, 1])
    with torch.no_grad():
        base, changed = model(images, ids)["logits"], model(perturbed, ids)["logits"]
    assert torch.allclose(base[:, :second], changed[:, :second], atol=1e-6)
    assert not torch.allclose(base[:, second:], changed[:, second:], atol=1e-4)


@pytest.mark.parametrize("preset", TINY)
def test_text_before_first_image_ignores_all_images(preset):
    """Tokens before the first <image> get the same logits whatever the images are."""
    model, tok = tiny_model(preset)
    open_gates(model)
    images, ids = inputs(tok)
    first = media_positions(model, ids)[0]
    with torch.no_grad():
        base = model(images, ids)["logits"]
        changed = model(torch.randn_like(images), ids)["logits"]
    assert first > 0
    assert torch.allclose(base[:, :first], changed[:, :first], atol=1e-6)
    assert not torch.allclose(base[:, first:], changed[:, first:], atol=1e-4)


def test_only_resampler_xattn_and_new_rows_require_grad():
    """Vision and LM weights are frozen; resampler, cross-attention blocks and the added-token tables train."""
    model, _ = tiny_model("tiny-llama")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())
    allowed = [n for n in trainable if n.startswith("resampler.") or ".gated_xattn." in n or n.endswith("new.weight")]
    assert sorted(allowed) == sorted(trainable)
    num_xattn = sum(1 for n in trainable if ".gated_xattn." in n)
    num_resampler = sum(1 for n in trainable if n.startswith("resampler."))
    assert num_xattn == 2 * len(list(model.flamingo_layers()[0].gated_xattn.parameters()))
    assert num_resampler == len(list(model.resampler.parameters()))
    assert len(trainable) == num_xattn + num_resampler + 2  # untied LM: input and output new-row tables
    lm_trainable = [n for n in trainable if n.startswith("lm.") and ".gated_xattn." not in n]
    assert sorted(lm_trainable) == ["lm.lm_head.new.weight", "lm.model.embed_tokens.new.weight"]


@pytest.mark.parametrize("preset", TINY)
def test_optimizer_step_moves_new_rows_only(preset):
    """After backward and an Adam step the pretrained embedding rows are unchanged and the added rows moved."""
    model, tok = tiny_model(preset)
    model.train()
    images, ids = inputs(tok)
    emb_in, emb_out = model.lm.get_input_embeddings(), model.lm.get_output_embeddings()
    old_rows = [emb_in.base.weight.detach().clone(), emb_out.base.weight.detach().clone()]
    new_rows = [emb_in.new.weight.detach().clone(), emb_out.new.weight.detach().clone()]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optim = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(images, ids, labels=ids)["loss"].backward()
    optim.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert torch.equal(emb_in.base.weight, old_rows[0]) and torch.equal(emb_out.base.weight, old_rows[1])
    assert not torch.allclose(emb_in.new.weight, new_rows[0]) and not torch.allclose(emb_out.new.weight, new_rows[1])


def test_loss_decreases_on_fixed_batch():
    """Twenty Adam steps on one fixed batch lower the next-token loss."""
    model, tok = tiny_model()
    model.train()
    texts = [TEXT, "<image>Output: three<|endofchunk|><image>Output: nine<|endofchunk|>"]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    labels = labels.masked_fill(labels == model.media_token_id, -100)
    images = torch.randn(2, 2, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    optim = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(images, batch.input_ids, batch.attention_mask, labels=labels)["loss"]
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_few_shot_generation_returns_text():
    """Greedy and sampled decoding with two in-context examples return strings."""
    model, tok = tiny_model()
    examples = [(torch.rand(3, 32, 32), "seven"), (torch.rand(3, 32, 32), "two")]
    prompt, images = few_shot_prompt(examples, torch.rand(3, 32, 32), "Output:")
    assert prompt == "<image>Output: seven<|endofchunk|><image>Output: two<|endofchunk|><image>Output:"
    assert images.shape == (3, 1, 3, 32, 32)
    greedy = generate(model, tok, images, prompt, max_new_tokens=4)
    sampled = generate(
        model,
        tok,
        images,
        prompt,
        max_new_tokens=4,
        temperature=1.0,
        top_k=20,
        generator=torch.Generator().manual_seed(0),
    )
    assert isinstance(greedy, str) and isinstance(sampled, str)
    assert greedy == generate(model, tok, images, prompt, max_new_tokens=4)


def test_media_centering_uses_real_images_and_a_running_mean():
    """Training subtracts the mean over real (not padding) images and tracks it; eval subtracts the running mean."""
    from vlm.models.flamingo.model import MediaCentering

    center = MediaCentering(num_latents=2, dim=3, momentum=0.5).train()
    media = torch.randn(2, 3, 2, 3)  # (B, T, n, D)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = center(media, mask)
    want = media[mask].mean(dim=0)  # (n, D), the padding slots left out
    torch.testing.assert_close(out, media - want)
    torch.testing.assert_close(out[mask].mean(dim=0), torch.zeros(2, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(center.running_mean, 0.5 * want)
    center.eval()
    torch.testing.assert_close(center(media), media - 0.5 * want)


def test_precomputed_media_give_the_same_logits():
    """forward(media=encode_images(...)) equals encoding inside forward (decoding encodes once per prompt)."""
    torch.manual_seed(0)
    model, tok = build_flamingo(flamingo_preset("tiny", center_media=True))
    model.eval()
    open_gates(model)
    images, ids = inputs(tok)
    with torch.no_grad():
        model.media_center.running_mean.normal_()
        direct = model(images, ids)["logits"]
        cached = model(images, ids, media=model.encode_images(images))["logits"]
    torch.testing.assert_close(direct, cached)


def test_more_image_tokens_than_images_is_rejected():
    """A sequence with three <image> tokens but two images fails with a ValueError saying so."""
    model, tok = tiny_model()
    images, ids = inputs(tok, TEXT + "<image>", num_images=2)
    with pytest.raises(ValueError, match="sequence 0 has 3 <image> tokens but 2 images"):
        model(images, ids)


class ToyLM(nn.Module):
    """An LM-like module whose layers sit at no known path."""

    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"vocab_size": 400})()
        self.embed = nn.Embedding(512, 64)
        self.blocks = nn.ModuleList(nn.Linear(64, 64) for _ in range(2))
        self.head = nn.Linear(64, 512)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head


def test_unknown_lm_layout_is_rejected():
    """Wrapping an LM whose decoder layers cannot be found fails with a ValueError naming its class."""
    cfg = flamingo_preset("tiny")
    tokens = add_flamingo_tokens(build_tokenizer(cfg))
    with pytest.raises(ValueError, match="cannot find the decoder layers of LM class ToyLM"):
        assemble(cfg, build_vision_tower(cfg.vision_model), ToyLM(), tokens)


def test_flamingo_layer_passes_arguments_through():
    """The wrapper hands hidden_states (positional or keyword) and other args to the layer and returns its output."""
    cfg = flamingo_preset("tiny")
    model, _ = tiny_model()
    gated = model.flamingo_layers()[0].gated_xattn

    class Layer(nn.Module):
        attention_type = "sliding_attention"

        def forward(self, hidden_states, mask=None, **kwargs):
            return hidden_states + 1, mask, kwargs

    layer = FlamingoLayer(gated, Layer())
    x = torch.randn(1, 3, 64)
    layer.condition(torch.randn(1, 1, cfg.num_latents, 64), torch.tensor([[False, True, False]]))
    out_pos = layer(x, "m", extra=2)
    out_kw = layer(hidden_states=x, mask="m", extra=2)
    assert out_pos[1:] == ("m", {"extra": 2}) and out_kw[1:] == ("m", {"extra": 2})
    assert torch.equal(out_pos[0], x + 1) and torch.equal(out_kw[0], x + 1)  # gates at 0: identity
    assert layer.attention_type == "sliding_attention"


def test_gradient_checkpointing_gives_same_gradients():
    """Gradient checkpointing on the LM and cross-attention blocks leaves gradients unchanged."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, tok = build_flamingo(flamingo_preset("tiny-llama", gradient_checkpointing=checkpointing))
        model.train()
        open_gates(model)
        images, ids = inputs(tok)
        model(images, ids, labels=ids)["loss"].backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_vision_tower_loads_a_clip_checkpoint(tmp_path):
    """A full open_clip CLIP checkpoint of the same architecture loads into the vision tower (visual.* keys)."""
    import open_clip

    cfg = flamingo_preset("tiny")
    clip = open_clip.CLIP(**cfg.vision_model)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    visual = build_vision_tower(cfg.vision_model, str(tmp_path / "clip.pt"))
    assert all(torch.equal(a, b) for a, b in zip(visual.state_dict().values(), clip.visual.state_dict().values()))


def test_resnet_vision_tower_is_rejected():
    """A ResNet open_clip tower fails with a ValueError naming what is supported."""
    tower = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16}}
    with pytest.raises(ValueError, match="needs an open_clip VisionTransformer tower, got ModifiedResNet"):
        build_vision_tower(tower)


def test_count_parameters_9b_on_meta_device():
    """The 9B preset is counted on the meta device in seconds with plausible totals."""
    start = time.perf_counter()
    counts = count_parameters(flamingo_preset("flamingo-9b"))
    assert time.perf_counter() - start < 10
    assert 7.0e9 < counts["lm"] < 7.5e9  # Mistral-7B
    assert 0.25e9 < counts["vision"] < 0.35e9  # ViT-L/14
    assert 0.8e9 < counts["trainable"] < 1.5e9  # OpenFlamingo-9B trains ~1.1B
    parts = counts["vision"] + counts["lm"] + counts["resampler"] + counts["xattn"] + counts["new_token_embeddings"]
    assert parts == counts["total"] > 8e9
    assert counts["trainable"] == counts["resampler"] + counts["xattn"] + counts["new_token_embeddings"]
