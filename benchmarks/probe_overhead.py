"""Overhead of the probe engine: requests per second it sustains against the simulator (zero
added latency) divided by a bare httpx loop sending the same requests in the same run.

The bare loop only sends each request and reads the streamed bytes; the engine also builds
prompts, parses every SSE event, validates usage and records evidence. Target: >= 0.8.
Rounds alternate (bare, engine, bare, ...) and the median of each is reported, so drift in
machine load affects both alike. Loopback only; bounded by --requests and --rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import anyio
import httpx

from exporter.clock import SystemClock
from exporter.probes import ProbeContext, ProbeSettings, run_probe
from exporter.prompts import PromptFactory
from exporter.providers.openai import OpenAIAdapter
from exporter.transport import RetryPolicy, Transport
from tests.simulator_process import simulator

MODEL = "sim-cache-ok"


async def bare_loop(client: httpx.AsyncClient, adapter: OpenAIAdapter, n: int) -> float:
    factory = PromptFactory()
    prompt = factory.prompt("bench", run_id="bare", target_tokens=1075)
    request = adapter.chat_request(MODEL, prompt, stream=True)
    start = time.perf_counter()
    for _ in range(n):
        async with client.stream(
            "POST", request.url, headers=request.headers, json=request.json
        ) as response:
            async for _chunk in response.aiter_bytes():
                pass
    return n / (time.perf_counter() - start)


async def engine_loop(client: httpx.AsyncClient, adapter: OpenAIAdapter, n: int) -> float:
    clock = SystemClock()
    settings = ProbeSettings(persistence_requests=10)
    transport = Transport(client, policy=RetryPolicy(), clock=clock)
    factory = PromptFactory()
    sent = 0
    start = time.perf_counter()
    while sent < n:
        ctx = ProbeContext(
            provider="bench",
            model=MODEL,
            adapter=adapter,
            transport=transport,
            prompts=factory,
            clock=clock,
            settings=settings,
        )
        result = await run_probe("persistence", ctx)
        if result.error:
            raise SystemExit(f"probe failed: {result.error}")
        sent += len(result.requests)
    return sent / (time.perf_counter() - start)


async def main(requests: int, rounds: int) -> None:
    with simulator() as sim:  # zero added latency
        adapter = OpenAIAdapter(base_url=sim.base_url, api_key=None)
        bare: list[float] = []
        engine: list[float] = []
        async with httpx.AsyncClient(trust_env=False) as client:
            await bare_loop(client, adapter, 20)  # warm-up: connections, imports
            for _ in range(rounds):
                bare.append(await bare_loop(client, adapter, requests))
                engine.append(await engine_loop(client, adapter, requests))
    b, e = statistics.median(bare), statistics.median(engine)
    print(f"requests per round: {requests}, rounds: {rounds}")
    print(
        f"bare httpx loop : {b:8.1f} req/s (median; rounds {', '.join(f'{x:.0f}' for x in bare)})"
    )
    print(
        f"probe engine    : {e:8.1f} req/s (median; rounds {', '.join(f'{x:.0f}' for x in engine)})"
    )
    print(f"ratio engine/bare: {e / b:.3f} (target >= 0.8)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    anyio.run(main, args.requests, args.rounds)
