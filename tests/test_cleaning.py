"""Cleaning steps (vlm/data/cleaning.py) on inline samples: every drop reason, dedup, CLIP score."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from vlm.data import cleaning as cl
from vlm.data.images import ImageConfig, process_image
from vlm.testbed.digits import caption_for, render_digit, train_indices

SIZES = [(256, 256), (512, 384), (1024, 768), (300, 900)]


def _digit(index: int, size=(256, 256), seed: int = 0) -> tuple[bytes, dict]:
    """A digit stored the way ingest stores it (64 px, border mode) with ingest's metadata."""
    buf = io.BytesIO()
    render_digit(index, *size, seed=seed).save(buf, format="JPEG", quality=90)
    img = process_image(buf.getvalue(), ImageConfig(image_size=64, resize_mode="border"))
    meta = {"original_width": img.original_width, "original_height": img.original_height, "width": 64, "height": 64}
    return img.data, meta


def _sample(key: str, image: bytes | None, caption: str | None, **meta) -> cl.Sample:
    return cl.Sample(key, image, caption, meta)


def _run(steps: list[cl.Step], samples: list[cl.Sample]) -> dict[str, dict]:
    records = [{"key": s.key, **cl.sample_features(steps, s)} for s in samples]
    return cl.run_steps(steps, records)


def _reencode(data: bytes, *, quality: int = 75, size: int | None = None, fmt: str = "JPEG") -> bytes:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    if size:
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    im.save(out, format=fmt, quality=quality)
    return out.getvalue()


@pytest.fixture(scope="module")
def digit():
    return _digit(int(train_indices()[0]))


# ----------------------------------------------------------------------------- basic


@pytest.mark.parametrize(
    "caption, meta, cfg, reason",
    [
        ("a handwritten digit seven", {"original_width": 150, "original_height": 300}, {}, "image_too_small"),
        ("a handwritten digit seven", {"original_width": 300, "original_height": 1000}, {}, "aspect_ratio"),
        ("a b c", {}, {}, "caption_too_short"),
        ("x" * 30 + " y z", {}, {"max_caption_chars": 20}, "caption_too_long"),
        ("DSC_1234.JPG", {}, {}, "too_few_words"),
        ("one two three four five", {}, {"max_caption_words": 4}, "too_many_words"),
        (
            "a handwritten digit seven",
            {"original_width": 30, "original_height": 30},
            {"size_source": "stored", "min_image_side": 64},
            None,
        ),
        ("a handwritten digit seven", {}, {"min_image_side": 100, "size_source": "stored"}, "image_too_small"),
    ],
)
def test_basic_drop_reasons(digit, caption, meta, cfg, reason):
    """Each basic bound drops with its own reason class; size_source picks original or stored size."""
    image, base_meta = digit
    step = cl.BasicFilter(cl.BasicConfig(**cfg))
    decision = _run([step], [_sample("000000000", image, caption, **(base_meta | meta))])["000000000"]
    assert decision["keep"] is (reason is None)
    if reason:
        assert decision["reason"].startswith(reason + ":") and decision["dropped_by"] == "basic"
        assert step.stats.reasons == {reason: 1} and step.stats.dropped == 1


def test_basic_keeps_good_and_drops_undecodable(digit):
    """A DataComp-passing sample is kept; missing or corrupt image bytes are dropped as undecodable."""
    image, meta = digit
    samples = [
        _sample("000000000", image, "a handwritten digit seven", **meta),
        _sample("000000001", b"not an image", "a handwritten digit seven", **meta),
        _sample("000000002", None, "a handwritten digit seven"),
    ]
    step = cl.BasicFilter(cl.BasicConfig())
    d = _run([step], samples)
    assert d["000000000"]["keep"] and d["000000000"]["meta"]["basic"]["width"] == 256
    assert [d[k]["reason"].split(":")[0] for k in ("000000001", "000000002")] == ["undecodable_image"] * 2
    assert step.stats.to_dict() == {"seen": 3, "kept": 1, "dropped": 2, "reasons": {"undecodable_image": 2}}


# ----------------------------------------------------------------------------- dedup


