"""Scrape cost with 500 models × all five probes, beside its floor.

Fills the exporter's in-memory state as a day of probing would (every probe for every model,
TTL and size results, request timings), serves it with the real app on 127.0.0.1 and
measures, median of --rounds each:

* the HTTP scrape of /metrics (identity encoding), and the same bytes served as a fixed
  string by the same server stack (the static floor): their ratio is what the exporter adds
  to sending bytes (target <= 3);
* the same with gzip (Accept-Encoding: gzip, as Prometheus asks);
* the scrape right after one model's probe result changed (the re-render of that model);
* series per model and per provider, and the resident memory of this process (state,
  prepared exposition, server and client together).

Bounded by --models and --rounds; loopback only.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Awaitable, Callable

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from benchmarks.procstatus import rss_mb
from exporter.exposition import Exposition
from exporter.memtrim import configure_allocator
from exporter.metrics import build_registry
from exporter.pricing import resolve_price
from exporter.probes import PROBE_NAMES
from exporter.results import ModelPrice, ProbeResult, RequestRecord, SizeOutcome, Verdict
from exporter.server import Readiness, create_app, serve
from exporter.state import State

NOW = 1_700_000_000.0
PROVIDER = "bench"


def _requests(i: int) -> list[RequestRecord]:
    return [
        RequestRecord(
            "prime",
            True,
            attempts=1,
            status=200,
            prompt_tokens=1100,
            cached_tokens=0,
            completion_tokens=5,
            latency_seconds=0.4,
            ttft_seconds=0.3,
            hit=False,
        ),
        RequestRecord(
            "repeat",
            False,
            attempts=1,
            status=200,
            prompt_tokens=1100,
            cached_tokens=1024,
            completion_tokens=5,
            latency_seconds=0.2,
            ttft_seconds=0.1 + (i % 7) / 100,
            hit=True,
        ),
    ]


def result(name: str, probe: str, i: int, finished: float = NOW) -> ProbeResult:
    out = ProbeResult(
        probe=probe,
        provider=PROVIDER,
        model=name,
        run_id=f"{name}-{probe}-{finished}",
        verdict=Verdict.WORKS,
        started_at=finished - 3,
        finished_at=finished,
        duration_seconds=3.0,
        hit_ratio=0.93,
        requests=_requests(i),
    )
    if probe == "prompt_sizes":
        out.sizes = {
            s: SizeOutcome(t, Verdict.WORKS, 0.95, t)
            for s, t in (("small", 1100), ("medium", 2000), ("large", 4000), ("xlarge", 8000))
        }
    if probe == "ttl":
        out.ttl = {1.0: True, 5.0: True, 10.0: True, 30.0: False}
    return out


def populated_state(models: int) -> State:
    state = State()
    state.configure_provider(
        PROVIDER, probes=PROBE_NAMES, intervals=dict.fromkeys(PROBE_NAMES, 300.0)
    )
    names = [f"model-{i:04d}" for i in range(models)]
    price = resolve_price(ModelPrice(1.0, 4.0, 0.1), None)
    state.set_models(PROVIDER, names, dict.fromkeys(names, price))
    for i, name in enumerate(names):
        for probe in PROBE_NAMES:
            state.observe_result(result(name, probe, i))
        state.set_reliability(PROVIDER, name, 97.5)
        state.record_failures(PROVIDER, name, 0, 0.0)
    state.set_balance(PROVIDER, "usd", 12.5)
    return state


class _NoRuns:
    async def recent_runs(self, **_: object) -> list[ProbeResult]:
        return []


def static_app(body: bytes, headers: dict[str, str]) -> Starlette:
    """The floor: the same bytes as a fixed string, same Starlette and uvicorn stack."""

    async def metrics(request: Request) -> Response:
        return Response(body, headers=headers)

    return Starlette(routes=[Route("/metrics", metrics)])


async def median_get(
    url: str, rounds: int, headers: dict[str, str], between: Callable[[], None] | None = None
) -> tuple[float, bytes, httpx.Headers]:
    """Median time of GET ``url``; the last answer's raw (undecoded) body and headers."""
    times = []
    raw = b""
    got = httpx.Headers()
    # Raw bytes: the client does not decompress, so the time is the server's and the wire's.
    async with httpx.AsyncClient(timeout=60) as client:
        await client.get(url, headers=headers)  # warm the connection
        for _ in range(rounds):
            if between is not None:
                between()
            start = time.perf_counter()
            async with client.stream("GET", url, headers=headers) as streamed:
                raw = b"".join([chunk async for chunk in streamed.aiter_raw()])
            times.append(time.perf_counter() - start)
            got = streamed.headers
    return statistics.median(times), raw, got


