"""vlm.storage against the real local S3 server (moto, its own process) and the local disk: the same calls."""

from __future__ import annotations

import pytest

from vlm import storage
from vlm.errors import InputError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3").bucket() + "/out"


def test_write_read_list_delete_the_same_on_disk_and_s3(root):
    storage.makedirs(root)
    assert storage.listdir(root) == []
    storage.write_json(storage.join(root, "a.json"), {"x": 1})
    storage.write_bytes(storage.join(root, "sub", "b.bin") if storage.is_url(root) else _mk(root), b"\x00\x01")
    assert storage.read_json(storage.join(root, "a.json")) == {"x": 1}
    assert storage.listdir(root) == ["a.json", "sub"]
    assert storage.glob(root, "*.json") == [storage.join(root, "a.json")]
    assert storage.is_file(storage.join(root, "a.json")) and storage.is_dir(storage.join(root, "sub"))
    assert storage.size(storage.join(root, "sub", "b.bin")) == 2
    with storage.open_input(storage.join(root, "sub", "b.bin")) as f:
        f.seek(1)
        assert f.read() == b"\x01"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "missing"))
    storage.delete(storage.join(root, "a.json"))
    storage.delete(storage.join(root, "a.json"))  # twice: nothing
    assert not storage.exists(storage.join(root, "a.json"))
    with storage.local_dir(root) as local:
        assert (local / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    storage.rmtree(root)
    assert not storage.exists(storage.join(root, "sub", "b.bin"))


def _mk(root: str) -> str:
    storage.makedirs(storage.join(root, "sub"))
    return storage.join(root, "sub", "b.bin")


def test_paths_join_and_normalize():
    assert storage.join("s3://b/x/", "y", "z.tar") == "s3://b/x/y/z.tar"
    assert storage.normalize("S3://b/x/") == "s3://b/x"
    assert storage.basename("s3://b/x/y/") == "y" and storage.parent("s3://b/x/y") == "s3://b/x"
    assert not storage.is_url("/tmp/x") and not storage.is_url("file:///tmp/x") and storage.is_url("gs://b/x")


def test_upload_and_expand_globs(s3, tmp_path):
    url = s3.bucket()
    for name in ("part-0.parquet", "part-1.parquet", "other.csv"):
        (tmp_path / name).write_bytes(b"x")
        storage.upload_file(tmp_path / name, f"{url}/laion/{name}")
    parts = [f"{url}/laion/part-0.parquet", f"{url}/laion/part-1.parquet"]
    assert storage.expand(f"{url}/laion/part-*.parquet") == parts
    assert storage.expand(f"{url}/laion/other.csv") == [f"{url}/laion/other.csv"]
    assert storage.expand(f"{url}/laion/none-*.csv") == []


def test_bad_buckets_and_endpoints_are_one_line(s3, monkeypatch):
    with pytest.raises(InputError, match=r"s3://no-such-bucket-x/out: bucket no-such-bucket-x does not exist"):
        storage.check_writable("s3://no-such-bucket-x/out")
    assert storage.check_writable(s3.bucket() + "/out/")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(InputError, match=r"cannot reach the storage endpoint http://127.0.0.1:9") as err:
        storage.check_writable("s3://any-bucket/out")
    assert "\n" not in str(err.value)


def test_denied_credentials_are_one_line(tmp_path, monkeypatch):
    """A second moto server that checks IAM credentials: unknown keys are one line naming the URL."""
    import os

    from vlm.testbed.s3 import free_port, start_moto

    port = free_port()
    proc = start_moto(port, env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0"))  # moto: authenticate all
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAREALKEY00000")
        with pytest.raises(InputError) as err:
            storage.check_writable("s3://some-bucket/out")
        assert str(err.value).startswith("s3://some-bucket/out: ") and "\n" not in str(err.value)
        assert "access denied" in str(err.value) or "credentials rejected" in str(err.value), err.value
    finally:
        proc.terminate()
        proc.wait(timeout=30)
