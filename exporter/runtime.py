"""One configured provider, ready to probe: adapter, transport, budget guard, prices.

Data flows one way: the scheduler picks a (model, probe), ``run_job`` runs the probe through
the adapter and transport, and the scheduler applies the result to the store and the state.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx

from exporter.budget import Budget, BudgetLimits, Reservation
from exporter.clock import Clock
from exporter.config import Config, ProviderConfig
from exporter.pricing import PriceInfo, cost_of, max_price_per_token, resolve_price
from exporter.probes import ProbeContext, ProbeSettings, run_probe
from exporter.prompts import PromptFactory
from exporter.providers import adapter_class
from exporter.providers.base import ProviderAdapter
from exporter.results import ModelPrice, ProbeResult, ResponseMeta, Usage
from exporter.state import State
from exporter.transport import RetryPolicy, Transport

log = logging.getLogger(__name__)


def budget_limits(provider: ProviderConfig) -> BudgetLimits:
    b = provider.budget
    return BudgetLimits(b.daily_tokens, b.monthly_tokens, b.daily_usd, b.monthly_usd)


def probe_settings(config: Config) -> ProbeSettings:
    probes = config.probes
    return ProbeSettings(
        sizes=dict(probes.prompt_sizes.sizes),
        persistence_requests=probes.persistence.requests,
        ttl_delays=tuple(probes.ttl.delays),
    )


class RateLimiter:
    """Client-side limit: request starts at least 60/rate seconds apart."""

    def __init__(self, per_minute: float, clock: Clock) -> None:
        self._spacing = 60.0 / per_minute
        self._clock = clock
        self._next = 0.0

    async def __call__(self) -> None:
        now = self._clock.monotonic()
        start = max(now, self._next)
        self._next = start + self._spacing
        if start > now:
            await self._clock.sleep(start - now)


@dataclass(slots=True)
class BudgetGuard:
    """The transport's spend guard for one model: reserve an upper bound, settle the truth."""

    budget: Budget
    provider: str
    price: ModelPrice | None
    state: State

    async def reserve(self, estimated_tokens: int) -> object | None:
        usd = estimated_tokens * max_price_per_token(self.price)
        reservation = await self.budget.reserve(self.provider, estimated_tokens, usd)
        self.state.set_budgets(self.budget.snapshot())
        return reservation

    async def settle(self, handle: object, usage: Usage | None, *, billed: bool) -> None:
        assert isinstance(handle, Reservation)
        if usage is not None:
            tokens: int | None = usage.prompt_tokens + usage.completion_tokens
            usd: float | None = cost_of(self.price, usage)[0] if self.price is not None else 0.0
        elif not billed:
            tokens, usd = 0, 0.0  # refused before any work: nothing was charged
        else:
            tokens, usd = None, None  # unknown: the reservation stays spent
        await self.budget.settle(handle, tokens=tokens, usd=usd)
        self.state.set_budgets(self.budget.snapshot())


@dataclass(slots=True)
class ProviderRuntime:
    config: ProviderConfig
    adapter: ProviderAdapter
    transport: Transport
    prompts: PromptFactory
    models: list[str] = field(default_factory=list)
    published_prices: dict[str, ModelPrice] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    def price_info(self, model: str) -> PriceInfo:
        return resolve_price(self.config.price_for(model), self.published_prices.get(model))


def build_runtime(
    provider: ProviderConfig,
    config: Config,
    *,
    client: httpx.AsyncClient,
    clock: Clock,
    state: State,
    env: Mapping[str, str] | None = None,
) -> ProviderRuntime:
    adapter = adapter_class(provider.type)(
        base_url=provider.base_url,
        api_key=provider.api_key(env),
        min_cacheable_tokens=provider.min_cacheable_tokens,
        warmup_repeats=provider.warmup_repeats,
        stream=provider.stream,
        max_tokens=provider.max_tokens,
        extra_headers=dict(provider.headers),
    )
    http = config.http
    policy = RetryPolicy(
        attempts=http.attempts,
        backoff=http.backoff,
        backoff_max=http.backoff_max,
        max_retry_after=http.max_retry_after,
        timeout=http.timeout,
        max_body_bytes=http.max_body_bytes,
    )

    def on_meta(meta: ResponseMeta) -> None:
        for currency, amount in meta.balances.items():
            state.set_balance(provider.name, currency, amount)
        if meta.ratelimit_remaining:
            state.set_ratelimit(provider.name, meta.ratelimit_remaining)

    throttle = RateLimiter(provider.rate_limit, clock) if provider.rate_limit > 0 else None
    transport = Transport(client, policy=policy, clock=clock, on_meta=on_meta, throttle=throttle)
    return ProviderRuntime(provider, adapter, transport, PromptFactory())


async def run_job(
    runtime: ProviderRuntime,
    model: str,
    probe: str,
    *,
    config: Config,
    budget: Budget | None,
    state: State,
    clock: Clock,
) -> ProbeResult:
    """Run one probe for one model with the configured settings, deadline and budget."""
    guard = None
    if budget is not None and not budget_limits(runtime.config).ledger_limits().unlimited:
        guard = BudgetGuard(budget, runtime.name, runtime.price_info(model).price, state)
    ctx = ProbeContext(
        provider=runtime.name,
        model=model,
        adapter=runtime.adapter,
        transport=runtime.transport,
        prompts=runtime.prompts,
        clock=clock,
        settings=probe_settings(config),
        guard=guard,
    )
    return await run_probe(probe, ctx, deadline=config.probes.get(probe).timeout)


def estimate_probe_tokens(
    probe: str, *, minimum: int, settings: ProbeSettings, warmup: int, max_tokens: int
) -> int:
    """About what a probe run costs in tokens, to skip runs a budget cannot cover.

    Per-request reservations are what enforce the budget; this only avoids starting a run
    that would be cut off half-way.
    """
    base = math.ceil(minimum * settings.margin)

    def requests(count: int, size: int = base) -> int:
        return count * (math.ceil(size * 1.1) + max_tokens)

    if probe == "basic":
        return requests(1 + max(1, warmup))
    if probe == "prompt_sizes":
        return sum(requests(2, size) for size in settings.sizes.values() if size >= minimum)
    if probe == "partial":
        return requests(1 + settings.partial_variants)
    if probe == "persistence":
        return requests(settings.persistence_requests)
    return requests(2 * len(settings.ttl_delays))