def test_phash_stable_under_reencoding(digit):
    """Re-encoding and resizing move the 64-bit pHash by a few bits at most."""
    image, meta = digit
    h = cl.phash(image)
    assert 0 <= h < 2**64 and bin(h).count("1") == 32  # median split: half the bits set
    assert cl.hamming(h, cl.phash(_reencode(image, quality=60))) <= 4
    assert cl.hamming(h, cl.phash(_reencode(image, size=48))) <= 4
    assert cl.hamming(h, cl.phash(_reencode(image, size=100, fmt="PNG"))) <= 4


def test_multi_index_matches_brute_force():
    """The multi-index search finds the earliest hash within the threshold, exactly as brute force."""
    rng = random.Random(0)
    base = [rng.getrandbits(64) for _ in range(300)]
    hashes = base + [b ^ (1 << rng.randrange(64)) ^ (1 << rng.randrange(64)) for b in base[:100]]
    rng.shuffle(hashes)
    for t in (0, 2, 4, 8):
        index, kept = cl._MultiIndex(t), []
        for h in hashes:
            hit = index.query(h)
            brute = next(((i, cl.hamming(h, k)) for i, k in enumerate(kept) if cl.hamming(h, k) <= t), None)
            assert hit == brute
            if hit is None:
                index.add(h)
                kept.append(h)


def test_dedup_finds_exact_and_near_duplicates(digit):
    """Planted exact (same bytes, same downloaded sha256) and near (re-encoded/resized) copies are dropped,
    naming the first key; the original is kept."""
    image, meta = digit
    other, other_meta = _digit(int(train_indices()[3]), (512, 384))
    third, third_meta = _digit(int(train_indices()[7]), (1024, 768))
    samples = [
        _sample("000000003", image, "c", **meta),  # exact copy of 000000001 (listed out of order)
        _sample("000000001", image, "a", **meta, sha256="d" * 64),
        _sample("000000002", _reencode(image, quality=60), "b", **meta),
        _sample("000010000", _reencode(image, size=48), "d", **meta),  # another shard: still global
        _sample("000010001", other, "e", **other_meta, sha256="e" * 64),
        _sample("000010002", _reencode(other, size=56), "f", **other_meta),
        _sample("000010003", third, "g", **third_meta, sha256="d" * 64),  # same downloaded bytes as 000000001
    ]
    step = cl.Dedup(cl.DedupConfig())
    d = _run([step], samples)
    assert d["000000001"]["keep"]
    assert d["000000003"]["reason"] == "exact_duplicate: of 000000001 (sha256 of image bytes)"
    assert d["000010003"]["reason"] == "exact_duplicate: of 000000001 (sha256 of downloaded bytes)"
    assert d["000000002"]["reason"].startswith("near_duplicate: of 000000001 (phash distance")
    assert d["000010000"]["reason"].startswith("near_duplicate: of 000000001")
    assert d["000010001"]["keep"] and d["000010002"]["meta"]["dedup"]["duplicate_of"] == "000010001"
    assert step.stats.reasons == {"exact_duplicate": 2, "near_duplicate": 3}


def test_dedup_no_false_positives_on_distinct_digits():
    """Distinct handwritten digits at the web's sizes (letterboxed ones included) are all kept."""
    idx = train_indices()[:60]
    samples = []
    for i, d in enumerate(idx):
        image, meta = _digit(int(d), SIZES[i % 4], seed=i)
        samples.append(_sample(f"{i:09d}", image, caption_for(0), **meta))
    step = cl.Dedup(cl.DedupConfig())
    d = _run([step], samples)
    assert [k for k, v in d.items() if not v["keep"]] == []


def test_padding_crop_separates_letterboxed_digits():
    """Without cropping ingest's border, tall letterboxed digits hash alike; with it they do not."""
    idx = train_indices()[:40]
    digits = [_digit(int(d), (300, 900), seed=i) for i, d in enumerate(idx)]
    near = {}
    for crop in (False, True):
        hashes = [cl.phash(img, (m["original_width"], m["original_height"]) if crop else None) for img, m in digits]
        near[crop] = sum(cl.hamming(a, b) <= 4 for i, a in enumerate(hashes) for b in hashes[i + 1 :])
    assert near[False] > 10 * max(near[True], 1)


