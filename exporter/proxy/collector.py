"""The ``llmcache_traffic_*`` families: real traffic through the proxies, from one state copy.

``collect`` does no I/O and holds the state lock only for the copy. Per provider and model
(models bounded by ``max_models``; the rest are ``model="other"``) there are 18 series: six
request outcomes, four token counters, spend, savings, hit and miss requests, the hashed
requests and three prefix-change parts. Latency and time-to-first-token histograms are per
provider and cache (hit, miss, unreported), not per model, to keep the series budget.

Example exposition (abridged)::

    # TYPE llmcache_traffic_requests counter
    llmcache_traffic_requests_total{model="gpt-4o",outcome="success",provider="openai"} 42.0
    # TYPE llmcache_traffic_cached_tokens counter
    llmcache_traffic_cached_tokens_total{model="gpt-4o",provider="openai"} 81920.0
    # TYPE llmcache_traffic_prefix_changes counter
    llmcache_traffic_prefix_changes_total{model="gpt-4o",part="system",provider="openai"} 3.0
    llmcache_traffic_time_to_first_token_seconds_bucket{cache="hit",le="0.25",provider="oai"} 40.0
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from exporter.proxy.traffic import TrafficModel, TrafficState

PM = ("provider", "model")
_TOKENS = (
    ("prompt_tokens", "Prompt tokens of real requests as reported, cached included."),
    ("cached_tokens", "Prompt tokens of real requests read from the cache."),
    ("cache_write_tokens", "Prompt tokens of real requests written to the cache, where reported."),
    ("completion_tokens", "Completion tokens of real requests."),
)


class TrafficCollector(Collector):
    """Every ``llmcache_traffic_`` family, built fresh from one snapshot per scrape."""

    def __init__(self, state: TrafficState) -> None:
        self._state = state

    def describe(self) -> Iterable[Metric]:
        return []  # dynamic families; nothing to build at registration

    def collect(self) -> Iterator[Metric]:
        providers = self._state.snapshot()
        info = GaugeMetricFamily(
            "llmcache_traffic_proxy_info",
            "A configured pass-through proxy and the provider labels its traffic carries.",
            labels=("proxy", "provider", "type"),
        )
        in_flight = GaugeMetricFamily(
            "llmcache_traffic_in_flight_requests",
            "Requests being forwarded right now.",
            labels=("provider",),
        )
        passthrough = CounterMetricFamily(
            "llmcache_traffic_passthrough_requests",
            "Forwarded requests that are not chat completions (models list, embeddings...).",
            labels=("provider",),
        )
        recording = CounterMetricFamily(
            "llmcache_traffic_recording_errors",
            "Requests whose usage could not be recorded; the traffic itself was unaffected.",
            labels=("provider",),
        )
        duration = HistogramMetricFamily(
            "llmcache_traffic_request_duration_seconds",
            "Real chat requests, sent upstream to last byte, by cache hit or miss.",
            labels=("provider", "cache"),
        )
        ttft = HistogramMetricFamily(
            "llmcache_traffic_time_to_first_token_seconds",
            "Real streamed chat requests, sent upstream to first generated token.",
            labels=("provider", "cache"),
        )
        model_families = _ModelFamilies()
        for p in providers:
            for proxy, api_type in sorted(p.proxies.items()):
                info.add_metric([proxy, p.name, api_type], 1.0)
            in_flight.add_metric([p.name], float(p.in_flight))
            passthrough.add_metric([p.name], float(p.passthrough))
            recording.add_metric([p.name], float(p.recording_errors))
            for cache, hist in p.duration.items():
                duration.add_metric([p.name, cache], hist.cumulative(), hist.total)
            for cache, hist in p.ttft.items():
                ttft.add_metric([p.name, cache], hist.cumulative(), hist.total)
            for model, series in sorted(p.models.items()):
                model_families.add(p.name, model, series)
        yield from (info, in_flight, passthrough, recording)
        yield from model_families.families()
        yield from (duration, ttft)


class _ModelFamilies:
    def __init__(self) -> None:
        self.requests = CounterMetricFamily(
            "llmcache_traffic_requests",
            "Real chat requests through the proxies by outcome (no_usage: the answer "
            "reported none, e.g. a stream without stream_options.include_usage).",
            labels=(*PM, "outcome"),
        )
        self.tokens = {
            name: CounterMetricFamily(f"llmcache_traffic_{name}", text, labels=PM)
            for name, text in _TOKENS
        }
        self.spend = CounterMetricFamily(
            "llmcache_traffic_spend_usd",
            "What real requests cost: the price table in force, else what the provider billed.",
            labels=PM,
        )
        self.savings = CounterMetricFamily(
            "llmcache_traffic_savings_usd",
            "What caching saved on real requests: cached tokens × (input − cache-read price).",
            labels=PM,
        )
        self.cache = CounterMetricFamily(
            "llmcache_traffic_cache_requests",
            "Real requests that reported cache figures, by whether they hit (the shared hit "
            "rule with a fixed baseline, docs/proxy.md).",
            labels=(*PM, "cache"),
        )
        self.prefix_requests = CounterMetricFamily(
            "llmcache_traffic_prefix_requests",
            "Real requests long enough to cache whose prompt prefix was hashed.",
            labels=PM,
        )
        self.prefix_changes = CounterMetricFamily(
            "llmcache_traffic_prefix_changes",
            "Hashed requests whose cacheable prefix was not among the recent ones, by the "
            "first part that changed (tools, system, messages).",
            labels=(*PM, "part"),
        )

    def add(self, provider: str, model: str, series: TrafficModel) -> None:
        base = [provider, model]
        for outcome, count in series.requests.items():
            self.requests.add_metric([*base, outcome], float(count))
        for name, family in self.tokens.items():
            family.add_metric(base, float(getattr(series, name)))
        self.spend.add_metric(base, series.spend_usd)
        self.savings.add_metric(base, series.savings_usd)
        for cache, count in series.cache.items():
            self.cache.add_metric([*base, cache], float(count))
        self.prefix_requests.add_metric(base, float(series.prefix_requests))
        for part, count in series.prefix_changes.items():
            self.prefix_changes.add_metric([*base, part], float(count))

    def families(self) -> Iterator[Metric]:
        yield self.requests
        yield from self.tokens.values()
        yield from (self.spend, self.savings, self.cache, self.prefix_requests)
        yield self.prefix_changes
