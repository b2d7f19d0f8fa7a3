"""Start the simulator in its own process for benchmarks (loopback only, bounded lifetime)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def simulator(*args: str, timeout: float = 900.0) -> Iterator[str]:
    """Yields the base URL of a simulator process; it is killed on exit or after ``timeout``."""
    port = free_port()
    proc = subprocess.Popen(
        [
            "timeout",
            str(int(timeout)),
            sys.executable,
            "-m",
            "exporter",
            "simulate",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *args,
        ],
        stdout=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("simulator did not start")
            time.sleep(0.1)
        yield base + "/v1"
    finally:
        proc.terminate()
        proc.wait(10)
