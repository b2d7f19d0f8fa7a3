"""The one writer of state: applies what probe runs and provider responses report.

Data flows one way: the scheduler decides *when* a probe runs, the runtime runs it (the
transport only sends) and hands back one ``RunReport``; this module applies it to the
in-memory state and the store: verdict gauges, counters, spend, balances, rate limits,
failure tracking and cooldown, the provider-wide outage breaker (``exporter.outage``), pauses,
persistence and the reliability score. The scheduler reads back only what it needs to decide
(``health``, ``outage``, ``balance_paused``), never the state.

Every finished run is logged on one INFO line::

    venice/llama-3.3-70b basic: works, hit ratio 0.952, 2152 prompt tokens (1024 cached),
        2 requests, 1.3s
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from exporter.budget import Budget, BudgetSnapshot
from exporter.clock import Clock
from exporter.config import Config, ProviderConfig
from exporter.outage import ProviderOutage, outage_failure, says_nothing
from exporter.pricing import PriceInfo
from exporter.reliability import reliability_score
from exporter.report import ResponseFacts, RunReport
from exporter.results import ErrorType, ProbeResult, Verdict
from exporter.state import State
from exporter.store import ModelState, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelHealth:
    """Failure tracking of one model, as a circuit breaker.

    ``cooldown_until`` 0: closed (normal schedule). In the future: open (cooldown, nothing
    runs). In the past: half-open: exactly one trial run decides, success closes it, failure
    opens it again at once.
    """

    failures: int = 0
    successes: int = 0
    cooldown_until: float = 0.0

    def cooling(self, now: float) -> bool:
        return self.cooldown_until > now

    def trial(self, now: float) -> bool:
        return 0.0 < self.cooldown_until <= now


@dataclass(slots=True)
class Restored:
    """What the store remembered at start-up that the scheduler needs: when each probe last
    started, so a restart does not re-probe everything at once."""

    last_started: dict[tuple[str, str, str], float] = field(default_factory=dict)


class Recorder:
    """Applies reports to ``state`` and ``store`` (either may be absent in tests: no store)."""

    def __init__(
        self,
        state: State,
        store: Store | None,
        budget: Budget | None,
        clock: Clock,
        config: Config,
    ) -> None:
        self.state = state
        self.store = store
        self.budget = budget
        self.clock = clock
        self._health: dict[tuple[str, str], ModelHealth] = {}
        self._outage: dict[str, ProviderOutage] = {}
        self._funds_exhausted: set[str] = set()
        self._budget_paused: set[str] = set()
        self._balance_paused: set[str] = set()
        self._unpriced: set[tuple[str, str]] = set()
        self._too_expensive: set[tuple[str, str, str]] = set()
        self._saved_balances: dict[tuple[str, str], float] = {}
        self._models: dict[str, frozenset[str]] = {}
        self.config = config
        self._providers: dict[str, ProviderConfig] = {}
        self.configure(config)

    # -- configuration ------------------------------------------------------------------------

    def configure(self, config: Config) -> None:
        """The configuration in force (at start and after every reload)."""
        self.config = config
        self._providers = {p.name: p for p in config.providers}
        self._too_expensive.clear()  # budgets may have changed
        if not config.scheduler.outage_after:  # the breaker was turned off: nothing is paused
            for provider in list(self._outage):
                self._set_outage(provider, ProviderOutage())

    def provider_started(self, provider: ProviderConfig, probes: tuple[str, ...]) -> None:
        """A worker for ``provider`` starts: its series exist from now on."""
        intervals = {p: self.config.probes.get(p).interval for p in probes}
        self.state.configure_provider(provider.name, probes=probes, intervals=intervals)
        self._update_balance_pause(provider.name)
        self.budget_changed(provider.name)

    def provider_removed(self, name: str) -> None:
        """``name`` is no longer configured and its worker has stopped: its series go."""
        self.state.retain_providers(set(self._providers))
        for table in (self._funds_exhausted, self._budget_paused, self._balance_paused):
            table.discard(name)
        self._models.pop(name, None)
        self._outage.pop(name, None)

    def models_selected(
        self,
        provider: str,
        models: list[str],
        prices: Mapping[str, PriceInfo],
        forecast: Mapping[str, float],
    ) -> None:
        self._models[provider] = frozenset(models)
        if len(models) < 2 and self.outage(provider).open:
            log.warning("%s: fewer than two models now: the outage pause ends", provider)
            self._set_outage(provider, ProviderOutage())
        self.state.set_models(provider, models, dict(prices))
        self.state.set_forecast(provider, dict(forecast))
        for key in [k for k in self._unpriced if k[0] == provider and k[1] not in models]:
            self._unpriced.discard(key)

    def set_unpriced(self, provider: str, model: str, unpriced: bool) -> None:
        """``model`` is (not) skipped because a USD budget applies and it has no price."""
        key = (provider, model)
        if unpriced and key not in self._unpriced:
            log.warning(
                "%s/%s: not probed: the provider has a USD budget and this model has no price "
                "(add one under [providers.prices] or wait for the provider to publish one)",
                provider,
                model,
            )
        elif not unpriced and key in self._unpriced:
            log.info("%s/%s: a price is known now; probing resumes", provider, model)
        if unpriced:
            self._unpriced.add(key)
        else:
            self._unpriced.discard(key)
        self.state.set_unpriced(provider, model, unpriced)

    def too_expensive(self, provider: str, model: str, probe: str, tokens: int, usd: float) -> None:
        """``probe`` for ``model`` needs more than the whole budget: it never runs."""
        key = (provider, model, probe)
        if key in self._too_expensive:
            return
        self._too_expensive.add(key)
        money = f" / ${usd:.6f}" if usd else ""
        log.warning(
            "budget: %s/%s: %s needs room for up to %d tokens%s, more than the whole budget; "
            "it does not run (raise the budget or make the probe cheaper)",
            provider,
            model,
            probe,
            tokens,
            money,
        )

    def cycle(self, provider: str, seconds: float) -> None:
        self.state.observe_cycle(provider, seconds)

    def reload_result(self, ok: bool) -> None:
        self.state.set_reload(ok, self.clock.time())

    def store_error(self, operation: str) -> None:
        self.state.store_error(operation)

    # -- what the scheduler reads back ----------------------------------------------------------

    def health(self, provider: str, model: str) -> ModelHealth:
        return self._health.get((provider, model), ModelHealth())

    def balance_paused(self, provider: str) -> bool:
        return provider in self._balance_paused

    def outage(self, provider: str) -> ProviderOutage:
        return self._outage.get(provider, ProviderOutage())

    # -- runs ---------------------------------------------------------------------------------

    async def record(self, report: RunReport) -> None:
        """Apply one finished (or skipped) run everywhere it counts."""
        result = report.result
        provider = result.provider
        current = provider in self._providers and (
            provider not in self._models or result.model in self._models[provider]
        )
        if current:
            self.state.observe_result(result, costs=report.costs)
            await self._apply_facts(provider, report.facts)
            if any(r.error_type is ErrorType.INSUFFICIENT_FUNDS for r in result.requests):
                if provider not in self._funds_exhausted:
                    log.warning(
                        "%s: the provider reports insufficient funds; probing paused", provider
                    )
                self._funds_exhausted.add(provider)
            self._update_balance_pause(provider)
            self.budget_changed(provider, report)
        skipped = result.verdict is Verdict.SKIPPED
        if not report.sent or (skipped and not any(r.attempts for r in result.requests)):
            return  # never reached the provider: nothing to store, no failure to count
        if current and not skipped and not self._track_outage(result):
            await self._track_health(result)
        if self.store is not None:
            await self.store.record_run(
                result, spend_usd=report.spend_usd, savings_usd=report.savings_usd
            )
            if current:
                await self._update_reliability(provider, result.model)
        if not skipped:
            _log_run(result)

    async def response_facts(self, provider: str, facts: ResponseFacts) -> None:
        """Headers of a request outside a probe run (models list, balance check)."""
        if provider in self._providers:
            await self._apply_facts(provider, facts)
            self._update_balance_pause(provider)

    async def balance_checked(self, provider: str, balances: Mapping[str, float]) -> None:
        """A balance check while paused succeeded: funds may be back; the next 402 pauses
        again."""
        self._funds_exhausted.discard(provider)
        await self._apply_facts(provider, ResponseFacts(balances))
        self._update_balance_pause(provider)

    def budget_changed(self, provider: str, report: RunReport | None = None) -> None:
        """Push the budget's figures; pause or resume the provider as they say."""
        if self.budget is None:
            return
        snapshots = self.budget.snapshot()
        self.state.set_budgets(snapshots)
        snap = snapshots.get(provider)
        exhausted = bool(snap and snap.exhausted) and provider in self._providers
        was = provider in self._budget_paused
        if exhausted and not was:
            self._budget_paused.add(provider)
            until = datetime.fromtimestamp(self.budget.next_window(), tz=UTC)
            what = ""
            if report is not None and report.result.error:
                what = f" ({report.result.probe} for {report.result.model}: {report.result.error})"
            log.warning(
                "budget: %s: the budget cannot cover the next probe%s; %s; provider paused "
                "until room appears or the window rolls over (next at %s)",
                provider,
                what,
                _budget_use(snap),
                until.strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
        elif was and not exhausted:
            self._budget_paused.discard(provider)
            log.info("budget: %s: there is room again; probing resumes", provider)
        self.state.set_paused(provider, "budget", exhausted)

    # -- start-up -----------------------------------------------------------------------------

    async def restore(self) -> Restored:
        """Put the last known results, failure state and balances (with the pause they imply)
        back into memory, so /metrics shows them before the first new probe."""
        restored = Restored()
        if self.store is None:
            return restored
        store = self.store
        configured = set(self._providers)
        for result in await store.latest_results():
            if result.provider not in configured:
                continue
            self.state.observe_result(result, restored=True)
            key = (result.provider, result.model, result.probe)
            restored.last_started[key] = result.started_at
        for (provider, model), saved in (await store.load_model_states()).items():
            if provider in configured:
                health = ModelHealth(
                    saved.consecutive_failures,
                    saved.consecutive_successes,
                    saved.cooldown_until or 0.0,
                )
                self._health[(provider, model)] = health
                self.state.record_failures(provider, model, health.failures, health.cooldown_until)
        for (provider, currency), (amount, _) in (await store.latest_balances()).items():
            if provider in configured:
                self._saved_balances[(provider, currency)] = amount
                self.state.set_balance(provider, currency, amount)
        for provider in configured:
            self._update_balance_pause(provider)
        since = self.clock.time() - self.config.scheduler.reliability_window
        for (provider, model), stats in (await store.reliability_stats(since=since)).items():
            if provider in configured:
                self.state.set_reliability(provider, model, reliability_score(stats))
        return restored

    async def cleanup(self) -> None:
        """Retention: delete history older than ``storage.retention_days``."""
        if self.store is None:
            return
        days = self.config.storage.retention_days
        deleted = await self.store.cleanup(older_than=self.clock.time() - days * 86400.0)
        if deleted:
            log.info("retention: deleted %d rows older than %d days", deleted, days)

    # -- internals ----------------------------------------------------------------------------

    async def _apply_facts(self, provider: str, facts: ResponseFacts) -> None:
        for currency, amount in facts.balances.items():
            self.state.set_balance(provider, currency, amount)
            key = (provider, currency)
            if self.store is not None and self._saved_balances.get(key) != amount:
                self._saved_balances[key] = amount
                await self.store.save_balance(provider, currency, amount)
        if facts.ratelimit:
            self.state.set_ratelimit(provider, dict(facts.ratelimit))

    def _update_balance_pause(self, provider: str) -> None:
        pconf = self._providers.get(provider)
        if pconf is None:
            return
        amount = self.state.balance(provider, pconf.balance_currency)
        low = amount is not None and amount < pconf.balance_stop_threshold
        paused = low or provider in self._funds_exhausted
        was = provider in self._balance_paused
        if paused and not was:
            self._balance_paused.add(provider)
            if low:
                log.warning(
                    "%s: balance %g %s is below the stop threshold %g; probing paused",
                    provider,
                    amount,
                    pconf.balance_currency,
                    pconf.balance_stop_threshold,
                )
        elif was and not paused:
            self._balance_paused.discard(provider)
            log.info("%s: balance back above the threshold; probing resumes", provider)
        self.state.set_paused(provider, "balance", paused)

    def _track_outage(self, result: ProbeResult) -> bool:
        """Apply a finished run to its provider's outage breaker (exporter.outage). True when
        the failure is the outage's, so the model's own failure tracking leaves it out."""
        cfg = self.config.scheduler
        provider, model = result.provider, result.model
        if not cfg.outage_after:
            return False
        if len(self._models.get(provider, ())) < 2:
            # One model cannot tell an outage from a model problem: its own breaker decides.
            self._set_outage(provider, ProviderOutage())
            return False
        before = self.outage(provider)
        now = self.clock.time()
        if says_nothing(result):
            if before.trial(now):  # a trial that decided nothing: the next one after a pause
                self._set_outage(provider, replace(before, open_until=now + cfg.outage_retry))
            return False
        if not outage_failure(result):
            if before.open:
                log.warning(
                    "%s: outage over: %s %s got an answer; probing resumes for every model",
                    provider,
                    model,
                    result.probe,
                )
            self._set_outage(provider, ProviderOutage())
            return False
        streak = ProviderOutage(before.failures + 1, before.models | {model}, before.open_until)
        if before.open:
            # A trial (or a run in flight when it opened) failed: the next trial after a pause.
            self._set_outage(provider, replace(streak, open_until=now + cfg.outage_retry))
            log.info(
                "%s: outage continues (%s %s: %s); next trial in %.0fs",
                provider,
                model,
                result.probe,
                result.error_type,
                cfg.outage_retry,
            )
            return True
        if streak.failures >= cfg.outage_after and self._covers_every_model(provider, streak):
            streak = replace(streak, open_until=now + cfg.outage_retry)
            log.warning(
                "%s: every model failed with connection errors, timeouts or 5xx (%d runs in a "
                "row, last: %s); provider outage: probing paused, one trial run every %.0fs",
                provider,
                streak.failures,
                result.error_type,
                cfg.outage_retry,
            )
        self._set_outage(provider, streak)
        return False

    def _covers_every_model(self, provider: str, streak: ProviderOutage) -> bool:
        """Every model that could run has failed in the streak (one cooling down on its own,
        or unpriced under a USD budget, cannot run)."""
        now = self.clock.time()
        return all(
            model in streak.models
            or self.health(provider, model).cooling(now)
            or (provider, model) in self._unpriced
            for model in self._models.get(provider, ())
        )

    def _set_outage(self, provider: str, outage: ProviderOutage) -> None:
        if outage == ProviderOutage():
            self._outage.pop(provider, None)
        else:
            self._outage[provider] = outage
        self.state.set_paused(provider, "outage", outage.open)

    async def _track_health(self, result: ProbeResult) -> None:
        key = (result.provider, result.model)
        cfg = self.config.scheduler
        health = self._health.get(key, ModelHealth())
        now = self.clock.time()
        if result.success:
            successes = health.successes + 1
            failures = 0 if successes >= cfg.reset_after_successes else health.failures
            if health.cooldown_until:
                log.info("%s/%s: trial run succeeded; back on schedule", *key)
            health = ModelHealth(failures, successes, 0.0)
        else:
            failures = health.failures + 1
            health = replace(health, failures=failures, successes=0)
            if failures == cfg.failure_warn_after:
                log.warning(
                    "%s/%s: %d consecutive probe failures (last: %s)",
                    *key,
                    failures,
                    result.error_type,
                )
            if failures >= cfg.cooldown_after:
                health = replace(health, cooldown_until=now + cfg.cooldown)
                log.warning(
                    "%s/%s: %d consecutive failures; cooling down for %.0fs",
                    *key,
                    failures,
                    cfg.cooldown,
                )
        self._health[key] = health
        self.state.record_failures(*key, health.failures, health.cooldown_until)
        if self.store is not None:
            await self.store.save_model_state(
                ModelState(*key, health.failures, health.successes, health.cooldown_until or None)
            )

    async def _update_reliability(self, provider: str, model: str) -> None:
        assert self.store is not None
        since = self.clock.time() - self.config.scheduler.reliability_window
        stats = await self.store.reliability_stats(since=since, provider=provider, model=model)
        score = stats.get((provider, model))
        self.state.set_reliability(provider, model, reliability_score(score) if score else None)


def _budget_use(snap: BudgetSnapshot | None) -> str:
    """The fullest limited window, e.g. "28785 of 30000 tokens used this day"."""
    if snap is None:
        return "no budget figures"
    limited = [u for u in snap.usage if u.limit]
    if not limited:
        return "no limit"
    usage = max(limited, key=lambda u: u.used / u.limit if u.limit else 0.0)
    if usage.unit == "usd":
        return f"${usage.used:.6g} of ${usage.limit:.6g} used this {usage.window}"
    return f"{usage.used:.0f} of {usage.limit:.0f} tokens used this {usage.window}"


def _log_run(result: ProbeResult) -> None:
    sent = [r for r in result.requests if r.attempts]
    prompt = sum(r.prompt_tokens or 0 for r in sent)
    cached = sum(r.cached_tokens or 0 for r in sent)
    verdict = result.verdict.value
    if result.error_type is not None:
        verdict += f" ({result.error_type.value})"
    ratio = "" if result.hit_ratio is None else f", hit ratio {result.hit_ratio:.3f}"
    log.info(
        "%s/%s %s: %s%s, %d prompt tokens (%d cached), %d requests, %.1fs",
        result.provider,
        result.model,
        result.probe,
        verdict,
        ratio,
        prompt,
        cached,
        len(sent),
        result.duration_seconds,
    )
