"""The downloader against a real HTTP server on 127.0.0.1: every failure kind, retries, safety."""

from __future__ import annotations

import asyncio
import time

import pytest

from vlm.data import download as dl
from vlm.data.download import (
    DownloadConfig,
    Downloader,
    address_refusal,
    check_url,
    is_opted_out,
    legacy_ipv4,
    parse_retry_after,
)


def _cfg(**kw) -> DownloadConfig:
    base = dict(timeout_s=1.0, retries=1, backoff_base_s=0.01, allow_private_networks=True, user_agent_token="vlmbot")
    base.update(kw)
    return DownloadConfig(**base)


def fetch(url: str, **kw) -> dl.FetchResult:
    async def go():
        async with Downloader(_cfg(**kw)) as d:
            return await d.fetch(url)

    return asyncio.run(go())


def test_optout_parsing():
    """X-Robots-Tag directives apply globally or to our token, never to another agent's."""
    banned = ["noai", "noimageai", "noindex", "noimageindex"]
    assert is_opted_out(["noai"], "vlmbot", banned)
    assert is_opted_out(["nofollow", "NoImageIndex"], "vlmbot", banned)
    assert is_opted_out(["vlmbot: noai"], "vlmbot", banned)
    assert not is_opted_out(["otherbot: noai"], "vlmbot", banned)
    assert not is_opted_out(["nofollow, noarchive"], "vlmbot", banned)
    assert not is_opted_out([], "vlmbot", banned)


def test_address_policy():
    """Loopback, private, link-local and mapped addresses are refused; public ones pass."""
    assert "loopback" in address_refusal("127.0.0.1")
    assert "private" in address_refusal("10.1.2.3")
    assert "link-local" in address_refusal("169.254.169.254")
    assert address_refusal("::ffff:127.0.0.1") is not None
    assert address_refusal("8.8.8.8") is None
    with pytest.raises(dl.UnsafeAddressError, match="scheme 'ftp'"):
        check_url("ftp://example.com/a.jpg", allow_private=True)
    with pytest.raises(dl.UnsafeAddressError, match="loopback"):
        check_url("http://localhost:80/a.jpg", allow_private=False)


def test_retry_after_parsing():
    """Retry-After is read as seconds or as an HTTP date."""
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 - 10) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None


def test_success_and_redirects(web):
    """A plain image and a redirect chain within the bound both download."""
    ok = fetch(f"{web.base_url}/img/3.jpg?w=64&h=64")
    assert ok.status == dl.SUCCESS and ok.data[:2] == b"\xff\xd8"
    chain = fetch(f"{web.base_url}/redirect/3/4.jpg")
    assert chain.status == dl.SUCCESS and chain.final_url.endswith("/redirect/0/4.jpg")


def test_redirect_bound_and_loop(web):
    """Too many hops and redirect loops fail without retrying."""
    far = fetch(f"{web.base_url}/redirect/4/4.jpg", max_redirects=2)
    assert far.status == dl.FAILED_TO_DOWNLOAD and "too many redirects" in far.error
    loop = fetch(f"{web.base_url}/loop/a/5")
    assert loop.status == dl.FAILED_TO_DOWNLOAD and "redirect loop" in loop.error and not loop.retryable


def test_http_errors(web):
    """404 fails at once; 500 is retried, then fails as retryable."""
    nf = fetch(f"{web.base_url}/status/404")
    assert nf.status == dl.FAILED_TO_DOWNLOAD and "404" in nf.error and nf.attempts == 1 and not nf.retryable
    err = fetch(f"{web.base_url}/status/500", retries=2)
    assert err.status == dl.FAILED_TO_DOWNLOAD and err.retryable and err.attempts == 3


def test_flaky_and_ratelimit_recover(web):
    """A 503 then 200 succeeds on retry; a 429 waits its Retry-After and succeeds."""
    flaky = fetch(f"{web.base_url}/flaky/1/7.jpg")
    assert flaky.status == dl.SUCCESS and flaky.attempts == 2
    rl = fetch(f"{web.base_url}/ratelimit/1/8.jpg?after=1")
    assert rl.status == dl.SUCCESS and rl.attempts == 2


def test_retry_after_too_long_fails(web):
    """A Retry-After beyond retry_after_max_s fails (retryably) instead of stalling the worker."""
    res = fetch(f"{web.base_url}/ratelimit/5/9.jpg?after=120", retry_after_max_s=2)
    assert res.status == dl.FAILED_TO_DOWNLOAD and "Retry-After" in res.error and res.retryable


