"""The prepared /metrics exposition: the same bytes as a fresh render, at every step of a
changing state; never a half-updated model; gzip that real clients read; name[] filtering.

Fresh render = prometheus-client's own encoders over ``ExporterCollector`` (a snapshot of
the whole state per collect), the reference the cached bytes must equal byte for byte.
"""

from __future__ import annotations

import contextlib
import gzip
import shutil
import subprocess
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable

import anyio
import anyio.to_thread
import httpx
import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from exporter import memtrim
from exporter.budget import BudgetSnapshot, BudgetUsage
from exporter.exposition import Exposition, Refresher, gzip_parts
from exporter.memtrim import release_free_pages
from exporter.metrics import ExporterCollector
from exporter.pricing import resolve_price
from exporter.results import ErrorType, ModelPrice, ProbeResult, SizeOutcome, Verdict
from exporter.server import Readiness, create_app, serve
from exporter.state import State
from tests.test_metrics import record

T0 = 1_700_000_000.0
PROBES = ("basic", "prompt_sizes", "partial", "persistence", "ttl")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def run(
    model: str, probe: str, k: int, *, provider: str = "p", verdict: Verdict = Verdict.WORKS
) -> ProbeResult:
    """Run number ``k`` of ``probe``: its numbers say which run it was."""
    result = ProbeResult(
        probe=probe,
        provider=provider,
        model=model,
        run_id=f"{model}-{probe}-{k}",
        verdict=verdict,
        started_at=T0 + k - 1,
        finished_at=T0 + k,
        duration_seconds=1.0 + k % 5,
        hit_ratio=k / 1000,
        requests=[
            record("prime", cold=True, ttft=0.5 + k / 1000),
            record("repeat", cold=False, cached=1990 if verdict is Verdict.WORKS else 0),
        ],
    )
    if probe == "prompt_sizes":
        result.sizes = {
            "small": SizeOutcome(1100, Verdict.BELOW_MINIMUM),
            "large": SizeOutcome(4000, Verdict.WORKS, 0.97, 4010),
        }
    if probe == "ttl":
        result.ttl = {1.0: True, 2.5: True, 30.0: False}
    return result


def rich_state(*, per_model_histograms: bool = False) -> State:
    """Two providers; models with every probe, failures, errors of several kinds, pollution,
    cache writes, API without cache fields, a cooldown, label values that need escaping."""
    state = State(per_model_histograms=per_model_histograms)
    for provider in ("p", "q"):
        state.configure_provider(provider, probes=PROBES, intervals=dict.fromkeys(PROBES, 600.0))
    price = resolve_price(ModelPrice(input=1.0, output=4.0, cache_read=0.1), None)
    odd = 'we"ird\\name\nü'
    state.set_models("p", ["m1", "m2", odd], {"m1": price, odd: price})
    state.set_models("q", ["n1"], {})
    for k, probe in enumerate(PROBES, start=1):
        state.observe_result(run("m1", probe, k))
        state.observe_result(run(odd, probe, k, verdict=Verdict.BROKEN))
    failing = run("m2", "basic", 7, verdict=Verdict.ERROR)
    failing.requests = [
        record("prime", cold=True, ok=False, error=ErrorType.TIMEOUT),
        record("prime", cold=True, ok=False, error=ErrorType.RATE_LIMIT),
    ]
    state.observe_result(failing)
    state.record_failures("p", "m2", 5, T0 + 900)
    polluted = run("n1", "basic", 3, provider="q")
    polluted.pollution = True
    polluted.requests[0].cache_write_tokens = 1500
    polluted.requests.append(record("unreported", cold=False, cached=None, ttft=None))
    state.observe_result(polluted)
    state.set_reliability("p", "m1", 88.5)
    state.set_balance("p", "usd", 3.25)
    state.set_ratelimit("q", {"requests": 99.0, "tokens": 12345.0})
    state.set_paused("q", "balance", True)
    state.set_forecast("p", {"tokens": 1e6, "prompt_tokens": 9e5})
    usage = (
        BudgetUsage("day", "tokens", 100000.0, 1234.0),
        BudgetUsage("month", "usd", None, 0.5),
    )
    state.set_budgets({"p": BudgetSnapshot("p", usage, exhausted=False)})
    state.set_reload(True, T0 - 10)
    state.store_error("write_run")
    return state


