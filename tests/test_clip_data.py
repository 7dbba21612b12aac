"""CLIP training batches: uint8 images over the wire, CLIP normalization where the model runs."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.data.clip_data import ClipDataConfig, ClipPreprocess, load_rgb, normalize, to_chw


def _jpeg(value: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(value)
    pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _rows(n: int) -> dict:
    return {
        "__key__": [f"{i:09d}" for i in range(n)],
        "jpg": [_jpeg(i) for i in range(n)],
        "txt": [f"a photo of the digit {i}".encode() for i in range(n)],
        "json": [json.dumps({"caption": f"digit {i}"}).encode() for i in range(n)],
    }


def test_preprocess_yields_uint8_images_and_token_ids():
    """ClipPreprocess returns uint8 (B, 3, S, S) images and int64 (B, context) token ids."""
    from vlm.models.clip.build import model_config

    context = model_config("vlm-clip-tiny")["text_cfg"]["context_length"]
    out = ClipPreprocess("vlm-clip-tiny", 32, ClipDataConfig(augment=False))(_rows(3))
    assert out["image"].dtype == np.uint8 and out["image"].shape == (3, 3, 32, 32)
    assert out["text"].dtype == np.int64 and out["text"].shape == (3, context)


def test_normalize_equals_clip_float_normalization():
    """normalize(uint8 batch) equals CLIP's mean/std normalization of the same decoded images."""
    rows = _rows(4)
    out = ClipPreprocess("vlm-clip-tiny", 32, ClipDataConfig(augment=False))(rows)
    pil = [load_rgb(b, 32, False, random.Random(0)) for b in rows["jpg"]]
    expected = torch.from_numpy(to_chw(pil))
    got = normalize(torch.from_numpy(out["image"]))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert normalize(torch.from_numpy(out["image"]), torch.bfloat16).dtype == torch.bfloat16


def test_decode_batch_size_must_be_positive():
    """data.decode_batch_size < 1 is rejected with a message naming the key."""
    with pytest.raises(ValueError, match="data.decode_batch_size"):
        ClipDataConfig(decode_batch_size=0).validate()
