"""The exporter's in-memory state: what the last probes found, and running totals.

The recorder (``exporter.recorder``) is its only writer, from the event loop; readers take
copies from whatever thread renders ``/metrics``. A lock guards both, held only for
plain-data updates and for the copy, never across I/O, so a scrape cannot stall a probe and
vice versa.

Every write marks what it touched (a model, a provider, the exporter's own figures) and
bumps ``generation``; ``changes()`` hands a reader copies of just those parts, taken under
one lock acquisition, so ``exporter.exposition`` re-renders only what changed and never a
half-applied run. ``snapshot()`` copies everything (the fresh render the cache is checked
against).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from exporter.budget import BudgetSnapshot
from exporter.pricing import PriceInfo, request_cost
from exporter.report import RequestCost
from exporter.results import ErrorType, ProbeResult, RequestRecord, Verdict

REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
RUN_OUTCOMES = ("success", "failure", "skipped")
# Outcomes whose series exist from start-up; "skipped" (a budget refusal) appears when it
# first happens (docs/metrics.md "Series created on first use").
PREINIT_RUN_OUTCOMES = ("success", "failure")
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

# The probe whose cold and warm requests give the per-model "last run" TTFT gauges: the same
# prompt size run after run, so the figures compare over time.
TTFT_PROBE = "basic"

ModelKey = tuple[str, str]


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
    runs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PREINIT_RUN_OUTCOMES, 0))
    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REQUEST_OUTCOMES, 0))
    # By error type, created on first use (the provider's totals are pre-initialised).
    errors: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    completion_tokens: int = 0
    spend_usd: float = 0.0
    savings_usd: float = 0.0
    warm_requests: int = 0
    warm_hits: int = 0
    pollution: int = 0
    # TTFT of the last successful TTFT_PROBE run's cold and warm request ("cold", "warm").
    last_ttft: dict[str, float] = field(default_factory=dict)
    # Only with per-model histograms (``State(per_model_histograms=True)``).
    request_duration: dict[str, Histogram] = field(default_factory=dict)
    ttft: dict[str, Histogram] = field(default_factory=dict)
    cache_reporting: bool | None = None
    reliability: float | None = None
    consecutive_failures: int = 0
    cooldown_until: float = 0.0
    price: PriceInfo | None = None
    # Not probed: a USD budget applies and the model has no price.
    unpriced: bool = False
    # The provider has a USD budget, so "unpriced" can happen: only then is it exposed.
    usd_budget: bool = False


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
    # By (probe, outcome): runs that happened (skipped ones have no duration).
    probe_duration: dict[tuple[str, str], Histogram] = field(default_factory=dict)
    # Every error type from start-up: exact rates per provider, whatever the models do.
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_TYPES, 0))
    # Request duration and TTFT by cache label, unless the histograms are per model.
    request_duration: dict[str, Histogram] = field(default_factory=dict)
    ttft: dict[str, Histogram] = field(default_factory=dict)
    budget: BudgetSnapshot | None = None


@dataclass(slots=True)
class ExporterSeries:
    """The exporter's own figures."""

    store_errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STORE_OPERATIONS, 0))
    reload_ok: bool = False
    reload_timestamp: float = 0.0


@dataclass(slots=True)
class Snapshot:
    """A consistent copy of the state, safe to read without the lock."""

    providers: list[ProviderSeries]
    models: list[ModelSeries]
    exporter: ExporterSeries

    # The collector's historical view (tests read these).
    @property
    def store_errors(self) -> dict[str, int]:
        return self.exporter.store_errors

    @property
    def reload_ok(self) -> bool:
        return self.exporter.reload_ok

    @property
    def reload_timestamp(self) -> float:
        return self.exporter.reload_timestamp

    @property
    def budgets(self) -> dict[str, BudgetSnapshot]:
        return {p.name: p.budget for p in self.providers if p.budget is not None}


