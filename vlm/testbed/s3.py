"""A local S3-compatible server for tests and benchmarks: moto's server mode in its own process."""

from __future__ import annotations

import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto(port: int, *, log=subprocess.DEVNULL, env: dict[str, str] | None = None, timeout_s: float = 60):
    """Start `python -m moto.server` on 127.0.0.1:`port` and wait until it accepts connections.
    Returns the process; RuntimeError (the process stopped) if it does not come up in `timeout_s`."""
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"moto server did not start on 127.0.0.1:{port}") from None
            time.sleep(0.2)
