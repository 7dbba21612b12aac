"""`vlm submit` and `vlm jobs`: run vlm commands as Ray jobs through the Job Submission API.

A job is a shell command run on the cluster's head node (`ray job submit`'s model); `vlm submit
-- vlm pipeline run ...` ships the project as the job's working directory, points MLflow where
the submitter points it, and follows the job's logs until it ends. Everything here talks HTTP to
the Ray dashboard (default port 8265), never to the GCS.

Ray 2.60 clusters run with token authentication on: `ray.init()` turns it on for a new local
Ray and writes `~/.ray/auth_token`; `ray start --head` turns it on when RAY_AUTH_MODE=token or a
token already exists (env or that file), and KubeRay / the launcher set it up (cluster/README.md).
The token is found as Ray's own client finds it - RAY_AUTH_TOKEN, else the file named by
RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token - and sent as a bearer token (RAY_AUTH_MODE=disabled
sends none). A cluster without auth ignores it.

Every call to the dashboard has a connect and a read timeout (Ray's client sets none, so an
address that accepts connections and never answers would hang the command): a read waits at
most VLM_DASHBOARD_TIMEOUT_S seconds (default 60) and then fails with one line naming the address.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from vlm.errors import ClusterError, InputError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
DASHBOARD_PORT = 8265
# Ray's own defaults for the GCS and the Ray Client server: an address with one of these ports
# was meant for ray.init(); the job API of that cluster is its dashboard.
NON_DASHBOARD_PORTS = {6379, 10001}
# Never shipped with a job: environments, data, runs, caches (gitignore syntax, relative to the
# working directory; Ray also honours the project's .gitignore).
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "outputs",
    "demo_out",
    "mlruns",
    "mlartifacts",
    "*.db",
    "bench/results",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "build",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
CONNECT_TIMEOUT_S = 5.0
# Longest wait for an answer: a submit uploads the project and starts the job's supervisor
# actor before the dashboard replies, which takes seconds on a busy head, never minutes.
READ_TIMEOUT_S = 60.0
TIMEOUT_ENV = "VLM_DASHBOARD_TIMEOUT_S"  # overrides READ_TIMEOUT_S (a dashboard behind a slow tunnel)


# ------------------------------------------------------------------------------ address + auth


def dashboard_address(address: str | None = None) -> str:
    """The http(s) URL of the cluster's dashboard (its Job API) for an address in any usual form.

    Order: `address`, RAY_API_SERVER_ADDRESS (what `ray job` reads), RAY_ADDRESS, else the local
    default. `host:port` means http; `ray://host:10001` and `host:6379` (Ray Client / GCS
    addresses of the same cluster) mean its dashboard on port 8265.
    """
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD
    address = address.strip().rstrip("/")
    if address in ("auto", "local"):
        return DEFAULT_DASHBOARD
    if "://" not in address:
        address = f"http://{address}"
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https", "ray"):
        raise ClusterError(f"cannot submit jobs to {address}: use the dashboard's http://HOST:8265 address")
    host = parts.hostname or "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    port = parts.port
    if parts.scheme == "ray" or port in NON_DASHBOARD_PORTS or port is None:
        port = DASHBOARD_PORT
    scheme = "https" if parts.scheme == "https" else "http"
    return f"{scheme}://{host}:{port}"


def auth_token() -> tuple[str | None, str]:
    """(token, where it came from) as Ray's client finds it; (None, why) when there is none.

    RAY_AUTH_TOKEN, else the file in RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (the order of
    Ray 2.60's AuthenticationTokenLoader); RAY_AUTH_MODE=disabled sends no token.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError:
            token = ""
        if not token:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path}: no token there (the file is missing or empty)")
        return token, f"RAY_AUTH_TOKEN_PATH={path}"
    default = Path.home() / ".ray" / "auth_token"
    try:
        token = default.read_text().strip()
    except OSError:
        token = ""
    return (token, str(default)) if token else (None, "no token found")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def dashboard_timeouts() -> tuple[float, float]:
    """(connect, read) seconds for every call to the dashboard; the read one from VLM_DASHBOARD_TIMEOUT_S."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return CONNECT_TIMEOUT_S, READ_TIMEOUT_S
    try:
        read_s = float(raw)
    except ValueError:
        read_s = 0.0
    if not read_s > 0:
        raise InputError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    return min(CONNECT_TIMEOUT_S, read_s), read_s


def _timed_out(url: str, call: str, read_s: float) -> ClusterError:
    return ClusterError(
        f"the Ray dashboard at {url} timed out: no answer to {call} within {read_s:g}s "
        f"(is it a Ray dashboard? a slow one: raise {TIMEOUT_ENV})"
    )


async def tail_logs(url: str, job_id: str, *, headers=None, cookies=None, ssl=True, timeouts=None):
    """Yield a job's log chunks from the dashboard's websocket until the job ends.

    Ray's `tail_job_logs`, with the connect and the handshake bounded by `timeouts`; once the
    websocket is open aiohttp lifts the read timeout, as a quiet job may print nothing for hours.
    """
    import aiohttp

    connect_s, read_s = timeouts or dashboard_timeouts()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_s, sock_read=read_s)
    endpoint = f"/api/jobs/{job_id}/logs/tail"
    async with aiohttp.ClientSession(cookies=cookies, headers=headers, timeout=timeout) as session:
        try:
            ws = await session.ws_connect(url + endpoint, ssl=ssl)
        except TimeoutError:
            raise _timed_out(url, f"GET {endpoint}", read_s) from None
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                yield msg.data
            elif msg.type == aiohttp.WSMsgType.CLOSED:
                if ws.close_code == aiohttp.WSCloseCode.ABNORMAL_CLOSURE:
                    raise RuntimeError(f"WebSocket connection closed unexpectedly with close code {ws.close_code}")
                return
            elif msg.type == aiohttp.WSMsgType.ERROR:
                raise RuntimeError(f"WebSocket error for job {job_id}: {ws.exception()}")


@functools.cache
def _client_class():
    """Ray's JobSubmissionClient with timeouts on every HTTP call (imported on first use: Ray is heavy)."""
    import requests
    from ray.job_submission import JobSubmissionClient

    class TimedJobClient(JobSubmissionClient):
        def __init__(self, url: str, *, headers: dict | None, timeouts: tuple[float, float]):
            self._vlm_url = url
            self._vlm_timeouts = timeouts  # set first: the base __init__ already calls the dashboard
            super().__init__(url, headers=headers)

        def _do_request(self, method: str, endpoint: str, **kwargs):
            kwargs.setdefault("timeout", self._vlm_timeouts)
            try:
                return super()._do_request(method, endpoint, **kwargs)
            except requests.exceptions.Timeout:
                raise _timed_out(self._vlm_url, f"{method} {endpoint}", self._vlm_timeouts[1]) from None

        async def tail_job_logs(self, job_id: str):
            ssl = True if self._ssl_context is None else self._ssl_context
            async for chunk in tail_logs(
                self._address,
                job_id,
                headers=self._headers,
                cookies=self._cookies,
                ssl=ssl,
                timeouts=self._vlm_timeouts,
            ):
                yield chunk

    return TimedJobClient


