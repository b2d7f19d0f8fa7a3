"""What the configured schedule will cost: the forecast ``check-config`` prints and the running
exporter exposes (``llmcache_budget_forecast``).

Per model and UTC day, over the probes enabled for its provider::

    runs(probe)   = 86400 s / interval(probe)
    prompt tokens = Σ runs(probe) × Σ prompt tokens of the requests of one run
    tokens        = prompt tokens + Σ runs(probe) × requests × max_tokens
    USD           = Σ runs(probe) × expected USD of one run (cold prompt tokens at the input or
                    cache-write rate, cached ones at the cache-read rate, completions at output)

The requests of one run come from the probe module's own ``estimate`` (exporter.probes.cost),
the function the scheduler's budget pre-check uses too. Prompt sizes are the calibrated
targets, so the forecast is what the provider will bill (``max_tokens`` is an upper bound of
completions). It assumes the schedule keeps up: models × run time within each interval.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from exporter.assembly import build_adapter, probe_settings
from exporter.config import Config, ProviderConfig
from exporter.probes import PROBE_COSTS
from exporter.probes.common import ProbeSettings
from exporter.probes.cost import CostInputs
from exporter.providers.base import ProviderAdapter
from exporter.results import ModelPrice

DAY = 86_400.0


def cost_inputs(adapter: ProviderAdapter, model: str | None, settings: ProbeSettings) -> CostInputs:
    """The cost model's inputs for ``model`` (None: a model not known yet, at the adapter's
    default minimum)."""
    minimum = adapter.min_cacheable_for(model) if model else adapter.min_cacheable_tokens
    return CostInputs(minimum, adapter.warmup_repeats, adapter.max_tokens, settings)


@dataclass(frozen=True, slots=True)
class Forecast:
    """Per UTC day. ``usd`` None: some price is unknown."""

    prompt_tokens: float = 0.0
    completion_tokens: float = 0.0
    usd: float | None = 0.0

    @property
    def tokens(self) -> float:
        """What a token budget counts: prompt and completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Forecast) -> Forecast:
        usd = None if self.usd is None or other.usd is None else self.usd + other.usd
        return Forecast(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            usd,
        )

    def times(self, count: int) -> Forecast:
        usd = None if self.usd is None else self.usd * count
        return Forecast(self.prompt_tokens * count, self.completion_tokens * count, usd)

    def gauges(self) -> dict[str, float]:
        """``llmcache_budget_forecast`` by unit (no ``usd`` while a price is unknown)."""
        out = {"prompt_tokens": self.prompt_tokens, "tokens": self.tokens}
        if self.usd is not None:
            out["usd"] = self.usd
        return out


def model_forecast(
    config: Config,
    provider: ProviderConfig,
    adapter: ProviderAdapter,
    settings: ProbeSettings,
    model: str | None,
    price: ModelPrice | None,
) -> Forecast:
    total = Forecast()
    inputs = cost_inputs(adapter, model, settings)
    for probe in config.probes.enabled_for(provider):
        runs = DAY / config.probes.get(probe).interval
        cost = PROBE_COSTS[probe](inputs)
        usd = None if price is None else runs * cost.expected_usd(price)
        total += Forecast(runs * cost.prompt_tokens, runs * cost.completion_tokens, usd)
    return total


def models_forecast(
    config: Config,
    provider: ProviderConfig,
    adapter: ProviderAdapter,
    models: Iterable[str],
    prices: Mapping[str, ModelPrice | None],
) -> Forecast:
    """The running exporter's forecast: the models selected, at the prices in force."""
    settings = probe_settings(config.probes, provider)
    total = Forecast()
    for model in models:
        total += model_forecast(config, provider, adapter, settings, model, prices.get(model))
    return total


class ConfigForecast:
    """check-config's forecast lines, from the configuration alone (nothing is contacted)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._total = Forecast()
        self._discovered = False

    def provider(self, provider: ProviderConfig) -> list[str]:
        config = self.config
        adapter = build_adapter(provider, {})
        settings = probe_settings(config.probes, provider)
        if provider.models:
            forecast = Forecast()
            unpriced = []
            for model in provider.models:
                price = provider.price_for(model)
                if price is None:
                    unpriced.append(model)
                forecast += model_forecast(config, provider, adapter, settings, model, price)
            count = len(provider.models)
            money = _usd(forecast.usd) if forecast.usd is not None else ""
            if unpriced:
                money = f" (USD: no price configured for {', '.join(unpriced[:3])}"
                money += ", …)" if len(unpriced) > 3 else ")"
            lines = [
                f"  forecast: {forecast.prompt_tokens:.0f} prompt tokens/day{money} "
                f"for {count} model{'s' if count > 1 else ''}"
            ]
        else:
            price = provider.price_for("*") if "*" in provider.prices else None
            one = model_forecast(config, provider, adapter, settings, None, price)
            forecast = one.times(provider.max_models)
            self._discovered = True
            money = _usd(one.usd) + " per model" if price is not None else ""
            lines = [
                f"  forecast: {one.prompt_tokens:.0f} prompt tokens/day per model{money} "
                f"(models are discovered: at most {provider.max_models} models, "
                f"{forecast.prompt_tokens:.0f} prompt tokens/day; a model with a larger "
                "cacheable minimum costs more)"
            ]
            if price is None:
                forecast = Forecast(forecast.prompt_tokens, forecast.completion_tokens, None)
        daily = provider.budget.daily_tokens
        if daily and forecast.tokens > daily:
            lines.append(
                f"  forecast exceeds the daily token budget ({daily}): probing pauses when "
                "the budget runs out"
            )
        self._total += forecast
        return lines

    def total(self) -> list[str]:
        money = _usd(self._total.usd) if self._total.usd is not None else ""
        note = " (discovered providers counted at max_models)" if self._discovered else ""
        return [f"forecast total: {self._total.prompt_tokens:.0f} prompt tokens/day{money}{note}"]


def _usd(value: float | None) -> str:
    return "" if value is None else f", ${value:.4f}/day"