def fresh(state: State, clock: Callable[[], float]) -> CollectorRegistry:
    registry = CollectorRegistry(support_collectors_without_names=True)
    registry.register(ExporterCollector(state, now=clock))
    return registry


def assert_same_bytes(exposition: Exposition, state: State, clock: Clock) -> None:
    registry = fresh(state, clock)
    text = exposition.prepared("text", gzip=False).body
    assert text == generate_latest(registry)
    openmetrics = exposition.prepared("openmetrics", gzip=False).body
    assert openmetrics is not None
    # The live collectors follow the prepared part and end OpenMetrics with "# EOF".
    assert openmetrics + b"# EOF\n" == generate_openmetrics(registry)
    zipped = b"".join(gzip_parts(exposition.prepared("text", gzip=True), b"live 1\n"))
    assert gzip.decompress(zipped) == text + b"live 1\n"


@pytest.mark.parametrize("per_model_histograms", [False, True])
def test_prepared_bytes_equal_a_fresh_render_at_every_step(per_model_histograms: bool) -> None:
    clock = Clock()
    state = rich_state(per_model_histograms=per_model_histograms)
    exposition = Exposition(state, now=clock)
    assert_same_bytes(exposition, state, clock)
    steps: list[Callable[[], object]] = [
        lambda: state.observe_result(run("m1", "basic", 11)),  # one model's run
        lambda: state.observe_result(run("m2", "basic", 12)),  # the failing one recovers
        lambda: state.set_models("p", ["m1", "m3", "m2"], {}),  # a model goes, one comes
        lambda: state.observe_result(run("m3", "ttl", 13)),
        lambda: state.set_unpriced("p", "m3", True),
        lambda: state.set_budgets({}),
        lambda: state.retain_providers({"q"}),  # a provider goes, with its models
        lambda: state.configure_provider("r", probes=("basic",), intervals={"basic": 60.0}),
        lambda: state.set_models("q", [], {}),
        lambda: state.set_reload(False, T0),
    ]
    for step in steps:
        step()
        assert_same_bytes(exposition, state, clock)


def test_a_cooldown_ends_without_a_write() -> None:
    clock = Clock()
    state = rich_state()
    exposition = Exposition(state, now=clock)
    body = exposition.prepared("text", gzip=False).body
    assert body is not None
    assert b'llmcache_model_cooldown{model="m2",provider="p"} 1.0' in body
    generation = state.generation
    clock.now = T0 + 901
    after = exposition.prepared("text", gzip=False).body
    assert after is not None
    assert b'llmcache_model_cooldown{model="m2",provider="p"} 0.0' in after
    assert state.generation > generation  # the model was marked for rendering again
    assert_same_bytes(exposition, state, clock)


@pytest.mark.parametrize(
    "names",
    [
        ["llmcache_caching_works"],
        ["llmcache_probe_runs_total", "llmcache_models", "llmcache_exporter_build_info"],
        ["llmcache_probe_duration_seconds_bucket"],
        ["llmcache_request_duration_seconds_count", "llmcache_request_duration_seconds_sum"],
        ["llmcache_balance", "no_such_metric"],
        ["no_such_metric"],
    ],
)
def test_name_filter_equals_the_restricted_registry(names: list[str]) -> None:
    clock = Clock()
    state = rich_state()
    exposition = Exposition(state, now=clock)
    registry = fresh(state, clock).restricted_registry(names)
    assert exposition.filtered("text", names) == generate_latest(registry)
    assert exposition.filtered("openmetrics", names) + b"# EOF\n" == generate_openmetrics(registry)


# --- over HTTP ------------------------------------------------------------------------------


class NoRuns:
    async def recent_runs(self, **_: object) -> list[ProbeResult]:
        return []


