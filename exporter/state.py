"""The exporter's in-memory state: what the last probes found, and running totals.

The recorder (``exporter.recorder``) is its only writer, from the event loop; the collector
reads a copy from whatever thread renders ``/metrics``. A lock guards both, held only for
plain-data updates and for the copy, never across I/O, so a scrape cannot stall a probe and
vice versa.
"""

from __future__ import annotations

import dataclasses
import threading
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field

from exporter.budget import BudgetSnapshot
from exporter.pricing import PriceInfo, request_cost
from exporter.report import RequestCost
from exporter.results import ErrorType, ProbeResult, RequestRecord, Verdict

REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
RUN_OUTCOMES = ("success", "failure", "skipped")
REQUEST_OUTCOMES = ("success", "failure")
CACHE_LABELS = ("hit", "miss")
PAUSE_REASONS = ("balance", "budget", "outage")
STORE_OPERATIONS = (
    "write_run",
    "write_usage",
    "budget",
    "balance",
    "model_state",
    "cleanup",
    "restore",
    "read",
)
ERROR_TYPES = tuple(e.value for e in ErrorType)
# Probes whose warm requests should hit; ttl repeats may miss by design (expired entries).
WARM_PROBES = frozenset({"basic", "prompt_sizes", "partial", "persistence"})


