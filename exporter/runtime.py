"""One configured provider, ready to probe: adapter, transport, prompts, prices, cost model.

Data flows one way: the scheduler picks a (model, probe) and decides when; ``run_job`` runs
the probe through the adapter and transport (reserving every request in the budget first) and
returns one ``RunReport``; the recorder applies that report to the state and the store.
Nothing here writes state.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx

from exporter.assembly import build_adapter, probe_settings, retry_policy
from exporter.budget import Budget, BudgetLimits, Reservation
from exporter.clock import Clock
from exporter.config import Config, ProviderConfig
from exporter.forecast import cost_inputs
from exporter.pricing import PriceInfo, charged_usd, reservation_usd, resolve_price
from exporter.probes import PROBE_COSTS, ProbeContext, ProbeSettings, run_probe
from exporter.probes.cost import ProbeCost
from exporter.prompts import PromptFactory
from exporter.providers.base import ProviderAdapter
from exporter.report import RunReport
from exporter.results import Completion, ModelPrice
from exporter.transport import Transport

log = logging.getLogger(__name__)


def budget_limits(provider: ProviderConfig) -> BudgetLimits:
    b = provider.budget
    return BudgetLimits(b.daily_tokens, b.monthly_tokens, b.daily_usd, b.monthly_usd)


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
class SpendGate:
    """The transport's spend guard for one run: refuses every request once the provider's
    worker is retired (a reload removed or replaced it), and reserves an upper bound in the
    budget before each request, settling what the provider reported after it."""

    runtime: ProviderRuntime
    budget: Budget | None
    price: ModelPrice | None

    async def reserve(self, estimated_tokens: int) -> object | None:
        if self.runtime.retired:
            return None  # not in the configuration in force: nothing more is sent
        if self.budget is None or not self.budget.limited(self.runtime.name):
            return _UNBUDGETED
        # The transport's estimate is the prompt's bound plus max_tokens of completion.
        completion = min(estimated_tokens, self.runtime.adapter.max_tokens)
        usd = reservation_usd(self.price, estimated_tokens - completion, completion)
        return await self.budget.reserve(self.runtime.name, estimated_tokens, usd)

    async def settle(self, handle: object, completion: Completion | None, *, billed: bool) -> None:
        if not isinstance(handle, Reservation) or self.budget is None:
            return
        if completion is not None:
            usage = completion.usage
            tokens: int | None = usage.prompt_tokens + usage.completion_tokens
            # Reconciled with what the provider says it charged, where it says so.
            usd: float | None = charged_usd(self.price, usage, completion.cost)
        elif not billed:
            tokens, usd = 0, 0.0  # refused before any work: nothing was charged
        else:
            tokens, usd = None, None  # unknown: the reservation stays spent
        await self.budget.settle(handle, tokens=tokens, usd=usd)


_UNBUDGETED = object()  # a granted "reservation" of a provider without limits


@dataclass(slots=True)
class ProviderRuntime:
    config: ProviderConfig
    adapter: ProviderAdapter
    transport: Transport
    prompts: PromptFactory
    settings: ProbeSettings
    models: list[str] = field(default_factory=list)
    published_prices: dict[str, ModelPrice] = field(default_factory=dict)
    # Set when a reload removed or replaced this provider's worker: nothing more is sent.
    retired: bool = False

    @property
    def name(self) -> str:
        return self.config.name

    def price_info(self, model: str) -> PriceInfo:
        return resolve_price(self.config.price_for(model), self.published_prices.get(model))

    def cost(self, model: str, probe: str) -> ProbeCost:
        """What one run of ``probe`` for ``model`` sends (the probe module's own estimate)."""
        return PROBE_COSTS[probe](cost_inputs(self.adapter, model, self.settings))

    def reservation_bound(self, model: str, prompt_tokens: int) -> int:
        """What the transport will reserve for a prompt of this size (before completion)."""
        return self.prompts.upper_bound_for(f"{self.name}/{model}", prompt_tokens)

    def precheck(self, model: str, probe: str) -> tuple[int, float]:
        """(tokens, USD) a run must have room for before it starts."""
        cost = self.cost(model, probe)

        def bound(tokens: int) -> int:
            return self.reservation_bound(model, tokens)

        return cost.upper_bound_tokens(bound), cost.upper_bound_usd(bound, self.price(model))

    def price(self, model: str) -> ModelPrice | None:
        return self.price_info(model).price


def build_runtime(
    provider: ProviderConfig,
    config: Config,
    *,
    client: httpx.AsyncClient,
    clock: Clock,
    env: Mapping[str, str] | None = None,
) -> ProviderRuntime:
    throttle = RateLimiter(provider.rate_limit, clock) if provider.rate_limit > 0 else None
    transport = Transport(client, policy=retry_policy(config.http), clock=clock, throttle=throttle)
    return ProviderRuntime(
        provider,
        build_adapter(provider, env),
        transport,
        PromptFactory(),
        probe_settings(config.probes, provider),
    )


async def run_job(
    runtime: ProviderRuntime,
    model: str,
    probe: str,
    *,
    config: Config,
    budget: Budget | None,
    clock: Clock,
) -> RunReport:
    """Run one probe for one model with the configured settings, deadline and budget."""
    price = runtime.price_info(model)
    ctx = ProbeContext(
        provider=runtime.name,
        model=model,
        adapter=runtime.adapter,
        transport=runtime.transport,
        prompts=runtime.prompts,
        clock=clock,
        settings=runtime.settings,
        guard=SpendGate(runtime, budget, price.price),
    )
    result = await run_probe(probe, ctx, deadline=config.probes.get(probe).timeout)
    return RunReport.of(result, price, ctx.responses)
