"""Tiny BLIP / BLIP-2 captioners and filters: build, batched inference, export/reload, losses."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from vlm.models.blip.build import build_captioner, build_filter, export_pretrained
from vlm.models.blip.captioner import Captioner, Filter, strip_prompt
from vlm.models.blip.config import BlipConfig
from vlm.models.blip.losses import (
    captioner_loss,
    collate_blip,
    filter_loss,
    positive_pairs,
    sample_negatives,
)
from vlm.models.scalars import (
    reshape_scalar_params,
    restore_scalar_params,
    restore_scalar_state_dict,
    scalar_param_names,
)
from vlm.testbed.digits import render_digit

BACKENDS = ["blip", "blip2"]
PROMPT = "a picture of"
TEXTS = ["a handwritten digit zero", "the number 1 written by hand", "a photo of the digit two", "spam click here"]


def _cfg(backend: str, **kw) -> BlipConfig:
    return BlipConfig(backend=backend, device="cpu", max_length=6, min_length=2, **kw)


@pytest.fixture(scope="module")
def images():
    return [render_digit(i, 32, 32) for i in range(4)]


@pytest.fixture(scope="module", params=BACKENDS)
def captioner_parts(request):
    cfg = _cfg(request.param, num_captions=2)
    model, processor = build_captioner(cfg)
    return cfg, model, processor


@pytest.fixture(scope="module", params=BACKENDS)
def filter_parts(request):
    cfg = _cfg(request.param)
    model, processor = build_filter(cfg)
    return cfg, model, processor


def _samples(images):
    return [{"image": im, "text": t} for im, t in zip(images, TEXTS)]


# ---------------------------------------------------------------- captioner


def test_strip_prompt_is_case_insensitive_and_trims():
    """The prompt is removed from the front whatever its case, and whitespace is trimmed."""
    assert strip_prompt("  A Picture of  a dog ", "a picture of ") == "a dog"
    assert strip_prompt("a dog", "a picture of ") == "a dog"


def test_captioner_gives_k_captions_per_image_without_prompt(captioner_parts, images):
    """One batched call returns K=2 captions for each of 4 images, none starting with the prompt."""
    cfg, model, processor = captioner_parts
    captions = Captioner(model, processor, cfg).caption(images, seed=0)
    assert len(captions) == 4 and all(len(c) == 2 for c in captions)
    assert all(isinstance(t, str) and not t.lower().startswith(PROMPT) for c in captions for t in c)


def test_captioner_runs_generate_once_per_batch(captioner_parts, images):
    """`caption` calls `generate` once for the whole batch with num_return_sequences=K."""
    cfg, model, processor = captioner_parts
    captioner = Captioner(model, processor, cfg)
    calls = []
    original = model.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["num_return_sequences"])
        return original(*args, **kwargs)

    model.generate = counting
    try:
        captioner.caption(images, seed=0)
    finally:
        del model.generate
    assert calls == [2]


def test_captioner_seed_makes_sampling_reproducible(captioner_parts, images):
    """The same seed and batch give the same sampled captions."""
    cfg, model, processor = captioner_parts
    captioner = Captioner(model, processor, cfg)
    assert captioner.caption(images, seed=7) == captioner.caption(images, seed=7)


def test_captioner_beam_search_without_sampling(images):
    """do_sample=false decodes with beam search and still returns K captions per image."""
    cfg = _cfg("blip", num_captions=2, do_sample=False, num_beams=2)
    model, processor = build_captioner(cfg)
    captions = Captioner(model, processor, cfg).caption(images[:2])
    assert [len(c) for c in captions] == [2, 2]


# ---------------------------------------------------------------- filter


def test_filter_itm_scores_are_probabilities(filter_parts, images):
    """ITM scores are one float per (image, text) pair, in [0, 1]."""
    cfg, model, processor = filter_parts
    scores = Filter(model, processor, cfg).score(images, TEXTS)
    assert scores.shape == (4,) and scores.dtype == np.float32
    assert np.all((scores >= 0) & (scores <= 1))


def test_filter_matches_hf_forward(filter_parts, images):
    """Scoring by parts equals the HF retrieval model's own forward (ITM softmax and ITC cosine)."""
    cfg, model, processor = filter_parts
    filt = Filter(model, processor, cfg)
    itc = Filter(model, processor, dataclasses.replace(cfg, score="itc"))
    inputs = processor(images=images, text=TEXTS, padding="longest", return_tensors="pt")
    with torch.inference_mode():
        if cfg.backend == "blip":
            itm_ref = model(**inputs, use_itm_head=True).itm_score.softmax(-1)[:, 1]
            itc_ref = model(**inputs, use_itm_head=False).itm_score.diagonal()
        else:
            itm_ref = model(**inputs, use_image_text_matching_head=True).logits_per_image.softmax(-1)[:, 1]
            itc_ref = model(**inputs, use_image_text_matching_head=False).logits_per_image.diagonal()
    np.testing.assert_allclose(filt.score(images, TEXTS), itm_ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(itc.score(images, TEXTS), itc_ref.numpy(), atol=1e-5)


def test_filter_score_sets_equal_pairwise_scores(filter_parts, images):
    """Scoring several captions per image (image encoded once) equals scoring the pairs one by one."""
    cfg, model, processor = filter_parts
    filt = Filter(model, processor, cfg)
    sets = filt.score_sets(images[:3], [TEXTS[:2], [], TEXTS[1:4]])
    assert [len(s) for s in sets] == [2, 0, 3]
    pairs = filt.score([images[0]] * 2 + [images[2]] * 3, TEXTS[:2] + TEXTS[1:4])
    np.testing.assert_allclose(np.concatenate(sets), pairs, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_and_reload_give_identical_outputs(backend, images, tmp_path):
    """save_pretrained + from_pretrained of filter and captioner reproduce scores and seeded captions."""
    cfg = _cfg(backend, num_captions=2)
    fmodel, fproc = build_filter(cfg)
    cmodel, cproc = build_captioner(cfg)
    export_pretrained(fmodel, fproc, tmp_path / "filter")
    export_pretrained(cmodel, cproc, tmp_path / "captioner")
    loaded = dataclasses.replace(
        cfg, pretrained=str(tmp_path / "captioner"), filter_pretrained=str(tmp_path / "filter")
    )
    fmodel2, fproc2 = build_filter(loaded)
    cmodel2, cproc2 = build_captioner(loaded)
    np.testing.assert_array_equal(
        Filter(fmodel, fproc, cfg).score(images, TEXTS), Filter(fmodel2, fproc2, loaded).score(images, TEXTS)
    )
    assert Captioner(cmodel, cproc, cfg).caption(images, seed=3) == Captioner(cmodel2, cproc2, loaded).caption(
        images, seed=3
    )


def test_preset_build_is_deterministic(images):
    """Two builds from the same config and seed have the same weights (same scores)."""
    cfg = _cfg("blip")
    a, b = build_filter(cfg), build_filter(cfg)
    np.testing.assert_array_equal(Filter(*a, cfg).score(images, TEXTS), Filter(*b, cfg).score(images, TEXTS))


# ---------------------------------------------------------------- scalar parameters


class _WithScalars(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))
        self.lin = torch.nn.Linear(3, 3)
        self.inner = torch.nn.Module()
        self.inner.bias = torch.nn.Parameter(torch.tensor(-1.0))

    def forward(self, x):
        return self.lin(x) * self.scale.exp() + self.inner.bias


def test_scalar_params_reshape_and_restore_round_trip():
    """Every 0-dim parameter becomes [1] (grad included) and comes back to [] with the same value."""
    model = _WithScalars()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert sorted(reshape_scalar_params(model)) == ["inner.bias", "scale"]
    assert scalar_param_names(model) == [] and model.scale.shape == (1,)
    model(torch.ones(2, 3)).sum().backward()
    assert model.scale.grad.shape == (1,)
    assert sorted(restore_scalar_params(model)) == ["inner.bias", "scale"]
    assert model.scale.shape == () and model.scale.grad.shape == ()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_restore_scalar_state_dict_handles_wrapper_prefix():
    """A gathered state dict's [1] entries get shape [] back, also under a `module.` prefix."""
    sd = {"module.scale": torch.ones(1), "module.lin.bias": torch.ones(1), "other": torch.ones(1)}
    restore_scalar_state_dict(sd, ["scale"])
    assert sd["module.scale"].shape == () and sd["module.lin.bias"].shape == (1,) and sd["other"].shape == (1,)


def test_hf_blip_logit_scale_trains_reshaped_and_reloads(tmp_path):
    """HF BlipModel runs forward/backward with logit_scale as [1], and saves/reloads after restore."""
    from transformers import BlipConfig as HFBlipConfig
    from transformers import BlipModel

    hf_cfg = HFBlipConfig(
        text_config=dict(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        projection_dim=8,
    )
    model = BlipModel(hf_cfg)
    assert "logit_scale" in reshape_scalar_params(model)
    ids = torch.randint(1, 50, (2, 5))
    out = model(input_ids=ids, pixel_values=torch.randn(2, 3, 16, 16), return_loss=True)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.logit_scale.grad.shape == (1,)
    restore_scalar_params(model)
    model.save_pretrained(tmp_path)
    reloaded = BlipModel.from_pretrained(tmp_path)
    assert reloaded.logit_scale.shape == ()
    torch.testing.assert_close(reloaded.logit_scale, model.logit_scale)


# ---------------------------------------------------------------- losses


def test_collate_caption_masks_prompt_and_padding(captioner_parts, images):
    """Caption labels ignore the prompt and the padding; the caption tokens are targets."""
    cfg, _, processor = captioner_parts
    batch = collate_blip(_samples(images), processor, "caption", prompt=cfg.prompt)
    labels, mask = batch["labels"], batch["attention_mask"]
    assert labels.shape == batch["input_ids"].shape
    assert torch.all(labels[mask == 0] == -100)
    first_target = (labels[0] != -100).nonzero()[0].item()
    caption = processor.tokenizer.decode(batch["input_ids"][0, first_target:], skip_special_tokens=True)
    assert caption.strip() == TEXTS[0]


def test_captioner_loss_is_finite_and_backprops(captioner_parts, images):
    """The captioning loss is a finite scalar that reaches the vision encoder's gradients."""
    cfg, model, processor = captioner_parts
    model = copy.deepcopy(model).train()
    loss = captioner_loss(model, collate_blip(_samples(images), processor, "caption"))["loss"]
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision_model.parameters())


def test_filter_loss_is_finite_and_backprops(filter_parts, images):
    """ITC + ITM loss is finite, its parts are reported, and gradients reach the ITM head."""
    cfg, model, processor = filter_parts
    model = copy.deepcopy(model).train()
    batch = collate_blip(_samples(images), processor, "filter")
    out = filter_loss(model, batch, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert set(out) == {"loss", "itc_loss", "itm_loss", "itm_acc"}
    assert all(torch.isfinite(v) for v in out.values()) and 0 <= out["itm_acc"] <= 1
    assert model.itm_head.weight.grad is not None and model.itm_head.weight.grad.abs().sum() > 0


def test_adam_steps_reduce_captioner_loss(images):
    """A few Adam steps on one fixed tiny batch lower the captioning loss."""
    cfg = _cfg("blip")
    model, processor = build_captioner(cfg)
    model.train()
    batch = collate_blip(_samples(images), processor, "caption")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = captioner_loss(model, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0] and losses == sorted(losses, reverse=True)


def test_hard_negatives_are_never_positives():
    """Hard-negative draws never pick a positive (the pair itself or an identical caption)."""
    ids = torch.tensor([[5, 6, 0], [7, 8, 9], [5, 6, 0], [9, 9, 9], [1, 2, 3]])
    mask = (ids != 0).long()
    positive = positive_pairs(ids, mask)
    assert positive[0, 2] and positive[2, 0] and positive.diagonal().all()
    sim = torch.eye(5) * 50 + torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    sim[0, 2] = sim[2, 0] = 60.0  # the duplicate caption looks most similar of all
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        picks = sample_negatives(sim, positive, generator=gen)
        assert not positive[torch.arange(5), picks].any()


def test_sample_negatives_marks_rows_without_negatives():
    """A row whose every column is positive gets -1 instead of a draw."""
    positive = torch.ones(3, 3, dtype=torch.bool)
    positive[2, 0] = False
    picks = sample_negatives(torch.zeros(3, 3), positive, hard=False)
    assert picks.tolist() == [-1, -1, 0]
