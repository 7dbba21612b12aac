"""URL list readers: every format, streaming in batches, column checks."""

from __future__ import annotations

import pytest

from vlm.data.localweb import write_url_list
from vlm.data.urls import InputConfig, check_inputs, expand_inputs, iter_rows
from vlm.errors import InputError

ROWS = [{"url": f"http://example.com/{i}.jpg", "caption": f"caption {i}", "label": i} for i in range(7)]


@pytest.mark.parametrize("suffix", ["parquet", "csv", "tsv", "jsonl"])
def test_each_format_reads_in_order(tmp_path, suffix):
    """Each format yields url, caption and the other columns as extras, in input order."""
    path = write_url_list(ROWS, tmp_path / f"urls.{suffix}")
    rows = [r for batch in iter_rows([path], InputConfig(batch_rows=3)) for r in batch]
    assert [r["url"] for r in rows] == [r["url"] for r in ROWS]
    assert [r["caption"] for r in rows] == [r["caption"] for r in ROWS]
    assert str(rows[4]["extra"]["label"]) == "4"


def test_streams_in_batches(tmp_path):
    """Reading is batched (the driver never holds a whole input)."""
    path = write_url_list(ROWS, tmp_path / "urls.jsonl")
    sizes = [len(b) for b in iter_rows([path], InputConfig(batch_rows=3))]
    assert sizes == [3, 3, 1]


def test_txt_and_headerless_tsv(tmp_path):
    """Plain url lists have no caption; CC3M-style headerless TSV takes column names from config."""
    txt = tmp_path / "urls.txt"
    txt.write_text("http://a/1.jpg\n\nhttp://a/2.jpg\n")
    rows = [r for b in iter_rows([txt], InputConfig(caption_col=None)) for r in b]
    assert [(r["url"], r["caption"]) for r in rows] == [("http://a/1.jpg", None), ("http://a/2.jpg", None)]
    tsv = tmp_path / "cc3m.tsv"
    tsv.write_text("a dog, running\thttp://a/3.jpg\na cat\thttp://a/4.jpg\n")
    cfg = InputConfig(column_names=["caption", "url"])
    rows = [r for b in iter_rows([tsv], cfg) for r in b]
    assert [(r["url"], r["caption"]) for r in rows] == [
        ("http://a/3.jpg", "a dog, running"),
        ("http://a/4.jpg", "a cat"),
    ]


def test_globs_and_directories(tmp_path):
    """Globs and directories expand to sorted files; a glob matching nothing is an error."""
    for i in range(3):
        write_url_list(ROWS, tmp_path / f"part-{i}.parquet")
    assert [p.name for p in expand_inputs(str(tmp_path / "part-*.parquet"))] == [f"part-{i}.parquet" for i in range(3)]
    assert len(expand_inputs(str(tmp_path))) == 3
    with pytest.raises(InputError, match="no input files match"):
        expand_inputs(str(tmp_path / "*.csv"))
    with pytest.raises(InputError, match="input file not found"):
        expand_inputs(str(tmp_path / "missing.parquet"))


def test_missing_columns_are_named(tmp_path):
    """A missing url or caption column is named along with the columns present."""
    path = write_url_list([{"link": "http://a", "text": "x"}], tmp_path / "u.csv")
    with pytest.raises(InputError, match=r"no url column 'url' \(columns: link, text\)"):
        check_inputs([path], InputConfig())
    with pytest.raises(InputError, match="no caption column 'caption'"):
        check_inputs([path], InputConfig(url_col="link"))
    check_inputs([path], InputConfig(url_col="link", caption_col="text"))


def test_bad_jsonl_line_is_located(tmp_path):
    """A malformed JSON line is reported with its file and line number."""
    path = tmp_path / "u.jsonl"
    path.write_text('{"url": "http://a", "caption": "x"}\n{not json}\n')
    with pytest.raises(InputError, match=r"u.jsonl:2: invalid JSON"):
        list(iter_rows([path], InputConfig()))
