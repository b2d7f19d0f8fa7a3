"""The ``llmcache_`` families: what each one means and which series a model, a provider and
the exporter itself contribute.

Probe results are those of the LAST probe, because probing costs money and runs on its own
schedule (the "expensive to retrieve" exception of the exporter guidelines); the HELP texts
say so. Nothing here touches the network or the database.

The catalogue (``Catalogue``) fixes the families and their order; ``write_model``,
``write_provider`` and ``write_exporter`` emit one fragment's series into a ``Sink``. Two
sinks read them: ``ExporterCollector`` builds prometheus-client families from a full state
snapshot (the fresh render), and ``exporter.exposition`` formats each fragment once when it
changes and serves the prepared bytes. Both therefore expose exactly the same series.

Example exposition (abridged)::

    # HELP llmcache_caching_works 1 if warm requests hit the cache, ...
    # TYPE llmcache_caching_works gauge
    llmcache_caching_works{model="sim-cache-ok",probe="basic",provider="sim"} 1.0
    # TYPE llmcache_cached_tokens_total counter
    llmcache_cached_tokens_total{model="sim-cache-ok",provider="sim"} 1024.0
    # TYPE llmcache_last_time_to_first_token_seconds gauge
    llmcache_last_time_to_first_token_seconds{model="sim-ok",provider="sim",request="warm"} 0.1
    # TYPE llmcache_price_usd_per_million_tokens gauge
    llmcache_price_usd_per_million_tokens{kind="cache_read",model="sim-cache-ok",provider="sim"} 0.1
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.results import ModelPrice
from exporter.state import (
    CACHE_LABELS,
    REQUEST_BUCKETS,
    TTFT_BUCKETS,
    ExporterSeries,
    Histogram,
    ModelSeries,
    ProviderSeries,
    State,
)

LAST_PROBE = (
    " Value from the last probe run; probes run on their own schedule because each costs money."
)
PM = ("provider", "model")
PMP = ("provider", "model", "probe")

Kind = Literal["gauge", "counter", "histogram"]


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: ``name`` without ``_total`` for counters."""

    name: str
    kind: Kind
    documentation: str
    labels: tuple[str, ...] = ()

    def sample_names(self) -> tuple[str, ...]:
        if self.kind == "counter":
            return (self.name + "_total",)
        if self.kind == "histogram":
            return (self.name + "_bucket", self.name + "_count", self.name + "_sum")
        return (self.name,)


class Sink(Protocol):
    """Where a fragment's series go, in order."""

    def sample(self, family: Family, labels: Sequence[str], value: float) -> None: ...

    def histogram(self, family: Family, labels: Sequence[str], hist: Histogram) -> None: ...


