"""Ingest's duplicate URLs as a Ray job (issue 18): the decisions of a driver-side set walk,
across shards and within them, made on the shared local Ray; a rerun reuses the plan."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines import ingest as ing
from pipelines.ingest import IngestConfig, cut_inputs, ingest
from vlm.config import load_config
from vlm.data import shards as sh
from vlm.testbed.url_lists import make_url_rows, write_url_list

pytestmark = pytest.mark.slow

FAST = ["download.allow_private_networks=true", "download.timeout_s=1", "download.retries=1", "image.image_size=64"]


def _cfg(per_shard: int) -> IngestConfig:
    return load_config(IngestConfig, None, [*FAST, f"output.samples_per_shard={per_shard}"])


def _plan_rows(plan_dir: Path) -> list[dict]:
    """Every shard input row in key order (what the shard tasks will read)."""
    rows = []
    for path in sorted((plan_dir / ing.INPUTS_DIR).glob("*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return rows


def _walk(urls: list[str]) -> list[bool]:
    """The old driver-side decision: a URL seen earlier in input order is a duplicate."""
    seen, dup = set(), []
    for url in urls:
        dup.append(bool(url) and url in seen)
        seen.add(url)
    return dup


def _urls_with_duplicates(n: int, distinct: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    urls = [f"http://example.invalid/{rng.randrange(distinct)}.jpg" for _ in range(n)]
    for i in rng.sample(range(n), n // 50):
        urls[i] = ""  # no URL: never a duplicate, however many there are
    return urls


@pytest.fixture
def many_tasks(monkeypatch):
    """Small inputs split over several read, map and reduce tasks, as a large one would be."""
    monkeypatch.setattr(ing, "_MIN_ROWS_PER_TASK", 300)


def test_plan_marks_what_a_set_walk_marks(tmp_path, ray_local, many_tasks):
    """3,000 rows over 12 shards and 4 partitions: the same rows marked as one set walk marks."""
    urls = _urls_with_duplicates(3000, 1800, seed=3)
    src = write_url_list([{"url": u, "caption": f"c{i}"} for i, u in enumerate(urls)], tmp_path / "urls.parquet")
    plan = cut_inputs(tmp_path / "plan", [src], _cfg(250))
    rows = _plan_rows(tmp_path / "plan")
    expected = _walk(urls)
    assert [r["url"] for r in rows] == urls  # keys and rows in input order
    assert [r["key"] for r in rows] == [sh.sample_key(i // 250, i % 250) for i in range(3000)]
    got = [r["status"] == "skipped_duplicate" for r in rows]
    assert got == expected
    assert plan["duplicates"] == sum(expected) > 500 and len(plan["shards"]) == 12
    assert all(r["error_message"] == "duplicate url in input" for r, d in zip(rows, got) if d)
    assert all(r["status"] is None and r["error_message"] is None for r, d in zip(rows, got) if not d)


def test_first_occurrence_kept_across_and_within_shards(tmp_path, ray_local, many_tasks):
    """A URL repeated in its own shard and in later shards keeps only its first row; only the
    shard inputs holding a duplicate are rewritten."""
    urls = [f"http://example.invalid/{i}.jpg" for i in range(12)]
    urls[2] = urls[1]  # within shard 0
    urls[7] = urls[0]  # shard 1 repeats shard 0
    urls[11] = urls[0]  # and shard 2 again
    src = write_url_list([{"url": u, "caption": "x"} for u in urls], tmp_path / "urls.parquet")
    plan_dir = tmp_path / "plan"
    cut_inputs(plan_dir, [src], _cfg(4))
    rows = _plan_rows(plan_dir)
    assert [r["key"] for r in rows if r["status"] == "skipped_duplicate"] == [
        sh.sample_key(0, 2),
        sh.sample_key(1, 3),
        sh.sample_key(2, 3),
    ]
    assert rows[0]["status"] is None and rows[1]["status"] is None  # the first occurrences


def test_shard_input_carries_digest_not_shard_tasks(tmp_path, ray_local):
    """The plan stores each URL's digest (null without a URL); shard tasks read the row without it."""
    src = write_url_list(
        [{"url": "http://a.invalid/x.jpg", "caption": "a"}, {"url": "", "caption": "b"}], tmp_path / "u.parquet"
    )
    out = tmp_path / "out"
    cut_inputs(out / "_plan", [src], _cfg(10))
    table = pq.read_table(out / "_plan" / ing.INPUTS_DIR / f"{sh.shard_name(0)}.parquet")
    assert table.column(ing.DIGEST).to_pylist() == [ing._url_digest("http://a.invalid/x.jpg"), None]
    assert ing.DIGEST not in ing.read_shard_input(out, 0)[0]


def test_rerun_reuses_the_plan(tmp_path, web, ray_local, mlflow_store):
    """A rerun makes no new plan (the shard inputs stay as written) and ends with the same counts."""
    rows = make_url_rows(web.base_url, 12, seed=5, failures=False, duplicates=4)
    src = write_url_list(rows, tmp_path / "urls.parquet")
    out = tmp_path / "out"
    first = ingest(str(src), out, _cfg(5), show_progress=False)
    inputs = sorted((out / "_plan" / ing.INPUTS_DIR).glob("*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in inputs]
    again = ingest(str(src), out, _cfg(5), show_progress=False)
    assert first["run"]["planned"] and not again["run"]["planned"]
    assert [p.stat().st_mtime_ns for p in inputs] == stamps
    assert (
        first["totals"]["status_counts"]["skipped_duplicate"]
        == 4
        == again["totals"]["status_counts"]["skipped_duplicate"]
    )
