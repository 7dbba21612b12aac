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
- a cap on bytes read per image.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import random
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


def check_url(url: str, allow_private: bool) -> tuple[str, str]:
    """Validate scheme and (literal-IP) host. Returns (scheme, host); raises UnsafeAddressError."""
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
                    check_url(current, cfg.allow_private_networks)
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
                        if ctype.startswith("text/") or ctype in ("application/json", "application/xhtml+xml"):
                            raise _Fatal(f"unexpected content type {ctype}", http_status=code)
                        length = resp.content_length
                        if length is not None and length > cfg.max_bytes:
                            raise _Fatal(
                                f"image too large: {length} bytes > max_bytes={cfg.max_bytes}", http_status=code
                            )
                        data = await _read_capped(resp, cfg.max_bytes)
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


async def _read_capped(resp, max_bytes: int) -> bytes:
    chunks = []
    total = 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        total += len(chunk)
        if total > max_bytes:
            raise _Fatal(f"image too large: more than max_bytes={max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
