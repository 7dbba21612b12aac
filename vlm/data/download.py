"""Polite, bounded, safe HTTP downloading of images for web-scale ingest.

One `Downloader` per worker holds an aiohttp session with many concurrent connections and a
per-host connection cap (the img2dataset feature request of issue 62: don't hammer one site).
Each URL is fetched with:
- timeouts, and retries with exponential backoff + jitter for failures worth retrying
  (timeouts, connection resets, 5xx, 429 — which honours `Retry-After`);
- redirects followed by hand, up to a bound, so every hop is checked;
- an address policy: only http/https, and no private, loopback, link-local or otherwise
  non-global address unless `allow_private_networks` (checked on literal IPs and inside the
  DNS resolver, so a public name that resolves to 127.0.0.1, or a redirect to 10.0.0.1, is
  refused too);
- the `X-Robots-Tag` opt-out (noai / noimageai / noindex / noimageindex, global or scoped to
  our user-agent token), following the convention img2dataset and spawning.ai established;
- a cap on bytes read per image;
- a content check by the body's first bytes, not the Content-Type header alone: static hosts
  label real images `text/plain` or `application/octet-stream`, and img2dataset stores those,
  while an HTML page (by header or by its first bytes) is refused after one chunk.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import random
import re
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

# Statuses a download can end in (the shard parquet's `status` column adds the decode ones).
SUCCESS = "success"
FAILED_TO_DOWNLOAD = "failed_to_download"
FAILED_TO_RESIZE = "failed_to_resize"
SKIPPED_OPTOUT = "skipped_optout"
SKIPPED_UNSAFE = "skipped_unsafe_url"
SKIPPED_DUPLICATE = "skipped_duplicate"
STATUSES = (SUCCESS, FAILED_TO_DOWNLOAD, FAILED_TO_RESIZE, SKIPPED_OPTOUT, SKIPPED_UNSAFE, SKIPPED_DUPLICATE)

RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524})

# Content types refused without reading the body, and those refused unless the body starts
# like an image (a mislabelled image is still an image; a text page is not).
_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
_SNIFF_BYTES = 16  # bytes needed before judging: every signature below fits
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")  # + RIFF....WEBP below
_HTML_PREFIXES = (b"<!doctype html", b"<html", b"<head")

# One part of an IPv4 address the way inet_aton reads it: 0x-hex, 0-octal or decimal.
_NUMERIC_PART = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$", re.IGNORECASE)


@dataclass
class DownloadConfig:
    connections: int = 64  # concurrent requests per worker
    per_host_connections: int = 8  # concurrent connections to one host:port, per worker
    timeout_s: float = 10.0  # whole attempt: connect + headers + body
    connect_timeout_s: float = 5.0
    retries: int = 2  # extra attempts after a retryable failure
    backoff_base_s: float = 0.5  # attempt k waits base * 2**k (with jitter), capped below
    backoff_max_s: float = 10.0
    retry_after_max_s: float = 60.0  # longest Retry-After we honour; longer ones fail the sample
    max_redirects: int = 5
    max_bytes: int = 20_000_000  # bytes read per image; larger bodies fail
    user_agent_token: str = "vlmbot"  # the token sites name in scoped X-Robots-Tag directives
    user_agent: str = "Mozilla/5.0 (compatible; {token}/0.1; image-text dataset research)"
    respect_optouts: bool = True
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )
    allow_private_networks: bool = False  # tests and the demo serve on 127.0.0.1

    def validate(self) -> None:
        for name in ("connections", "per_host_connections", "max_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"download.{name} must be > 0")
        for name in ("timeout_s", "connect_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"download.{name} must be > 0")
        if self.retries < 0 or self.max_redirects < 0:
            raise ValueError("download.retries and download.max_redirects must be >= 0")


@dataclass
class FetchResult:
    status: str  # success / failed_to_download / skipped_optout / skipped_unsafe_url
    data: bytes | None = None
    error: str | None = None
    retryable: bool = False  # the final failure is one a later --retry-failed should redo
    http_status: int | None = None
    final_url: str | None = None
    attempts: int = 0


class UnsafeAddressError(OSError):
    """The URL points at an address the policy refuses (an OSError so aiohttp's connector
    carries it through as the cause of its connection error)."""


class _Retryable(Exception):
    def __init__(self, message: str, wait_s: float | None = None, http_status: int | None = None):
        super().__init__(message)
        self.wait_s = wait_s
        self.http_status = http_status


class _Fatal(Exception):
    def __init__(self, message: str, status: str = FAILED_TO_DOWNLOAD, http_status: int | None = None):
        super().__init__(message)
        self.status = status
        self.http_status = http_status


def address_refusal(ip: str) -> str | None:
    """Why an address is refused without allow_private_networks, or None if it is global."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for attr in ("is_loopback", "is_link_local", "is_private", "is_multicast", "is_reserved", "is_unspecified"):
        if getattr(addr, attr):
            return f"refused {attr[3:].replace('_', '-')} address {addr}"
    if not addr.is_global:
        return f"refused non-global address {addr}"
    return None