async def serve_and(app: Starlette, run: Callable[[str], Awaitable[None]]) -> None:
    async with serve(app, host="127.0.0.1", port=0) as address:
        await run(address.url + "/metrics")


def series_counts(text: str, models: int) -> tuple[float, int]:
    per_model = per_provider = 0
    for line in text.splitlines():
        if not line.startswith("llmcache_"):
            continue
        if re.search(r'[{,]model="', line):
            per_model += 1
        else:
            per_provider += 1
    return per_model / models, per_provider


async def measure(models: int, rounds: int) -> None:
    floor_rss, _ = rss_mb()  # the interpreter and its libraries, before any model
    build = time.perf_counter()
    state = populated_state(models)
    exposition = Exposition(state, now=lambda: NOW)
    app = create_app(
        registry=build_registry(),
        runs=_NoRuns(),
        readiness=lambda: Readiness(True),
        reload=None,
        web_config=None,
        probe_names=PROBE_NAMES,
        version="bench",
        exposition=exposition,
    )
    identity = {"Accept-Encoding": "identity"}
    gzipped = {"Accept-Encoding": "gzip"}
    figures: dict[str, float] = {}
    kept: dict[str, tuple[bytes, httpx.Headers]] = {}
    changed = iter(range(1, 1_000_000))

    def change_one_model() -> None:
        n = next(changed)
        state.observe_result(result(f"model-{n % models:04d}", "basic", n, NOW + n))

    async def scrapes(url: str) -> None:
        figures["scrape"], *kept["identity"] = await median_get(url, rounds, identity)
        figures["gzip"], *kept["gzip"] = await median_get(url, rounds, gzipped)
        figures["changed"], *_ = await median_get(url, rounds, gzipped, change_one_model)

    await serve_and(app, scrapes)
    body, headers = kept["identity"]
    gz_body, _ = kept["gzip"]
    per_model, per_provider = series_counts(body.decode(), models)
    print(
        f"models: {models}, exposition {len(body) / 2**20:.2f} MiB "
        f"({len(gz_body) / 1024:.0f} KiB gzip), set-up "
        f"{time.perf_counter() - build:.1f}s"
    )

    async def floor(url: str) -> None:
        figures["floor"], *_ = await median_get(url, rounds, identity)

    async def gzip_floor(url: str) -> None:
        figures["gzip_floor"], *_ = await median_get(url, rounds, gzipped)

    plain_headers = {"Content-Type": headers["content-type"]}
    await serve_and(static_app(body, plain_headers), floor)
    gzip_headers = {**plain_headers, "Content-Encoding": "gzip"}
    await serve_and(static_app(gz_body, gzip_headers), gzip_floor)
    rss, peak = rss_mb()
    print(
        f"HTTP scrape of /metrics         : {figures['scrape'] * 1000:7.2f} ms (median of {rounds})"
    )
    print(f"static floor (same bytes)       : {figures['floor'] * 1000:7.2f} ms")
    print(f"scrape/static-floor ratio: {figures['scrape'] / figures['floor']:.2f} (target <= 3)")
    print(f"HTTP scrape, gzip               : {figures['gzip'] * 1000:7.2f} ms")
    print(f"static floor, gzip              : {figures['gzip_floor'] * 1000:7.2f} ms")
    print(f"gzip scrape/static-floor ratio: {figures['gzip'] / figures['gzip_floor']:.2f}")
    print(
        f"gzip scrape after one model changed: {figures['changed'] * 1000:7.2f} ms "
        "(that model re-rendered, the whole exposition re-joined and re-compressed)"
    )
    print(f"series per model: {per_model:g}")
    print(f"series per provider (beside its models): {per_provider}")
    print(
        f"RSS of this process: {rss:.1f} MB (peak {peak:.1f} MB; state, exposition, server, "
        f"client); floor {floor_rss:.1f} MB before any model, "
        f"+{rss - floor_rss:.1f} MB for {models} models"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    configure_allocator()  # as the daemon does
    anyio.run(measure, args.models, args.rounds)
