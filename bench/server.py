"""``metasent serve`` in a subprocess for the benchmarks (speed, HTTP food, load), ready when its
``/healthz`` answers ``ok``; one place for the start, the wait and the stop."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)


def wait_ready(url: str, process: subprocess.Popen | None = None, timeout: float = 300.0) -> None:
    """Poll ``<url>/healthz`` until it answers ``{"status": "ok"}``.

    Raises:
        RuntimeError: when ``process`` exits first.
        TimeoutError: after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).json().get("status") == "ok":
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def free_port() -> int:
    """A TCP port nobody listens on now (bound to port 0, then released), for a subprocess."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def local_server(
    port: int,
    checkpoint: str | Path | None = None,
    threads: int | None = None,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    timeout: float = 300.0,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start ``metasent serve`` on 127.0.0.1:``port`` with a fresh SQLite domain store (a new
    temporary ``METASENT_DATA_DIR``, unless ``env`` sets one), wait until it is ready, and stop it
    on exit.

    Args:
        port (`int`): the port.
        checkpoint (`str | Path`, *optional*): served checkpoint (default: the server's default).
        threads (`int`, *optional*): torch CPU threads of the server.
        env (`Mapping[str, str]`, *optional*): more ``METASENT_*`` settings.
        log (`Path`, *optional*): file for the server's output (default: inherited).
        timeout (`float`, defaults to 300): seconds to wait for readiness.

    Yields:
        `(str, subprocess.Popen)`: the base URL and the server process.
    """
    command = [sys.executable, "-m", "metasent.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if checkpoint is not None:
        command += ["--checkpoint", str(checkpoint)]
    if threads:
        command += ["--threads", str(threads)]
    environment = {key: value for key, value in os.environ.items() if key != "METASENT_DATABASE_URL"}
    environment["METASENT_DATA_DIR"] = tempfile.mkdtemp(prefix="metasent-bench-")
    environment.update(env or {})
    url = f"http://127.0.0.1:{port}"
    logger.info("starting %s (data: %s)", " ".join(command), environment["METASENT_DATA_DIR"])
    with ExitStack() as stack:
        out = stack.enter_context(log.open("w")) if log is not None else None
        process = subprocess.Popen(command, env=environment, stdout=out, stderr=subprocess.STDOUT if out else None)
        try:
            wait_ready(url, process, timeout)
            yield url, process
        finally:
            process.terminate()
            process.wait(timeout=60)
