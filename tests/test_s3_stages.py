"""clean and capfilt with s3:// inputs and outputs, on the real local S3 server (moto, its own process):
the same decisions as on local disk, the same published layout, nothing half-written, one-line errors."""

from __future__ import annotations

import pytest

from pipelines.capfilt import CapfiltConfig, capfilt
from pipelines.clean import CleanConfig, clean
from vlm import storage
from vlm.config import load_config
from vlm.data import filtered_shards as fs
from vlm.data import shards as sh
from vlm.data.shard_check import check_shards
from vlm.errors import InputError
from vlm.testbed.digit_shards import write_digit_shards

pytestmark = pytest.mark.slow

CLEAN = ["basic.min_image_side=32", "basic.size_source=stored", "dedup.near_threshold=2"]
CAPFILT = ["captioner.batch_size=8", "filter.batch_size=8", "blip.max_length=6", "blip.min_length=1"]


@pytest.fixture(scope="module")
def local_raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw")
    write_digit_shards(out, 60, samples_per_shard=20, noisy_fraction=0.3, seed=1)
    return out


@pytest.fixture(scope="module")
def s3_raw(local_raw, s3):
    url = s3.bucket() + "/raw"
    storage.copy_dir(local_raw, url)
    return url


def _decisions(out) -> dict[str, tuple]:
    rows = [r for s in sh.complete_shards(out) for r in sh.read_parquet(sh.parquet_path(out, s)).to_pylist()]
    return {r["key"]: (r["status"], r["reason"], r["caption"]) for r in rows}


def test_clean_then_capfilt_on_s3_match_local_disk(local_raw, s3_raw, s3, tmp_path, ray_local, mlflow_store):
    cfg = load_config(CleanConfig, None, CLEAN)
    local = clean(local_raw, tmp_path / "clean", cfg, show_progress=False)
    bucket = s3_raw.rsplit("/", 1)[0]
    out = f"{bucket}/clean"
    remote = clean(s3_raw, out, cfg, show_progress=False)

    assert remote["totals"] == local["totals"] and remote["num_shards"] == 3
    assert _decisions(out) == _decisions(tmp_path / "clean")
    assert remote["inputs"][0]["path"] == s3_raw
    keys = [k for k in s3.keys(out) if not k.endswith("/")]  # directory markers are not data
    for shard in range(3):
        for name in (f"{shard:05d}.tar", f"{shard:05d}.parquet", f"{shard:05d}_stats.json"):
            assert f"clean/{name}" in keys and f"clean/_dropped/{name}" in keys
    for name in ("manifest.json", "_SUCCESS", "config.yaml", "_plan/plan.json"):
        assert f"clean/{name}" in keys
    assert not [k for k in keys if ".tmp" in k or "write-check" in k], keys
    for shard in range(3):  # the tars hold the same samples, byte for byte
        assert sh.read_tar_samples(sh.tar_path(out, shard)) == sh.read_tar_samples(
            sh.tar_path(tmp_path / "clean", shard)
        )

    again = clean(s3_raw, out, cfg, show_progress=False)  # complete on S3: nothing redone
    # (pyarrow may leave a `clean/` directory marker behind the output check's probe object: not data)
    assert again["run"]["shards_processed"] == 0 and [k for k in s3.keys(out) if not k.endswith("/")] == keys

    storage.delete(sh.stats_path(out, 1))  # shard 1 loses its completion marker: only it is redone
    redo = clean(s3_raw, out, cfg, show_progress=False)
    assert redo["run"]["shards_processed"] == 1 and _decisions(out) == _decisions(tmp_path / "clean")

    filtered = capfilt(out, f"{bucket}/capfilt", load_config(CapfiltConfig, None, [*CAPFILT]), show_progress=False)
    assert fs.input_shards(f"{bucket}/capfilt") == [0, 1, 2]
    assert filtered["totals"]["count"] == remote["totals"]["kept"]
    assert sh.read_manifest(f"{bucket}/capfilt")["inputs"][0]["path"] == out


