"""Bad trainer input ends in one line naming it, in seconds, before Ray starts; a corrupt sample is skipped."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipelines.train_clip import TrainClipConfig, train_clip
from vlm.config import load_config
from vlm.data.shard_check import check_shards, count_shard
from vlm.data.skips import decode_rows
from vlm.errors import InputError
from vlm.testbed.digit_shards import write_digit_shards

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "scaling.num_workers=1",
    "scaling.cpus_per_worker=1",
    "deepspeed.zero_stage=0",
    "train.global_batch_size=16",
    "train.max_steps=4",
    "train.log_every=2",
    "eval.digits=false",
]


def cfg_for(*overrides: str) -> TrainClipConfig:
    return load_config(TrainClipConfig, None, [*TINY, *overrides])


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """One clean shard of 64 digit samples."""
    out = tmp_path_factory.mktemp("good")
    write_digit_shards(out, 64, samples_per_shard=64, image_size=32)
    return out / "00000.tar"


def _members(tar_path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _one_line(exc: pytest.ExceptionInfo, *needles: str) -> None:
    text = str(exc.value)
    assert "\n" not in text and all(n in text for n in needles), text


def test_truncated_shard_fails_naming_it(tmp_path, good):
    """A copy cut inside a member, or at a member boundary: 'truncated', the shard named, nothing written."""
    data = good.read_bytes()
    cut = tmp_path / "cut" / "00000.tar"
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as err:
        train_clip(str(cut.parent), tmp_path / "run", cfg_for())
    _one_line(err, "truncated", str(cut))
    assert not (tmp_path / "run").exists()
    boundary = _members(good)[:6]
    whole = _write_tar(tmp_path / "b" / "00000.tar", boundary).read_bytes()
    end = 512 * sum(1 + -(-len(d) // 512) for _, d in boundary)  # headers + padded data, no end block
    cut.write_bytes(whole[:end])
    with pytest.raises(InputError) as err:
        count_shard(str(cut))
    _one_line(err, "truncated", "end-of-archive", str(cut))


def test_tar_of_random_files_and_random_bytes_fail_naming_the_shard(tmp_path):
    """A tar of other files holds no samples; random bytes named .tar are no tar: one line each."""
    rnd = _write_tar(tmp_path / "r" / "00000.tar", [("notes", os.urandom(700)), ("a.bin", os.urandom(900))])
    with pytest.raises(InputError) as err:
        train_clip(str(rnd.parent), tmp_path / "run", cfg_for())
    _one_line(err, "holds no WebDataset samples", str(rnd))
    junk = tmp_path / "j" / "00000.tar"
    junk.parent.mkdir()
    junk.write_bytes(os.urandom(5000))
    with pytest.raises(InputError) as err:
        train_clip(str(junk.parent), tmp_path / "run", cfg_for())
    _one_line(err, "not a readable tar archive", str(junk))
    assert not (tmp_path / "run").exists()


def test_fewer_samples_than_one_global_batch_fail(tmp_path, good):
    """64 samples cannot fill a global batch of 128: one line with the count and the shard."""
    with pytest.raises(InputError) as err:
        train_clip(str(good), tmp_path / "run", cfg_for("train.global_batch_size=128"))
    _one_line(err, str(good), "64 samples", "fewer than one global batch", "128")
    assert [c.samples for c in check_shards([str(good)], 64)] == [64]


def test_output_that_is_a_file_or_unwritable_fails_before_ray(tmp_path, good):
    """--output naming a file, a path under a file, or a read-only place: one line naming it."""
    file = tmp_path / "taken"
    file.write_text("x")
    with pytest.raises(InputError) as err:
        train_clip(str(good), file, cfg_for())
    _one_line(err, str(file), "is a file")
    with pytest.raises(InputError) as err:
        train_clip(str(good), file / "run", cfg_for())
    _one_line(err, str(file), "is a file")
    with pytest.raises(InputError) as err:  # sysfs refuses new entries even to root
        train_clip(str(good), "/sys/vlm-run", cfg_for())
    _one_line(err, "/sys", "not writable")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "-q", "train", "clip", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, RAY_ADDRESS=""),
        cwd=ROOT,
    )


def test_cli_bad_shard_and_output_file_exit_2_with_one_line(tmp_path, good):
    """`vlm train clip` on a truncated shard, and with --output an existing file: exit 2, one stderr line."""
    cut = tmp_path / "cut" / "00000.tar"
    cut.parent.mkdir()
    cut.write_bytes(good.read_bytes()[:5000])
    (tmp_path / "file").write_text("x")
    for args, needle in (
        (["--data", str(cut.parent), "--output", str(tmp_path / "run")], "truncated"),
        (["--data", str(good), "--output", str(tmp_path / "file")], "is a file"),
    ):
        res = _cli(*args)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, res.stderr)
    assert not (tmp_path / "run").exists()


def test_decode_rows_leaves_out_undecodable_rows(good):
    """A row whose image does not decode, or that has none, is left out; the rest keep their order."""
    from vlm.data.clip_data import load_rgb

    jpg = next(data for name, data in _members(good) if name.endswith(".jpg"))
    batch = {"__key__": ["a", "b", "c"], "jpg": [jpg, b"not an image", None], "txt": [b"one", b"two", b"three"]}
    rows = decode_rows(batch, lambda data, txt, meta: (load_rgb(data, 16, False, None).size, txt))
    assert rows == [((16, 16), "one")]


def _with_corrupt_images(good: Path, path: Path, n: int) -> Path:
    members = _members(good)
    jpgs = [name for name, _ in members if name.endswith(".jpg")][:n]
    return _write_tar(path, [(name, b"\xff\xd8 not a jpeg" if name in jpgs else data) for name, data in members])


@pytest.mark.slow
def test_corrupt_image_is_skipped_counted_and_over_the_limit_stops(tmp_path, good, ray_local, mlflow_store):
    """One undecodable image among 128 trains and reports samples_skipped == 1 (MLflow too); six stop the
    run with one line naming a shard and key, without Ray Train retrying the workers."""
    import mlflow

    data = tmp_path / "data"
    _write_tar(data / "00000.tar", _members(good))
    _with_corrupt_images(good, data / "00001.tar", 1)
    result = train_clip(str(data), tmp_path / "run", cfg_for())
    assert result["steps"] == 4 and result["samples_skipped"] == 1
    history = mlflow.MlflowClient(mlflow_store).get_metric_history(result["mlflow_run_id"], "samples_skipped")
    assert history and max(m.value for m in history) == 1

    _with_corrupt_images(good, data / "00001.tar", 6)  # 6 of 128 > 1% (train.max_skipped_fraction)
    with pytest.raises(InputError) as err:  # 12 steps: the second epoch has met every sample by step 8
        train_clip(str(data), tmp_path / "run2", cfg_for("train.max_steps=12", "train.max_failures=2"))
    _one_line(err, "6 of 128 samples could not be decoded", str(data / "00001.tar"))
    assert not (tmp_path / "run2" / "export").exists()