def test_timeout_and_reset(web):
    """A slow server times out and a reset connection fails; both are retryable."""
    slow = fetch(f"{web.base_url}/slow/1.jpg", timeout_s=0.5, retries=0)
    assert slow.status == dl.FAILED_TO_DOWNLOAD and "timeout" in slow.error and slow.retryable
    reset = fetch(f"{web.base_url}/reset/1.jpg", retries=0)
    assert reset.status == dl.FAILED_TO_DOWNLOAD and reset.retryable, reset.error


def test_content_type_and_size_caps(web):
    """HTML instead of an image and bodies over max_bytes fail with a reason."""
    html = fetch(f"{web.base_url}/wrongtype/1.jpg")
    assert html.status == dl.FAILED_TO_DOWNLOAD and "content type text/html" in html.error
    big = fetch(f"{web.base_url}/oversized/1.jpg", max_bytes=1_000_000)
    assert big.status == dl.FAILED_TO_DOWNLOAD and "too large" in big.error


@pytest.mark.parametrize("ext", ["jpg", "png", "webp", "gif"])
@pytest.mark.parametrize("ctype", ["text/plain", "application/octet-stream"])
def test_mislabelled_images_are_judged_by_their_bytes(web, ext, ctype):
    """A real image served as text/plain or application/octet-stream downloads as a success."""
    res = fetch(f"{web.base_url}/mislabelled/3.{ext}?type={ctype}")
    assert res.status == dl.SUCCESS, res.error
    assert dl.sniff_content(res.data) == "image"


def test_html_is_refused_after_its_first_chunk(web):
    """An HTML body fails on its first bytes whatever its label; the rest is never waited for."""
    t0 = time.monotonic()
    as_jpeg = fetch(f"{web.base_url}/trickle/1.jpg?type=image/jpeg", timeout_s=3.0)
    as_text = fetch(f"{web.base_url}/trickle/1.jpg?type=text/plain", timeout_s=3.0)
    # The server sends the rest of each body only after slow_delay_s (5 s): reading it all would time out.
    assert time.monotonic() - t0 < 3.0
    for res in (as_jpeg, as_text):
        assert res.status == dl.FAILED_TO_DOWNLOAD and not res.retryable and res.attempts == 1
    assert "HTML page served as image/jpeg" in as_jpeg.error and "HTML page served as text/plain" in as_text.error


def test_text_that_is_not_an_image_keeps_its_content_type_error(web):
    """A text/plain body that does not start like an image fails as before, after one chunk."""
    res = fetch(f"{web.base_url}/trickle/1.jpg?type=text/plain&body=text", timeout_s=3.0)
    assert res.status == dl.FAILED_TO_DOWNLOAD and res.error == "unexpected content type text/plain"


def test_optout_headers(web):
    """Opt-out headers skip the image; another agent's scoped opt-out does not."""
    assert fetch(f"{web.base_url}/optout/noai/1.jpg").status == dl.SKIPPED_OPTOUT
    assert fetch(f"{web.base_url}/optout/scoped/1.jpg").status == dl.SKIPPED_OPTOUT
    assert fetch(f"{web.base_url}/optout/multi/1.jpg").status == dl.SKIPPED_OPTOUT
    assert fetch(f"{web.base_url}/optout/otherbot/1.jpg").status == dl.SUCCESS
    assert fetch(f"{web.base_url}/optout/noai/1.jpg", respect_optouts=False).status == dl.SUCCESS


def test_private_addresses_refused(web):
    """Without allow_private_networks, 127.0.0.1 and localhost are refused before any request."""
    before = web.hits("/img/")
    lit = fetch(f"{web.base_url}/img/2.jpg", allow_private_networks=False)
    assert lit.status == dl.SKIPPED_UNSAFE and "loopback" in lit.error
    port = web.base_url.rsplit(":", 1)[1]
    name = fetch(f"http://localhost:{port}/img/2.jpg", allow_private_networks=False)
    assert name.status == dl.SKIPPED_UNSAFE
    assert web.hits("/img/") == before


