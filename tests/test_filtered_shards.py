"""The shared writer/reader of filtering stages (vlm/data/filtered_shards.py), without Ray."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from vlm.data import filtered_shards as fs
from vlm.data import shards as sh
from vlm.errors import InputError
from vlm.testbed.digit_shards import write_digit_shards


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    write_digit_shards(out, 10, samples_per_shard=4, image_size=32)
    return out


def _decide(samples, drop_keys, caption=None):
    return [
        s
        | {
            "keep": s["key"] not in drop_keys,
            "reason": f"too_dark: mean {i}" if s["key"] in drop_keys else None,
            "caption": caption,
            "meta": {"score": i},
        }
        for i, s in enumerate(samples)
    ]


def test_input_shards_lists_complete_shards(digits):
    """A whole input lists every complete shard in order."""
    assert fs.input_shards(digits) == [0, 1, 2]


def test_input_shards_errors(tmp_path, digits):
    """Missing dir, missing _SUCCESS and no shards each raise a clear InputError."""
    with pytest.raises(InputError, match="not found"):
        fs.input_shards(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    with pytest.raises(InputError, match="_SUCCESS"):
        fs.input_shards(tmp_path / "a")
    sh.write_success(tmp_path / "a", {"stage": "x"})
    with pytest.raises(InputError, match="no complete shards"):
        fs.input_shards(tmp_path / "a")


def test_read_input_shard_in_key_order_with_rows(digits):
    """Samples come back in key order with their files and input parquet row (no stage status)."""
    samples = fs.read_input_shard(digits, 1)
    assert [s["key"] for s in samples] == ["000010000", "000010001", "000010002", "000010003"]
    assert {"jpg", "txt", "json"} <= set(samples[0]["files"])
    assert samples[0]["row"]["url"].startswith("digit://") and "status" not in samples[0]["row"]


def test_write_filtered_shard_layout(tmp_path, digits):
    """Kept go to the tar with KEY.json[stage]; dropped go to _dropped with reason; parquet has all rows."""
    samples = fs.read_input_shard(digits, 0)
    drop = {samples[1]["key"], samples[3]["key"]}
    stats = fs.write_filtered_shard(tmp_path, 0, _decide(samples, drop), stage="clean", extra_stats={"x": 1})
    assert stats["kept"] == 2 and stats["dropped"] == 2 and stats["kept_fraction"] == 0.5
    assert stats["reason_counts"] == {"too_dark": 2} and stats["x"] == 1
    assert sh.read_stats(tmp_path, 0) == json.loads(json.dumps(stats))

    kept = sh.read_tar_samples(sh.tar_path(tmp_path, 0))
    assert sorted(kept) == [samples[0]["key"], samples[2]["key"]]
    first = kept[samples[0]["key"]]
    assert first["jpg"] == samples[0]["files"]["jpg"] and first["txt"] == samples[0]["files"]["txt"]
    record = json.loads(first["json"])
    assert record["clean"] == {"score": 0} and record["url"] == json.loads(samples[0]["files"]["json"])["url"]

    dropped = sh.read_tar_samples(sh.tar_path(tmp_path / fs.DROPPED_DIR, 0))
    assert sorted(dropped) == sorted(drop)
    assert json.loads(dropped[samples[1]["key"]]["json"])["clean"]["reason"] == "too_dark: mean 1"

    rows = pq.read_table(sh.parquet_path(tmp_path, 0)).to_pylist()
    assert [r["status"] for r in rows] == ["kept", "dropped", "kept", "dropped"]
    assert rows[1]["reason"] == "too_dark: mean 1" and rows[1]["reason_class"] == "too_dark"
    assert rows[0]["url"].startswith("digit://") and rows[0]["reason"] is None
    drows = pq.read_table(sh.parquet_path(tmp_path / fs.DROPPED_DIR, 0)).to_pylist()
    assert [r["key"] for r in drows] == sorted(drop)


def test_write_filtered_shard_sets_caption(tmp_path, digits):
    """A non-None caption replaces KEY.txt and the parquet caption."""
    samples = fs.read_input_shard(digits, 2)
    fs.write_filtered_shard(tmp_path, 2, _decide(samples, set(), caption="a new caption"), stage="capfilt")
    kept = sh.read_tar_samples(sh.tar_path(tmp_path, 2))
    assert {f["txt"] for f in kept.values()} == {b"a new caption"}
    assert pq.read_table(sh.parquet_path(tmp_path, 2)).column("caption").to_pylist() == ["a new caption"] * 2


def test_rewrite_replaces_and_stats_marks_completion(tmp_path, digits):
    """Rewriting a shard replaces it whole; an aborted write leaves it incomplete and no temp files."""
    samples = fs.read_input_shard(digits, 0)
    fs.write_filtered_shard(tmp_path, 0, _decide(samples, set()), stage="clean")
    assert sh.is_complete(tmp_path, 0)
    bad = _decide(samples, set()) + [{"key": "zzz"}]  # no "keep": fails mid-shard
    with pytest.raises(KeyError):
        fs.write_filtered_shard(tmp_path, 0, bad, stage="clean")
    assert not sh.is_complete(tmp_path, 0)
    assert not list(tmp_path.glob(".*tmp*")) and not list((tmp_path / fs.DROPPED_DIR).glob(".*tmp*"))
    fs.write_filtered_shard(tmp_path, 0, _decide(samples, {samples[0]["key"]}), stage="clean")
    assert len(sh.read_tar_samples(sh.tar_path(tmp_path, 0))) == 3


def test_reason_class():
    """Reason classes are the text before ':' made metric-safe."""
    assert fs.reason_class("near_duplicate: of 000000001 (distance 3)") == "near_duplicate"
    assert fs.reason_class("no caption scored >= 0.5") == "no_caption_scored_0.5"
    assert fs.reason_class(None) == ""