def live_registry() -> CollectorRegistry:
    """What the daemon renders live, here with a fixed value so answers compare."""
    registry = CollectorRegistry(support_collectors_without_names=True)
    Gauge("live_value", "A live collector's gauge.", registry=registry).set(7)
    return registry


@contextlib.asynccontextmanager
async def serving(exposition: Exposition) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    app = create_app(
        registry=live_registry(),
        runs=NoRuns(),
        readiness=lambda: Readiness(True),
        reload=None,
        web_config=None,
        probe_names=PROBES,
        version="test",
        exposition=exposition,
    )
    async with (
        serve(app, host="127.0.0.1", port=0) as address,
        httpx.AsyncClient(base_url=address.url, timeout=10.0) as client,
    ):
        yield client, address.url


async def raw_get(client: httpx.AsyncClient, **headers: str) -> tuple[httpx.Headers, bytes]:
    async with client.stream("GET", "/metrics", headers=headers) as response:
        assert response.status_code == 200
        return response.headers, b"".join([c async for c in response.aiter_raw()])


@pytest.mark.anyio
async def test_gzip_negotiation_and_every_client_reads_it() -> None:
    curl = shutil.which("curl")
    assert curl is not None, "curl is required (Debian package curl)"
    clock = Clock()
    state = rich_state()
    async with serving(Exposition(state, now=clock)) as (client, url):
        plain_headers, plain = await raw_get(client, **{"Accept-Encoding": "identity"})
        zipped_headers, zipped = await raw_get(client, **{"Accept-Encoding": "gzip, deflate"})
        decoded = await client.get("/metrics")  # httpx decodes a single gzip member
        result = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [curl, "-sS", "--compressed", url + "/metrics"],
                capture_output=True,
                timeout=30,
                check=True,
            )
        )
    assert "content-encoding" not in plain_headers
    assert zipped_headers["content-encoding"] == "gzip"
    assert zipped_headers["vary"] == "Accept, Accept-Encoding"
    assert int(zipped_headers["content-length"]) == len(zipped) < len(plain) / 5
    live = b"# HELP live_value A live collector's gauge.\n# TYPE live_value gauge\nlive_value 7.0\n"
    assert plain == generate_latest(fresh(state, clock)) + live
    assert gzip.decompress(zipped) == plain
    one_member = zlib.decompressobj(16 + zlib.MAX_WBITS)
    assert one_member.decompress(zipped) == plain
    assert one_member.eof
    assert not one_member.unused_data
    assert decoded.content == plain
    assert result.stdout == plain


@pytest.mark.anyio
async def test_openmetrics_gzip_head_and_name_filter_over_http() -> None:
    clock = Clock()
    state = rich_state()
    om = "application/openmetrics-text; version=1.0.0"
    async with serving(Exposition(state, now=clock)) as (client, _):
        headers, zipped = await raw_get(client, Accept=om, **{"Accept-Encoding": "gzip"})
        head = await client.head("/metrics", headers={"Accept-Encoding": "gzip"})
        names = {"name[]": ["llmcache_models", "live_value"]}
        filtered = await client.get("/metrics", params=names)
        dots = await client.get(
            "/metrics", headers={"Accept": "text/plain; version=1.0.0; escaping=dots"}
        )
    assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    body = gzip.decompress(zipped)
    expected = generate_openmetrics(fresh(state, clock))
    assert body.startswith(expected.removesuffix(b"# EOF\n"))
    assert body.endswith(b"live_value 7.0\n# EOF\n")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-encoding"] == "gzip"
    assert filtered.text == (
        "# HELP llmcache_models Models selected for probing.\n"
        "# TYPE llmcache_models gauge\n"
        'llmcache_models{provider="p"} 3.0\n'
        'llmcache_models{provider="q"} 1.0\n'
        "# HELP live_value A live collector's gauge.\n"
        "# TYPE live_value gauge\n"
        "live_value 7.0\n"
    )
    # The dots escaping renames every metric: rendered fresh, not from the prepared bytes.
    assert "escaping=dots" in dots.headers["content-type"]
    assert "llmcache__models" in dots.text
    assert "live__value 7.0" in dots.text