def _gauge(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Family:
    return Family(name, "gauge", documentation, labels)


def _counter(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Family:
    return Family(name, "counter", documentation, labels)


def _histogram(name: str, documentation: str, labels: tuple[str, ...]) -> Family:
    return Family(name, "histogram", documentation, labels)


# -- per model -----------------------------------------------------------------------------------

CACHING_WORKS = _gauge(
    "llmcache_caching_works",
    "1 if warm requests hit the cache, 0 if cache fields were reported but warm requests "
    "never hit; absent without a verdict." + LAST_PROBE,
    PMP,
)
HIT_RATIO = _gauge(
    "llmcache_hit_ratio",
    "Run-specific cached share of the warm requests, shared template tokens not counted "
    "(partial: of the shared prefix; persistence: fraction of warm requests that hit; "
    "prompt_sizes: per size)." + LAST_PROBE,
    (*PMP, "size"),
)
TTL_HIT = _gauge(
    "llmcache_ttl_hit",
    "1 if a repeat after this delay still hit." + LAST_PROBE,
    (*PM, "delay_seconds"),
)
TTL_MAX = _gauge(
    "llmcache_ttl_max_hit_delay_seconds",
    "Longest delay after which a repeat still hit (0 if none)." + LAST_PROBE,
    PM,
)
FIRST_MISS = _gauge(
    "llmcache_persistence_first_miss_index",
    "1-based index of the first warm request that missed (0: none missed)." + LAST_PROBE,
    PM,
)
PROBE_SUCCESS = _gauge(
    "llmcache_probe_success",
    "1 if the last run produced a verdict, 0 if it failed (0 before the first run).",
    PMP,
)
LAST_RUN = _gauge(
    "llmcache_probe_last_run_timestamp_seconds",
    "When the last run finished (0 before the first run).",
    PMP,
)
PROBE_RUNS = _counter(
    "llmcache_probe_runs",
    "Probe runs of the model by outcome, all probes together (skipped appears when it first "
    "happens); per probe: llmcache_probe_duration_seconds_count.",
    (*PM, "outcome"),
)
REQUESTS = _counter(
    "llmcache_requests",
    "Probe requests by outcome (retries of one request count once).",
    (*PM, "outcome"),
)
ERRORS = _counter(
    "llmcache_errors",
    "Failed probe requests by cause; a cause appears at its first error "
    "(llmcache_provider_errors_total has every cause from start-up).",
    (*PM, "error_type"),
)
PROMPT_TOKENS = _counter(
    "llmcache_prompt_tokens", "Prompt tokens as reported, cached included.", PM
)
CACHED_TOKENS = _counter("llmcache_cached_tokens", "Prompt tokens read from the cache.", PM)
CACHE_WRITE_TOKENS = _counter(
    "llmcache_cache_write_tokens",
    "Prompt tokens written to the cache; appears with the first write the API reports.",
    PM,
)
COMPLETION_TOKENS = _counter("llmcache_completion_tokens", "Completion tokens.", PM)
SPEND = _counter("llmcache_spend_usd", "What the probes cost, from the price table in force.", PM)
SAVINGS = _counter(
    "llmcache_savings_usd",
    "What caching saved: cached tokens × (input − cache-read price).",
    PM,
)
WARM = _counter(
    "llmcache_warm_requests",
    "Successful requests that should have hit the cache (ttl repeats excluded).",
    PM,
)
WARM_HITS = _counter(
    "llmcache_warm_request_hits",
    "Warm requests whose own prompt was served from cache (beyond the shared template tokens).",
    PM,
)
POLLUTION = _counter(
    "llmcache_cache_pollution",
    "Runs whose cold request (unique run id first) reported cached tokens beyond the shared "
    "baseline; appears with the first such run.",
    PM,
)
LAST_TTFT = _gauge(
    "llmcache_last_time_to_first_token_seconds",
    "Time to first token of the cold request (the prime) and of the warm request (the "
    "deciding repeat) of the last successful basic run; streamed requests only." + LAST_PROBE,
    (*PM, "request"),
)
PRICE_INFO = _gauge(
    "llmcache_price_info",
    "The price table in force for a model (version changes when a price does).",
    (*PM, "version", "source"),
)
PRICE_RATES = _gauge(
    "llmcache_price_usd_per_million_tokens",
    "USD per million tokens by kind, as spend and savings are computed: cache_read and "
    "cache_write equal input where the model has no discounted price for them; absent for a "
    "model without any price.",
    (*PM, "kind"),
)
RELIABILITY = _gauge(
    "llmcache_reliability_score",
    "0-100: 100 × (0.4 × success rate + 0.3 × consistency + 0.3 × effectiveness) over the "
    "reliability window (docs/metrics.md).",
    PM,
)
FAILURES = _gauge("llmcache_consecutive_failures", "Failed probe runs in a row.", PM)
COOLDOWN = _gauge(
    "llmcache_model_cooldown", "1 while the model is in cooldown after repeated failures.", PM
)
UNPRICED = _gauge(
    "llmcache_model_unpriced",
    "1 while the model is not probed because its provider has a USD budget and the model has "
    "no price (exists for the models of providers with a USD budget).",
    PM,
)
REPORTING = _gauge(
    "llmcache_cache_reporting_supported",
    "1 if the API reported cache fields, 0 if it reported none (not reported is not 0 "
    "cached)." + LAST_PROBE,
    PM,
)

_REQUEST_DURATION_HELP = "Probe request duration, request sent to last byte."
_TTFT_HELP = "Time to the first generated token of streamed probe requests."
MODEL_REQUEST_DURATION = _histogram(
    "llmcache_request_duration_seconds", _REQUEST_DURATION_HELP, (*PM, "cache")
)
MODEL_TTFT = _histogram("llmcache_time_to_first_token_seconds", _TTFT_HELP, (*PM, "cache"))

# -- per provider --------------------------------------------------------------------------------

PROBE_INTERVAL = _gauge(
    "llmcache_probe_interval_seconds",
    "Configured probe interval, for staleness alerts.",
    ("provider", "probe"),
)
PROBE_DURATION = _histogram(
    "llmcache_probe_duration_seconds",
    "Wall time of probe runs by outcome (skipped runs have none).",
    ("provider", "probe", "outcome"),
)
REQUEST_DURATION = _histogram(
    "llmcache_request_duration_seconds", _REQUEST_DURATION_HELP, ("provider", "cache")
)
TTFT = _histogram("llmcache_time_to_first_token_seconds", _TTFT_HELP, ("provider", "cache"))
PROVIDER_ERRORS = _counter(
    "llmcache_provider_errors",
    "Failed probe requests of all the provider's models by cause, every cause from start-up.",
    ("provider", "error_type"),
)
CYCLE = _histogram(
    "llmcache_scheduler_cycle_duration_seconds",
    "Time to probe every due model of a provider once.",
    ("provider",),
)
BALANCE = _gauge(
    "llmcache_balance",
    "Account balance as last reported by the provider (never sum across currencies).",
    ("provider", "currency"),
)
RATELIMIT = _gauge(
    "llmcache_ratelimit_remaining",
    "Remaining rate-limit allowance from the last response headers.",
    ("provider", "resource"),
)
PAUSED = _gauge(
    "llmcache_provider_paused",
    "1 while probing of the provider is stopped for this reason.",
    ("provider", "reason"),
)
MODELS = _gauge("llmcache_models", "Models selected for probing.", ("provider",))
BUDGET_LIMIT = _gauge(
    "llmcache_budget_limit",
    "Configured spend budget (absent: unlimited).",
    ("provider", "window", "unit"),
)
BUDGET_USED = _gauge(
    "llmcache_budget_used",
    "Spend in the current UTC window: settled requests plus open reservations.",
    ("provider", "window", "unit"),
)
BUDGET_FORECAST = _gauge(
    "llmcache_budget_forecast",
    "What the configured schedule is expected to cost per UTC day (unit tokens: prompt and "
    "completion, as budgets count; prompt_tokens; usd where prices are known), from the "
    "probes' own cost estimates.",
    ("provider", "window", "unit"),
)
BUDGET_EXHAUSTED = _gauge(
    "llmcache_budget_exhausted", "1 while the next probe would exceed a budget.", ("provider",)
)

# -- the exporter itself -------------------------------------------------------------------------

STORE_ERRORS = _counter(
    "llmcache_store_errors",
    "SQLite operations that failed; the exporter keeps serving and retries writes.",
    ("operation",),
)
RELOAD_OK = _gauge(
    "llmcache_config_last_reload_successful", "1 if the last configuration (re)load succeeded."
)
RELOAD_TIME = _gauge(
    "llmcache_config_last_reload_success_timestamp_seconds",
    "When the configuration was last loaded successfully.",
)
BUILD_INFO = _gauge(
    "llmcache_exporter_build_info", "Build information (always 1).", ("version", "python")
)


@dataclass(frozen=True, slots=True)
class Catalogue:
    """The families in exposition order: every model's, then every provider's, then the
    exporter's. ``per_model_histograms`` moves the request and TTFT histograms from the
    provider fragments to the model fragments (with a ``model`` label)."""

    per_model_histograms: bool = False

    @property
    def model(self) -> tuple[Family, ...]:
        histograms = (MODEL_REQUEST_DURATION, MODEL_TTFT) if self.per_model_histograms else ()
        return (
            CACHING_WORKS,
            HIT_RATIO,
            TTL_HIT,
            TTL_MAX,
            FIRST_MISS,
            PROBE_SUCCESS,
            LAST_RUN,
            PROBE_RUNS,
            REQUESTS,
            ERRORS,
            PROMPT_TOKENS,
            CACHED_TOKENS,
            CACHE_WRITE_TOKENS,
            COMPLETION_TOKENS,
            SPEND,
            SAVINGS,
            WARM,
            WARM_HITS,
            POLLUTION,
            LAST_TTFT,
            *histograms,
            PRICE_INFO,
            PRICE_RATES,
            RELIABILITY,
            FAILURES,
            COOLDOWN,
            UNPRICED,
            REPORTING,
        )

    @property
    def provider(self) -> tuple[Family, ...]:
        histograms = () if self.per_model_histograms else (REQUEST_DURATION, TTFT)
        return (
            PROBE_INTERVAL,
            PROBE_DURATION,
            *histograms,
            PROVIDER_ERRORS,
            CYCLE,
            BALANCE,
            RATELIMIT,
            PAUSED,
            MODELS,
            BUDGET_LIMIT,
            BUDGET_USED,
            BUDGET_FORECAST,
            BUDGET_EXHAUSTED,
        )

    @property
    def exporter(self) -> tuple[Family, ...]:
        return (STORE_ERRORS, RELOAD_OK, RELOAD_TIME, BUILD_INFO)

    @property
    def families(self) -> tuple[Family, ...]:
        return (*self.model, *self.provider, *self.exporter)


# -- what each fragment contributes ---------------------------------------------------------------


def _delay_label(delay: float) -> str:
    return str(int(delay)) if float(delay).is_integer() else repr(float(delay))


def _price_kinds(price: ModelPrice) -> tuple[tuple[str, float], ...]:
    # The effective rates of exporter.pricing.cost_of, so that PromQL over these gauges
    # gives the same figures as llmcache_spend_usd_total and llmcache_savings_usd_total.
    read = price.input if price.cache_read is None else price.cache_read
    write = price.input if price.cache_write is None else price.cache_write
    return (
        ("input", price.input),
        ("output", price.output),
        ("cache_read", read),
        ("cache_write", write),
    )


def _flag(value: bool) -> float:
    return 1.0 if value else 0.0


def write_model(sink: Sink, m: ModelSeries, now: float, per_model_histograms: bool) -> float:
    """One model's series. Returns when they next change without a write (a cooldown that
    ends), or 0 if they do not."""
    base = (m.provider, m.model)
    probes = sorted(m.probes.items())
    for probe, g in probes:
        if g.caching_works is not None:
            sink.sample(CACHING_WORKS, (*base, probe), _flag(g.caching_works))
    for probe, g in probes:
        if probe == "prompt_sizes":
            # The probe's own figure is the mean over the sizes: avg() of these series.
            for size, value in sorted(g.sizes.items()):
                if value is not None:
                    sink.sample(HIT_RATIO, (*base, probe, size), value)
        elif probe != "ttl" and g.hit_ratio is not None:
            # ttl's figure is the share of delays that hit: avg() of llmcache_ttl_hit.
            sink.sample(HIT_RATIO, (*base, probe, ""), g.hit_ratio)
    ttl = m.probes.get("ttl")
    if ttl is not None and ttl.ttl:
        for delay, hit in sorted(ttl.ttl.items()):
            if hit is not None:
                sink.sample(TTL_HIT, (*base, _delay_label(delay)), _flag(hit))
        if ttl.ttl_max_hit_delay is not None:
            sink.sample(TTL_MAX, base, ttl.ttl_max_hit_delay)
    persistence = m.probes.get("persistence")
    if persistence is not None and persistence.success and persistence.hit_ratio is not None:
        sink.sample(FIRST_MISS, base, float(persistence.first_miss_index or 0))
    for probe, g in probes:
        sink.sample(PROBE_SUCCESS, (*base, probe), _flag(g.success))
    for probe, g in probes:
        sink.sample(LAST_RUN, (*base, probe), g.last_run)
    for outcome, count in m.runs.items():
        sink.sample(PROBE_RUNS, (*base, outcome), float(count))
    for outcome, count in m.requests.items():
        sink.sample(REQUESTS, (*base, outcome), float(count))
    for kind, count in sorted(m.errors.items()):
        sink.sample(ERRORS, (*base, kind), float(count))
    sink.sample(PROMPT_TOKENS, base, float(m.prompt_tokens))
    sink.sample(CACHED_TOKENS, base, float(m.cached_tokens))
    if m.cache_write_tokens:
        sink.sample(CACHE_WRITE_TOKENS, base, float(m.cache_write_tokens))
    sink.sample(COMPLETION_TOKENS, base, float(m.completion_tokens))
    sink.sample(SPEND, base, m.spend_usd)
    sink.sample(SAVINGS, base, m.savings_usd)
    sink.sample(WARM, base, float(m.warm_requests))
    sink.sample(WARM_HITS, base, float(m.warm_hits))
    if m.pollution:
        sink.sample(POLLUTION, base, float(m.pollution))
    for request, seconds in sorted(m.last_ttft.items()):
        sink.sample(LAST_TTFT, (*base, request), seconds)
    if per_model_histograms:
        _cache_histograms(sink, MODEL_REQUEST_DURATION, base, m.request_duration, _EMPTY_REQUEST)
        _cache_histograms(sink, MODEL_TTFT, base, m.ttft, _EMPTY_TTFT)
    info = m.price
    sink.sample(
        PRICE_INFO, (*base, info.version if info else "none", info.source if info else "none"), 1.0
    )
    if info is not None and info.price is not None:
        for kind, usd in _price_kinds(info.price):
            sink.sample(PRICE_RATES, (*base, kind), usd)
    if m.reliability is not None:
        sink.sample(RELIABILITY, base, m.reliability)
    sink.sample(FAILURES, base, float(m.consecutive_failures))
    cooling = m.cooldown_until > now
    sink.sample(COOLDOWN, base, _flag(cooling))
    if m.usd_budget:
        sink.sample(UNPRICED, base, _flag(m.unpriced))
    if m.cache_reporting is not None:
        sink.sample(REPORTING, base, _flag(m.cache_reporting))
    return m.cooldown_until if cooling else 0.0


def write_provider(sink: Sink, p: ProviderSeries, per_model_histograms: bool) -> None:
    name = p.name
    for probe, seconds in sorted(p.intervals.items()):
        sink.sample(PROBE_INTERVAL, (name, probe), seconds)
    for (probe, outcome), hist in sorted(p.probe_duration.items()):
        sink.histogram(PROBE_DURATION, (name, probe, outcome), hist)
    if not per_model_histograms:
        _cache_histograms(sink, REQUEST_DURATION, (name,), p.request_duration, _EMPTY_REQUEST)
        _cache_histograms(sink, TTFT, (name,), p.ttft, _EMPTY_TTFT)
    for kind, count in sorted(p.errors.items()):
        sink.sample(PROVIDER_ERRORS, (name, kind), float(count))
    sink.histogram(CYCLE, (name,), p.cycle)
    for currency, amount in sorted(p.balances.items()):
        sink.sample(BALANCE, (name, currency), amount)
    for resource, remaining in sorted(p.ratelimit.items()):
        sink.sample(RATELIMIT, (name, resource), remaining)
    for reason, flag in sorted(p.paused.items()):
        sink.sample(PAUSED, (name, reason), _flag(flag))
    sink.sample(MODELS, (name,), float(p.models))
    snap = p.budget
    if snap is not None:
        for usage in snap.usage:
            if usage.limit is not None:
                sink.sample(BUDGET_LIMIT, (name, usage.window, usage.unit), usage.limit)
        for usage in snap.usage:
            sink.sample(BUDGET_USED, (name, usage.window, usage.unit), usage.used)
    for unit, amount in sorted(p.forecast.items()):
        sink.sample(BUDGET_FORECAST, (name, "day", unit), amount)
    sink.sample(BUDGET_EXHAUSTED, (name,), _flag(snap is not None and snap.exhausted))


def write_exporter(sink: Sink, e: ExporterSeries) -> None:
    for operation, count in sorted(e.store_errors.items()):
        sink.sample(STORE_ERRORS, (operation,), float(count))
    sink.sample(RELOAD_OK, (), _flag(e.reload_ok))
    sink.sample(RELOAD_TIME, (), e.reload_timestamp)
    sink.sample(BUILD_INFO, (__version__, platform.python_version()), 1.0)


# Series for hit and miss exist from start-up, with the same buckets as observed ones.
_EMPTY_REQUEST = Histogram(REQUEST_BUCKETS)
_EMPTY_TTFT = Histogram(TTFT_BUCKETS)


def _cache_histograms(
    sink: Sink,
    family: Family,
    base: tuple[str, ...],
    histograms: dict[str, Histogram],
    empty: Histogram,
) -> None:
    for cache in sorted(set(CACHE_LABELS) | set(histograms)):
        sink.histogram(family, (*base, cache), histograms.get(cache) or empty)


# -- the fresh render ------------------------------------------------------------------------------


class _FamilySink:
    """Collects samples into prometheus-client metric families."""

    def __init__(self, families: Iterable[Family]) -> None:
        self.metrics: dict[Family, Metric] = {}
        for f in families:
            if f.kind == "gauge":
                self.metrics[f] = GaugeMetricFamily(f.name, f.documentation, labels=f.labels)
            elif f.kind == "counter":
                self.metrics[f] = CounterMetricFamily(f.name, f.documentation, labels=f.labels)
            else:
                self.metrics[f] = HistogramMetricFamily(f.name, f.documentation, labels=f.labels)

    def sample(self, family: Family, labels: Sequence[str], value: float) -> None:
        metric = self.metrics[family]
        assert isinstance(metric, GaugeMetricFamily | CounterMetricFamily)
        metric.add_metric(list(labels), value)

    def histogram(self, family: Family, labels: Sequence[str], hist: Histogram) -> None:
        metric = self.metrics[family]
        assert isinstance(metric, HistogramMetricFamily)
        metric.add_metric(list(labels), hist.cumulative(), hist.total)


class ExporterCollector(Collector):
    """Every ``llmcache_`` family, built fresh from one state snapshot per collect().

    The daemon serves the same series from ``exporter.exposition`` (rendered on change);
    this is the reference it is tested against, and what tests read samples from."""

    def __init__(self, state: State, *, now: Callable[[], float]) -> None:
        self._state = state
        self._now = now
        self.catalogue = Catalogue(state.per_model_histograms)

    def describe(self) -> Iterable[Metric]:
        # Families are dynamic; registering without a describe-time collect keeps start-up
        # free of work and of partially-built state.
        return []

    def collect(self) -> Iterator[Metric]:
        snap = self._state.snapshot()
        now = self._now()
        per_model = self.catalogue.per_model_histograms
        sink = _FamilySink(self.catalogue.families)
        for m in snap.models:
            write_model(sink, m, now, per_model)
        for p in snap.providers:
            write_provider(sink, p, per_model)
        write_exporter(sink, snap.exporter)
        yield from sink.metrics.values()


def build_registry(collector: Collector | None = None) -> CollectorRegistry:
    """A registry with prometheus-client's process, platform and GC collectors (rendered
    live on every scrape), after ``collector`` if given. A new registry per exporter, never
    the global one. Collectors without a describe() take part in ``name[]`` filtering too
    (prometheus-client leaves them out of a restricted registry otherwise)."""
    registry = CollectorRegistry(auto_describe=False, support_collectors_without_names=True)
    if collector is not None:
        registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
