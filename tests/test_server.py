"""The HTTP endpoints over real loopback HTTP: /metrics, health, readiness, /api/runs, reload.

TLS, basic auth and the web config file itself are tested in test_webconfig.py.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette

from exporter.clock import FakeClock
from exporter.metrics import ExporterCollector, build_registry
from exporter.results import ErrorType, ProbeResult, RequestRecord, SizeOutcome, Verdict
from exporter.server import (
    DependencyStatus,
    Readiness,
    create_app,
    run_to_json,
    serve,
)
from exporter.state import State
from exporter.store import Store
from exporter.webconfig import WebConfig

START = 1_700_000_000.0  # 2023-11-14T22:13:20Z
PROBES = ("basic", "prompt_sizes", "ttl", "persistence", "partial")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- fakes and helpers ------------------------------------------------------------------


class FakeRuns:
    """A RunsSource that records its calls and returns (or raises) what it is told."""

    def __init__(self, results: Iterable[ProbeResult] = (), error: Exception | None = None):
        self.results = list(results)
        self.error = error
        self.calls: list[dict[str, Any]] = []

    async def recent_runs(
        self,
        *,
        provider: str | None,
        model: str | None,
        probe: str | None,
        limit: int,
        trace_id: str | None = None,
    ) -> list[ProbeResult]:
        call = {"provider": provider, "model": model, "probe": probe, "limit": limit}
        self.calls.append({**call, **({"trace_id": trace_id} if trace_id else {})})
        if self.error is not None:
            raise self.error
        return self.results


def ready() -> Readiness:
    return Readiness.of(
        store=DependencyStatus(True, "open"), scheduler=DependencyStatus(True, "running")
    )


def make_app(
    *,
    registry: CollectorRegistry | None = None,
    runs: Any = None,
    readiness: Callable[[], Readiness] = ready,
    reload: Callable[[], Awaitable[tuple[bool, str]]] | None = None,
    web_config: WebConfig | None = None,
) -> Starlette:
    return create_app(
        registry=registry or CollectorRegistry(),
        runs=runs if runs is not None else FakeRuns(),
        readiness=readiness,
        reload=reload,
        web_config=web_config,
        probe_names=PROBES,
        version="1.2.3-test",
    )


@contextlib.asynccontextmanager
async def running(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        serve(app, host="127.0.0.1", port=0) as address,
        httpx.AsyncClient(base_url=address.url, timeout=10.0) as client,
    ):
        yield client


def result(
    run_id: str,
    *,
    provider: str = "venice",
    model: str = "llama-3.3-70b",
    probe: str = "basic",
    finished_at: float = START,
) -> ProbeResult:
    return ProbeResult(
        probe=probe,
        provider=provider,
        model=model,
        run_id=run_id,
        verdict=Verdict.WORKS,
        started_at=finished_at - 2.0,
        finished_at=finished_at,
        duration_seconds=2.0,
        hit_ratio=0.9,
        requests=[
            RequestRecord(
                label="prime",
                cold=True,
                status=200,
                attempts=1,
                prompt_tokens=1200,
                cached_tokens=0,
                completion_tokens=4,
                ttft_seconds=0.5,
            ),
            RequestRecord(
                label="repeat",
                cold=False,
                status=200,
                attempts=1,
                prompt_tokens=1200,
                cached_tokens=1080,
                completion_tokens=4,
                ttft_seconds=0.25,
                hit=True,
            ),
        ],
    )


def rich_result() -> ProbeResult:
    return ProbeResult(
        probe="ttl",
        provider="venice",
        model="qwen-2.5",
        run_id="rich",
        verdict=Verdict.FLAKY,
        started_at=START,
        finished_at=START + 12.5,
        duration_seconds=12.5,
        hit_ratio=0.5,
        requests=[
            RequestRecord(
                label="prime",
                span_id="00f067aa0ba902b7",
                cold=True,
                started_at=START,
                status=200,
                attempts=1,
                request_id="req-1",
                streamed=True,
                prompt_tokens=1200,
                cached_tokens=0,
                cache_write_tokens=1100,
                completion_tokens=5,
                latency_seconds=1.25,
                ttfb_seconds=0.25,
                ttft_seconds=0.5,
                hit=False,
                baseline_tokens=0,
                cost={"usd": 0.00125},
            ),
            RequestRecord(
                label="repeat after 1s",
                span_id="53995c3f42cd8ad8",
                cold=False,
                status=200,
                attempts=1,
                prompt_tokens=1200,
                cached_tokens=1152,
                completion_tokens=5,
                latency_seconds=0.5,
                ttft_seconds=0.2,
                hit=True,
                baseline_tokens=0,
            ),
            RequestRecord(
                label="repeat after 2s",
                span_id="b7ad6b7169203331",
                cold=False,
                status=200,
                attempts=1,
                prompt_tokens=1200,
                cached_tokens=1152,
                completion_tokens=5,
                ttft_seconds=0.4,
                hit=True,
                baseline_tokens=0,
            ),
            RequestRecord(
                label="repeat after 5s",
                span_id="e457b5a2e4d86bd1",
                cold=False,
                status=429,
                attempts=3,
                ttft_seconds=9.0,  # failed: must not count in the warm mean
                error_type=ErrorType.RATE_LIMIT,
                error="429 Too Many Requests",
            ),
        ],
        pollution=True,
        baseline_tokens=0,
        sizes={"large": SizeOutcome(4096, Verdict.WORKS, 0.96875, 4100)},
        ttl={1.0: True, 2.0: True, 5.0: None},
        first_miss_index=3,
        shared_prefix_tokens=1024,
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
    )


# --- /metrics ---------------------------------------------------------------------------


def registry_with_samples() -> CollectorRegistry:
    registry = CollectorRegistry()
    Gauge("llmcache_caching_works", "Caching works.", ["provider"], registry=registry).labels(
        "venice"
    ).set(1)
    Counter("llmcache_requests", "Requests.", registry=registry).inc(3)
    return registry


@pytest.mark.anyio
async def test_metrics_prometheus_text_by_default() -> None:
    async with running(make_app(registry=registry_with_samples())) as client:
        response = await client.get("/metrics", headers={"Accept-Encoding": "identity"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "content-encoding" not in response.headers
    assert 'llmcache_caching_works{provider="venice"} 1.0' in response.text
    assert "llmcache_requests_total 3.0" in response.text
    assert "# EOF" not in response.text


@pytest.mark.anyio
async def test_metrics_openmetrics_by_negotiation() -> None:
    async with running(make_app(registry=registry_with_samples())) as client:
        response = await client.get(
            "/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0,text/plain;q=0.5"},
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    )
    assert response.text.endswith("# EOF\n")
    assert "llmcache_requests_total 3.0" in response.text


@pytest.mark.anyio
async def test_metrics_gzip_when_accepted() -> None:
    async with running(make_app(registry=registry_with_samples())) as client:
        request = client.build_request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
        response = await client.send(request, stream=True)
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
        await response.aclose()
    assert response.headers["content-encoding"] == "gzip"
    assert "Accept-Encoding" in response.headers["vary"]
    assert b"llmcache_requests_total 3.0" in gzip.decompress(raw)


@pytest.mark.anyio
async def test_metrics_name_filter() -> None:
    async with running(make_app(registry=registry_with_samples())) as client:
        response = await client.get("/metrics", params={"name[]": "llmcache_caching_works"})
    assert "llmcache_caching_works" in response.text
    assert "llmcache_requests_total" not in response.text


@pytest.mark.anyio
async def test_metrics_head_and_method_not_allowed() -> None:
    async with running(make_app(registry=registry_with_samples())) as client:
        head = await client.head("/metrics")
        post = await client.post("/metrics")
    assert head.status_code == 200
    assert head.headers["content-type"].startswith("text/plain")
    assert head.content == b""
    assert post.status_code == 405
    assert post.headers["allow"] == "GET, HEAD"


class FailingCollector(Collector):
    def collect(self) -> Iterable[GaugeMetricFamily]:
        raise RuntimeError("bug in a collector")


@pytest.mark.anyio
async def test_metrics_collector_failure_is_a_500_without_traceback() -> None:
    registry = CollectorRegistry()
    registry.register(FailingCollector())
    async with running(make_app(registry=registry)) as client:
        response = await client.get("/metrics")
    assert response.status_code == 500
    assert response.text == "error rendering metrics\n"


class SlowCollector(Collector):
    """Blocks its thread for 0.2 s per collect(), like a huge exposition would."""

    def __init__(self) -> None:
        self.calls = 0

    def collect(self) -> Iterable[GaugeMetricFamily]:
        self.calls += 1
        time.sleep(0.2)  # deliberately blocking: this must not stall the event loop
        yield GaugeMetricFamily("llmcache_slow", "Slow.", value=1)


@pytest.mark.anyio
async def test_slow_metrics_render_does_not_block_the_event_loop() -> None:
    registry = CollectorRegistry()
    slow = SlowCollector()
    registry.register(slow)  # register() calls collect() once to learn the names
    ticks = 0
    async with running(make_app(registry=registry)) as client:

        async def tick() -> None:
            nonlocal ticks
            while True:
                await anyio.sleep(0.005)
                ticks += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(tick)
            response = await client.get("/metrics")
            tg.cancel_scope.cancel()
    assert response.status_code == 200
    assert "llmcache_slow 1.0" in response.text
    # 0.2 s of blocking at 5 ms per tick: a blocked loop would tick a handful of times at most.
    assert ticks >= 10


# --- health and readiness ---------------------------------------------------------------


@pytest.mark.anyio
async def test_healthz() -> None:
    async with running(make_app()) as client:
        response = await client.get("/healthz")
        post = await client.post("/healthz")
    assert response.status_code == 200
    assert response.text == "ok\n"
    assert post.status_code == 405


@pytest.mark.anyio
async def test_readyz_ready() -> None:
    async with running(make_app()) as client:
        response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "status": "ready",
        "checks": {
            "store": {"ok": True, "detail": "open"},
            "scheduler": {"ok": True, "detail": "running"},
        },
    }


@pytest.mark.anyio
async def test_readyz_not_ready() -> None:
    def not_ready() -> Readiness:
        return Readiness.of(
            store=DependencyStatus(False, "database is locked"),
            scheduler=DependencyStatus(True, "running"),
        )

    async with running(make_app(readiness=not_ready)) as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not ready"
    assert body["checks"]["store"] == {"ok": False, "detail": "database is locked"}


@pytest.mark.anyio
async def test_readyz_with_no_checks_or_a_failing_check_is_not_ready() -> None:
    def broken() -> Readiness:
        raise RuntimeError("boom")

    async with running(make_app(readiness=Readiness.of)) as client:
        empty = await client.get("/readyz")
    async with running(make_app(readiness=broken)) as client:
        failing = await client.get("/readyz")
    assert empty.status_code == 503
    assert empty.json() == {"status": "not ready", "checks": {}}
    assert failing.status_code == 503
    assert failing.json() == {
        "status": "not ready",
        "checks": {},
        "error": "readiness check failed",
    }
    assert "boom" not in failing.text


# --- /api/runs --------------------------------------------------------------------------


def test_run_to_json_schema() -> None:
    data = run_to_json(rich_result())
    assert data == {
        "run_id": "rich",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "provider": "venice",
        "model": "qwen-2.5",
        "probe": "ttl",
        "verdict": "flaky",
        "caching_works": True,
        "hit_ratio": 0.5,
        "time": "2023-11-14T22:13:32Z",
        "started_at": START,
        "finished_at": START + 12.5,
        "duration_seconds": 12.5,
        "error_type": None,
        "error": None,
        "pollution": True,
        "cache_reported": True,
        "baseline_tokens": 0,
        "prompt_tokens": 3600,
        "cached_tokens": 2304,
        "run_cached_tokens": 2304,
        "request_count": 4,
        "cold_ttft_seconds": 0.5,
        "warm_ttft_seconds": pytest.approx(0.3),
        "hit_ttft_seconds": pytest.approx(0.3),
        "hits_no_faster": 0,
        "requests": [
            {
                "label": "prime",
                "cold": True,
                "status": 200,
                "attempts": 1,
                "prompt_tokens": 1200,
                "cached_tokens": 0,
                "cache_write_tokens": 1100,
                "completion_tokens": 5,
                "latency_seconds": 1.25,
                "ttft_seconds": 0.5,
                "hit": False,
                "baseline_tokens": 0,
                "run_cached_tokens": 0,
                "ttft_no_faster": None,
                "error_type": None,
                "error": None,
                "span_id": "00f067aa0ba902b7",
            },
            {
                "label": "repeat after 1s",
                "cold": False,
                "status": 200,
                "attempts": 1,
                "prompt_tokens": 1200,
                "cached_tokens": 1152,
                "cache_write_tokens": None,
                "completion_tokens": 5,
                "latency_seconds": 0.5,
                "ttft_seconds": 0.2,
                "hit": True,
                "baseline_tokens": 0,
                "run_cached_tokens": 1152,
                "ttft_no_faster": False,
                "error_type": None,
                "error": None,
                "span_id": "53995c3f42cd8ad8",
            },
            {
                "label": "repeat after 2s",
                "cold": False,
                "status": 200,
                "attempts": 1,
                "prompt_tokens": 1200,
                "cached_tokens": 1152,
                "cache_write_tokens": None,
                "completion_tokens": 5,
                "latency_seconds": None,
                "ttft_seconds": 0.4,
                "hit": True,
                "baseline_tokens": 0,
                "run_cached_tokens": 1152,
                "ttft_no_faster": False,
                "error_type": None,
                "error": None,
                "span_id": "b7ad6b7169203331",
            },
            {
                "label": "repeat after 5s",
                "cold": False,
                "status": 429,
                "attempts": 3,
                "prompt_tokens": None,
                "cached_tokens": None,
                "cache_write_tokens": None,
                "completion_tokens": None,
                "latency_seconds": None,
                "ttft_seconds": 9.0,
                "hit": None,
                "baseline_tokens": None,
                "run_cached_tokens": None,
                "ttft_no_faster": None,
                "error_type": "rate_limit",
                "error": "429 Too Many Requests",
                "span_id": "e457b5a2e4d86bd1",
            },
        ],
        "sizes": {
            "large": {
                "target_tokens": 4096,
                "verdict": "works",
                "hit_ratio": 0.96875,
                "prompt_tokens": 4100,
            }
        },
        "ttl": {"1": True, "2": True, "5": None},
        "first_miss_index": 3,
        "shared_prefix_tokens": 1024,
    }


def test_run_to_json_not_reported_is_null_not_zero() -> None:
    run = ProbeResult(
        probe="basic",
        provider="local",
        model="m",
        run_id="nr",
        verdict=Verdict.NOT_REPORTED,
        started_at=START,
        finished_at=START + 0.999,
        requests=[RequestRecord(label="prime", cold=True, prompt_tokens=10, ttft_seconds=None)],
    )
    data = run_to_json(run)
    assert data["cached_tokens"] is None
    assert data["prompt_tokens"] == 10
    assert data["caching_works"] is None
    assert data["cold_ttft_seconds"] is None
    assert data["warm_ttft_seconds"] is None
    assert data["time"] == "2023-11-14T22:13:20Z"


@pytest.mark.anyio
async def test_api_runs_defaults_and_filters() -> None:
    runs = FakeRuns([result("r2", finished_at=START + 60), result("r1")])
    async with running(make_app(runs=runs)) as client:
        plain = await client.get("/api/runs")
        filtered = await client.get(
            "/api/runs",
            params={"provider": "venice", "model": "llama-3.3-70b", "probe": "ttl", "limit": "2"},
        )
        # Grafana's "All" sends empty values: they mean "no filter".
        empty = await client.get("/api/runs?provider=&model=&probe=&trace_id=&limit=")
        # A trace id as a tracing UI shows it, in either case: the run it belongs to.
        traced = await client.get("/api/runs?trace_id=4BF92F3577B34DA6A3CE929D0E0E4736")
    assert plain.status_code == 200
    assert plain.headers["content-type"] == "application/json"
    assert [r["run_id"] for r in plain.json()["runs"]] == ["r2", "r1"]
    assert filtered.status_code == 200
    assert empty.status_code == 200
    assert runs.calls == [
        {"provider": None, "model": None, "probe": None, "limit": 50},
        {"provider": "venice", "model": "llama-3.3-70b", "probe": "ttl", "limit": 2},
        {"provider": None, "model": None, "probe": None, "limit": 50},
        {
            "provider": None,
            "model": None,
            "probe": None,
            "limit": 50,
            "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        },
    ]
    assert traced.status_code == 200


@pytest.mark.anyio
async def test_api_runs_never_returns_more_than_limit() -> None:
    runs = FakeRuns([result(f"r{i}") for i in range(5)])  # a source that ignores limit
    async with running(make_app(runs=runs)) as client:
        response = await client.get("/api/runs", params={"limit": "3"})
    assert [r["run_id"] for r in response.json()["runs"]] == ["r0", "r1", "r2"]


NAME_RULE = "must be 1 to 200 characters of A-Z a-z 0-9 . _ : / @ + -"
TRACE_RULE = "must be 32 hexadecimal digits (a W3C trace id)"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("limit=0", "limit: must be an integer from 1 to 1000"),
        ("limit=1001", "limit: must be an integer from 1 to 1000"),
        ("limit=-1", "limit: must be an integer from 1 to 1000"),
        ("limit=abc", "limit: must be an integer from 1 to 1000"),
        ("limit=1.5", "limit: must be an integer from 1 to 1000"),
        ("limit=+5", "limit: must be an integer from 1 to 1000"),
        ("limit=%205", "limit: must be an integer from 1 to 1000"),
        ("limit=5_0", "limit: must be an integer from 1 to 1000"),
        ("limit=%D9%A5", "limit: must be an integer from 1 to 1000"),  # Arabic-Indic five
        ("limit=" + "9" * 4301, "limit: must be an integer from 1 to 1000"),  # int() raises
        ("probe=nope", "probe: must be one of basic, prompt_sizes, ttl, persistence, partial"),
        ("probe=BASIC", "probe: must be one of basic, prompt_sizes, ttl, persistence, partial"),
        ("provider=" + "a" * 201, f"provider: {NAME_RULE}"),
        ("provider=ven%20ice", f"provider: {NAME_RULE}"),
        ("provider=%3Cscript%3E", f"provider: {NAME_RULE}"),
        ("model=gpt%0A4", f"model: {NAME_RULE}"),
        ("model=caf%C3%A9", f"model: {NAME_RULE}"),
        ("model=a%22b", f"model: {NAME_RULE}"),
        ("url=http://example.com", 'unknown query parameter "url" (allowed: provider, model, '
         "probe, trace_id, limit)"),
        ("%3Cx%3E=1", "unknown query parameter (allowed: provider, model, probe, trace_id, "
         "limit)"),
        ("trace_id=4bf92f3577b34da6a3ce929d0e0e473", f"trace_id: {TRACE_RULE}"),  # 31 digits
        ("trace_id=00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
         f"trace_id: {TRACE_RULE}"),  # a whole traceparent
        ("trace_id=4bf92f3577b34da6a3ce929d0e0e473g", f"trace_id: {TRACE_RULE}"),
        ("limit=1&limit=2", "limit: given more than once"),
        ("provider=a&provider=b", "provider: given more than once"),
    ],
)  # fmt: skip
@pytest.mark.anyio
async def test_api_runs_rejects_invalid_parameters(query: str, message: str) -> None:
    runs = FakeRuns([result("r1")])
    async with running(make_app(runs=runs)) as client:
        response = await client.get(f"/api/runs?{query}")
    assert response.status_code == 400
    assert response.json() == {"error": message}
    assert runs.calls == []  # nothing reaches the store


@pytest.mark.anyio
async def test_api_runs_accepts_edge_values() -> None:
    runs = FakeRuns()
    model = "accounts/fireworks/models/llama-v3p1-8b+x@2024:1_a.b-c"
    async with running(make_app(runs=runs)) as client:
        ok = await client.get(
            "/api/runs", params={"provider": "a" * 200, "model": model, "limit": "1000"}
        )
        one = await client.get("/api/runs", params={"limit": "1"})
    assert ok.status_code == 200
    assert ok.json() == {"runs": []}
    assert one.status_code == 200
    assert runs.calls[0] == {"provider": "a" * 200, "model": model, "probe": None, "limit": 1000}
    assert runs.calls[1]["limit"] == 1


@pytest.mark.anyio
async def test_api_runs_store_failure_is_503_json() -> None:
    runs = FakeRuns(error=OSError("disk I/O error at /var/lib/secret-path"))
    async with running(make_app(runs=runs)) as client:
        response = await client.get("/api/runs")
    assert response.status_code == 503
    assert response.json() == {"error": "history store unavailable"}
    assert "secret-path" not in response.text


@pytest.mark.anyio
async def test_api_runs_non_finite_numbers_become_null() -> None:
    run = result("nan")
    run.hit_ratio = float("nan")
    async with running(make_app(runs=FakeRuns([run]))) as client:
        response = await client.get("/api/runs")
    assert response.status_code == 200
    assert response.json()["runs"][0]["hit_ratio"] is None


@pytest.mark.anyio
async def test_api_runs_with_a_real_store(tmp_path: Path) -> None:
    async with await Store.open(tmp_path / "db.sqlite", clock=FakeClock()) as store:
        await store.record_run(result("old", finished_at=START))
        await store.record_run(result("new", finished_at=START + 300))
        await store.record_run(
            result("other", provider="openai", model="gpt-4o", probe="ttl", finished_at=START - 60)
        )
        await store.record_run(rich_result())
        assert await store.flush() == 0
        async with running(make_app(runs=store)) as client:
            everything = await client.get("/api/runs")
            venice_basic = await client.get(
                "/api/runs", params={"provider": "venice", "probe": "basic"}
            )
            by_model = await client.get("/api/runs", params={"model": "gpt-4o"})
            newest = await client.get("/api/runs", params={"limit": "1"})
            rich = await client.get("/api/runs", params={"model": "qwen-2.5"})
    assert everything.status_code == 200
    assert [r["run_id"] for r in everything.json()["runs"]] == ["new", "rich", "old", "other"]
    assert [r["run_id"] for r in venice_basic.json()["runs"]] == ["new", "old"]
    assert [r["run_id"] for r in by_model.json()["runs"]] == ["other"]
    assert [r["run_id"] for r in newest.json()["runs"]] == ["new"]
    # The round trip through SQLite and JSON gives what the schema promises.
    assert rich.json()["runs"] == [json.loads(json.dumps(run_to_json(rich_result())))]


# --- reload -----------------------------------------------------------------------------


class FakeReload:
    def __init__(self, answer: tuple[bool, str] = (True, "")) -> None:
        self.answer = answer
        self.calls = 0

    async def __call__(self) -> tuple[bool, str]:
        self.calls += 1
        return self.answer


@pytest.mark.anyio
async def test_reload_ok() -> None:
    reload = FakeReload()
    async with running(make_app(reload=reload)) as client:
        post = await client.post("/-/reload")
        put = await client.put("/-/reload", content=b"x" * 100)
    assert post.status_code == 200
    assert post.json() == {"status": "ok"}
    assert put.status_code == 200
    assert reload.calls == 2


@pytest.mark.anyio
async def test_reload_failure_is_500_with_one_line() -> None:
    reload = FakeReload((False, "config.toml: providers.venice.api_key:\n  must be set"))
    async with running(make_app(reload=reload)) as client:
        response = await client.post("/-/reload")
    assert response.status_code == 500
    assert response.json() == {
        "status": "error",
        "error": "config.toml: providers.venice.api_key: must be set",
    }


@pytest.mark.anyio
async def test_reload_that_raises_is_500_without_details() -> None:
    async def explode() -> tuple[bool, str]:
        raise RuntimeError("traceback material")

    async with running(make_app(reload=explode)) as client:
        response = await client.post("/-/reload")
    assert response.status_code == 500
    assert response.json() == {
        "status": "error",
        "error": "reload failed with an internal error (see the log)",
    }


@pytest.mark.anyio
async def test_reload_other_methods_and_bodies() -> None:
    reload = FakeReload()
    async with running(make_app(reload=reload)) as client:
        get = await client.get("/-/reload")
        big = await client.post("/-/reload", content=b"x" * 5000)

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(5):
                yield b"y" * 1000

        chunked = await client.post("/-/reload", content=chunks())
    assert get.status_code == 405
    assert get.headers["allow"] == "POST, PUT"
    assert big.status_code == 413
    assert chunked.status_code == 413
    assert chunked.json() == {"status": "error", "error": "request body too large"}
    assert reload.calls == 0


@pytest.mark.anyio
async def test_reload_not_configured_is_404() -> None:
    async with running(make_app(reload=None)) as client:
        response = await client.post("/-/reload")
        landing = await client.get("/")
    assert response.status_code == 404
    assert "-/reload" not in landing.text


# --- the rest ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_landing_page_shows_what_is_probed() -> None:
    state = State()
    state.configure_provider("sim", probes=("basic", "ttl"), intervals={"basic": 30, "ttl": 300})
    state.set_models("sim", ["sim-cache-ok", "sim-error", "sim-<b>"], {})
    state.observe_result(result("r1", provider="sim", model="sim-cache-ok", finished_at=START))
    failed = result("r2", provider="sim", model="sim-error", finished_at=START)
    failed.verdict, failed.error_type = Verdict.ERROR, ErrorType.API_ERROR
    state.observe_result(failed)
    registry = build_registry(ExporterCollector(state, now=lambda: START))
    async with running(make_app(registry=registry)) as client:
        page = (await client.get("/")).text
    assert "What is probed (3 models)" in page
    rows = {
        row.split("</td>")[1].removeprefix("<td>"): row
        for row in page.split("<tr>")
        if row.startswith("<td>sim</td>")
    }
    assert sorted(rows) == ["sim-&lt;b&gt;", "sim-cache-ok", "sim-error"]  # escaped
    assert "<td>caching works</td>" in rows["sim-cache-ok"]
    assert "<td>failed</td>" in rows["sim-error"]
    assert rows["sim-cache-ok"].count("<td>not run yet</td>") == 1  # ttl
    assert rows["sim-cache-ok"].count("<td>-</td>") == 3  # probes not configured for sim
    assert 'href="api/runs?provider=sim&amp;model=sim-error&amp;limit=10"' in rows["sim-error"]


@pytest.mark.anyio
async def test_landing_page_before_anything_is_probed() -> None:
    async with running(make_app()) as client:
        page = (await client.get("/")).text
    assert "Nothing probed yet" in page


@pytest.mark.anyio
async def test_landing_page() -> None:
    async with running(make_app(reload=FakeReload())) as client:
        response = await client.get("/")
        post = await client.post("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    for needle in (
        "prompt-cache-exporter",
        "1.2.3-test",
        'href="metrics"',
        'href="healthz"',
        'href="readyz"',
        'href="api/runs"',
        "POST -/reload",
    ):
        assert needle in response.text
    assert "<script" not in response.text
    assert post.status_code == 405


@pytest.mark.anyio
async def test_unknown_paths_are_404() -> None:
    async with running(make_app()) as client:
        unknown = await client.get("/nope")
        slash = await client.get("/metrics/")
    assert unknown.status_code == 404
    assert unknown.text == "Not Found"
    assert slash.status_code == 404  # no redirect


@pytest.mark.anyio
async def test_request_bodies_are_refused() -> None:
    async with running(make_app()) as client:
        response = await client.request("GET", "/metrics", content=b"hello")
    assert response.status_code == 413
    assert response.json() == {"error": "request body not accepted"}


@pytest.mark.anyio
async def test_headers_from_the_web_config_on_every_response() -> None:
    headers = {
        "X-Frame-Options": "deny",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'self'",
    }
    config = WebConfig(http_server_config={"headers": headers})
    async with running(make_app(web_config=config)) as client:
        responses = [
            await client.get("/"),
            await client.get("/metrics"),
            await client.get("/api/runs"),
            await client.get("/nope"),
            await client.post("/healthz"),
        ]
    assert [r.status_code for r in responses] == [200, 200, 200, 404, 405]
    for response in responses:
        assert response.headers["x-frame-options"] == "deny"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["content-security-policy"] == "default-src 'self'"
