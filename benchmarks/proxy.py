"""What the pass-through proxy costs a client: added latency, throughput and streaming TTFT.

Three processes on 127.0.0.1: a minimal fixed-response upstream (a raw ASGI app under
uvicorn, so the figures measure the proxy rather than the simulator's tokenizer), the proxy
(``exporter.proxy.serve_proxy``, as the daemon runs it, recording every request), and this
load generator (httpx). Each figure compares the same requests sent directly to the upstream
and through the proxy, in alternating rounds so drift in machine load affects both alike:

- added latency: sequential non-streamed requests, p50 and p99 through the proxy minus direct
  (targets: p50 ≤ 1 ms, p99 ≤ 5 ms);
- throughput at concurrency 32, through the proxy ÷ direct (target ≥ 0.9);
- streaming time to first token with a 50 ms upstream prefill, through ÷ direct (≤ 1.05).

With ``litellm`` on PATH of a separate virtualenv (``--litellm /path/to/venv/bin/litellm``),
the same figures are measured for LiteLLM's proxy in front of the same upstream and printed
beside ours. Bounded by ``--requests``, ``--rounds`` and per-request timeouts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx

from tests.simulator_process import free_port

MODEL = "bench-model"
PROMPT = "You are a benchmark. " * 200
BODY = {
    "model": MODEL,
    "messages": [{"role": "system", "content": PROMPT}, {"role": "user", "content": "hi"}],
    "max_tokens": 8,
}
STREAM_BODY = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
# Every target gets the same header; LiteLLM checks it (it refuses to start without a master
# key), the upstream and our proxy pass it on or ignore it.
MASTER_KEY = "sk-bench-" + secrets.token_hex(24)
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
PREFILL_SECONDS = 0.05
TOKENS = 8
USAGE = {
    "prompt_tokens": 1210,
    "completion_tokens": TOKENS,
    "total_tokens": 1210 + TOKENS,
    "prompt_tokens_details": {"cached_tokens": 1152},
}


# -- the upstream -----------------------------------------------------------------------------


def _chunk(delta: dict[str, Any], usage: Any = None, finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "model": MODEL,
        "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}],
        "usage": usage,
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": USAGE,
    }
).encode()


async def upstream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers every POST with a fixed completion; a stream after PREFILL_SECONDS."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if b'"stream":true' not in body.replace(b" ", b""):
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(COMPLETION)),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": COMPLETION})
        return
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send(
        {"type": "http.response.body", "body": _chunk({"role": "assistant"}), "more_body": True}
    )
    await asyncio.sleep(PREFILL_SECONDS)
    for i in range(TOKENS):
        await send(
            {"type": "http.response.body", "body": _chunk({"content": f" w{i}"}), "more_body": True}
        )
    await send({"type": "http.response.body", "body": _chunk({}, finish="stop"), "more_body": True})
    await send({"type": "http.response.body", "body": _chunk({}, usage=USAGE), "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def serve_upstream(port: int) -> None:
    from exporter.asgi import serve_asgi

    async def main() -> None:
        # serve_asgi, not uvicorn.run: its socket gets TCP_NODELAY (no 40 ms delayed ACKs).
        async with serve_asgi(upstream_app, host="127.0.0.1", port=port):
            await anyio.sleep_forever()

    anyio.run(main)


def serve_our_proxy(port: int, upstream: str) -> None:
    from exporter.config.proxies import ProxyConfig
    from exporter.proxy import TrafficState, serve_proxy

    async def main() -> None:
        proxy = ProxyConfig(
            name="bench", type="openai", listen=f"127.0.0.1:{port}", upstream=upstream
        )
        async with serve_proxy(proxy, state=TrafficState(), grace=1.0, trust_env=False):
            await anyio.sleep_forever()

    anyio.run(main)


# -- processes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    url: str
    pid: int | None = None  # whose CPU time is counted (None: not measured)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its waited-for children (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


@contextmanager
def process(args: list[str], url: str, env: dict[str, str] | None = None) -> Iterator[Target]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                ready = httpx.post(url + "/v1/chat/completions", json=BODY, headers=AUTH, timeout=5)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"could not start {args[0]} {args[1:3]}")
            time.sleep(0.1)
        yield Target(url, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def me(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.proxy", *args]


@contextmanager
def litellm_proxy(binary: str, upstream: str) -> Iterator[Target]:
    port = free_port()
    config = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {
                    "model": f"openai/{MODEL}",
                    "api_base": upstream + "/v1",
                    "api_key": "bench",
                },
            }
        ],
        "litellm_settings": {"telemetry": False},
        "general_settings": {"master_key": MASTER_KEY},
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "litellm.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
        args = [binary, "--config", str(path), "--host", "127.0.0.1", "--port", str(port)]
        with process(args, f"http://127.0.0.1:{port}", env) as target:
            yield target


# -- measurements -----------------------------------------------------------------------------


async def latencies(client: httpx.AsyncClient, url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        response = await client.post(url + "/v1/chat/completions", json=BODY)
        response.read()
        out.append(time.perf_counter() - start)
        if response.status_code != 200:
            raise SystemExit(f"{url}: HTTP {response.status_code}")
    return out


async def throughput(
    client: httpx.AsyncClient, url: str, n: int, concurrency: int, body: Any = BODY
) -> float:
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            response = await client.post(url + "/v1/chat/completions", json=body)
            if response.status_code != 200:
                raise SystemExit(f"{url}: HTTP {response.status_code}")

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    return n / (time.perf_counter() - start)


async def ttfts(client: httpx.AsyncClient, url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        first: float | None = None
        async with client.stream("POST", url + "/v1/chat/completions", json=STREAM_BODY) as r:
            async for chunk in r.aiter_bytes():
                if first is None and b'"content"' in chunk:
                    first = time.perf_counter() - start
        if first is None:
            raise SystemExit(f"{url}: no token streamed")
        out.append(first)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


Runner = Callable[[httpx.AsyncClient, str], Awaitable[Any]]


async def measure(
    targets: dict[str, Target], requests: int, rounds: int
) -> dict[str, dict[str, Any]]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    out: dict[str, dict[str, Any]] = {
        name: {"lat": [], "tput": [], "slow": [], "ttft": [], "cpu": []} for name in targets
    }
    async with httpx.AsyncClient(
        trust_env=False, timeout=30, limits=limits, headers=AUTH
    ) as client:
        for target in targets.values():  # warm-up: connections, imports, caches
            await latencies(client, target.url, 20)
            await throughput(client, target.url, 64, 32)
        for _ in range(rounds):
            for name, target in targets.items():
                before = cpu_seconds(target.pid) if target.pid else 0.0
                out[name]["lat"] += await latencies(client, target.url, requests)
                if target.pid:
                    out[name]["cpu"].append((cpu_seconds(target.pid) - before) / requests)
                out[name]["tput"].append(await throughput(client, target.url, requests * 2, 32))
                # The same concurrency against an upstream that takes 50 ms (streams).
                slow = await throughput(client, target.url, requests, 32, STREAM_BODY)
                out[name]["slow"].append(slow)
                out[name]["ttft"] += await ttfts(client, target.url, max(10, requests // 10))
    return out


def report(results: dict[str, dict[str, Any]]) -> None:
    direct = results["direct"]
    d50, d99 = pct(direct["lat"], 0.5), pct(direct["lat"], 0.99)
    dt = statistics.median(direct["tput"])
    dslow = statistics.median(direct["slow"])
    dttft = statistics.median(direct["ttft"])
    print(
        f"direct            : latency p50 {d50 * 1e3:6.2f} ms  p99 {d99 * 1e3:6.2f} ms  "
        f"throughput {dt:7.0f} req/s ({dslow:.0f} with a 50 ms upstream)  "
        f"TTFT p50 {dttft * 1e3:6.2f} ms"
    )
    for name, figures in results.items():
        if name == "direct":
            continue
        p50, p99 = pct(figures["lat"], 0.5), pct(figures["lat"], 0.99)
        tput = statistics.median(figures["tput"])
        slow = statistics.median(figures["slow"])
        ttft = statistics.median(figures["ttft"])
        cpu = statistics.median(figures["cpu"]) if figures["cpu"] else float("nan")
        print(
            f"{name:18}: latency p50 {p50 * 1e3:6.2f} ms  p99 {p99 * 1e3:6.2f} ms  "
            f"throughput {tput:7.0f} req/s ({slow:.0f} with a 50 ms upstream)  "
            f"TTFT p50 {ttft * 1e3:6.2f} ms  CPU {cpu * 1e3:.2f} ms/request"
        )
        print(
            f"{'':18}  added p50 {(p50 - d50) * 1e3:+.2f} ms (target <= 1 ms), "
            f"added p99 {(p99 - d99) * 1e3:+.2f} ms (<= 5 ms), "
            f"throughput ratio {tput / dt:.3f} (>= 0.9; {slow / dslow:.3f} with a 50 ms "
            f"upstream), TTFT ratio {ttft / dttft:.3f} (<= 1.05)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role")
    up = sub.add_parser("upstream")
    up.add_argument("--port", type=int, required=True)
    px = sub.add_parser("proxy")
    px.add_argument("--port", type=int, required=True)
    px.add_argument("--upstream", required=True)
    parser.add_argument("--requests", type=int, default=500, help="per round and target")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--litellm", help="path of a litellm binary (in its own virtualenv)")
    args = parser.parse_args()
    if args.role == "upstream":
        serve_upstream(args.port)
        return
    if args.role == "proxy":
        serve_our_proxy(args.port, args.upstream)
        return
    up_port, proxy_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    with (
        process(me("upstream", "--port", str(up_port)), upstream) as direct,
        process(
            me("proxy", "--port", str(proxy_port), "--upstream", upstream),
            f"http://127.0.0.1:{proxy_port}",
        ) as ours,
    ):
        targets = {"direct": Target(direct.url), "prompt-cache-exporter": ours}
        if args.litellm:
            with litellm_proxy(args.litellm, upstream) as litellm:
                targets["litellm"] = litellm
                results = anyio.run(measure, targets, args.requests, args.rounds)
        else:
            results = anyio.run(measure, targets, args.requests, args.rounds)
    print(f"requests per round and target: {args.requests}, rounds: {args.rounds}, loopback")
    # Wall-clock figures depend on what else the machine runs; CPU per request hardly does.
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    report(results)


if __name__ == "__main__":
    main()
