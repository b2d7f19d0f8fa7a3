"""Scrape cost with 500 models × all five probes.

Fills the exporter's in-memory state as a day of probing would (every probe for every model,
with request histograms, TTL and size results), then measures:

* the time to render /metrics (collector snapshot + exposition), median of --rounds;
* the same samples held in plain prometheus-client Gauges, rendered with generate_latest()
  in the same run: the ratio is the collector's overhead (target <= 1.2);
* a full HTTP scrape of the real app on 127.0.0.1 (median), and the exposition size.

Bounded by --models and --rounds; loopback only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import anyio
import httpx
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.metrics import ExporterCollector, build_registry
from exporter.pricing import resolve_price
from exporter.probes import PROBE_NAMES
from exporter.results import ModelPrice, ProbeResult, RequestRecord, SizeOutcome, Verdict
from exporter.server import Readiness, create_app, serve
from exporter.state import State

NOW = 1_700_000_000.0


def populated_state(models: int) -> State:
    state = State()
    state.configure_provider(
        "bench", probes=PROBE_NAMES, intervals=dict.fromkeys(PROBE_NAMES, 300.0)
    )
    names = [f"model-{i:04d}" for i in range(models)]
    price = resolve_price(ModelPrice(1.0, 4.0, 0.1), None)
    state.set_models("bench", names, dict.fromkeys(names, price))
    for i, name in enumerate(names):
        for probe in PROBE_NAMES:
            requests = [
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
            result = ProbeResult(
                probe=probe,
                provider="bench",
                model=name,
                run_id=f"{name}-{probe}",
                verdict=Verdict.WORKS,
                started_at=NOW - 3,
                finished_at=NOW,
                duration_seconds=3.0,
                hit_ratio=0.93,
                requests=requests,
            )
            if probe == "prompt_sizes":
                result.sizes = {
                    s: SizeOutcome(t, Verdict.WORKS, 0.95, t)
                    for s, t in (
                        ("small", 1100),
                        ("medium", 2000),
                        ("large", 4000),
                        ("xlarge", 8000),
                    )
                }
            if probe == "ttl":
                result.ttl = {1.0: True, 5.0: True, 10.0: True, 30.0: False}
            if probe == "persistence":
                result.first_miss_index = None
            state.observe_result(result)
        state.set_reliability("bench", name, 97.5)
        state.record_failures("bench", name, 0, 0.0)
    state.set_balance("bench", "usd", 12.5)
    return state


def plain_gauges(text: str) -> CollectorRegistry:
    """The same samples as plain Gauges, one per sample name."""
    registry = CollectorRegistry()
    gauges: dict[str, Gauge] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            gauge = gauges.get(sample.name)
            if gauge is None:
                gauge = Gauge(
                    sample.name,
                    family.documentation or "x",
                    labelnames=sorted(sample.labels),
                    registry=registry,
                )
                gauges[sample.name] = gauge
            if sample.labels:
                gauge.labels(**sample.labels).set(sample.value)
            else:
                gauge.set(sample.value)
    return registry


def timed(fn: object, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _NoRuns:
    async def recent_runs(self, **_: object) -> list[ProbeResult]:
        return []


async def http_scrape(registry: CollectorRegistry, rounds: int) -> tuple[float, int]:
    app = create_app(
        registry=registry,
        runs=_NoRuns(),
        readiness=lambda: Readiness(True),
        reload=None,
        web_config=None,
        probe_names=PROBE_NAMES,
        version="bench",
    )
    times = []
    size = 0
    async with serve(app, host="127.0.0.1", port=0) as address, httpx.AsyncClient() as client:
        for _ in range(rounds):
            start = time.perf_counter()
            response = await client.get(address.url + "/metrics")
            times.append(time.perf_counter() - start)
            size = len(response.content)
    return statistics.median(times), size


def main(models: int, rounds: int) -> None:
    build_start = time.perf_counter()
    state = populated_state(models)
    registry = build_registry(ExporterCollector(state, now=lambda: NOW))
    text = generate_latest(registry).decode()
    series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    llm_series = sum(1 for line in text.splitlines() if line.startswith("llmcache_"))
    plain = plain_gauges(text)
    print(
        f"models: {models}, series: {series} ({llm_series} llmcache_), "
        f"exposition: {len(text.encode()) / 1024:.0f} KiB, "
        f"set-up {time.perf_counter() - build_start:.1f}s"
    )
    ours, theirs = [], []
    for _ in range(rounds):  # alternate, so machine noise hits both alike
        ours.append(timed(lambda: generate_latest(registry), 1))
        theirs.append(timed(lambda: generate_latest(plain), 1))
    o, t = statistics.median(ours), statistics.median(theirs)
    print(f"render, exporter collector : {o * 1000:7.1f} ms (median of {rounds})")
    print(f"render, plain Gauges       : {t * 1000:7.1f} ms (median of {rounds})")
    print(f"ratio collector/plain      : {o / t:.3f} (target <= 1.2)")
    http, size = anyio.run(http_scrape, registry, rounds)
    print(f"HTTP scrape of /metrics    : {http * 1000:7.1f} ms (median), {size / 1024:.0f} KiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    main(args.models, args.rounds)
