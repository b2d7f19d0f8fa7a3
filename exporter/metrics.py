"""The Prometheus collector: renders a snapshot of the in-memory state on every scrape.

A scrape never touches the network or the database. Probe results are those of the LAST
probe, because probing costs money and runs on its own schedule (the "expensive to
retrieve" exception of the exporter guidelines); the HELP texts say so.

Example exposition (abridged)::

    # HELP llmcache_caching_works 1 if the last probe saw warm requests hit the cache, ...
    # TYPE llmcache_caching_works gauge
    llmcache_caching_works{model="sim-cache-ok",probe="basic",provider="sim"} 1.0
    # TYPE llmcache_cached_tokens counter
    llmcache_cached_tokens_total{model="sim-cache-ok",provider="sim"} 1024.0
    # TYPE llmcache_price_usd_per_million_tokens gauge
    llmcache_price_usd_per_million_tokens{kind="cache_read",model="sim-cache-ok",provider="sim"} 0.1
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.budget import BudgetSnapshot
from exporter.results import ModelPrice
from exporter.state import (
    CACHE_LABELS,
    REQUEST_BUCKETS,
    TTFT_BUCKETS,
    Histogram,
    ModelSeries,
    ProviderSeries,
    Snapshot,
    State,
)

LAST_PROBE = (
    " Value from the last probe run; probes run on their own schedule because each costs money."
)
PM = ("provider", "model")
PMP = ("provider", "model", "probe")


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


def _histogram(family: HistogramMetricFamily, labels: list[str], hist: Histogram) -> None:
    family.add_metric(labels, hist.cumulative(), hist.total)


class ExporterCollector(Collector):
    """Every ``llmcache_`` family, built fresh from one state snapshot per scrape."""

    def __init__(self, state: State, *, now: Callable[[], float]) -> None:
        self._state = state
        self._now = now

    def describe(self) -> Iterable[Metric]:
        # Families are dynamic; registering without a describe-time collect keeps start-up
        # free of work and of partially-built state.
        return []

    def collect(self) -> Iterator[Metric]:
        snap = self._state.snapshot()
        yield from self._probe_families(snap.models)
        yield from self._request_families(snap.models)
        yield from self._model_health_families(snap.models)
        yield from self._provider_families(snap.providers, snap.budgets)
        yield from self._exporter_families(snap)

    # -- probe results ----------------------------------------------------------------------

    def _probe_families(self, models: list[ModelSeries]) -> Iterator[Metric]:
        works = GaugeMetricFamily(
            "llmcache_caching_works",
            "1 if warm requests hit the cache, 0 if cache fields were reported but warm "
            "requests never hit; absent without a verdict." + LAST_PROBE,
            labels=PMP,
        )
        ratio = GaugeMetricFamily(
            "llmcache_hit_ratio",
            "Run-specific cached share of the warm requests, shared template tokens not "
            "counted (partial: of the shared prefix; persistence and ttl: fraction of warm "
            "requests that hit)." + LAST_PROBE,
            labels=(*PMP, "size"),
        )
        ttl_hit = GaugeMetricFamily(
            "llmcache_ttl_hit",
            "1 if a repeat after this delay still hit." + LAST_PROBE,
            labels=(*PM, "delay_seconds"),
        )
        ttl_max = GaugeMetricFamily(
            "llmcache_ttl_max_hit_delay_seconds",
            "Longest delay after which a repeat still hit (0 if none)." + LAST_PROBE,
            labels=PM,
        )
        persistence = GaugeMetricFamily(
            "llmcache_persistence_hit_ratio",
            "Fraction of warm requests of the persistence probe that hit." + LAST_PROBE,
            labels=PM,
        )
        first_miss = GaugeMetricFamily(
            "llmcache_persistence_first_miss_index",
            "1-based index of the first warm request that missed (0: none missed)." + LAST_PROBE,
            labels=PM,
        )
        success = GaugeMetricFamily(
            "llmcache_probe_success",
            "1 if the last run produced a verdict, 0 if it failed (0 before the first run).",
            labels=PMP,
        )
        last_run = GaugeMetricFamily(
            "llmcache_probe_last_run_timestamp_seconds",
            "When the last run finished (0 before the first run).",
            labels=PMP,
        )
        runs = CounterMetricFamily(
            "llmcache_probe_runs", "Probe runs by outcome.", labels=(*PMP, "outcome")
        )
        for m in models:
            base = [m.provider, m.model]
            for probe, g in sorted(m.probes.items()):
                labels = [*base, probe]
                success.add_metric(labels, 1.0 if g.success else 0.0)
                last_run.add_metric(labels, g.last_run)
                if g.caching_works is not None:
                    works.add_metric(labels, 1.0 if g.caching_works else 0.0)
                if g.hit_ratio is not None:
                    ratio.add_metric([*labels, ""], g.hit_ratio)
                for size, value in sorted(g.sizes.items()):
                    if value is not None:
                        ratio.add_metric([*labels, size], value)
                if probe == "ttl" and g.ttl:
                    for delay, hit in sorted(g.ttl.items()):
                        if hit is not None:
                            ttl_hit.add_metric([*base, _delay_label(delay)], 1.0 if hit else 0.0)
                    if g.ttl_max_hit_delay is not None:
                        ttl_max.add_metric(base, g.ttl_max_hit_delay)
                if probe == "persistence" and g.success and g.hit_ratio is not None:
                    persistence.add_metric(base, g.hit_ratio)
                    first_miss.add_metric(base, float(g.first_miss_index or 0))
            for (probe, outcome), count in sorted(m.runs.items()):
                runs.add_metric([*base, probe, outcome], float(count))
        yield from (works, ratio, ttl_hit, ttl_max, persistence, first_miss, success, last_run)
        yield runs

    # -- requests, tokens, money ---------------------------------------------------------------

    def _request_families(self, models: list[ModelSeries]) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "llmcache_requests",
            "Probe requests by outcome (retries of one request count once).",
            labels=(*PM, "outcome"),
        )
        errors = CounterMetricFamily(
            "llmcache_errors", "Failed probe requests by cause.", labels=(*PM, "error_type")
        )
        counters = {
            "prompt": CounterMetricFamily(
                "llmcache_prompt_tokens", "Prompt tokens as reported, cached included.", labels=PM
            ),
            "cached": CounterMetricFamily(
                "llmcache_cached_tokens", "Prompt tokens read from the cache.", labels=PM
            ),
            "write": CounterMetricFamily(
                "llmcache_cache_write_tokens",
                "Prompt tokens written to the cache, where the API reports them.",
                labels=PM,
            ),
            "completion": CounterMetricFamily(
                "llmcache_completion_tokens", "Completion tokens.", labels=PM
            ),
            "spend": CounterMetricFamily(
                "llmcache_spend_usd",
                "What the probes cost, from the price table in force.",
                labels=PM,
            ),
            "savings": CounterMetricFamily(
                "llmcache_savings_usd",
                "What caching saved: cached tokens × (input − cache-read price).",
                labels=PM,
            ),
            "warm": CounterMetricFamily(
                "llmcache_warm_requests",
                "Successful requests that should have hit the cache (ttl repeats excluded).",
                labels=PM,
            ),
            "warm_hits": CounterMetricFamily(
                "llmcache_warm_request_hits",
                "Warm requests whose own prompt was served from cache (beyond the shared "
                "template tokens).",
                labels=PM,
            ),
            "pollution": CounterMetricFamily(
                "llmcache_cache_pollution",
                "Runs whose cold request (unique run id first) reported cached tokens beyond "
                "the shared baseline.",
                labels=PM,
            ),
        }
        duration = HistogramMetricFamily(
            "llmcache_request_duration_seconds",
            "Probe request duration, request sent to last byte.",
            labels=(*PM, "cache"),
        )
        ttft = HistogramMetricFamily(
            "llmcache_time_to_first_token_seconds",
            "Time to the first generated token of streamed probe requests.",
            labels=(*PM, "cache"),
        )
        price = GaugeMetricFamily(
            "llmcache_price_info",
            "The price table in force for a model (version changes when a price does).",
            labels=(*PM, "version", "source"),
        )
        rates = GaugeMetricFamily(
            "llmcache_price_usd_per_million_tokens",
            "USD per million tokens by kind, as spend and savings are computed: cache_read "
            "and cache_write equal input where the model has no discounted price for them; "
            "absent for a model without any price.",
            labels=(*PM, "kind"),
        )
        for m in models:
            base = [m.provider, m.model]
            for outcome, count in m.requests.items():
                requests.add_metric([*base, outcome], float(count))
            for kind, count in sorted(m.errors.items()):
                errors.add_metric([*base, kind], float(count))
            values = {
                "prompt": m.prompt_tokens,
                "cached": m.cached_tokens,
                "write": m.cache_write_tokens,
                "completion": m.completion_tokens,
                "spend": m.spend_usd,
                "savings": m.savings_usd,
                "warm": m.warm_requests,
                "warm_hits": m.warm_hits,
                "pollution": m.pollution,
            }
            for key, family in counters.items():
                family.add_metric(base, float(values[key]))
            for cache in sorted(set(CACHE_LABELS) | set(m.request_duration)):
                hist = m.request_duration.get(cache)
                if hist is not None or cache in CACHE_LABELS:
                    _histogram(duration, [*base, cache], hist or _EMPTY_REQUEST)
            for cache in sorted(set(CACHE_LABELS) | set(m.ttft)):
                hist = m.ttft.get(cache)
                if hist is not None or cache in CACHE_LABELS:
                    _histogram(ttft, [*base, cache], hist or _EMPTY_TTFT)
            info = m.price
            price.add_metric(
                [*base, info.version if info else "none", info.source if info else "none"], 1.0
            )
            if info is not None and info.price is not None:
                for kind, usd in _price_kinds(info.price):
                    rates.add_metric([*base, kind], usd)
        yield from (requests, errors, *counters.values(), duration, ttft, price, rates)

    def _model_health_families(self, models: list[ModelSeries]) -> Iterator[Metric]:
        now = self._now()
        reliability = GaugeMetricFamily(
            "llmcache_reliability_score",
            "0-100: 100 × (0.4 × success rate + 0.3 × consistency + 0.3 × effectiveness) "
            "over the reliability window (docs/metrics.md).",
            labels=PM,
        )
        failures = GaugeMetricFamily(
            "llmcache_consecutive_failures", "Failed probe runs in a row.", labels=PM
        )
        cooldown = GaugeMetricFamily(
            "llmcache_model_cooldown",
            "1 while the model is in cooldown after repeated failures.",
            labels=PM,
        )
        unpriced = GaugeMetricFamily(
            "llmcache_model_unpriced",
            "1 while the model is not probed because its provider has a USD budget and the "
            "model has no price.",
            labels=PM,
        )
        reporting = GaugeMetricFamily(
            "llmcache_cache_reporting_supported",
            "1 if the API reported cache fields, 0 if it reported none (not reported is not "
            "0 cached)." + LAST_PROBE,
            labels=PM,
        )
        for m in models:
            base = [m.provider, m.model]
            if m.reliability is not None:
                reliability.add_metric(base, m.reliability)
            failures.add_metric(base, float(m.consecutive_failures))
            cooldown.add_metric(base, 1.0 if m.cooldown_until > now else 0.0)
            unpriced.add_metric(base, 1.0 if m.unpriced else 0.0)
            if m.cache_reporting is not None:
                reporting.add_metric(base, 1.0 if m.cache_reporting else 0.0)
        yield from (reliability, failures, cooldown, unpriced, reporting)

    # -- providers -------------------------------------------------------------------------------

    def _provider_families(
        self, providers: list[ProviderSeries], budgets: dict[str, BudgetSnapshot]
    ) -> Iterator[Metric]:
        interval = GaugeMetricFamily(
            "llmcache_probe_interval_seconds",
            "Configured probe interval, for staleness alerts.",
            labels=("provider", "probe"),
        )
        duration = HistogramMetricFamily(
            "llmcache_probe_duration_seconds",
            "Wall time of probe runs.",
            labels=("provider", "probe"),
        )
        cycle = HistogramMetricFamily(
            "llmcache_scheduler_cycle_duration_seconds",
            "Time to probe every due model of a provider once.",
            labels=("provider",),
        )
        balance = GaugeMetricFamily(
            "llmcache_balance",
            "Account balance as last reported by the provider (never sum across currencies).",
            labels=("provider", "currency"),
        )
        ratelimit = GaugeMetricFamily(
            "llmcache_ratelimit_remaining",
            "Remaining rate-limit allowance from the last response headers.",
            labels=("provider", "resource"),
        )
        paused = GaugeMetricFamily(
            "llmcache_provider_paused",
            "1 while probing of the provider is stopped for this reason.",
            labels=("provider", "reason"),
        )
        models = GaugeMetricFamily(
            "llmcache_models", "Models selected for probing.", labels=("provider",)
        )
        limit = GaugeMetricFamily(
            "llmcache_budget_limit",
            "Configured spend budget (absent: unlimited).",
            labels=("provider", "window", "unit"),
        )
        used = GaugeMetricFamily(
            "llmcache_budget_used",
            "Spend in the current UTC window: settled requests plus open reservations.",
            labels=("provider", "window", "unit"),
        )
        forecast = GaugeMetricFamily(
            "llmcache_budget_forecast",
            "What the configured schedule is expected to cost per UTC day (unit tokens: "
            "prompt and completion, as budgets count; prompt_tokens; usd where prices are "
            "known), from the probes' own cost estimates.",
            labels=("provider", "window", "unit"),
        )
        exhausted = GaugeMetricFamily(
            "llmcache_budget_exhausted",
            "1 while the next probe would exceed a budget.",
            labels=("provider",),
        )
        for p in providers:
            for probe, seconds in sorted(p.intervals.items()):
                interval.add_metric([p.name, probe], seconds)
            for probe, hist in sorted(p.probe_duration.items()):
                _histogram(duration, [p.name, probe], hist)
            _histogram(cycle, [p.name], p.cycle)
            for currency, amount in sorted(p.balances.items()):
                balance.add_metric([p.name, currency], amount)
            for resource, remaining in sorted(p.ratelimit.items()):
                ratelimit.add_metric([p.name, resource], remaining)
            for reason, flag in sorted(p.paused.items()):
                paused.add_metric([p.name, reason], 1.0 if flag else 0.0)
            models.add_metric([p.name], float(p.models))
            for unit, amount in sorted(p.forecast.items()):
                forecast.add_metric([p.name, "day", unit], amount)
            snap = budgets.get(p.name)
            if snap is not None:
                for usage in snap.usage:
                    labels = [p.name, usage.window, usage.unit]
                    if usage.limit is not None:
                        limit.add_metric(labels, usage.limit)
                    used.add_metric(labels, usage.used)
                exhausted.add_metric([p.name], 1.0 if snap.exhausted else 0.0)
            else:
                exhausted.add_metric([p.name], 0.0)
        yield from (interval, duration, cycle, balance, ratelimit, paused, models)
        yield from (limit, used, forecast, exhausted)

    # -- the exporter itself -------------------------------------------------------------------

    @staticmethod
    def _exporter_families(snap: Snapshot) -> Iterator[Metric]:
        store = CounterMetricFamily(
            "llmcache_store_errors",
            "SQLite operations that failed; the exporter keeps serving and retries writes.",
            labels=("operation",),
        )
        for operation, count in sorted(snap.store_errors.items()):
            store.add_metric([operation], float(count))
        yield store
        yield GaugeMetricFamily(
            "llmcache_config_last_reload_successful",
            "1 if the last configuration (re)load succeeded.",
            value=1.0 if snap.reload_ok else 0.0,
        )
        yield GaugeMetricFamily(
            "llmcache_config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully.",
            value=snap.reload_timestamp,
        )
        build = GaugeMetricFamily(
            "llmcache_exporter_build_info",
            "Build information (always 1).",
            labels=("version", "python"),
        )
        build.add_metric([__version__, platform.python_version()], 1.0)
        yield build


# Series for hit and miss exist from start-up, with the same buckets as observed ones.
_EMPTY_REQUEST = Histogram(REQUEST_BUCKETS)
_EMPTY_TTFT = Histogram(TTFT_BUCKETS)


def build_registry(collector: ExporterCollector) -> CollectorRegistry:
    """The exporter's registry: its collector plus prometheus-client's process, platform
    and GC collectors. A new registry per exporter, never the global one."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
