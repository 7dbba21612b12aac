"""CapFilt steps: BLIP's keep rule, and the captioner/filter steps on a batch of digit images."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from vlm.data.capfilt import CaptionerStep, FilterStep, choose_captions, filter_quality
from vlm.errors import ConfigError
from vlm.testbed.digits import render_digit

STEP_CFG = {"device": "cpu", "num_captions": 2, "min_length": 2, "max_length": 6}


# ---------------------------------------------------------------- choose_captions


def test_both_captions_kept_and_best_chosen():
    """Original and synthetic above threshold are both kept; the higher-scoring one is chosen."""
    d = choose_captions("web caption", ["synthetic one"], 0.6, [0.9], 0.5)
    assert d["keep"] and d["reason"] is None and d["chosen"] == "synthetic one"
    assert [(c["source"], c["kept"]) for c in d["candidates"]] == [("original", True), ("synthetic", True)]


def test_only_synthetic_kept_when_original_fails():
    """A noisy original below threshold is dropped while a matching synthetic caption is kept."""
    d = choose_captions("IMG_2041.jpg", ["a handwritten seven", "a cat"], 0.1, [0.8, 0.3], 0.5)
    assert d["keep"] and d["chosen"] == "a handwritten seven"
    assert [c["kept"] for c in d["candidates"]] == [False, True, False]


def test_sample_without_passing_caption_is_dropped_with_reason():
    """No caption >= threshold: the sample is dropped, the reason names the threshold."""
    d = choose_captions("spam", ["bad", "worse"], 0.2, [0.49, 0.1], 0.5)
    assert not d["keep"] and d["chosen"] is None
    assert d["reason"] == "low_itm_score: no caption scored >= 0.5"
    assert len(d["candidates"]) == 3 and not any(c["kept"] for c in d["candidates"])


def test_score_equal_to_threshold_is_kept():
    """A score exactly at the threshold counts as kept."""
    d = choose_captions("exact", [], 0.5, [], 0.5)
    assert d["keep"] and d["chosen"] == "exact" and d["candidates"][0]["kept"]


def test_ties_go_to_original_then_earlier_synthetic():
    """Equal top scores: the original wins; among synthetic captions the earlier one wins."""
    assert choose_captions("orig", ["syn"], 0.7, [0.7], 0.5)["chosen"] == "orig"
    assert choose_captions(None, ["first", "second"], None, [0.8, 0.8], 0.5)["chosen"] == "first"


def test_missing_original_uses_synthetic_only():
    """Without an original (None or blank) only synthetic captions are candidates."""
    for original in (None, "  "):
        d = choose_captions(original, ["syn"], None, [0.9], 0.5)
        assert [c["source"] for c in d["candidates"]] == ["synthetic"] and d["chosen"] == "syn"


def test_nan_score_never_kept_and_mismatch_rejected():
    """A NaN score is not kept; a score list of the wrong length is an error."""
    assert not choose_captions("x", [], float("nan"), [], 0.5)["keep"]
    with pytest.raises(ValueError):
        choose_captions("x", ["a", "b"], 0.9, [0.9], 0.5)


# ---------------------------------------------------------------- steps


def _jpg(index: int) -> bytes:
    buf = io.BytesIO()
    render_digit(index, 32, 32).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _batch(n: int = 4) -> dict[str, np.ndarray]:
    jpgs = np.empty(n, dtype=object)
    jpgs[:] = [_jpg(i) for i in range(n)]
    return {
        "key": np.array([f"00000{i:04d}" for i in range(n)]),
        "jpg": jpgs,
        "txt": np.array(["a handwritten digit zero", "IMG_2041.jpg", "the number 2 written by hand", ""], dtype=object)[
            :n
        ],
    }


@pytest.fixture(scope="module")
def captioner_step():
    return CaptionerStep(STEP_CFG)


@pytest.fixture(scope="module")
def filter_step():
    return FilterStep(STEP_CFG)


@pytest.fixture(scope="module")
def captioned(captioner_step):
    return captioner_step(_batch())


def test_captioner_step_adds_k_synthetic_captions(captioned):
    """CaptionerStep keeps the input columns and adds `synthetic`: a JSON list of K strings per row."""
    assert set(captioned) == {"key", "jpg", "txt", "synthetic"}
    rows = [json.loads(s) for s in captioned["synthetic"]]
    assert len(rows) == 4 and all(len(r) == 2 and all(isinstance(t, str) for t in r) for r in rows)


def test_captioner_step_calls_generate_once_per_batch(captioner_step):
    """A batch of 4 images costs one `generate` call, not one per image."""
    model = captioner_step.captioner.model
    calls = []
    original = model.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["pixel_values"].shape[0])
        return original(*args, **kwargs)

    model.generate = counting
    try:
        captioner_step(_batch())
    finally:
        del model.generate
    assert calls == [4]


def test_captioner_step_is_reproducible(captioner_step, captioned):
    """The same batch captions the same way on a rerun (seeded by config seed + keys)."""
    assert list(captioner_step(_batch())["synthetic"]) == list(captioned["synthetic"])


def test_filter_step_scores_and_decides(filter_step, captioned):
    """FilterStep adds scores (original + each synthetic), a choose_captions decision and `keep`."""
    out = filter_step(captioned)
    assert {"scores", "decision", "keep"} <= set(out)
    for i in range(4):
        scores, decision = json.loads(out["scores"][i]), json.loads(out["decision"][i])
        synthetic = json.loads(captioned["synthetic"][i])
        original = captioned["txt"][i] or None
        assert (scores["original"] is None) == (original is None)
        assert len(scores["synthetic"]) == len(synthetic)
        assert all(0.0 <= s <= 1.0 for s in scores["synthetic"])
        expected = choose_captions(original, synthetic, scores["original"], scores["synthetic"], 0.5)
        assert decision == json.loads(json.dumps(expected))
        assert bool(out["keep"][i]) == decision["keep"]


def test_filter_step_threshold_decides_drops(captioned):
    """With an unreachable threshold every sample is dropped with the reason; with 0 all are kept."""
    drop_all = FilterStep({**STEP_CFG, "itm_threshold": 1.01})(captioned)
    reasons = {json.loads(d)["reason"] for d in drop_all["decision"]}
    assert reasons == {"low_itm_score: no caption scored >= 1.01"} and not drop_all["keep"].any()
    step = FilterStep({**STEP_CFG, "itm_threshold": 0.0})
    assert step(captioned)["keep"].all() and step.stats["kept"] == 4


def test_undecodable_image_is_dropped_with_reason(captioner_step, filter_step):
    """Bytes that are not an image get no captions and are dropped with a decode reason."""
    batch = _batch(2)
    batch["jpg"][1] = b"not an image"
    out = filter_step(captioner_step(batch))
    assert json.loads(out["synthetic"][1]) == []
    decision = json.loads(out["decision"][1])
    assert not decision["keep"] and decision["reason"].startswith("image could not be decoded")


def test_step_config_rejects_unknown_key():
    """A typo in the step config is a ConfigError naming the key, before any model is built."""
    with pytest.raises(ConfigError, match="num_caption"):
        CaptionerStep({"num_caption": 2})


def test_filter_quality_counts():
    """Precision/recall of noise detection from confusion counts; {} without labels."""
    q = filter_quality({"tp": 8, "fp": 2, "fn": 2, "tn": 88})
    assert q["precision"] == pytest.approx(0.8) and q["recall"] == pytest.approx(0.8)
    assert q["accuracy"] == pytest.approx(0.96) and q["labelled"] == 100
    assert filter_quality({}) == {}
