"""The in-memory state of real traffic: running totals per provider and model, and recent prefixes.

The proxies are its only writers (one ``record`` per finished chat request); the traffic
collector reads a copy. A lock guards both, held only for plain-data updates and the copy.
Nothing is written to the store: these are counters, and Prometheus copes with a restart
that resets them. Model labels are bounded: past ``max_models`` distinct models per provider,
and for a model name that is not a plausible label, requests count as ``model="other"``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from exporter.pricing import cost_of
from exporter.proxy.hits import traffic_hit
from exporter.proxy.prefix import PREFIX_PARTS, PrefixDigests, PrefixTracker
from exporter.proxy.usage import NO_USAGE, OUTCOMES, SUCCESS
from exporter.results import Completion, ModelPrice
from exporter.state import REQUEST_BUCKETS, TTFT_BUCKETS, Histogram

OTHER_MODEL = "other"
# Requests by whether they hit (the shared rule), or whether the answer reported no cache
# figures at all ("not reported" is not "0 cached").
CACHE_LABELS = ("hit", "miss", "unreported")
# Answers that went through whole: their timings are the upstream's, not an error's.
_TIMED = frozenset({SUCCESS, NO_USAGE})
_MODEL_LABEL = re.compile(r"[A-Za-z0-9._:/@+-]{1,128}")

PriceLookup = Callable[[str], ModelPrice | None]


@dataclass(frozen=True, slots=True)
class Observation:
    """One finished chat request as the proxy saw it (no content, no headers)."""

    provider: str
    model: str | None
    outcome: str
    completion: Completion | None = None
    latency: float | None = None  # request sent upstream to last byte
    ttft: float | None = None  # request sent upstream to the first generated token
    prefix: PrefixDigests | None = None


@dataclass(slots=True)
class TrafficModel:
    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    completion_tokens: int = 0
    spend_usd: float = 0.0
    savings_usd: float = 0.0
    cache: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CACHE_LABELS[:2], 0))
    prefix_requests: int = 0
    prefix_changes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PREFIX_PARTS, 0))

    def copy(self) -> TrafficModel:
        return TrafficModel(
            dict(self.requests),
            self.prompt_tokens,
            self.cached_tokens,
            self.cache_write_tokens,
            self.completion_tokens,
            self.spend_usd,
            self.savings_usd,
            dict(self.cache),
            self.prefix_requests,
            dict(self.prefix_changes),
        )


def _histograms(bounds: tuple[float, ...]) -> dict[str, Histogram]:
    return {cache: Histogram(bounds) for cache in CACHE_LABELS}


@dataclass(slots=True)
class TrafficProvider:
    name: str
    proxies: dict[str, str] = field(default_factory=dict)  # proxy name -> API type
    models: dict[str, TrafficModel] = field(default_factory=dict)
    duration: dict[str, Histogram] = field(default_factory=lambda: _histograms(REQUEST_BUCKETS))
    ttft: dict[str, Histogram] = field(default_factory=lambda: _histograms(TTFT_BUCKETS))
    in_flight: int = 0
    passthrough: int = 0
    recording_errors: int = 0

    def copy(self) -> TrafficProvider:
        return TrafficProvider(
            self.name,
            dict(self.proxies),
            {name: m.copy() for name, m in self.models.items()},
            {k: _copy_histogram(h) for k, h in self.duration.items()},
            {k: _copy_histogram(h) for k, h in self.ttft.items()},
            self.in_flight,
            self.passthrough,
            self.recording_errors,
        )


def _copy_histogram(hist: Histogram) -> Histogram:
    return Histogram(hist.bounds, list(hist.counts), hist.total)


@dataclass(slots=True)
class _Limits:
    max_models: int
    prefix_memory: int
    price_for: PriceLookup


class TrafficState:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._providers: dict[str, TrafficProvider] = {}
        self._limits: dict[str, _Limits] = {}
        self._trackers: dict[tuple[str, str], PrefixTracker] = {}

    def configure(
        self,
        provider: str,
        *,
        proxy: str,
        api_type: str,
        max_models: int,
        prefix_memory: int,
        price_for: PriceLookup,
    ) -> None:
        """Declare a proxy so its provider's series exist from start-up. Proxies that share
        a provider add up into one set of series (the tightest limits win)."""
        with self._lock:
            series = self._providers.setdefault(provider, TrafficProvider(provider))
            series.proxies[proxy] = api_type
            known = self._limits.get(provider)
            if known is not None:
                max_models = min(max_models, known.max_models)
                prefix_memory = min(prefix_memory, known.prefix_memory)
                price_for = _first_price(known.price_for, price_for)
            self._limits[provider] = _Limits(max_models, prefix_memory, price_for)

    def record(self, obs: Observation) -> None:
        """Add one finished chat request to the totals."""
        limits = self._limits[obs.provider]
        usage = obs.completion.usage if obs.completion is not None else None
        spend = savings = 0.0
        hit: bool | None = None
        if obs.completion is not None and usage is not None:
            price = limits.price_for(obs.model) if obs.model is not None else None
            if price is not None:
                spend, savings = cost_of(price, usage)
            else:
                spend = obs.completion.cost.get("usd", 0.0)  # what the provider billed
            hit = traffic_hit(usage)
        cache = "unreported" if hit is None else ("hit" if hit else "miss")
        with self._lock:
            series = self._providers[obs.provider]
            label = self._label(series, limits, obs.model)
            model = series.models.get(label)
            if model is None:
                model = series.models[label] = TrafficModel()
            model.requests[obs.outcome] += 1
            if usage is not None:
                model.prompt_tokens += usage.prompt_tokens
                model.cached_tokens += usage.cached_tokens or 0
                model.cache_write_tokens += usage.cache_write_tokens or 0
                model.completion_tokens += usage.completion_tokens
                model.spend_usd += spend
                model.savings_usd += savings
                if hit is not None:
                    model.cache[cache] += 1
            if obs.outcome in _TIMED:
                if obs.latency is not None:
                    series.duration[cache].observe(obs.latency)
                if obs.ttft is not None:
                    series.ttft[cache].observe(obs.ttft)
            if obs.prefix is not None:
                tracker = self._trackers.get((obs.provider, label))
                if tracker is None:
                    tracker = PrefixTracker(limits.prefix_memory)
                    self._trackers[(obs.provider, label)] = tracker
                model.prefix_requests += 1
                part = tracker.observe(obs.prefix)
                if part is not None:
                    model.prefix_changes[part] += 1

    def request_started(self, provider: str) -> None:
        with self._lock:
            self._providers[provider].in_flight += 1

    def request_ended(self, provider: str) -> None:
        with self._lock:
            self._providers[provider].in_flight -= 1

    def passthrough(self, provider: str) -> None:
        """A forwarded request that is not a chat completion (models list, embeddings...)."""
        with self._lock:
            self._providers[provider].passthrough += 1

    def recording_error(self, provider: str) -> None:
        """Reading or recording a request failed; the request itself was unaffected."""
        with self._lock:
            self._providers[provider].recording_errors += 1

    def snapshot(self) -> list[TrafficProvider]:
        with self._lock:
            return [p.copy() for p in self._providers.values()]

    @staticmethod
    def _label(series: TrafficProvider, limits: _Limits, model: str | None) -> str:
        if model is None or not _MODEL_LABEL.fullmatch(model) or model == OTHER_MODEL:
            return OTHER_MODEL
        if model in series.models:
            return model
        named = len(series.models) - (OTHER_MODEL in series.models)
        return model if named < limits.max_models else OTHER_MODEL


def _first_price(first: PriceLookup, second: PriceLookup) -> PriceLookup:
    def lookup(model: str) -> ModelPrice | None:
        return first(model) or second(model)

    return lookup