@dataclass(slots=True)
class Histogram:
    """Bucket counts (non-cumulative, last one +Inf), sum and count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le is inclusive).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


@dataclass(slots=True)
class ProbeGauges:
    """What the last run of one probe for one model found."""

    success: bool = False
    last_run: float = 0.0
    verdict: Verdict | None = None
    caching_works: bool | None = None
    hit_ratio: float | None = None
    sizes: dict[str, float | None] = field(default_factory=dict)
    ttl: dict[float, bool | None] = field(default_factory=dict)
    ttl_max_hit_delay: float | None = None
    first_miss_index: int | None = None


@dataclass(slots=True)
class ModelSeries:
    provider: str
    model: str
    probes: dict[str, ProbeGauges] = field(default_factory=dict)
    runs: dict[tuple[str, str], int] = field(default_factory=dict)  # (probe, outcome)
    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REQUEST_OUTCOMES, 0))
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_TYPES, 0))
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    completion_tokens: int = 0
    spend_usd: float = 0.0
    savings_usd: float = 0.0
    warm_requests: int = 0
    warm_hits: int = 0
    pollution: int = 0
    request_duration: dict[str, Histogram] = field(default_factory=dict)
    ttft: dict[str, Histogram] = field(default_factory=dict)
    cache_reporting: bool | None = None
    reliability: float | None = None
    consecutive_failures: int = 0
    cooldown_until: float = 0.0
    price: PriceInfo | None = None
    # Not probed: a USD budget applies and the model has no price.
    unpriced: bool = False


@dataclass(slots=True)
class ProviderSeries:
    name: str
    probes: tuple[str, ...] = ()
    intervals: dict[str, float] = field(default_factory=dict)
    balances: dict[str, float] = field(default_factory=dict)
    ratelimit: dict[str, float] = field(default_factory=dict)
    paused: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(PAUSE_REASONS, False))
    models: int = 0
    # What the configured schedule is expected to cost per UTC day, by unit.
    forecast: dict[str, float] = field(default_factory=dict)
    cycle: Histogram = field(default_factory=lambda: Histogram(DURATION_BUCKETS))
    probe_duration: dict[str, Histogram] = field(default_factory=dict)


@dataclass(slots=True)
class Snapshot:
    """A consistent copy of the state, safe to read without the lock."""

    providers: list[ProviderSeries]
    models: list[ModelSeries]
    store_errors: dict[str, int]
    reload_ok: bool
    reload_timestamp: float
    budgets: dict[str, BudgetSnapshot]


class State:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._providers: dict[str, ProviderSeries] = {}
        self._models: dict[tuple[str, str], ModelSeries] = {}
        self._store_errors: dict[str, int] = dict.fromkeys(STORE_OPERATIONS, 0)
        self._reload_ok = False
        self._reload_timestamp = 0.0
        self._budgets: dict[str, BudgetSnapshot] = {}

    # -- configuration ----------------------------------------------------------------------

    def configure_provider(
        self, name: str, *, probes: tuple[str, ...], intervals: dict[str, float]
    ) -> None:
        """Declare a provider so its series exist from start-up."""
        with self._lock:
            series = self._providers.setdefault(name, ProviderSeries(name))
            series.probes = probes
            series.intervals = dict(intervals)
            for probe in probes:
                series.probe_duration.setdefault(probe, Histogram(DURATION_BUCKETS))

    def retain_providers(self, names: set[str]) -> None:
        """Forget providers (and their models) no longer configured."""
        with self._lock:
            for name in list(self._providers):
                if name not in names:
                    del self._providers[name]
            for key in list(self._models):
                if key[0] not in names:
                    del self._models[key]

    def set_models(self, provider: str, models: list[str], prices: dict[str, PriceInfo]) -> None:
        """The models selected for ``provider``: pre-initialise their series, drop others."""
        with self._lock:
            series = self._providers.setdefault(provider, ProviderSeries(provider))
            series.models = len(models)
            keep = set(models)
            for key in list(self._models):
                if key[0] == provider and key[1] not in keep:
                    del self._models[key]
            for model in models:
                entry = self._model(provider, model)
                entry.price = prices.get(model)
                for probe in series.probes:
                    entry.probes.setdefault(probe, ProbeGauges())
                    for outcome in RUN_OUTCOMES:
                        entry.runs.setdefault((probe, outcome), 0)

    def set_reload(self, ok: bool, at: float) -> None:
        with self._lock:
            self._reload_ok = ok
            if ok:
                self._reload_timestamp = at

    # -- observations ---------------------------------------------------------------------

    def observe_result(
        self,
        result: ProbeResult,
        *,
        costs: Sequence[RequestCost] | None = None,
        restored: bool = False,
    ) -> None:
        """Apply a finished run. ``costs`` (one per request) are the spend and savings the
        recorder computed; without them they come from the model's price in force.
        ``restored`` (at start-up) sets gauges but counts nothing."""
        with self._lock:
            entry = self._model(result.provider, result.model)
            if not restored:
                outcome = (
                    "success"
                    if result.success
                    else ("skipped" if result.verdict is Verdict.SKIPPED else "failure")
                )
                key = (result.probe, outcome)
                entry.runs[key] = entry.runs.get(key, 0) + 1
                provider = self._providers.get(result.provider)
                if provider is not None and result.verdict is not Verdict.SKIPPED:
                    histogram = provider.probe_duration.setdefault(
                        result.probe, Histogram(DURATION_BUCKETS)
                    )
                    histogram.observe(result.duration_seconds)
                for i, record in enumerate(result.requests):
                    cost = costs[i] if costs is not None and i < len(costs) else None
                    self._observe_request(entry, result.probe, record, cost)
                if result.pollution:
                    entry.pollution += 1
            if result.verdict is Verdict.SKIPPED:
                # A run that never happened says nothing new about the model: its last real
                # verdict stays, and staleness alerts see the gap.
                return
            self._set_gauges(entry, result)

    def record_failures(
        self, provider: str, model: str, failures: int, cooldown_until: float
    ) -> None:
        with self._lock:
            entry = self._model(provider, model)
            entry.consecutive_failures = failures
            entry.cooldown_until = cooldown_until

    def set_reliability(self, provider: str, model: str, score: float | None) -> None:
        with self._lock:
            self._model(provider, model).reliability = score

    def set_balance(self, provider: str, currency: str, amount: float) -> None:
        with self._lock:
            self._providers.setdefault(provider, ProviderSeries(provider)).balances[currency] = (
                amount
            )

    def set_ratelimit(self, provider: str, remaining: dict[str, float]) -> None:
        with self._lock:
            self._providers.setdefault(provider, ProviderSeries(provider)).ratelimit.update(
                remaining
            )

    def set_forecast(self, provider: str, forecast: dict[str, float]) -> None:
        with self._lock:
            self._providers.setdefault(provider, ProviderSeries(provider)).forecast = dict(forecast)

    def set_unpriced(self, provider: str, model: str, unpriced: bool) -> None:
        with self._lock:
            self._model(provider, model).unpriced = unpriced

    def set_paused(self, provider: str, reason: str, paused: bool) -> None:
        with self._lock:
            self._providers.setdefault(provider, ProviderSeries(provider)).paused[reason] = paused

    def observe_cycle(self, provider: str, seconds: float) -> None:
        with self._lock:
            self._providers.setdefault(provider, ProviderSeries(provider)).cycle.observe(seconds)

    def set_budgets(self, snapshots: dict[str, BudgetSnapshot]) -> None:
        """The budget's figures (immutable snapshots), pushed after every change."""
        with self._lock:
            self._budgets = dict(snapshots)

    def store_error(self, operation: str) -> None:
        with self._lock:
            self._store_errors[operation] = self._store_errors.get(operation, 0) + 1

    # -- reads ----------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(
                providers=[_copy_provider(p) for p in self._providers.values()],
                models=[_copy_model(m) for m in self._models.values()],
                store_errors=dict(self._store_errors),
                reload_ok=self._reload_ok,
                reload_timestamp=self._reload_timestamp,
                budgets=dict(self._budgets),
            )

    def paused(self, provider: str) -> dict[str, bool]:
        with self._lock:
            series = self._providers.get(provider)
            return dict(series.paused) if series else {}

    def balance(self, provider: str, currency: str) -> float | None:
        with self._lock:
            series = self._providers.get(provider)
            return series.balances.get(currency) if series else None

    # -- internals --------------------------------------------------------------------------

    def _model(self, provider: str, model: str) -> ModelSeries:
        entry = self._models.get((provider, model))
        if entry is None:
            entry = ModelSeries(provider, model)
            self._models[(provider, model)] = entry
        return entry

    @staticmethod
    def _set_gauges(entry: ModelSeries, result: ProbeResult) -> None:
        gauges = entry.probes.setdefault(result.probe, ProbeGauges())
        gauges.success = result.success
        gauges.last_run = result.finished_at
        gauges.verdict = result.verdict
        gauges.caching_works = result.caching_works
        gauges.hit_ratio = result.hit_ratio
        gauges.sizes = {name: s.hit_ratio for name, s in result.sizes.items()}
        gauges.ttl = dict(result.ttl)
        gauges.ttl_max_hit_delay = result.ttl_max_hit_delay
        gauges.first_miss_index = result.first_miss_index
        reported = result.cache_reported
        if reported is not None:
            entry.cache_reporting = reported

    @staticmethod
    def _observe_request(
        entry: ModelSeries, probe: str, record: RequestRecord, cost: RequestCost | None
    ) -> None:
        if record.attempts == 0:
            return  # never sent (budget)
        entry.requests["success" if record.ok else "failure"] += 1
        if not record.ok:
            kind = record.error_type.value if record.error_type else ErrorType.API_ERROR.value
            entry.errors[kind] = entry.errors.get(kind, 0) + 1
            return
        entry.prompt_tokens += record.prompt_tokens or 0
        entry.cached_tokens += record.cached_tokens or 0
        entry.cache_write_tokens += record.cache_write_tokens or 0
        entry.completion_tokens += record.completion_tokens or 0
        if cost is not None:
            entry.spend_usd += cost.spend_usd
            entry.savings_usd += cost.savings_usd
        elif entry.price is not None:
            spend, savings = request_cost(entry.price, record)
            entry.spend_usd += spend
            entry.savings_usd += savings
        cache = "unknown" if record.hit is None else ("hit" if record.hit else "miss")
        if record.latency_seconds is not None:
            entry.request_duration.setdefault(cache, Histogram(REQUEST_BUCKETS)).observe(
                record.latency_seconds
            )
        if record.ttft_seconds is not None:
            entry.ttft.setdefault(cache, Histogram(TTFT_BUCKETS)).observe(record.ttft_seconds)
        if not record.cold and probe in WARM_PROBES and record.hit is not None:
            entry.warm_requests += 1
            entry.warm_hits += int(record.hit)


