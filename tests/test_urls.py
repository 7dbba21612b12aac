"""URL list readers: every format, streaming in batches, column checks."""

from __future__ import annotations

import pytest

from vlm.data.urls import InputConfig, check_inputs, expand_inputs, iter_rows
from vlm.errors import InputError
from vlm.testbed.url_lists import write_url_list

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


def _bad_byte_file(path, sep: str):
    """Five rows; the third has a 0xff byte in its caption and starts on line 5 (row 2 spans two lines)."""
    rows = [
        b"http://a/1.jpg" + sep + b"one",
        b"http://a/2.jpg" + sep + b'"two\nlines"',
        b"http://a/3.jpg" + sep + b"bad \xff byte",
        b"http://a/4.jpg" + sep + b"four",
        b"http://a/5.jpg" + sep + b"caf\xc3\xa9",
    ]
    path.write_bytes(b"url" + sep + b"caption\n" + b"\n".join(rows) + b"\n")
    return path


@pytest.mark.parametrize("suffix,sep", [("csv", b","), ("tsv", b"\t")])
def test_row_with_a_bad_byte_is_skipped_and_reported(tmp_path, caplog, suffix, sep):
    """A row that is not UTF-8 is skipped, counted and named by line; the other rows read as before."""
    path = _bad_byte_file(tmp_path / f"u.{suffix}", sep)
    reader = iter_rows([path], InputConfig(max_bad_row_fraction=0.25))
    with caplog.at_level("WARNING", logger="vlm.data.urls"):
        rows = [r for batch in reader for r in batch]
    assert [r["caption"] for r in rows] == ["one", "two\nlines", "four", "café"]
    assert reader.skipped_rows == 1 and reader.skipped_lines == [(path, 5)]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{path}: skipped 1 of 5 rows not valid UTF-8 (line 5)"]


def test_headerless_tsv_bad_row_lines_count_from_one(tmp_path):
    """Without a header line (input.column_names) the first row is line 1."""
    path = tmp_path / "cc3m.tsv"
    path.write_bytes(
        b"ok\thttp://a/1.jpg\nbad \xfe\thttp://a/2.jpg\n" + b"".join(b"c\thttp://a/%d.jpg\n" % i for i in range(3, 9))
    )
    reader = iter_rows([path], InputConfig(column_names=["caption", "url"], max_bad_row_fraction=0.2))
    assert len([r for batch in reader for r in batch]) == 7 and reader.skipped_lines == [(path, 2)]


def test_too_many_bad_rows_is_a_one_line_error(tmp_path):
    """Past input.max_bad_row_fraction the file is refused with one line naming it, the count and the line."""
    path = _bad_byte_file(tmp_path / "u.csv", b",")
    with pytest.raises(InputError) as err:
        list(iter_rows([path], InputConfig()))  # default 0.01: 1 bad row of 5 is too many
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        f"{path}: 1 of 5 rows not valid UTF-8 (line 5), more than input.max_bad_row_fraction=0.01"
    )


def test_jsonl_line_with_a_bad_byte_is_skipped(tmp_path):
    """A JSON line that is not UTF-8 is skipped by line number, not a traceback."""
    path = tmp_path / "u.jsonl"
    good = b"".join(b'{"url": "http://a/%d.jpg", "caption": "c"}\n' % i for i in range(3))
    path.write_bytes(good + b'{"url": "http://a/x.jpg", "caption": "\xff"}\n')
    reader = iter_rows([path], InputConfig(max_bad_row_fraction=0.5))
    assert len([r for batch in reader for r in batch]) == 3 and reader.skipped_lines == [(path, 4)]


def test_long_captions_are_cut_and_flagged(tmp_path):
    """A caption over input.max_caption_chars is cut there and flagged; null keeps it whole."""
    path = write_url_list(
        [{"url": "http://a/1.jpg", "caption": "x" * 10_000}, {"url": "http://a/2.jpg", "caption": "short"}],
        tmp_path / "u.csv",
    )
    reader = iter_rows([path], InputConfig(max_caption_chars=100))
    rows = [r for batch in reader for r in batch]
    assert [len(r["caption"]) for r in rows] == [100, 5] and reader.truncated_captions == 1
    assert [r["extra"]["caption_truncated"] for r in rows] == [True, False]
    whole = [r for batch in iter_rows([path], InputConfig(max_caption_chars=None)) for r in batch]
    assert len(whole[0]["caption"]) == 10_000 and not whole[0]["extra"]["caption_truncated"]