def test_legacy_numeric_ipv4_forms_are_normalised():
    """Hex, decimal, octal and short IPv4 hosts read as inet_aton reads them; names are left alone."""
    for host in ("0x7f000001", "2130706433", "127.1", "0177.0.0.1", "0x7f.0.0.1", "127.0.1", "017700000001"):
        assert legacy_ipv4(host) == "127.0.0.1", host
    assert legacy_ipv4("0x0a.1") == "10.0.0.1" and legacy_ipv4("134744072") == "8.8.8.8"
    assert (
        legacy_ipv4("example.com") is None and legacy_ipv4("0x1.example") is None and legacy_ipv4("1.2.3.4.5") is None
    )
    for bad in ("4294967296", "256.1", "1.2.3.256", "08.0.0.1"):
        with pytest.raises(dl.UnsafeAddressError, match="malformed numeric host"):
            legacy_ipv4(bad)
    assert check_url("http://0x08080808/a.jpg", allow_private=False) == ("http", "8.8.8.8")


@pytest.mark.parametrize("host", ["0x7f000001", "2130706433", "127.1", "0177.0.0.1"])
def test_numeric_loopback_hosts_are_unsafe(web, host):
    """Integer, hex, octal and short forms of 127.0.0.1 end as skipped_unsafe_url, before any request."""
    port = web.base_url.rsplit(":", 1)[1]
    before = web.hits("/img/")
    res = fetch(f"http://{host}:{port}/img/2.jpg", allow_private_networks=False)
    assert res.status == dl.SKIPPED_UNSAFE and "loopback address 127.0.0.1" in res.error, res.error
    assert web.hits("/img/") == before
    allowed = fetch(f"http://{host}:{port}/img/2.jpg", allow_private_networks=True)
    assert allowed.status == dl.SUCCESS and allowed.final_url == f"http://127.0.0.1:{port}/img/2.jpg"


def test_redirect_to_private_refused(web, monkeypatch):
    """The policy holds on every hop: a redirect from an allowed host onto loopback is refused."""
    real = dl.address_refusal
    monkeypatch.setattr(dl, "address_refusal", lambda ip: None if ip == "127.0.0.1" else real(ip))
    port = web.base_url.rsplit(":", 1)[1]
    before = web.hits("/img/")
    res = fetch(f"{web.base_url}/goto?url=http://127.0.0.2:{port}/img/2.jpg", allow_private_networks=False)
    assert res.status == dl.SKIPPED_UNSAFE and "127.0.0.2" in res.error
    res = fetch(f"{web.base_url}/goto?url=http://localhost:{port}/img/2.jpg", allow_private_networks=False)
    assert res.status == dl.SKIPPED_UNSAFE and "localhost" in res.error
    assert web.hits("/img/") == before


def test_resolver_refuses_names_of_private_addresses():
    """A name that resolves only to refused addresses fails inside the resolver (DNS rebinding)."""

    async def go():
        resolver = dl._make_resolver(allow_private=False)
        with pytest.raises(dl.UnsafeAddressError, match="loopback"):
            await resolver.resolve("localhost", 80)
        ok = dl._make_resolver(allow_private=True)
        assert (await ok.resolve("localhost", 80))[0]["host"] in ("127.0.0.1", "::1")

    asyncio.run(go())


def test_long_caption_is_capped_in_the_shard(web, tmp_path):
    """A 1 MB caption reaches KEY.txt, KEY.json and the parquet cut to max_caption_chars, flagged."""
    import json
    import tarfile

    import pyarrow.parquet as pq

    from vlm.data.images import ImageConfig
    from vlm.data.shard_download import download_shard
    from vlm.data.urls import InputConfig, iter_rows
    from vlm.testbed.url_lists import write_url_list

    urls = [f"{web.base_url}/img/{i}.jpg?w=32&h=32" for i in (1, 2)]
    path = write_url_list(
        [{"url": urls[0], "caption": "y" * 1_000_000}, {"url": urls[1], "caption": "a two"}], tmp_path / "u.csv"
    )
    rows = [r for batch in iter_rows([path], InputConfig(max_caption_chars=4096)) for r in batch]
    items = [dict(r, key=f"00000{i:04d}", status=None) for i, r in enumerate(rows)]
    (tmp_path / "out").mkdir()
    stats = download_shard(tmp_path / "out", 0, items, _cfg(), ImageConfig(image_size=32))
    assert stats["successes"] == 2
    table = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
    assert [(len(r["caption"]), r["caption_truncated"]) for r in table] == [(4096, True), (5, False)]
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        assert len(tar.extractfile("000000000.txt").read()) == 4096
        meta = json.loads(tar.extractfile("000000000.json").read())
        assert len(meta["caption"]) == 4096 and meta["caption_truncated"] is True
        assert json.loads(tar.extractfile("000000001.json").read())["caption_truncated"] is False
