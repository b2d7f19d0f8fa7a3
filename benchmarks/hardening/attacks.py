"""Issue 8 items 1, 2, 5, 6, 7: each attack against whatever ``exporter`` is on the path.

    python -m benchmarks.hardening.attacks bomb|leak|drip|series|idle

Prints one figure per attack with its floor. Uses only public APIs that main has too, so
``PYTHONPATH=<old checkout>`` measures "before". Loopback only; every loop bounded.
"""

from __future__ import annotations

import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx

from exporter.clock import SystemClock
from exporter.providers.base import Prompt
from exporter.providers.openai import OpenAIAdapter
from exporter.transport import RetryPolicy, Transport, TransportError
from tests.hostile_upstream import Reply, gzip_bomb, hostile_upstream

KEY = "sk-MARKER-7f3a9c1e5b2d4f6a8c0e2b4d6f8a0c2e"


def _adapter(url: str) -> OpenAIAdapter:
    return OpenAIAdapter(base_url=url, api_key=KEY, stream=True)


async def _complete(url: str, stream: bool, deadline: float = 30.0) -> object:
    async with httpx.AsyncClient() as client:
        t = Transport(client, policy=RetryPolicy(attempts=1, timeout=deadline), clock=SystemClock())
        a = _adapter(url)
        return await t.complete(a, a.chat_request("m", Prompt("r1 sys", "hi"), stream=stream),
                                stream=stream)  # fmt: skip


async def bomb() -> None:
    body = gzip_bomb(1 << 30)  # 1 GiB of zeros, gzipped twice
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    headers = [("Content-Type", "application/json"), ("Content-Encoding", "gzip, gzip")]
    async with hostile_upstream(lambda *_: Reply(200, headers, body)) as up:
        exchange = await _complete(up.url, stream=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    outcome = getattr(exchange, "error", None)
    print(f"bomb of {len(body)} bytes on the wire: peak RSS {peak} MB (was {before} MB before "
          f"the request; floor: + a few MB); outcome: {outcome}")  # fmt: skip


async def leak() -> None:
    escaped = "".join(f"\\u{ord(c):04x}" for c in KEY)
    usage = {"prompt_tokens": "__K__", "completion_tokens": 1}
    ok = json.dumps({"choices": [], "usage": usage}).replace('"__K__"', f'"{escaped}"').encode()
    cases = {
        "x-request-id echo": Reply(200, [("Content-Type", "application/json"),
                                         ("x-request-id", f"req-{KEY}")], ok),
        "401 body, key at the cut": Reply(401, [("Content-Type", "application/json")], json.dumps(
            {"error": {"message": "x" * 270 + f" invalid api key {KEY}"}}).encode()),
        "plain-text 500 echo": Reply(500, [("Content-Type", "text/plain")],
                                     ("y" * 190 + KEY).encode()),
    }  # fmt: skip
    total = 0
    for name, reply in cases.items():
        async with hostile_upstream(lambda *_, r=reply: r) as up:
            exchange = await _complete(up.url, stream=False)
        kept = f"{getattr(exchange, 'error', '')} {getattr(exchange, 'meta', '')}"
        found = sum(KEY[i : i + 6] in kept for i in range(len(KEY) - 5))
        total += found
        print(f"  {name}: {found} key fragments of 6+ characters kept")
    print(f"leaked key fragments: {total} (floor: 0)")


async def drip() -> None:
    reply = Reply(200, [("Content-Type", "application/json"), ("Content-Length", "42")],
                  [b" "] * 40 + [b"{}"], pause=0.5)  # fmt: skip
    async with hostile_upstream(lambda *_: reply) as up, httpx.AsyncClient() as client:
        t = Transport(client, policy=RetryPolicy(attempts=1, timeout=2.0), clock=SystemClock())
        a = _adapter(up.url)
        started = time.monotonic()
        try:
            await t.get_json(a, a.models_request())
            outcome = "answered"
        except TransportError as exc:
            outcome = f"{exc.error_type}: {exc}"
        took = time.monotonic() - started
    print(f"models endpoint dripping 1 byte / 0.5 s, timeout 2 s: gave up after {took:.1f} s "
          f"(floor: ~2 s); {outcome}")  # fmt: skip


async def series() -> None:
    headers = {f"x-ratelimit-remaining-odd{i}": "5" for i in range(300)}
    headers |= {"x-ratelimit-remaining-requests": "1", "x-ratelimit-remaining-tokens": "2"}
    resources = _adapter("http://127.0.0.1:1").parse_meta(headers).ratelimit_remaining
    print(f"ratelimit resources from 300 made-up + 2 real headers: {len(resources)} (floor: 2)")


SERVER = """
import resource, anyio, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
from prometheus_client import CollectorRegistry
from exporter.server import DependencyStatus, Readiness, create_app, serve
class R:
    async def recent_runs(self, **_): return []
async def main():
    app = create_app(registry=CollectorRegistry(), runs=R(), readiness=lambda: Readiness.of(
        s=DependencyStatus(True)), reload=None, web_config=None, probe_names=("basic",),
        version="t")
    async with serve(app, host="127.0.0.1", port=0) as address:
        print(address.port, flush=True)
        await anyio.sleep(40)
anyio.run(main)
"""


async def idle() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    log_path = Path(tempfile.mkdtemp()) / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(  # noqa: ASYNC220 - the server under test, in its own process
            [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, stderr=log, text=True
        )
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        streams = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(1100)]
        ok = 0
        async with httpx.AsyncClient(timeout=8.0) as client:
            for _ in range(4):
                with contextlib.suppress(httpx.HTTPError):
                    ok += (await client.get(f"http://127.0.0.1:{port}/metrics")).status_code == 200
        for stream in streams:
            await stream.aclose()
        proc.terminate()
        proc.wait(10)
    lines = len(log_path.read_text().splitlines())
    print(f"scrapes answered with 1,100 idle connections and 1,024 descriptors: {ok}/4 "
          f"(floor: 4/4); server log: {lines} lines")  # fmt: skip


if __name__ == "__main__":
    anyio.run(
        {"bomb": bomb, "leak": leak, "drip": drip, "series": series, "idle": idle}[sys.argv[1]]
    )
