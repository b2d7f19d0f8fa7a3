"""The simulator as a separate process (it must outlive exporter processes that tests kill)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SimProcess:
    def __init__(self, url: str) -> None:
        self.url = url

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.url + "/sim/stats", timeout=10).json()
        return data

    def billed_tokens(self) -> int:
        totals = self.stats()["totals"]
        return int(totals["prompt_tokens"]) + int(totals["completion_tokens"])

    def chat_requests(self) -> int:
        return int(self.stats()["totals"]["requests"])


@contextmanager
def simulator(*args: str, port: int | None = None) -> Iterator[SimProcess]:
    port = port or free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exporter",
            "simulate",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--latency-scale",
            "0",
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("simulator did not start")
            time.sleep(0.05)
        yield SimProcess(url)
    finally:
        proc.terminate()
        proc.wait(10)
