"""A local web of real images (and of everything that goes wrong on the real web).

`LocalWeb` serves handwritten digits (see `vlm.testbed.digits`) on 127.0.0.1 from an aiohttp
server running on its own event loop in a daemon thread, so tests, the demo and benchmarks
can run the downloader against real HTTP: images in several formats, sizes and awkward
encodings, plus error codes, flaky and rate-limited paths, slow and reset connections,
redirect chains and loops, wrong content types (HTML pages, and real images labelled
text/plain as mislabelled static hosts serve them), truncated / corrupt / empty / oversized
bodies, a decompression bomb and X-Robots-Tag opt-outs.

`make_url_rows` / `write_url_list` write URL lists for it, each row carrying the status a
correct downloader should report, so end-to-end tests can check every outcome.

Run standalone (a benchmark runs it in its own process)::

    python -m vlm.testbed.web --port 0 --write-urls urls.parquet --n 1000

prints the base URL as the first stdout line once the server and the list are ready, then
serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import http
import logging
import os
import signal
import sys
import threading
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from vlm.testbed.digits import load_digit_images
from vlm.testbed.media import (
    DEFAULT_SIZE,
    FORMATS,
    MAX_SIDE,
    OPTOUT_HEADERS,
    OVERSIZED_BYTES,
    STREAM_CHUNK,
    VARIANTS,
    ByteLRU,
    bomb_png,
    corrupt_jpeg,
    encode_image,
    norm_ext,
)
from vlm.testbed.url_lists import make_url_rows, write_url_list

log = logging.getLogger(__name__)

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
        self._cache = ByteLRU()
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
        key = (idx, norm_ext(ext), w, h, variant, render_seed)
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
        ext = norm_ext(request.match_info["ext"])
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
        ext = norm_ext(request.match_info["ext"])
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
        padding = b"\x00" * STREAM_CHUNK
        try:
            await resp.prepare(request)
            await resp.write(body)
            sent = len(body)
            while sent < total:
                piece = padding[: min(STREAM_CHUNK, total - sent)]
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


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """Serve until killed; optionally write a URL list first. First stdout line: base URL."""
    parser = argparse.ArgumentParser(prog="python -m vlm.testbed.web", description=__doc__.split("\n\n")[0])
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