def legacy_ipv4(host: str) -> str | None:
    """The dotted-quad address of a host in a numeric form inet_aton accepts, else None.

    `2130706433`, `0x7f000001`, `127.1` and `0177.0.0.1` all mean 127.0.0.1 to the C resolver
    (and to browsers, which canonicalise them); a policy that only parses dotted quads would
    wave them through. A host that is numeric but out of range raises UnsafeAddressError.
    """
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()  # one trailing dot, as in a fully qualified name
    if not 1 <= len(parts) <= 4 or not all(_NUMERIC_PART.match(p) for p in parts):
        return None
    try:
        values = [
            int(p[2:] or "0", 16) if p[:2].lower() == "0x" else int(p, 8) if len(p) > 1 and p[0] == "0" else int(p)
            for p in parts
        ]
    except ValueError:  # an octal part with an 8 or 9
        raise UnsafeAddressError(f"malformed numeric host {host}") from None
    *head, last = values
    if any(v > 255 for v in head) or last >= 1 << (8 * (5 - len(values))):
        raise UnsafeAddressError(f"malformed numeric host {host}")
    number = last
    for i, v in enumerate(head):
        number |= v << (8 * (3 - i))
    return str(ipaddress.IPv4Address(number))


def check_url(url: str, allow_private: bool) -> tuple[str, str]:
    """Validate scheme and (literal-IP) host. Returns (scheme, host); raises UnsafeAddressError.

    The host comes back canonical: a legacy numeric IPv4 form (see `legacy_ipv4`) as the dotted
    quad it means, which is also the form aiohttp connects to.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        raise UnsafeAddressError(f"malformed url: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeAddressError(f"unsupported url scheme '{scheme or '(none)'}'")
    if not host:
        raise UnsafeAddressError("url has no host")
    host = legacy_ipv4(host) or host
    if not allow_private:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host.lower() == "localhost" or host.lower().endswith(".localhost"):
                raise UnsafeAddressError(f"refused loopback host {host}") from None
        else:
            reason = address_refusal(host)
            if reason:
                raise UnsafeAddressError(reason)
    return scheme, host


def _with_host(url: str, host: str) -> str:
    """`url` with its host replaced by `host` (userinfo, port, path and query kept)."""
    parts = urlsplit(url)
    if parts.hostname == host:
        return url
    userinfo, _, _ = parts.netloc.rpartition("@")
    netloc = (f"{userinfo}@" if userinfo else "") + host + (f":{parts.port}" if parts.port is not None else "")
    return parts._replace(netloc=netloc).geturl()


def sniff_content(head: bytes) -> str | None:
    """What the first bytes of a body are: "image" (JPEG/PNG/GIF/WebP), "html", or None."""
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip()[:_SNIFF_BYTES].lower()  # after a UTF-8 BOM / whitespace
    if text.startswith(_HTML_PREFIXES):
        return "html"
    return None


def is_opted_out(header_values: list[str], token: str, disallowed: list[str]) -> bool:
    """True if any X-Robots-Tag value forbids use, globally or for our user-agent token.

    A value is `directive, directive` or `agent: directive, directive`; several headers may
    be present. Directives scoped to another agent do not apply to us.
    """
    token = token.lower()
    banned = {d.lower() for d in disallowed}
    for value in header_values:
        agent, sep, rest = value.partition(":")
        if sep and agent.strip() and " " not in agent.strip() and "," not in agent:
            if agent.strip().lower() != token:
                continue
            directives = rest
        else:
            directives = value
        if any(d.strip().lower() in banned for d in directives.split(",")):
            return True
    return False


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _make_resolver(allow_private: bool):
    import aiohttp

    class SafeResolver(aiohttp.ThreadedResolver):
        """Resolves names and refuses the ones that land on non-global addresses."""

        async def resolve(self, host, port=0, family=socket.AF_INET):
            infos = await super().resolve(host, port, family)
            if allow_private:
                return infos
            safe = [i for i in infos if address_refusal(i["host"]) is None]
            if not safe:
                reason = address_refusal(infos[0]["host"]) if infos else "no address"
                raise UnsafeAddressError(f"{host}: {reason}")
            return safe

    return SafeResolver()


class Downloader:
    """Fetches URLs concurrently inside one event loop; use as `async with Downloader(cfg)`."""

    def __init__(self, cfg: DownloadConfig, seed: int | None = None):
        self.cfg = cfg
        self._rng = random.Random(seed)
        self._session = None
        self.headers = {"User-Agent": cfg.user_agent.format(token=cfg.user_agent_token)}

    async def __aenter__(self) -> Downloader:
        import aiohttp

        connector = aiohttp.TCPConnector(
            limit=self.cfg.connections,
            limit_per_host=self.cfg.per_host_connections,
            resolver=_make_resolver(self.cfg.allow_private_networks),
            ttl_dns_cache=300,
            ssl=True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self.headers,
            auto_decompress=True,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _backoff(self, attempt: int) -> float:
        base = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * (2**attempt))
        return base * (0.5 + self._rng.random())

    async def fetch(self, url: str) -> FetchResult:
        """Download one URL, retrying what is worth retrying. Never raises for web failures."""
        cfg = self.cfg
        attempts = 0
        last: _Retryable | None = None
        while attempts <= cfg.retries:
            attempts += 1
            try:
                data, final_url, code = await self._attempt(url)
                return FetchResult(SUCCESS, data=data, http_status=code, final_url=final_url, attempts=attempts)
            except _Fatal as exc:
                return FetchResult(exc.status, error=str(exc), http_status=exc.http_status, attempts=attempts)
            except UnsafeAddressError as exc:
                return FetchResult(SKIPPED_UNSAFE, error=str(exc), attempts=attempts)
            except _Retryable as exc:
                last = exc
                if attempts > cfg.retries:
                    break
                if exc.wait_s is not None and exc.wait_s > cfg.retry_after_max_s:
                    return FetchResult(
                        FAILED_TO_DOWNLOAD,
                        error=f"{exc} (Retry-After {exc.wait_s:.0f}s exceeds retry_after_max_s)",
                        retryable=True,
                        http_status=exc.http_status,
                        attempts=attempts,
                    )
                wait = exc.wait_s if exc.wait_s is not None else self._backoff(attempts - 1)
                await asyncio.sleep(wait)
        assert last is not None
        msg = f"{last} (after {attempts} attempt{'s' if attempts > 1 else ''})"
        return FetchResult(
            FAILED_TO_DOWNLOAD, error=msg, retryable=True, http_status=last.http_status, attempts=attempts
        )

    async def _attempt(self, url: str) -> tuple[bytes, str, int]:
        import aiohttp

        cfg = self.cfg
        timeout = aiohttp.ClientTimeout(total=cfg.timeout_s, sock_connect=cfg.connect_timeout_s)
        seen = {url}
        current = url
        try:
            async with asyncio.timeout(cfg.timeout_s):
                for _hop in range(cfg.max_redirects + 1):
                    _, host = check_url(current, cfg.allow_private_networks)
                    current = _with_host(current, host)
                    async with self._session.get(current, allow_redirects=False, timeout=timeout) as resp:
                        code = resp.status
                        if code in (301, 302, 303, 307, 308):
                            location = resp.headers.get("Location")
                            if not location:
                                raise _Fatal(f"HTTP {code} redirect without Location", http_status=code)
                            nxt = urljoin(current, location)
                            if nxt in seen:
                                raise _Fatal(f"redirect loop at {nxt}", http_status=code)
                            seen.add(nxt)
                            current = nxt
                            continue
                        if code == 429:
                            wait = parse_retry_after(resp.headers.get("Retry-After"))
                            raise _Retryable("HTTP 429 Too Many Requests", wait_s=wait, http_status=code)
                        if code in RETRYABLE_HTTP:
                            raise _Retryable(f"HTTP {code} {resp.reason or ''}".strip(), http_status=code)
                        if code != 200:
                            raise _Fatal(f"HTTP {code} {resp.reason or ''}".strip(), http_status=code)
                        if cfg.respect_optouts and is_opted_out(
                            resp.headers.getall("X-Robots-Tag", []),
                            cfg.user_agent_token,
                            cfg.disallowed_header_directives,
                        ):
                            tags = "; ".join(resp.headers.getall("X-Robots-Tag", []))
                            raise _Fatal(f"X-Robots-Tag opt-out: {tags}", status=SKIPPED_OPTOUT, http_status=code)
                        ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
                        if ctype in _HTML_TYPES:
                            raise _Fatal(f"unexpected content type {ctype}", http_status=code)
                        length = resp.content_length
                        if length is not None and length > cfg.max_bytes:
                            raise _Fatal(
                                f"image too large: {length} bytes > max_bytes={cfg.max_bytes}", http_status=code
                            )
                        data = await _read_checked(resp, cfg.max_bytes, ctype, code)
                        return data, current, code
                raise _Fatal(f"too many redirects (> {cfg.max_redirects})")
        except (_Fatal, _Retryable, UnsafeAddressError):
            raise
        except TimeoutError:
            raise _Retryable(f"timeout after {cfg.timeout_s:g}s") from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.__cause__, UnsafeAddressError) or isinstance(
                getattr(exc, "os_error", None), UnsafeAddressError
            ):
                raise UnsafeAddressError(str(exc.__cause__ or exc.os_error)) from None
            raise _Retryable(f"connection error: {_one_line(exc)}") from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, ConnectionResetError) as exc:
            raise _Retryable(f"connection reset: {_one_line(exc) or type(exc).__name__}") from None
        except aiohttp.ClientOSError as exc:
            raise _Retryable(f"connection error: {_one_line(exc)}") from None
        except aiohttp.TooManyRedirects:
            raise _Fatal(f"too many redirects (> {cfg.max_redirects})") from None
        except (aiohttp.InvalidURL, ValueError) as exc:
            raise _Fatal(f"invalid url: {_one_line(exc)}") from None
        except aiohttp.ClientError as exc:
            raise _Fatal(f"{type(exc).__name__}: {_one_line(exc)}") from None


def _check_head(head: bytes, ctype: str, code: int) -> None:
    """Refuse a body by its first bytes: HTML whatever the header says, and text or JSON that
    does not start like an image. Other declared types (image/*, octet-stream, none) go on to
    the decoder, which names what is wrong with a non-image."""
    kind = sniff_content(head)
    if kind == "html":
        raise _Fatal(f"unexpected content: an HTML page served as {ctype or 'no content type'}", http_status=code)
    if kind is None and (ctype.startswith("text/") or ctype == "application/json"):
        raise _Fatal(f"unexpected content type {ctype}", http_status=code)


async def _read_checked(resp, max_bytes: int, ctype: str, code: int) -> bytes:
    """The body, at most max_bytes, checked by `_check_head` as soon as its first bytes are in,
    so a refused body costs one chunk (leaving the response unread closes its connection)."""
    chunks = []
    total = 0
    checked = False
    async for chunk in resp.content.iter_chunked(1 << 16):
        total += len(chunk)
        if total > max_bytes:
            raise _Fatal(f"image too large: more than max_bytes={max_bytes} bytes")
        chunks.append(chunk)
        if not checked and total >= _SNIFF_BYTES:
            _check_head(b"".join(chunks), ctype, code)
            checked = True
    data = b"".join(chunks)
    if not checked:
        _check_head(data, ctype, code)
    return data


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