@dataclass(slots=True)
class Changes:
    """What changed since the last ``changes()``: copies of the touched parts (None: gone).
    ``model_order`` / ``provider_order`` are given when the set of keys changed."""

    generation: int
    models: dict[ModelKey, ModelSeries | None]
    providers: dict[str, ProviderSeries | None]
    exporter: ExporterSeries | None
    model_order: list[ModelKey] | None
    provider_order: list[str] | None


class State:
    def __init__(self, *, per_model_histograms: bool = False) -> None:
        self._lock = threading.Lock()
        self.per_model_histograms = per_model_histograms
        self._providers: dict[str, ProviderSeries] = {}
        self._models: dict[ModelKey, ModelSeries] = {}
        self._exporter = ExporterSeries()
        self._generation = 0
        self._dirty_models: set[ModelKey] = set()
        self._dirty_providers: set[str] = set()
        self._dirty_exporter = True
        self._keys_changed = True
        self._listener: Callable[[], None] | None = None

    @property
    def generation(self) -> int:
        """Increases with every change (a plain int: reading it needs no lock)."""
        return self._generation

    def set_listener(self, listener: Callable[[], None] | None) -> None:
        """``listener()`` is called after each change, outside the lock, from the writer's
        thread; it must not block (``exporter.exposition`` sets an event)."""
        self._listener = listener

    # -- configuration ----------------------------------------------------------------------

    def configure_provider(
        self, name: str, *, probes: tuple[str, ...], intervals: dict[str, float]
    ) -> None:
        """Declare a provider so its series exist from start-up."""
        with self._writing():
            series = self._provider(name)
            series.probes = probes
            series.intervals = dict(intervals)
            for probe in probes:
                for outcome in PREINIT_RUN_OUTCOMES:
                    series.probe_duration.setdefault((probe, outcome), Histogram(DURATION_BUCKETS))
            if not self.per_model_histograms:
                for cache in CACHE_LABELS:
                    series.request_duration.setdefault(cache, Histogram(REQUEST_BUCKETS))
                    series.ttft.setdefault(cache, Histogram(TTFT_BUCKETS))

    def retain_providers(self, names: set[str]) -> None:
        """Forget providers (and their models) no longer configured."""
        with self._writing():
            for name in list(self._providers):
                if name not in names:
                    del self._providers[name]
                    self._mark_provider(name, keys=True)
            for key in list(self._models):
                if key[0] not in names:
                    del self._models[key]
                    self._mark_model(key, keys=True)

    def set_models(self, provider: str, models: list[str], prices: dict[str, PriceInfo]) -> None:
        """The models selected for ``provider``: pre-initialise their series, drop others."""
        with self._writing():
            series = self._provider(provider)
            if series.models != len(models):
                series.models = len(models)
                self._mark_provider(provider)
            keep = set(models)
            for key in list(self._models):
                if key[0] == provider and key[1] not in keep:
                    del self._models[key]
                    self._mark_model(key, keys=True)
            usd = _usd_budget(series.budget)
            for model in models:
                entry = self._model(provider, model)
                entry.price = prices.get(model)
                entry.usd_budget = usd
                for probe in series.probes:
                    entry.probes.setdefault(probe, ProbeGauges())
                self._mark_model((provider, model))

    def set_reload(self, ok: bool, at: float) -> None:
        with self._writing():
            self._exporter.reload_ok = ok
            if ok:
                self._exporter.reload_timestamp = at
            self._mark_exporter()

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
        with self._writing():
            entry = self._model(result.provider, result.model)
            self._mark_model((result.provider, result.model))
            provider = self._providers.get(result.provider)
            if not restored:
                outcome = (
                    "success"
                    if result.success
                    else ("skipped" if result.verdict is Verdict.SKIPPED else "failure")
                )
                entry.runs[outcome] = entry.runs.get(outcome, 0) + 1
                if provider is not None:
                    self._mark_provider(provider.name)
                    if result.verdict is not Verdict.SKIPPED:
                        histogram = provider.probe_duration.setdefault(
                            (result.probe, outcome), Histogram(DURATION_BUCKETS)
                        )
                        histogram.observe(result.duration_seconds)
                for i, record in enumerate(result.requests):
                    cost = costs[i] if costs is not None and i < len(costs) else None
                    self._observe_request(entry, provider, result.probe, record, cost)
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
        with self._writing():
            entry = self._model(provider, model)
            if (entry.consecutive_failures, entry.cooldown_until) != (failures, cooldown_until):
                entry.consecutive_failures = failures
                entry.cooldown_until = cooldown_until
                self._mark_model((provider, model))

    def set_reliability(self, provider: str, model: str, score: float | None) -> None:
        with self._writing():
            entry = self._model(provider, model)
            if entry.reliability != score:
                entry.reliability = score
                self._mark_model((provider, model))

    def set_balance(self, provider: str, currency: str, amount: float) -> None:
        with self._writing():
            balances = self._provider(provider).balances
            if balances.get(currency) != amount:
                balances[currency] = amount
                self._mark_provider(provider)

    def set_ratelimit(self, provider: str, remaining: dict[str, float]) -> None:
        with self._writing():
            ratelimit = self._provider(provider).ratelimit
            if any(ratelimit.get(k) != v for k, v in remaining.items()):
                ratelimit.update(remaining)
                self._mark_provider(provider)

    def set_forecast(self, provider: str, forecast: dict[str, float]) -> None:
        with self._writing():
            series = self._provider(provider)
            if series.forecast != forecast:
                series.forecast = dict(forecast)
                self._mark_provider(provider)

    def set_unpriced(self, provider: str, model: str, unpriced: bool) -> None:
        with self._writing():
            entry = self._model(provider, model)
            if entry.unpriced != unpriced:
                entry.unpriced = unpriced
                self._mark_model((provider, model))

    def set_paused(self, provider: str, reason: str, paused: bool) -> None:
        with self._writing():
            flags = self._provider(provider).paused
            if flags.get(reason) != paused:
                flags[reason] = paused
                self._mark_provider(provider)

    def observe_cycle(self, provider: str, seconds: float) -> None:
        with self._writing():
            self._provider(provider).cycle.observe(seconds)
            self._mark_provider(provider)

    def set_budgets(self, snapshots: dict[str, BudgetSnapshot]) -> None:
        """The budget's figures (immutable snapshots), pushed after every change."""
        with self._writing():
            for name, series in self._providers.items():
                snap = snapshots.get(name)
                if snap == series.budget:
                    continue
                series.budget = snap
                self._mark_provider(name)
                usd = _usd_budget(snap)
                for key, entry in self._models.items():
                    if key[0] == name and entry.usd_budget != usd:
                        entry.usd_budget = usd
                        self._mark_model(key)

    def store_error(self, operation: str) -> None:
        with self._writing():
            errors = self._exporter.store_errors
            errors[operation] = errors.get(operation, 0) + 1
            self._mark_exporter()

    # -- reads ----------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(
                providers=[_copy_provider(p) for p in self._providers.values()],
                models=[_copy_model(m) for m in self._models.values()],
                exporter=_copy_exporter(self._exporter),
            )

    def changes(self) -> Changes:
        """Copies of what changed since the previous call, all taken under one lock
        acquisition (so the parts one run touched arrive together), and the marks cleared."""
        with self._lock:
            models = {
                key: (_copy_model(self._models[key]) if key in self._models else None)
                for key in self._dirty_models
            }
            providers = {
                name: (_copy_provider(self._providers[name]) if name in self._providers else None)
                for name in self._dirty_providers
            }
            exporter = _copy_exporter(self._exporter) if self._dirty_exporter else None
            keys = self._keys_changed
            changes = Changes(
                generation=self._generation,
                models=models,
                providers=providers,
                exporter=exporter,
                model_order=list(self._models) if keys else None,
                provider_order=list(self._providers) if keys else None,
            )
            self._dirty_models.clear()
            self._dirty_providers.clear()
            self._dirty_exporter = False
            self._keys_changed = False
            return changes

    def mark_models(self, keys: Sequence[ModelKey]) -> None:
        """Mark models changed without a write: their exposition depends on the time (a
        cooldown that has ended) and must be rendered again."""
        with self._writing():
            for key in keys:
                if key in self._models:
                    self._mark_model(key)

    def paused(self, provider: str) -> dict[str, bool]:
        with self._lock:
            series = self._providers.get(provider)
            return dict(series.paused) if series else {}

    def balance(self, provider: str, currency: str) -> float | None:
        with self._lock:
            series = self._providers.get(provider)
            return series.balances.get(currency) if series else None

    # -- internals --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        with self._lock:
            before = self._generation
            yield
            changed = self._generation != before
        listener = self._listener
        if changed and listener is not None:
            listener()

    def _mark_model(self, key: ModelKey, *, keys: bool = False) -> None:
        self._dirty_models.add(key)
        self._keys_changed = self._keys_changed or keys
        self._generation += 1

    def _mark_provider(self, name: str, *, keys: bool = False) -> None:
        self._dirty_providers.add(name)
        self._keys_changed = self._keys_changed or keys
        self._generation += 1

    def _mark_exporter(self) -> None:
        self._dirty_exporter = True
        self._generation += 1

    def _provider(self, name: str) -> ProviderSeries:
        series = self._providers.get(name)
        if series is None:
            series = ProviderSeries(name)
            self._providers[name] = series
            self._mark_provider(name, keys=True)
        return series

    def _model(self, provider: str, model: str) -> ModelSeries:
        entry = self._models.get((provider, model))
        if entry is None:
            entry = ModelSeries(provider, model)
            self._models[(provider, model)] = entry
            self._mark_model((provider, model), keys=True)
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
        if result.probe == TTFT_PROBE and result.success:
            entry.last_ttft = _cold_warm_ttft(result.requests)

    def _observe_request(
        self,
        entry: ModelSeries,
        provider: ProviderSeries | None,
        probe: str,
        record: RequestRecord,
        cost: RequestCost | None,
    ) -> None:
        if record.attempts == 0:
            return  # never sent (budget)
        entry.requests["success" if record.ok else "failure"] += 1
        if not record.ok:
            kind = record.error_type.value if record.error_type else ErrorType.API_ERROR.value
            entry.errors[kind] = entry.errors.get(kind, 0) + 1
            if provider is not None:
                provider.errors[kind] = provider.errors.get(kind, 0) + 1
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
        # Per provider unless per-model histograms were asked for (docs/metrics.md).
        owner: ModelSeries | ProviderSeries | None = (
            entry if self.per_model_histograms else provider
        )
        if owner is not None:
            if record.latency_seconds is not None:
                owner.request_duration.setdefault(cache, Histogram(REQUEST_BUCKETS)).observe(
                    record.latency_seconds
                )
            if record.ttft_seconds is not None:
                owner.ttft.setdefault(cache, Histogram(TTFT_BUCKETS)).observe(record.ttft_seconds)
        if not record.cold and probe in WARM_PROBES and record.hit is not None:
            entry.warm_requests += 1
            entry.warm_hits += int(record.hit)


def _usd_budget(snap: BudgetSnapshot | None) -> bool:
    return snap is not None and any(u.unit == "usd" and u.limit is not None for u in snap.usage)


def _cold_warm_ttft(requests: Sequence[RequestRecord]) -> dict[str, float]:
    """The first cold and the last warm request's TTFT (the prime and the deciding repeat)."""
    out: dict[str, float] = {}
    for record in requests:
        if not record.ok or record.ttft_seconds is None:
            continue
        if record.cold:
            out.setdefault("cold", record.ttft_seconds)
        else:
            out["warm"] = record.ttft_seconds
    return out


# Read-time copies: only the mutable containers are copied (histogram count lists, dicts);
# everything else is immutable. copy.deepcopy would work too, at several times the time and
# garbage per copy.


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
        last_ttft=dict(m.last_ttft),
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
        errors=dict(p.errors),
        request_duration={k: _copy_histogram(h) for k, h in p.request_duration.items()},
        ttft={k: _copy_histogram(h) for k, h in p.ttft.items()},
    )


def _copy_exporter(e: ExporterSeries) -> ExporterSeries:
    return dataclasses.replace(e, store_errors=dict(e.store_errors))