# Scrape-time copies: only the mutable containers are copied (histogram count lists, dicts);
# everything else is immutable. copy.deepcopy would work too, at several times the time and
# garbage per scrape.


def _copy_histogram(h: Histogram) -> Histogram:
    return Histogram(h.bounds, list(h.counts), h.total)


def _copy_model(m: ModelSeries) -> ModelSeries:
    return dataclasses.replace(
        m,
        probes={
            k: dataclasses.replace(g, sizes=dict(g.sizes), ttl=dict(g.ttl))
            for k, g in m.probes.items()
        },
        runs=dict(m.runs),
        requests=dict(m.requests),
        errors=dict(m.errors),
        request_duration={k: _copy_histogram(h) for k, h in m.request_duration.items()},
        ttft={k: _copy_histogram(h) for k, h in m.ttft.items()},
    )


def _copy_provider(p: ProviderSeries) -> ProviderSeries:
    return dataclasses.replace(
        p,
        intervals=dict(p.intervals),
        balances=dict(p.balances),
        ratelimit=dict(p.ratelimit),
        paused=dict(p.paused),
        forecast=dict(p.forecast),
        cycle=_copy_histogram(p.cycle),
        probe_duration={k: _copy_histogram(h) for k, h in p.probe_duration.items()},
    )
