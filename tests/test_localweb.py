"""The local web of digit images: every route against a real server on 127.0.0.1, the URL
list writer, and the digits it serves."""

from __future__ import annotations

import asyncio
import csv
import http.client
import io
import json
import random
import struct
import time
import urllib.error
import urllib.request

import aiohttp
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from vlm.testbed import digits
from vlm.testbed.media import FAILURE_KINDS, OVERSIZED_BYTES, VARIANTS
from vlm.testbed.url_lists import make_url_rows, write_url_list
from vlm.testbed.web import LocalWeb

TIMEOUT = 10


@pytest.fixture(scope="module")
def web():
    with LocalWeb(slow_delay_s=5.0) as server:
        yield server


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_no_redirect = urllib.request.build_opener(_NoRedirect)


def fetch(url: str, *, follow: bool = True, timeout: float = TIMEOUT) -> tuple[int, dict, bytes, list]:
    """GET -> (status, headers, body, headers as a list of pairs); HTTP errors are returned, not raised."""
    opener = urllib.request.build_opener() if follow else _no_redirect
    try:
        with opener.open(url, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read(), resp.headers.items()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read(), err.headers.items()


def open_image(body: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(body))
    img.load()
    return img


# ---------------------------------------------------------------- image route


@pytest.mark.parametrize(
    "ext,fmt,ctype",
    [
        ("jpg", "JPEG", "image/jpeg"),
        ("png", "PNG", "image/png"),
        ("webp", "WEBP", "image/webp"),
        ("gif", "GIF", "image/gif"),
    ],
)
def test_image_formats_and_sizes(web, ext, fmt, ctype):
    """/img/{idx}.{ext}?w=&h= decodes as the requested format at the requested size."""
    status, headers, body, _ = fetch(f"{web.base_url}/img/12.{ext}?w=320&h=200")
    assert status == 200
    assert headers["Content-Type"] == ctype
    img = open_image(body)
    assert img.format == fmt
    assert img.size == (320, 200)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_image_variants(web, variant):
    """Each variant decodes with its awkward mode / encoding at the right (displayed) size."""
    ext = VARIANTS[variant] or "png"
    status, headers, body, _ = fetch(f"{web.base_url}/img/7.{ext}?w=300&h=200&v={variant}")
    assert status == 200
    img = open_image(body)
    if variant == "cmyk":
        assert (img.format, img.mode, img.size) == ("JPEG", "CMYK", (300, 200))
    elif variant == "exif6":
        assert img.format == "JPEG" and img.size == (200, 300)  # stored rotated
        assert img.getexif().get(0x0112) == 6
        assert ImageOps.exif_transpose(img).size == (300, 200)
    elif variant == "progressive":
        assert img.format == "JPEG" and img.size == (300, 200)
        assert img.info.get("progressive") or img.info.get("progression")
    elif variant == "gray":
        assert (img.format, img.mode, img.size) == ("PNG", "L", (300, 200))
    elif variant == "palette":
        assert (img.format, img.mode, img.size) == ("PNG", "P", (300, 200))
        assert "transparency" in img.info
    elif variant == "rgba":
        assert (img.format, img.mode, img.size) == ("PNG", "RGBA", (300, 200))
        alpha = np.asarray(img.getchannel("A"))
        assert alpha.min() < 255 and alpha.max() == 255
    elif variant == "png16":
        assert img.format == "PNG" and img.size == (300, 200)
        assert img.mode in ("I;16", "I")
        assert np.asarray(img).max() > 255
    assert headers["Content-Type"] == ("image/jpeg" if ext == "jpg" else "image/png")


def test_image_shows_dark_digit_on_light_paper(web):
    """A served image is light paper with a dark glyph in the middle."""
    _, _, body, _ = fetch(f"{web.base_url}/img/0.jpg?w=256&h=256")
    gray = np.asarray(open_image(body).convert("L"), dtype=np.float32)
    assert np.median(gray) > 180
    assert gray[64:192, 64:192].min() < 90


def test_image_bytes_deterministic_and_seeded(web):
    """The same URL returns the same bytes; a different s= renders a different image."""
    url = f"{web.base_url}/img/30.png?w=128&h=96&s=3"
    assert fetch(url)[2] == fetch(url)[2]
    assert fetch(url)[2] != fetch(url.replace("s=3", "s=4"))[2]


def test_image_bad_requests(web):
    """Unknown digits are 404, bad variants and sizes are 400."""
    assert fetch(f"{web.base_url}/img/999999.jpg")[0] == 404
    assert fetch(f"{web.base_url}/img/1.jpg?v=sepia")[0] == 400
    assert fetch(f"{web.base_url}/img/1.jpg?w=0")[0] == 400
    assert fetch(f"{web.base_url}/img/1.bmp")[0] == 404


# ---------------------------------------------------------------- failure routes


@pytest.mark.parametrize("code", [403, 404, 410, 500, 502])
def test_status_codes(web, code):
    """/status/{code} answers with that code and a small body."""
    status, _, body, _ = fetch(f"{web.base_url}/status/{code}")
    assert status == code
    assert str(code).encode() in body


def test_flaky_then_ok(web):
    """/flaky/2/ is 503 twice for that exact URL, then the image; hits() counts every try."""
    url = f"{web.base_url}/flaky/2/5.jpg?w=64&h=64"
    before = web.hits("/flaky/2/5.jpg")
    assert fetch(url)[0] == 503
    assert fetch(url)[0] == 503
    status, _, body, _ = fetch(url)
    assert status == 200 and open_image(body).size == (64, 64)
    assert web.hits("/flaky/2/5.jpg") - before == 3
    assert fetch(url.replace("w=64", "w=65"))[0] == 503  # counters are per URL


def test_ratelimit_retry_after(web):
    """/ratelimit/1/ is 429 with Retry-After from ?after=, then the image."""
    url = f"{web.base_url}/ratelimit/1/6.jpg?after=2"
    status, headers, _, _ = fetch(url)
    assert status == 429 and headers["Retry-After"] == "2"
    status, headers, body, _ = fetch(url)
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    open_image(body)
    status, headers, _, _ = fetch(f"{web.base_url}/ratelimit/1/7.jpg")
    assert status == 429 and headers["Retry-After"] == "1"


def test_redirect_chain(web):
    """/redirect/3/ is a chain of three 302s that ends at the image."""
    status, headers, _, _ = fetch(f"{web.base_url}/redirect/3/8.jpg?w=90&h=60", follow=False)
    assert status == 302 and headers["Location"] == "/redirect/2/8.jpg?w=90&h=60"
    before = web.hits("/redirect/")
    status, _, body, _ = fetch(f"{web.base_url}/redirect/3/8.jpg?w=90&h=60")
    assert status == 200 and open_image(body).size == (90, 60)
    assert web.hits("/redirect/") - before == 4


def test_redirect_loop(web):
    """/loop/a/ and /loop/b/ redirect to each other forever."""
    status, headers, _, _ = fetch(f"{web.base_url}/loop/a/9", follow=False)
    assert status == 302 and headers["Location"] == "/loop/b/9"
    status, headers, _, _ = fetch(f"{web.base_url}/loop/b/9", follow=False)
    assert status == 302 and headers["Location"] == "/loop/a/9"
    status, _, _, _ = fetch(f"{web.base_url}/loop/a/9")  # urllib gives up on the loop
    assert status == 302


def test_reset_connection(web):
    """/reset/ drops the connection without any response."""
    with pytest.raises((OSError, http.client.HTTPException)):
        fetch(f"{web.base_url}/reset/1.jpg")


def test_slow_times_out(web):
    """/slow/ does not answer within a short client timeout."""
    start = time.monotonic()
    with pytest.raises((TimeoutError, OSError)):
        fetch(f"{web.base_url}/slow/2.jpg", timeout=0.3)
    assert time.monotonic() - start < 3


def test_wrongtype_is_html(web):
    """/wrongtype/ serves an HTML page as text/html."""
    status, headers, body, _ = fetch(f"{web.base_url}/wrongtype/3.jpg")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert body.lstrip().lower().startswith(b"<!doctype html")


def test_truncated_jpeg(web):
    """/truncated/ is half a JPEG with a matching Content-Length; decoding it fails."""
    full = fetch(f"{web.base_url}/img/4.jpg")[2]
    status, headers, body, _ = fetch(f"{web.base_url}/truncated/4.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert int(headers["Content-Length"]) == len(body) == len(full) // 2
    assert body == full[: len(body)]
    with pytest.raises(OSError):
        open_image(body)


def test_corrupt_jpeg(web):
    """/corrupt/ starts like a JPEG but cannot be decoded."""
    status, headers, body, _ = fetch(f"{web.base_url}/corrupt/4.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert body[:2] == b"\xff\xd8" and len(body) > 1000
    with pytest.raises(OSError):
        open_image(body)


def test_empty_body(web):
    """/empty/ is a 200 image/jpeg with zero bytes."""
    status, headers, body, _ = fetch(f"{web.base_url}/empty/4.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert body == b""


def test_oversized_streams_40mb(web):
    """/oversized/ declares 40 MB, starts with a valid JPEG, and tolerates the client hanging up."""
    with urllib.request.urlopen(f"{web.base_url}/oversized/4.jpg", timeout=TIMEOUT) as resp:
        assert int(resp.headers["Content-Length"]) == OVERSIZED_BYTES
        head = resp.read(1 << 20)
    assert open_image(head).format == "JPEG"
    assert fetch(f"{web.base_url}/img/4.jpg")[0] == 200  # server still fine


def test_bomb_png(web):
    """/bomb/ is a small PNG whose header declares 30000x30000 pixels."""
    status, headers, body, _ = fetch(f"{web.base_url}/bomb/1.png")
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert len(body) < 1_000_000
    assert body[:8] == b"\x89PNG\r\n\x1a\n" and body[12:16] == b"IHDR"
    assert struct.unpack(">II", body[16:24]) == (30000, 30000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(body))


@pytest.mark.parametrize(
    "kind,values",
    [
        ("noai", ["noai"]),
        ("noimageai", ["noimageai, noindex"]),
        ("noindex", ["noindex"]),
        ("scoped", ["vlmbot: noai"]),
        ("otherbot", ["otherbot: noai"]),
        ("multi", ["nofollow", "noimageindex"]),
    ],
)
def test_optout_headers(web, kind, values):
    """/optout/{kind}/ serves the image with the matching X-Robots-Tag header(s)."""
    status, _, body, items = fetch(f"{web.base_url}/optout/{kind}/2.jpg")
    assert status == 200
    open_image(body)
    assert [v for k, v in items if k.lower() == "x-robots-tag"] == values


def test_aiohttp_client_sees_failures(web):
    """An aiohttp client gets a disconnect from /reset/ and can stop reading /oversized/ early."""

    async def go():
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"{web.base_url}/reset/3.jpg") as resp:
                    await resp.read()
            async with session.get(f"{web.base_url}/oversized/3.jpg") as resp:
                chunk = await resp.content.read(100_000)
                assert resp.content_length == OVERSIZED_BYTES and chunk[:2] == b"\xff\xd8"
            async with session.get(f"{web.base_url}/optout/multi/3.jpg") as resp:
                assert resp.headers.getall("X-Robots-Tag") == ["nofollow", "noimageindex"]

    asyncio.run(go())


def test_hits_counts_by_prefix():
    """hits() counts requests per path prefix, ignoring query strings; stop() is idempotent."""
    with LocalWeb() as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        fetch(f"{server.base_url}/img/1.jpg?w=10&h=10")
        fetch(f"{server.base_url}/img/2.jpg?w=10&h=10")
        fetch(f"{server.base_url}/status/404")
        assert server.hits() == 3
        assert server.hits("/img/") == 2
        assert server.hits("/img/1.jpg") == 1
        assert server.hits("/nothing") == 0
    server.stop()


# ---------------------------------------------------------------- URL lists


def test_url_rows_match_server_behaviour(web):
    """Every row's URL hits a route that behaves as its kind says on the first request."""
    rows = make_url_rows(web.base_url, 60, seed=3, sizes=((64, 48), (40, 80)), formats=("jpg", "png", "webp"))
    first_status = {"404": 404, "500": 500, "403": 403, "flaky": 503, "ratelimit": 429, "redirect": 302, "loop": 302}
    for row in rows:
        kind, url = row["kind"], row["url"]
        if kind == "slow":
            continue  # covered by test_slow_times_out
        if kind == "reset":
            with pytest.raises((OSError, http.client.HTTPException)):
                fetch(url)
            continue
        if kind == "oversized":
            with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
                assert int(resp.headers["Content-Length"]) == OVERSIZED_BYTES
            continue
        status, _, body, _ = fetch(url, follow=False)
        assert status == first_status.get(kind, 200), (kind, url)
        if row["expected_status"] == "success" and status == 200:
            img = open_image(body)
            assert img.size in ((64, 48), (40, 80), (48, 64), (80, 40)), (kind, url)


def test_make_url_rows_has_every_kind():
    """Default rows include every failure kind and variant with the documented expected status."""
    rows = make_url_rows("http://127.0.0.1:1", 300, seed=1, duplicates=5)
    assert len(rows) == 305
    kinds = {r["kind"] for r in rows}
    assert set(FAILURE_KINDS) <= kinds
    assert set(VARIANTS) <= kinds
    assert "ok" in kinds
    for row in rows:
        assert set(row) >= {"url", "caption", "label", "noisy", "expected_status", "kind"}
        if row["kind"] in FAILURE_KINDS:
            assert row["expected_status"] == FAILURE_KINDS[row["kind"]]
        elif row["kind"] == "duplicate":
            assert row["expected_status"] == "skipped_duplicate"
        else:
            assert row["expected_status"] == "success"
    expected = {
        "failed_to_download": {"404", "500", "403", "slow", "reset", "loop", "oversized", "wrongtype"},
        "failed_to_resize": {"truncated", "corrupt", "empty", "bomb"},
        "skipped_optout": {"optout_noai", "optout_noimageai", "optout_noindex", "optout_scoped", "optout_multi"},
    }
    for status, group in expected.items():
        assert {k for k, v in FAILURE_KINDS.items() if v == status} == group
    assert FAILURE_KINDS["optout_otherbot"] == FAILURE_KINDS["flaky"] == FAILURE_KINDS["redirect"] == "success"
    urls = [r["url"] for r in rows[:300]]
    assert len(set(urls)) == 300  # only the appended duplicates repeat
    assert all(r["url"] in set(urls) for r in rows[300:])


def test_make_url_rows_deterministic():
    """Same arguments give the same rows; another seed gives different ones."""
    a = make_url_rows("http://h:1", 120, seed=7, noisy_fraction=0.3, duplicates=3)
    b = make_url_rows("http://h:1", 120, seed=7, noisy_fraction=0.3, duplicates=3)
    c = make_url_rows("http://h:1", 120, seed=8, noisy_fraction=0.3, duplicates=3)
    assert a == b
    assert a != c


def test_make_url_rows_excludes_heldout_and_labels_match():
    """Default rows never use held-out digits, and each label is the served digit's label."""
    rows = make_url_rows("http://h:1", 2000, seed=0, failures=False)
    held = set(digits.heldout_indices().tolist())
    _, labels = digits.load_digit_images()
    assert all(r["index"] not in held for r in rows)
    assert all(r["label"] == int(labels[r["index"]]) for r in rows)
    assert len({r["index"] for r in rows}) == len(digits.train_indices())
    assert all(f"/{r['index']}." in r["url"] for r in rows)


def test_make_url_rows_noisy_and_failure_options():
    """noisy_fraction marks that share of ok rows; failures=False / a dict control failure rows."""
    rows = make_url_rows("http://h:1", 200, seed=2, noisy_fraction=0.25, failures=False, variants=False)
    assert {r["kind"] for r in rows} == {"ok"}
    assert sum(r["noisy"] for r in rows) == 50
    clean = [r for r in rows if not r["noisy"]]
    assert all(digits.DIGIT_NAMES[r["label"]] in r["caption"].lower() or str(r["label"]) in r["caption"] for r in clean)
    rows = make_url_rows("http://h:1", 50, seed=2, failures={"404": 3, "bomb": 2}, variants=False)
    kinds = [r["kind"] for r in rows]
    assert kinds.count("404") == 3 and kinds.count("bomb") == 2 and kinds.count("ok") == 45
    assert not any(r["noisy"] for r in rows if r["kind"] != "ok")
    with pytest.raises(ValueError):
        make_url_rows("http://h:1", 10, failures={"teapot": 1})


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".tsv", ".jsonl", ".txt"])
def test_write_url_list_roundtrip(tmp_path, suffix):
    """write_url_list writes each format so it reads back to the same rows (txt: urls only)."""
    rows = make_url_rows("http://127.0.0.1:9", 60, seed=4, noisy_fraction=0.2, duplicates=2)
    path = write_url_list(rows, tmp_path / "sub" / f"urls{suffix}")
    assert path.exists()
    if suffix == ".parquet":
        back = pq.read_table(path).to_pylist()
    elif suffix in (".csv", ".tsv"):
        with path.open(newline="") as fh:
            back = list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
        for r in back:
            r["label"], r["index"], r["noisy"] = int(r["label"]), int(r["index"]), r["noisy"] == "True"
    elif suffix == ".jsonl":
        back = [json.loads(line) for line in path.read_text().splitlines()]
    else:
        assert path.read_text().splitlines() == [r["url"] for r in rows]
        return
    assert back == rows


# ---------------------------------------------------------------- digits


def test_digit_split_and_images():
    """Digits load as uint8 0..255; held-out (i % 6 == 5) and train split all indices."""
    images, labels = digits.load_digit_images()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 255
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))
    held, train = digits.heldout_indices(), digits.train_indices()
    assert all(i % 6 == 5 for i in held) and 290 <= len(held) <= 310
    assert sorted(set(held) | set(train)) == list(range(1797)) and not set(held) & set(train)


def test_render_digit_deterministic():
    """render_digit gives an RGB image of the requested size, the same for the same seed."""
    a = digits.render_digit(11, 200, 120, seed=1)
    assert a.mode == "RGB" and a.size == (200, 120)
    assert np.array_equal(np.asarray(a), np.asarray(digits.render_digit(11, 200, 120, seed=1)))
    assert not np.array_equal(np.asarray(a), np.asarray(digits.render_digit(11, 200, 120, seed=2)))
    start = time.perf_counter()
    big = digits.render_digit(11, 1024, 1024)
    assert big.size == (1024, 1024) and time.perf_counter() - start < 0.5


def test_captions_name_the_digit():
    """caption_for names the digit; noisy_caption_for never names it correctly."""
    rng = random.Random(0)
    for label in range(10):
        for _ in range(20):
            cap = digits.caption_for(label, rng)
            assert digits.DIGIT_NAMES[label] in cap.lower() or str(label) in cap
            bad = digits.noisy_caption_for(label, rng)
            assert digits.DIGIT_NAMES[label] not in bad.lower().split() and bad != cap