def test_steps_run_in_order_on_survivors(digit):
    """A sample dropped by basic is not a dedup anchor: its later copy is kept."""
    image, meta = digit
    steps = cl.build_steps(["basic", "dedup"], {"basic": cl.BasicConfig(), "dedup": cl.DedupConfig()})
    d = _run(
        steps,
        [_sample("000000000", image, "img", **meta), _sample("000000001", image, "a handwritten seven", **meta)],
    )
    assert d["000000000"]["dropped_by"] == "basic" and "dedup" not in d["000000000"]["meta"]
    assert d["000000001"]["keep"] and set(d["000000001"]["meta"]) == {"basic", "dedup"}
    assert steps[1].stats.seen == 1


# ----------------------------------------------------------------------------- clip score


def _score_records(scores):
    return [{"key": f"{i:09d}", "clipscore": cl.ClipScoreFilter.score_features(s)} for i, s in enumerate(scores)]


def test_clipscore_threshold():
    """Threshold mode keeps score >= threshold, drops lower ones and missing scores with reasons."""
    step = cl.ClipScoreFilter(cl.ClipScoreConfig(checkpoint="x", threshold=0.25))
    d = cl.run_steps([step], _score_records([0.3, 0.25, 0.1, float("nan")]))
    assert [v["keep"] for v in d.values()] == [True, True, False, False]
    assert d["000000002"]["reason"] == "low_clip_score: 0.1000 < 0.2500 (threshold)"
    assert d["000000003"]["reason"].startswith("no_clip_score:")
    assert step.stats.reasons == {"low_clip_score": 1, "no_clip_score": 1}


def test_clipscore_top_fraction():
    """Top-fraction mode keeps the best round(f * n) scores, ties to the earlier key."""
    step = cl.ClipScoreFilter(cl.ClipScoreConfig(checkpoint="x", mode="top_fraction", top_fraction=0.5))
    d = cl.run_steps([step], _score_records([0.1, 0.4, 0.2, 0.4, 0.3, float("nan")]))
    assert [k for k, v in d.items() if v["keep"]] == ["000000001", "000000003", "000000004"]
    assert d["000000002"]["reason"] == "low_clip_score: 0.2000 < 0.3000 (top 50%)"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip
    import torch

    from vlm.models.clip.build import export_clip, model_config

    torch.manual_seed(0)
    cfg = model_config("vlm-clip-tiny")
    out = tmp_path_factory.mktemp("clip") / "export"
    export_clip(open_clip.CLIP(**cfg).state_dict(), cfg, out, "vlm-clip-tiny")
    return out


@pytest.mark.slow
def test_clip_scorer_scores_batches(tiny_clip, digit):
    """ClipScorer returns the cosine of the normalized embeddings per row, NaN when it cannot score."""
    import torch

    image, _ = digit
    scorer = cl.ClipScorer(str(tiny_clip), device="cpu")
    batch = {
        "key": np.array(["a", "b", "c", "d"], dtype=object),
        "image": np.array([image, image, b"junk", image], dtype=object),
        "caption": np.array(["a handwritten digit seven", "spam spam", "x", ""], dtype=object),
    }
    out = scorer(batch)["clip_score"]
    assert out.shape == (4,) and np.isnan(out[2]) and np.isnan(out[3])
    assert -1.0 <= out[0] <= 1.0 and out[0] != out[1]
    with torch.inference_mode():
        pix = scorer.preprocess(Image.open(io.BytesIO(image)).convert("RGB"))[None]
        img = scorer.model.encode_image(pix, normalize=True)
        txt = scorer.model.encode_text(scorer.tokenizer(["a handwritten digit seven"]), normalize=True)
    assert out[0] == pytest.approx(float((img * txt).sum()), abs=1e-5)


def test_load_clip_errors(tmp_path):
    """A missing checkpoint, or a weights file without a preset, is a one-line ConfigError."""
    from vlm.errors import ConfigError

    with pytest.raises(ConfigError, match="not found"):
        cl.load_clip(str(tmp_path / "nope"))
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="preset"):
        cl.load_clip(str(tmp_path / "w.safetensors"))