def _probe(url: str, timeout_s: float = 3.0) -> None:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s):
            return
    except OSError:
        raise ClusterError(
            f"cannot reach the Ray dashboard at {url}: nothing is listening there "
            "(start a cluster with `ray start --head`, or set --address / RAY_ADDRESS to its http://HOST:8265)"
        ) from None


def _quiet_ray_client() -> None:
    """Ray's job client logs every upload step and socket close at INFO; keep its warnings."""
    import logging

    # The two sdk loggers set INFO on themselves, so a parent's level would not reach them.
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk", "ray._private.runtime_env"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "Directory '.git' is now ignored by default": we exclude it anyway.
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)


def _explain(exc: BaseException, url: str, job_id: str | None = None) -> ClusterError | InputError:
    """A one-line error for what the Job API said."""
    text = str(exc)
    if "status code 401" in text or "Authentication required" in text:
        return ClusterError(
            f"the cluster at {url} requires its auth token: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH "
            "to a file holding it, or put it in ~/.ray/auth_token"
        )
    if "status code 403" in text or "Authentication failed" in text:
        return ClusterError(f"the cluster at {url} rejected the auth token from {auth_token()[1]}")
    if job_id and ("404" in text or "does not exist" in text):
        return InputError(f"no job {job_id!r} on the cluster at {url} (see `vlm jobs list`)")
    return ClusterError(f"Ray Job API at {url}: {_first_line(exc)}")