def model_numbers(text: str, model: str) -> dict[str, float]:
    """The samples of one model that a run sets together."""
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    basic = frozenset({("provider", "p"), ("model", model), ("probe", "basic")})
    success = frozenset({("provider", "p"), ("model", model), ("outcome", "success")})
    return {
        "works": samples[("llmcache_caching_works", basic)],
        "ratio": samples[("llmcache_hit_ratio", basic | {("size", "")})],
        "last_run": samples[("llmcache_probe_last_run_timestamp_seconds", basic)],
        "runs": samples[("llmcache_probe_runs_total", success)],
        "requests": samples[("llmcache_requests_total", success)],
    }


@pytest.mark.anyio
async def test_a_scrape_during_updates_never_shows_a_mixed_model() -> None:
    """A writer thread applies runs k = 1, 2, ... to three models (run k: verdict works if k
    is odd, hit ratio k/1000, finished at T0 + k, two more requests) while the server is
    scraped, with the background refresher on. Every scrape must show each model at exactly
    one run: never the new counters beside the old verdict."""
    clock = Clock()
    state = State()
    state.configure_provider("p", probes=("basic",), intervals={"basic": 60.0})
    models = ["a", "b", "c"]
    state.set_models("p", models, {})
    runs = 400
    done = threading.Event()

    def writer() -> None:
        for k in range(1, runs + 1):
            for model in models:
                verdict = Verdict.WORKS if k % 2 else Verdict.BROKEN
                state.observe_result(run(model, "basic", k, verdict=verdict))
            time.sleep(0.001)
        done.set()

    seen: set[int] = set()
    exposition = Exposition(state, now=clock)
    async with serving(exposition) as (client, _):
        with Refresher(exposition, state):
            thread = threading.Thread(target=writer, daemon=True)
            thread.start()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                finished = done.is_set()
                text = (await client.get("/metrics")).text
                for model in models:
                    if f'llmcache_caching_works{{model="{model}"' not in text:
                        continue  # not probed yet: no verdict
                    numbers = model_numbers(text, model)
                    k = round(numbers["last_run"] - T0)
                    assert numbers["works"] == (1.0 if k % 2 else 0.0)
                    assert numbers["ratio"] == k / 1000
                    assert numbers["runs"] == k
                    assert numbers["requests"] == 2 * k
                    seen.add(k)
                if finished:
                    break
            thread.join(timeout=10)
    assert done.is_set()
    assert runs in seen  # the last scrape saw every write
    assert len(seen) > 5  # and scrapes happened during the updates


def test_the_refresher_renders_after_writes_and_stops() -> None:
    clock = Clock()
    state = rich_state()
    exposition = Exposition(state, now=clock)
    with Refresher(exposition, state) as refresher:
        state.observe_result(run("m1", "basic", 42))
        deadline = time.monotonic() + 10
        while exposition.generation != state.generation and time.monotonic() < deadline:
            time.sleep(0.01)
        assert exposition.generation == state.generation  # rendered without a scrape
    assert not refresher.running
    generation = state.generation
    state.observe_result(run("m1", "basic", 43))  # no listener, no thread: nothing renders
    time.sleep(0.1)
    assert exposition.generation == generation
    assert_same_bytes(exposition, state, clock)  # and a scrape still sees the write


def test_free_pages_are_released_at_most_every_interval() -> None:
    """After a render the refresher returns free heap pages (glibc), rate-limited."""
    clock = [1e12]
    assert release_free_pages(now=lambda: clock[0]) is (memtrim._malloc_trim is not None)
    clock[0] += memtrim.TRIM_INTERVAL / 2
    assert release_free_pages(now=lambda: clock[0]) is False
    clock[0] += memtrim.TRIM_INTERVAL
    assert release_free_pages(now=lambda: clock[0]) is (memtrim._malloc_trim is not None)
