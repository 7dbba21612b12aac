"""A local web of real images (and of everything that goes wrong on the real web).

`LocalWeb` serves handwritten digits (see `vlm.data.digits`) on 127.0.0.1 from an aiohttp
server running on its own event loop in a daemon thread, so tests, the demo and benchmarks
can run the downloader against real HTTP: images in several formats, sizes and awkward
encodings, plus error codes, flaky and rate-limited paths, slow and reset connections,
redirect chains and loops, wrong content types (HTML pages, and real images labelled
text/plain as mislabelled static hosts serve them), truncated / corrupt / empty / oversized
bodies, a decompression bomb and X-Robots-Tag opt-outs.

`make_url_rows` / `write_url_list` write URL lists for it, each row carrying the status a
correct downloader should report, so end-to-end tests can check every outcome.

Run standalone (a benchmark runs it in its own process)::

    python -m vlm.data.localweb --port 0 --write-urls urls.parquet --n 1000

prints the base URL as the first stdout line once the server and the list are ready, then
serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import csv
import functools
import http
import io
import json
import logging
import os
import random
import signal
import struct
import sys
import threading
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from multidict import CIMultiDict
from PIL import Image

from vlm.data.digits import caption_for, load_digit_images, noisy_caption_for, render_digit, train_indices

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- constants

FORMATS = ("jpg", "png", "webp", "gif")
CONTENT_TYPES = {
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
}
_PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF"}

# Variant -> the format it needs (None: any). A variant whose format differs from the URL's
# extension is served in the variant's format, with the matching Content-Type.
VARIANTS: dict[str, str | None] = {
    "cmyk": "jpg",
    "exif6": "jpg",
    "progressive": "jpg",
    "gray": None,
    "palette": "png",
    "rgba": "png",
    "png16": "png",
}

# kind=... of /optout/{kind}/ -> X-Robots-Tag header value(s).
OPTOUT_HEADERS: dict[str, tuple[str, ...]] = {
    "noai": ("noai",),
    "noimageai": ("noimageai, noindex",),
    "noindex": ("noindex",),
    "scoped": ("vlmbot: noai",),
    "otherbot": ("otherbot: noai",),
    "multi": ("nofollow", "noimageindex"),
}

DEFAULT_SIZE = 256
MAX_SIDE = 4096
BOMB_SIDE = 30000
OVERSIZED_BYTES = 40 * 1024 * 1024
_STREAM_CHUNK = 256 * 1024

SUCCESS = "success"
FAILED_TO_DOWNLOAD = "failed_to_download"
FAILED_TO_RESIZE = "failed_to_resize"
SKIPPED_OPTOUT = "skipped_optout"
SKIPPED_DUPLICATE = "skipped_duplicate"

# Failure kind -> expected status for a correct downloader with default settings
# (private networks allowed, user agent token "vlmbot", one retry, honours Retry-After).
FAILURE_KINDS: dict[str, str] = {
    "404": FAILED_TO_DOWNLOAD,
    "500": FAILED_TO_DOWNLOAD,
    "403": FAILED_TO_DOWNLOAD,
    "slow": FAILED_TO_DOWNLOAD,
    "reset": FAILED_TO_DOWNLOAD,
    "loop": FAILED_TO_DOWNLOAD,
    "oversized": FAILED_TO_DOWNLOAD,
    "wrongtype": FAILED_TO_DOWNLOAD,
    "flaky": SUCCESS,
    "ratelimit": SUCCESS,
    "redirect": SUCCESS,
    "truncated": FAILED_TO_RESIZE,
    "corrupt": FAILED_TO_RESIZE,
    "empty": FAILED_TO_RESIZE,
    "bomb": FAILED_TO_RESIZE,
    "optout_noai": SKIPPED_OPTOUT,
    "optout_noimageai": SKIPPED_OPTOUT,
    "optout_noindex": SKIPPED_OPTOUT,
    "optout_scoped": SKIPPED_OPTOUT,
    "optout_multi": SKIPPED_OPTOUT,
    "optout_otherbot": SUCCESS,
}

URL_COLUMNS = ("url", "caption", "label", "noisy", "expected_status", "kind", "index")


# ---------------------------------------------------------------- encoding (pure, cached)


def _norm_ext(ext: str) -> str:
    ext = ext.lower()
    return "jpg" if ext == "jpeg" else ext


def encode_image(
    index: int, ext: str, width: int, height: int, variant: str | None = None, seed: int = 0
) -> tuple[bytes, str]:
    """Digit `index` rendered at `width` x `height` and encoded -> (bytes, content type).

    `variant` (see VARIANTS) picks an awkward-but-valid encoding; jpg-only and png-only
    variants override `ext`.
    """
    ext = _norm_ext(ext)
    if ext not in FORMATS:
        raise ValueError(f"unknown image format {ext!r}; expected one of {FORMATS}")
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {tuple(VARIANTS)}")
    if variant is not None and VARIANTS[variant] is not None:
        ext = VARIANTS[variant]
    img = render_digit(index, width, height, seed=seed)
    buf = io.BytesIO()
    fmt = _PIL_FORMATS[ext]
    if variant == "cmyk":
        img.convert("CMYK").save(buf, "JPEG", quality=88)
    elif variant == "exif6":
        # Stored rotated 90 degrees counter-clockwise; Orientation=6 says "rotate 90 CW to
        # display", so only a viewer that honours EXIF sees the upright width x height image.
        exif = Image.Exif()
        exif[0x0112] = 6
        img.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=88, exif=exif.tobytes())
    elif variant == "progressive":
        img.save(buf, "JPEG", quality=88, progressive=True)
    elif variant == "gray":
        gray = img.convert("L")
        if fmt == "JPEG":
            gray.save(buf, fmt, quality=88)
        else:
            gray.save(buf, fmt)
    elif variant == "palette":
        pal = img.quantize(colors=16, method=Image.Quantize.MEDIANCUT)
        # The most common index is the paper: make it the transparent one.
        counts = np.bincount(np.asarray(pal, dtype=np.uint8).ravel(), minlength=16)
        pal.save(buf, "PNG", transparency=int(counts.argmax()), compress_level=1)
    elif variant == "rgba":
        arr = np.asarray(img.convert("L"), dtype=np.int16)
        # Paper semi-transparent, ink opaque: composited on white the digit still shows.
        alpha = np.clip(96 + (255 - arr) * 2, 0, 255).astype(np.uint8)
        rgba = img.copy()
        rgba.putalpha(Image.fromarray(alpha))
        rgba.save(buf, "PNG", compress_level=1)
    elif variant == "png16":
        arr16 = np.asarray(img.convert("L"), dtype=np.uint16) * np.uint16(257)
        Image.fromarray(arr16).save(buf, "PNG", compress_level=1)  # mode I;16
    elif fmt == "JPEG":
        img.save(buf, "JPEG", quality=88)
    elif fmt == "PNG":
        img.save(buf, "PNG", compress_level=1)
    elif fmt == "WEBP":
        img.save(buf, "WEBP", quality=80, method=0)
    else:
        img.save(buf, fmt)
    return buf.getvalue(), CONTENT_TYPES[ext]


@functools.lru_cache(maxsize=1)
def bomb_png() -> bytes:
    """A ~110 kB PNG declaring 30000 x 30000 1-bit pixels (all black): a decompression bomb.

    Written by hand (zlib of repeated zero rows, compressed in chunks) so it costs a few
    hundred ms once, never a 900-megapixel image in memory.
    """
    width = height = BOMB_SIDE
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed 1-bit samples
    rows_per_block = 1000
    block = row * rows_per_block
    comp = zlib.compressobj(9)
    parts = []
    done = 0
    while done < height:
        take = min(rows_per_block, height - done)
        parts.append(comp.compress(block if take == rows_per_block else row * take))
        done += take
    parts.append(comp.flush())
    data = b"".join(parts)

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    idats = b"".join(chunk(b"IDAT", data[i : i + (1 << 20)]) for i in range(0, len(data), 1 << 20))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idats + chunk(b"IEND", b"")


def corrupt_jpeg(jpeg: bytes, seed: int = 0) -> bytes:
    """Keep the SOI marker and the JFIF APP0 segment, replace everything after with garbage.

    The garbage holds no 0xFF byte, so no decoder can find the next marker.
    """
    if jpeg[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    header_len = 2
    if jpeg[2:4] == b"\xff\xe0":
        header_len = 4 + struct.unpack(">H", jpeg[4:6])[0]
    rng = np.random.default_rng(seed)
    garbage = rng.integers(0, 255, size=max(len(jpeg) - header_len, 64), dtype=np.uint8).tobytes()
    return jpeg[:header_len] + garbage


class _ByteLRU:
    """Thread-safe LRU of encoded bodies bounded by total bytes."""

    def __init__(self, max_bytes: int = 128 * 1024 * 1024, max_item_bytes: int = 16 * 1024 * 1024):
        self._data: collections.OrderedDict[Any, tuple[bytes, str]] = collections.OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._max_item = max_item_bytes
        self._lock = threading.Lock()

    def get(self, key: Any) -> tuple[bytes, str] | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: Any, value: tuple[bytes, str]) -> None:
        size = len(value[0])
        if size > self._max_item:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= len(old[0])
            self._data[key] = value
            self._bytes += size
            while self._bytes > self._max_bytes and self._data:
                _, dropped = self._data.popitem(last=False)
                self._bytes -= len(dropped[0])

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


# ---------------------------------------------------------------- server


def _int_arg(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"query parameter {name} must be an integer, got {raw!r}\n") from None
    if not lo <= value <= hi:
        raise web.HTTPBadRequest(text=f"query parameter {name} must be in {lo}..{hi}, got {value}\n")
    return value


def _reason(code: int) -> str:
    try:
        return http.HTTPStatus(code).phrase
    except ValueError:
        return "Unknown"


class LocalWeb:
    """Local image web server on its own event loop in a daemon thread.

    >>> with LocalWeb() as webserver:
    ...     url = webserver.base_url + "/img/3.jpg?w=320&h=240"
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, seed: int = 0, slow_delay_s: float = 30.0):
        self.host = host
        self.port = port
        self.seed = int(seed)
        self.slow_delay_s = float(slow_delay_s)
        self.base_url = ""
        self._lock = threading.Lock()
        self._hits: collections.Counter[str] = collections.Counter()
        self._path_counts: collections.Counter[str] = collections.Counter()
        self._cache = _ByteLRU()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._n_images = int(load_digit_images()[0].shape[0])

    # ---- lifecycle

    def start(self) -> LocalWeb:
        """Bind and serve; returns once the server accepts connections (base_url is set)."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        errors: list[BaseException] = []
        loop = asyncio.new_event_loop()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="localweb-enc"
        )

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._astart())
            except BaseException as exc:  # reported to start()'s caller
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                try:
                    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                    for task in pending:
                        task.cancel()
                    if pending:
                        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                    loop.run_until_complete(loop.shutdown_asyncgens())
                finally:
                    loop.close()

        thread = threading.Thread(target=run, name="localweb", daemon=True)
        thread.start()
        if not ready.wait(timeout=60):
            raise RuntimeError("local web server did not start within 60 s")
        if errors:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise errors[0]
        self._loop, self._thread = loop, thread
        return self

    async def _astart(self) -> None:
        app = web.Application(middlewares=[self._count_middleware])
        self._add_routes(app)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        sockname = runner.addresses[0]
        self.port = int(sockname[1])
        host = self.host if ":" not in self.host else f"[{self.host}]"
        self.base_url = f"http://{host}:{self.port}"

    def stop(self) -> None:
        """Stop serving and join the server thread (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if self._runner is not None:
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(timeout=15)
        except Exception:  # noqa: BLE001 - best effort on shutdown
            log.debug("local web cleanup failed", exc_info=True)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=15)
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
            self._loop = self._thread = self._runner = self._executor = None

    def __enter__(self) -> LocalWeb:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- counters

    def hits(self, path_prefix: str = "") -> int:
        """Requests received so far whose path (no query) starts with `path_prefix`."""
        with self._lock:
            return sum(n for path, n in self._hits.items() if path.startswith(path_prefix))

    def reset_counters(self) -> None:
        """Forget hit counts and the flaky / rate-limit per-URL counters."""
        with self._lock:
            self._hits.clear()
            self._path_counts.clear()

    def _bump(self, key: str) -> int:
        """Count one more request for `key` (path + query); returns the count so far."""
        with self._lock:
            self._path_counts[key] += 1
            return self._path_counts[key]

    @web.middleware
    async def _count_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        with self._lock:
            self._hits[request.path] += 1
        return await handler(request)

    # ---- helpers

    def _idx(self, request: web.Request) -> int:
        idx = int(request.match_info["idx"])
        if not 0 <= idx < self._n_images:
            raise web.HTTPNotFound(text=f"no digit {idx} (0..{self._n_images - 1})\n")
        return idx

    async def _encoded(self, idx: int, ext: str, w: int, h: int, variant: str | None, s: int) -> tuple[bytes, str]:
        render_seed = self.seed * 1_000_003 + s
        key = (idx, _norm_ext(ext), w, h, variant, render_seed)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        loop = asyncio.get_running_loop()
        value = await loop.run_in_executor(self._executor, encode_image, idx, ext, w, h, variant, render_seed)
        self._cache.put(key, value)
        return value

    async def _image_bytes(
        self, request: web.Request, ext: str = "jpg", variant: str | None = None
    ) -> tuple[bytes, str]:
        idx = self._idx(request)
        w = _int_arg(request, "w", DEFAULT_SIZE, 1, MAX_SIDE)
        h = _int_arg(request, "h", DEFAULT_SIZE, 1, MAX_SIDE)
        s = _int_arg(request, "s", 0, 0, 2**31 - 1)
        return await self._encoded(idx, ext, w, h, variant, s)

    async def _image_response(
        self, request: web.Request, ext: str = "jpg", variant: str | None = None, headers: CIMultiDict | None = None
    ) -> web.Response:
        body, ctype = await self._image_bytes(request, ext, variant)
        return web.Response(body=body, content_type=ctype, headers=headers)

    @staticmethod
    def _with_query(request: web.Request, path: str) -> str:
        return f"{path}?{request.query_string}" if request.query_string else path

    # ---- routes

    def _add_routes(self, app: web.Application) -> None:
        idx = r"{idx:\d+}"
        app.router.add_get("/", self._index)
        app.router.add_get(f"/img/{idx}.{{ext:[A-Za-z]+}}", self._img)
        app.router.add_get(r"/status/{code:\d+}", self._status)
        app.router.add_get(rf"/flaky/{{n:\d+}}/{idx}.jpg", self._flaky)
        app.router.add_get(rf"/ratelimit/{{n:\d+}}/{idx}.jpg", self._ratelimit)
        app.router.add_get(f"/slow/{idx}.jpg", self._slow)
        app.router.add_get(f"/reset/{idx}.jpg", self._reset)
        app.router.add_get(rf"/redirect/{{n:\d+}}/{idx}.jpg", self._redirect)
        app.router.add_get(r"/loop/{side:[ab]}/{rest:.+}", self._loop_route)
        app.router.add_get("/goto", self._goto)
        app.router.add_get(f"/wrongtype/{idx}.jpg", self._wrongtype)
        app.router.add_get(f"/mislabelled/{idx}.{{ext:[A-Za-z]+}}", self._mislabelled)
        app.router.add_get(f"/trickle/{idx}.jpg", self._trickle)
        app.router.add_get(f"/truncated/{idx}.jpg", self._truncated)
        app.router.add_get(f"/corrupt/{idx}.jpg", self._corrupt)
        app.router.add_get(f"/empty/{idx}.jpg", self._empty)
        app.router.add_get(f"/oversized/{idx}.jpg", self._oversized)
        app.router.add_get(f"/bomb/{idx}.png", self._bomb)
        app.router.add_get(f"/optout/{{kind:[a-z]+}}/{idx}.jpg", self._optout)

    async def _index(self, request: web.Request) -> web.Response:
        lines = [
            "vlm local web: handwritten digits and web failures",
            "/img/{idx}.{jpg|png|webp|gif}?w=W&h=H&s=SEED&v={" + "|".join(VARIANTS) + "}",
            "/status/{code}  /flaky/{n}/{idx}.jpg  /ratelimit/{n}/{idx}.jpg?after=S  /slow/{idx}.jpg",
            "/reset/{idx}.jpg  /redirect/{n}/{idx}.jpg  /loop/a/{idx}  /goto?url=U  /wrongtype/{idx}.jpg",
            "/mislabelled/{idx}.{jpg|png|webp|gif}?type=T  /trickle/{idx}.jpg?type=T&body={html|text}",
            "/truncated/{idx}.jpg  /corrupt/{idx}.jpg  /empty/{idx}.jpg  /oversized/{idx}.jpg",
            "/bomb/{idx}.png  /optout/{" + "|".join(OPTOUT_HEADERS) + "}/{idx}.jpg",
        ]
        return web.Response(text="\n".join(lines) + "\n")

    async def _img(self, request: web.Request) -> web.Response:
        ext = _norm_ext(request.match_info["ext"])
        if ext not in FORMATS:
            raise web.HTTPNotFound(text=f"unknown format {ext!r}\n")
        variant = request.query.get("v") or None
        if variant is not None and variant not in VARIANTS:
            raise web.HTTPBadRequest(text=f"unknown variant {variant!r}\n")
        return await self._image_response(request, ext, variant)

    async def _status(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        if not 200 <= code <= 599:
            raise web.HTTPBadRequest(text=f"status must be 200..599, got {code}\n")
        reason = _reason(code)
        if code in (204, 304):
            return web.Response(status=code, reason=reason)
        return web.Response(status=code, reason=reason, text=f"{code} {reason}\n")

    async def _flaky(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if self._bump(request.path_qs) <= n:
            return web.Response(status=503, text="503 Service Unavailable (flaky)\n")
        return await self._image_response(request)

    async def _ratelimit(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        after = request.query.get("after", "1")
        if self._bump(request.path_qs) <= n:
            return web.Response(status=429, headers={"Retry-After": after}, text="429 Too Many Requests\n")
        return await self._image_response(request)

    async def _slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.slow_delay_s)
        return await self._image_response(request)

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            transport.abort()
        # The aborted connection cancels this handler (handler_cancellation=True).
        await asyncio.sleep(3600)
        raise web.HTTPInternalServerError()  # pragma: no cover - never reached

    async def _redirect(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n <= 0:
            return await self._image_response(request)
        location = self._with_query(request, f"/redirect/{n - 1}/{request.match_info['idx']}.jpg")
        return web.Response(status=302, headers={"Location": location}, text=f"moved to {location}\n")

    async def _goto(self, request: web.Request) -> web.Response:
        """An open redirect (`/goto?url=...`), as abused to bounce crawlers onto internal hosts."""
        location = request.query.get("url")
        if not location:
            raise web.HTTPBadRequest(text="url query parameter required\n")
        return web.Response(status=302, headers={"Location": location}, text=f"moved to {location}\n")

    async def _loop_route(self, request: web.Request) -> web.Response:
        other = "b" if request.match_info["side"] == "a" else "a"
        location = self._with_query(request, f"/loop/{other}/{request.match_info['rest']}")
        return web.Response(status=302, headers={"Location": location}, text=f"moved to {location}\n")

    async def _wrongtype(self, request: web.Request) -> web.Response:
        idx = self._idx(request)
        html = (
            "<!doctype html><html><head><title>Digit gallery</title></head><body>"
            f'<h1>Handwritten digit #{idx}</h1><img src="/img/{idx}.jpg" alt="digit">'
            "<p>Sign up for our newsletter!</p></body></html>"
        )
        return web.Response(text=html, content_type="text/html")

    async def _mislabelled(self, request: web.Request) -> web.Response:
        """A real image under a wrong Content-Type (`type`, default text/plain)."""
        ext = _norm_ext(request.match_info["ext"])
        if ext not in FORMATS:
            raise web.HTTPNotFound(text=f"unknown format {ext!r}\n")
        body, _ = await self._image_bytes(request, ext)
        return web.Response(body=body, headers={"Content-Type": request.query.get("type", "text/plain")})

    async def _trickle(self, request: web.Request) -> web.StreamResponse:
        """A non-image body labelled `type` (default image/jpeg): its first chunk at once, the rest
        after slow_delay_s. A client that judges by the first bytes is done long before that."""
        idx = self._idx(request)
        kind = request.query.get("body", "html")
        if kind not in ("html", "text"):
            raise web.HTTPBadRequest(text=f"body must be html or text, got {kind!r}\n")
        first = (
            f"<!DOCTYPE html>\n<html><head><title>Digit #{idx}</title></head><body>\n"
            if kind == "html"
            else f"Digit #{idx}: this file moved, see the gallery index for its new address.\n"
        ).encode()
        resp = web.StreamResponse(headers={"Content-Type": request.query.get("type", "image/jpeg")})
        try:
            await resp.prepare(request)
            await resp.write(first)
            await asyncio.sleep(self.slow_delay_s)
            await resp.write(b"<p>more</p>\n" * 100 if kind == "html" else b"more text\n" * 100)
            await resp.write_eof()
        except (ConnectionError, OSError):
            pass  # the client stopped reading after the first chunk: expected
        return resp

    async def _truncated(self, request: web.Request) -> web.Response:
        body, _ = await self._image_bytes(request, "jpg")
        return web.Response(body=body[: len(body) // 2], content_type="image/jpeg")

    async def _corrupt(self, request: web.Request) -> web.Response:
        body, _ = await self._image_bytes(request, "jpg")
        return web.Response(body=corrupt_jpeg(body, seed=int(request.match_info["idx"])), content_type="image/jpeg")

    async def _empty(self, request: web.Request) -> web.Response:
        self._idx(request)
        return web.Response(body=b"", content_type="image/jpeg")

    async def _oversized(self, request: web.Request) -> web.StreamResponse:
        body, _ = await self._image_bytes(request, "jpg")
        total = max(OVERSIZED_BYTES, len(body))
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.content_length = total
        padding = b"\x00" * _STREAM_CHUNK
        try:
            await resp.prepare(request)
            await resp.write(body)
            sent = len(body)
            while sent < total:
                piece = padding[: min(_STREAM_CHUNK, total - sent)]
                await resp.write(piece)
                sent += len(piece)
            await resp.write_eof()
        except (ConnectionError, OSError):
            pass  # the client stopped reading at its byte cap: expected
        return resp

    async def _bomb(self, request: web.Request) -> web.Response:
        self._idx(request)
        body = await asyncio.get_running_loop().run_in_executor(self._executor, bomb_png)
        return web.Response(body=body, content_type="image/png")

    async def _optout(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        values = OPTOUT_HEADERS.get(kind)
        if values is None:
            raise web.HTTPNotFound(text=f"unknown opt-out kind {kind!r}; expected one of {tuple(OPTOUT_HEADERS)}\n")
        headers: CIMultiDict[str] = CIMultiDict()
        for value in values:
            headers.add("X-Robots-Tag", value)
        return await self._image_response(request, headers=headers)


# ---------------------------------------------------------------- URL lists


def _failure_counts(failures: bool | dict[str, int], n: int) -> dict[str, int]:
    if failures is False or failures is None:
        return {}
    if failures is True:
        per_kind = max(1, n // 200)
        return {kind: per_kind for kind in FAILURE_KINDS}
    if isinstance(failures, dict):
        unknown = sorted(set(failures) - set(FAILURE_KINDS))
        if unknown:
            raise ValueError(f"unknown failure kinds {unknown}; expected some of {list(FAILURE_KINDS)}")
        bad = {k: v for k, v in failures.items() if int(v) < 0}
        if bad:
            raise ValueError(f"failure counts must be >= 0, got {bad}")
        return {kind: int(failures[kind]) for kind in FAILURE_KINDS if int(failures.get(kind, 0)) > 0}
    raise TypeError(f"failures must be a bool or a dict of kind -> count, got {type(failures).__name__}")


def _round_robin(counts: dict[str, int]) -> list[str]:
    """kind_a, kind_b, ..., kind_a, kind_b, ... so truncating keeps every kind longest."""
    out: list[str] = []
    left = dict(counts)
    while any(left.values()):
        for kind in counts:
            if left[kind] > 0:
                out.append(kind)
                left[kind] -= 1
    return out


def _failure_path(kind: str, idx: int, q: str, k: int) -> str:
    if kind in ("404", "500", "403"):
        return f"/status/{kind}?id={k}"
    if kind == "flaky":
        return f"/flaky/1/{idx}.jpg?{q}"
    if kind == "ratelimit":
        return f"/ratelimit/1/{idx}.jpg?after=1&{q}"
    if kind == "redirect":
        return f"/redirect/{1 + k % 3}/{idx}.jpg?{q}"
    if kind == "loop":
        return f"/loop/a/{idx}?{q}"
    if kind == "bomb":
        return f"/bomb/{idx}.png?s={k}"
    if kind.startswith("optout_"):
        return f"/optout/{kind[len('optout_') :]}/{idx}.jpg?{q}"
    return f"/{kind}/{idx}.jpg?{q}"  # slow, reset, wrongtype, truncated, corrupt, empty, oversized


def make_url_rows(
    base_url: str,
    n: int,
    *,
    seed: int = 0,
    failures: bool | dict[str, int] = True,
    noisy_fraction: float = 0.0,
    indices: Iterable[int] | None = None,
    sizes: Iterable[tuple[int, int]] = ((256, 256), (512, 384), (1024, 768), (300, 900)),
    formats: Iterable[str] = ("jpg", "png"),
    variants: bool = True,
    duplicates: int = 0,
) -> list[dict]:
    """`n` URL rows for a LocalWeb at `base_url` (+ `duplicates` repeated URLs at the end).

    Each row: url, caption, label, noisy, expected_status, kind, index. failures=True adds
    max(1, n // 200) rows of every FAILURE_KINDS kind (a dict gives counts per kind); the
    rest are ok images in mixed `sizes` / `formats`, some in each of VARIANTS when
    `variants`. Images cycle through `indices` (default: the non-held-out digits) in a
    seed-shuffled order; every URL is distinct (a per-row `s=` query). Deterministic.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= noisy_fraction <= 1.0:
        raise ValueError(f"noisy_fraction must be in [0, 1], got {noisy_fraction}")
    if duplicates < 0:
        raise ValueError(f"duplicates must be >= 0, got {duplicates}")
    base = base_url.rstrip("/")
    sizes = [(int(w), int(h)) for w, h in sizes]
    formats = [_norm_ext(f) for f in formats]
    if not sizes or not formats:
        raise ValueError("sizes and formats must be non-empty")
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"unknown format {f!r}; expected some of {FORMATS}")
    order = [int(i) for i in (train_indices() if indices is None else indices)]
    if not order:
        raise ValueError("indices is empty")
    labels = load_digit_images()[1]
    n_images = len(labels)
    bad = [i for i in order if not 0 <= i < n_images]
    if bad:
        raise ValueError(f"indices out of range 0..{n_images - 1}: {bad[:5]}")

    rng = random.Random(f"vlm-localweb-{seed}")
    rng.shuffle(order)

    fail_kinds = _round_robin(_failure_counts(failures, n))[:n]
    n_ok = n - len(fail_kinds)
    variant_kinds: list[str] = []
    if variants and n_ok > 0:
        per_variant = max(1, n_ok // 50)
        variant_kinds = _round_robin({v: per_variant for v in VARIANTS})[: n_ok // 2]
    kinds = fail_kinds + variant_kinds + ["ok"] * (n_ok - len(variant_kinds))
    rng.shuffle(kinds)

    ok_positions = [k for k, kind in enumerate(kinds) if kind == "ok" or kind in VARIANTS]
    noisy_positions = set(rng.sample(ok_positions, int(round(noisy_fraction * len(ok_positions)))))

    rows: list[dict] = []
    for k, kind in enumerate(kinds):
        idx = order[k % len(order)]
        label = int(labels[idx])
        w, h = sizes[rng.randrange(len(sizes))]
        q = f"w={w}&h={h}&s={k}"
        noisy = k in noisy_positions
        caption = noisy_caption_for(label, rng) if noisy else caption_for(label, rng)
        if kind == "ok":
            path = f"/img/{idx}.{formats[rng.randrange(len(formats))]}?{q}"
            expected = SUCCESS
        elif kind in VARIANTS:
            ext = VARIANTS[kind] or formats[rng.randrange(len(formats))]
            path = f"/img/{idx}.{ext}?{q}&v={kind}"
            expected = SUCCESS
        else:
            path = _failure_path(kind, idx, q, k)
            expected = FAILURE_KINDS[kind]
        rows.append(
            {
                "url": base + path,
                "caption": caption,
                "label": label,
                "noisy": noisy,
                "expected_status": expected,
                "kind": kind,
                "index": idx,
            }
        )

    if duplicates and rows:
        candidates = (
            [r for r in rows if r["kind"] == "ok"] or [r for r in rows if r["expected_status"] == SUCCESS] or rows
        )
        if duplicates <= len(candidates):
            originals = rng.sample(candidates, duplicates)
        else:
            originals = [rng.choice(candidates) for _ in range(duplicates)]
        rows.extend(dict(r, expected_status=SKIPPED_DUPLICATE, kind="duplicate") for r in originals)
    return rows


def _columns(rows: list[dict]) -> list[str]:
    cols = list(URL_COLUMNS) if not rows else []
    seen = set(cols)
    for row in rows:
        for key in row:
            if key not in seen:
                seen.add(key)
                cols.append(key)
    return cols


def write_url_list(rows: list[dict], path: str | Path) -> Path:
    """Write `rows` to `path`; the format follows the suffix.

    .parquet, .csv, .tsv, .jsonl (all columns) or .txt (one url per line, nothing else).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv", ".tsv", ".jsonl", ".txt"):
        raise ValueError(f"unknown URL list format {path.suffix!r}; use .parquet, .csv, .tsv, .jsonl or .txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = _columns(rows)
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        if rows:
            table = pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows])
        else:
            schema = pa.schema(
                [
                    ("url", pa.string()),
                    ("caption", pa.string()),
                    ("label", pa.int64()),
                    ("noisy", pa.bool_()),
                    ("expected_status", pa.string()),
                    ("kind", pa.string()),
                    ("index", pa.int64()),
                ]
            )
            table = schema.empty_table()
        pq.write_table(table, path)
    elif suffix in (".csv", ".tsv"):
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(
                fh,
                fieldnames=cols,
                delimiter="\t" if suffix == ".tsv" else ",",
                lineterminator="\n",
                extrasaction="ignore",
            )
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps({c: row.get(c) for c in cols}, ensure_ascii=False) + "\n")
    else:
        with path.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(f"{row['url']}\n")
    return path


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """Serve until killed; optionally write a URL list first. First stdout line: base URL."""
    parser = argparse.ArgumentParser(prog="python -m vlm.data.localweb", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slow-delay", type=float, default=30.0, help="seconds /slow/ waits before answering")
    parser.add_argument("--write-urls", metavar="FILE", help="write a URL list (.parquet/.csv/.tsv/.jsonl/.txt)")
    parser.add_argument("--n", type=int, default=1000, help="rows in the URL list (before duplicates)")
    parser.add_argument("--noisy-fraction", type=float, default=0.0)
    parser.add_argument("--no-failures", action="store_true", help="only good images in the URL list")
    parser.add_argument("--no-variants", action="store_true", help="no awkward encodings in the URL list")
    parser.add_argument("--duplicates", type=int, default=0)
    parser.add_argument("--formats", default="jpg,png", help="comma-separated formats of ok images")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server = LocalWeb(args.host, args.port, seed=args.seed, slow_delay_s=args.slow_delay).start()
    try:
        if args.write_urls:
            rows = make_url_rows(
                server.base_url,
                args.n,
                seed=args.seed,
                failures=not args.no_failures,
                noisy_fraction=args.noisy_fraction,
                formats=tuple(f for f in args.formats.split(",") if f),
                variants=not args.no_variants,
                duplicates=args.duplicates,
            )
            write_url_list(rows, args.write_urls)
        print(server.base_url, flush=True)
        if args.write_urls:
            print(f"wrote {len(rows)} urls to {args.write_urls}", file=sys.stderr, flush=True)
        while not stop.wait(3600):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