def job_client(address: str | None = None):
    """A `JobSubmissionClient` for the cluster, with its auth token; ClusterError if unreachable."""
    url = dashboard_address(address)
    timeouts = dashboard_timeouts()
    _probe(url, timeouts[0])
    token, _ = auth_token()
    # An explicit header, not RAY_AUTH_MODE=token in our environment: Ray reads that mode once
    # per process (cached config + token loader), and it would not reach the client reliably.
    headers = {"Authorization": f"Bearer {token}"} if token else None
    client_class = _client_class()
    _quiet_ray_client()
    # Ray's client lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override its address argument, and
    # reads a bare host:port there as a GCS address it then dials; pin it to the URL chosen here.
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = url
    try:
        client = client_class(url, headers=headers, timeouts=timeouts)
        client.list_jobs()  # the version check above does not need auth; this does
    except ClusterError:
        raise
    except Exception as exc:
        raise _explain(exc, url) from None
    finally:
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved
    return client


# ------------------------------------------------------------------------------------- submit


def _env_pairs(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--env expects KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def _absolute_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI as the job must see it: relative file paths made absolute."""
    from vlm import tracking

    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return Path(uri[len("file:") :]).resolve().as_uri()
    return uri


def runtime_env(working_dir: str | None = None, env: list[str] = (), pip: list[str] = ()) -> dict:
    """The job's runtime env: code, MLflow location, log settings, extra env and pip packages."""
    renv: dict = {}
    wd = Path(working_dir).expanduser().resolve() if working_dir else ROOT
    if working_dir and not wd.is_dir():
        raise InputError(f"--working-dir {working_dir}: not a directory")
    if working_dir or (ROOT / "pyproject.toml").is_file():  # an installed (non-source) vlm ships nothing
        renv["working_dir"] = str(wd)
        renv["excludes"] = list(EXCLUDES)
    env_vars = {
        "MLFLOW_TRACKING_URI": _absolute_tracking_uri(),
        "RAY_DEDUP_LOGS": os.environ.get("RAY_DEDUP_LOGS", "1"),
        "PYTHONUNBUFFERED": "1",  # log lines reach `vlm jobs logs --follow` as they are printed
    }
    env_vars.update(_env_pairs(list(env)))
    renv["env_vars"] = env_vars
    if pip:
        renv["pip"] = list(pip)
    return renv


def submit(
    entrypoint: list[str],
    *,
    address: str | None = None,
    working_dir: str | None = None,
    env: list[str] = (),
    pip: list[str] = (),
    job_id: str | None = None,
) -> tuple[object, str]:
    """Submit `entrypoint` (argv) as a Ray job. Returns (client, job id)."""
    if entrypoint and entrypoint[0] == "--":
        entrypoint = entrypoint[1:]
    if not entrypoint:
        raise InputError("nothing to run: give the command after --, e.g. vlm submit -- vlm pipeline run FILE")
    renv = runtime_env(working_dir, env, pip)
    client = job_client(address)
    url = dashboard_address(address)
    try:
        job = client.submit_job(
            entrypoint=shlex.join(entrypoint),
            runtime_env=renv,
            submission_id=job_id,
            metadata={"submitted_by": "vlm submit", "command": " ".join(entrypoint[:3])},
        )
    except ClusterError:
        raise
    except Exception as exc:
        raise _explain(exc, url) from None
    return client, job


def follow_logs(client, job_id: str, out=None) -> str:
    """Print the job's logs as they come until it ends; returns its final status name."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return wait(client, job_id)


def wait(client, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    """Block until the job is SUCCEEDED, FAILED or STOPPED; returns that status name."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise ClusterError(f"job {job_id} still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


# ---------------------------------------------------------------------------------------- CLI


def submit_command(args) -> int:
    client, job_id = submit(
        args.entrypoint,
        address=args.address,
        working_dir=args.working_dir,
        env=args.env,
        pip=args.pip,
        job_id=args.job_id,
    )
    url = dashboard_address(args.address)
    print(f"submitted job {job_id} to {url}", file=sys.stderr, flush=True)
    note = _local_store_note(url)
    if note:
        print(note, file=sys.stderr)
    if args.no_wait:
        print(job_id)
        print(f"follow: vlm jobs logs {job_id} --follow --address {url}", file=sys.stderr)
        return 0
    return _follow_and_report(client, job_id)


def _follow_and_report(client, job_id: str) -> int:
    try:
        status = follow_logs(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (vlm jobs stop {job_id})", file=sys.stderr)
        return 130
    return _report_end(client, job_id, status)


def _local_store_note(url: str) -> str | None:
    """A warning when a remote cluster is told to log to a file on this machine."""
    host = urlsplit(url).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1"):
        return None
    uri = _absolute_tracking_uri()
    if uri.startswith(("sqlite:", "file:", "/")):
        return (
            f"note: MLFLOW_TRACKING_URI is {uri}, a file on this machine; nodes of {host} log there only if "
            "they share that path (point MLFLOW_TRACKING_URI at a tracking server, cluster/README.md)"
        )
    return None


def _report_end(client, job_id: str, status: str) -> int:
    info = client.get_job_info(job_id)
    message = _message(info)
    line = f"job {job_id} {status}" + (f": {message}" if message and status != "SUCCEEDED" else "")
    print(line, file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _message(info) -> str:
    """The first line of Ray's status message, without the log excerpt it appends on failure."""
    lines = (info.message or "").strip().splitlines()
    return lines[0].split(", last available logs")[0] if lines else ""


def _fmt_time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _duration(info) -> str:
    if not info.start_time:
        return "-"
    end = info.end_time or time.time() * 1000
    return f"{(end - info.start_time) / 1000:.0f}s"


def jobs_table(jobs: list) -> str:
    rows = [("job", "status", "started", "time", "entrypoint")]
    for j in sorted(jobs, key=lambda j: j.start_time or 0):
        entry = j.entrypoint if len(j.entrypoint) <= 70 else j.entrypoint[:67] + "..."
        job_id = j.submission_id or j.job_id or "-"
        rows.append((job_id, str(j.status.value), _fmt_time(j.start_time), _duration(j), entry))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join([*(f"{c:<{w}}" for c, w in zip(r[:4], widths)), r[4]]) for r in rows)


def jobs_command(args) -> int:
    url = dashboard_address(args.address)
    client = job_client(args.address)
    job_id = getattr(args, "job_id", None)
    try:
        if args.action == "list":
            jobs = client.list_jobs()
            print(jobs_table(jobs) if jobs else f"no jobs on {url}")
            return 0
        if args.action == "status":
            info = client.get_job_info(job_id)
            print(f"job:        {job_id}")
            print(f"status:     {info.status.value}")
            print(f"entrypoint: {info.entrypoint}")
            print(f"started:    {_fmt_time(info.start_time)}   ended: {_fmt_time(info.end_time)}   ({_duration(info)})")
            if _message(info):
                print(f"message:    {_message(info)}")
            return 0
        if args.action == "logs":
            client.get_job_status(job_id)  # a clear error for an unknown id before tailing
            if args.follow:
                return _follow_and_report(client, job_id)
            sys.stdout.write(client.get_job_logs(job_id))
            return 0
        if args.action == "stop":
            stopped = client.stop_job(job_id)
            status = wait(client, job_id, timeout_s=60) if stopped else str(client.get_job_status(job_id).value)
            print(f"job {job_id} {status}" + ("" if stopped else " (it had already ended)"))
            return 0
    except (ClusterError, InputError):
        raise
    except Exception as exc:
        raise _explain(exc, url, job_id) from None
    raise InputError(f"unknown jobs action {args.action!r}")