def test_bad_s3_locations_are_one_line_before_ray(s3_raw, s3):
    cfg = load_config(CleanConfig, None, CLEAN)
    with pytest.raises(InputError, match=r"s3://no-such-bucket-vlm/clean: bucket no-such-bucket-vlm does not exist"):
        clean(s3_raw, "s3://no-such-bucket-vlm/clean", cfg, show_progress=False)
    empty = s3.bucket()
    with pytest.raises(InputError, match=r"input directory not found: s3://"):
        clean(f"{empty}/nothing", f"{empty}/out", cfg, show_progress=False)
    assert s3.keys(empty) == []  # nothing written for a refused run
    unfinished = f"{empty}/unfinished"
    storage.write_bytes(f"{unfinished}/00000.tar", b"")
    with pytest.raises(InputError, match=r"has no _SUCCESS"):
        clean(unfinished, f"{empty}/out", cfg, show_progress=False)


def test_remote_shard_check_reads_two_blocks_and_the_stats(local_raw, s3, tmp_path):
    url = s3.bucket()
    tar = sh.tar_path(local_raw, 0).read_bytes()
    storage.write_bytes(f"{url}/00000.tar", tar)
    storage.write_bytes(f"{url}/00000_stats.json", sh.stats_path(local_raw, 0).read_bytes())
    assert [c.samples for c in check_shards([f"{url}/00000.tar"], 20)] == [20]
    storage.write_bytes(f"{url}/00001.tar", tar[: len(tar) // 2])
    with pytest.raises(InputError, match=r"shard s3://.*/00001.tar is truncated"):
        check_shards([f"{url}/00001.tar"], 0)
    storage.write_bytes(f"{url}/00002.tar", b"not a tar archive at all" * 100)
    with pytest.raises(InputError, match=r"shard s3://.*/00002.tar is not a readable tar"):
        check_shards([f"{url}/00002.tar"], 0)
    storage.write_bytes(f"{url}/00003.tar", tar)  # no stats beside it: read once and counted
    assert [c.samples for c in check_shards([f"{url}/00003.tar"], 20)] == [20]
    # A shard whose downloads all failed: an empty archive, valid, 0 samples (local and remote alike).
    empty = sh.ShardWriter(tmp_path, 4)
    empty.close()
    storage.copy_dir(tmp_path, f"{url}/empty")
    assert [c.samples for c in check_shards([str(sh.tar_path(tmp_path, 4)), f"{url}/empty/00004.tar"], 0)] == [0, 0]


def test_clipscore_checkpoint_from_a_bucket(s3_raw, s3, tmp_path, ray_local, mlflow_store):
    """clean's CLIP-score step loads an open_clip export that lives in the bucket (no local copy given)."""
    import open_clip
    import torch

    from vlm.models.clip.build import export_clip, model_config

    torch.manual_seed(0)
    mcfg = model_config("vlm-clip-tiny")
    export_clip(open_clip.CLIP(**mcfg).state_dict(), mcfg, tmp_path / "clip", "vlm-clip-tiny")
    bucket = s3_raw.rsplit("/", 1)[0]
    storage.copy_dir(tmp_path / "clip", f"{bucket}/models/clip")
    overrides = [
        "steps=[clipscore]",
        f"clipscore.checkpoint={bucket}/models/clip",
        "clipscore.threshold=-1.0",
        "clipscore.num_cpus=0.5",
    ]
    manifest = clean(s3_raw, f"{bucket}/scored", load_config(CleanConfig, None, overrides), show_progress=False)
    assert manifest["totals"]["step_stats"]["clipscore"]["seen"] == 60 and manifest["totals"]["kept"] == 60
    rows = [r for s in range(3) for r in sh.read_parquet(sh.parquet_path(f"{bucket}/scored", s)).to_pylist()]
    assert len(rows) == 60
