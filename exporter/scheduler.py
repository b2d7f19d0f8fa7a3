"""When to probe what: one worker per provider, each probe type on its own interval.

Within a provider, models are probed ``concurrency`` at a time (one by default), with an
isolation delay between the runs of each slot and a client-side rate limit in the transport.
A model that fails repeatedly is warned about, then put in cooldown; a provider whose
balance falls below its threshold is paused and checked cheaply until it recovers; a probe
whose estimated cost does not fit the budget is skipped. All timing goes through the
injected clock, so tests drive it exactly.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import anyio
import anyio.abc
import anyio.lowlevel
import httpx

from exporter.budget import Budget
from exporter.clock import Clock
from exporter.config import Config, ProviderConfig
from exporter.pricing import request_cost
from exporter.probes.common import ProbeSettings
from exporter.providers.base import BadResponse, select_models
from exporter.reliability import reliability_score
from exporter.results import ErrorType, ProbeResult, Verdict
from exporter.runtime import (
    ProviderRuntime,
    budget_limits,
    build_runtime,
    estimate_probe_tokens,
    probe_settings,
    run_job,
)
from exporter.state import State
from exporter.store import Store
from exporter.transport import TransportError

log = logging.getLogger(__name__)

JobRunner = Callable[[ProviderRuntime, str, str], Awaitable[ProbeResult]]
# Model lists change rarely; re-read them hourly (and on every reload).
DISCOVERY_INTERVAL = 3600.0
DISCOVERY_RETRY_MAX = 900.0


@dataclass(slots=True)
class ModelSchedule:
    next_due: dict[str, float] = field(default_factory=dict)  # probe -> wall-clock time
    failures: int = 0
    successes: int = 0
    cooldown_until: float = 0.0


@dataclass(slots=True)
class Restored:
    """What the store remembered at start-up, so a restart neither re-probes everything at
    once nor forgets cooldowns."""

    last_started: dict[tuple[str, str, str], float] = field(default_factory=dict)
    model_states: dict[tuple[str, str], tuple[int, int, float]] = field(default_factory=dict)


class ProviderWorker:
    def __init__(
        self,
        runtime: ProviderRuntime,
        *,
        config: Config,
        state: State,
        store: Store | None,
        budget: Budget | None,
        clock: Clock,
        runner: JobRunner | None = None,
        restored: Restored | None = None,
    ) -> None:
        self.runtime = runtime
        self.config = config
        self.state = state
        self.store = store
        self.budget = budget
        self.clock = clock
        self.runner: JobRunner = runner or partial(
            run_job, config=config, budget=budget, state=state, clock=clock
        )
        self.restored = restored or Restored()
        self.probes = config.probes.enabled_for(runtime.config)
        self.schedule: dict[str, ModelSchedule] = {}
        self.stopping = False
        self.done = anyio.Event()
        self._wake = anyio.Event()
        self._next_discovery = 0.0
        self._discovery_failures = 0
        self._funds_exhausted = False
        self._next_balance_check = 0.0
        # The cheap request that refreshes the balance while paused (replaceable in tests).
        self.check_balance: Callable[[], Awaitable[None]] = self._fetch_balance

    @property
    def name(self) -> str:
        return self.runtime.name

    @property
    def pconf(self) -> ProviderConfig:
        return self.runtime.config

    def request_stop(self) -> None:
        self.stopping = True
        self._wake.set()

    # -- main loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            self.state.configure_provider(
                self.name,
                probes=self.probes,
                intervals={p: self.config.probes.get(p).interval for p in self.probes},
            )
            while not self.stopping:
                now = self.clock.time()
                if now >= self._next_discovery:
                    await self._discover()
                    continue
                if self._balance_paused():
                    await self._balance_check()
                    continue
                jobs = self._due_jobs(now)
                if not jobs:
                    await self._sleep(self._next_wakeup(now) - now)
                    continue
                started = self.clock.monotonic()
                await self._run_cycle(jobs)
                self.state.observe_cycle(self.name, self.clock.monotonic() - started)
        finally:
            self.done.set()

    async def _sleep(self, seconds: float) -> None:
        """Sleep on the injected clock, cut short by a stop request."""
        if self.stopping:
            await anyio.lowlevel.checkpoint()
            return
        await sleep_unless(self.clock, seconds, self._wake)

    def _due_jobs(self, now: float) -> list[tuple[str, list[str]]]:
        jobs: list[tuple[float, str, list[str]]] = []
        for model, sched in self.schedule.items():
            if sched.cooldown_until > now:
                continue
            due = [p for p in self.probes if sched.next_due.get(p, 0.0) <= now]
            if due:
                jobs.append((min(sched.next_due.get(p, 0.0) for p in due), model, due))
        jobs.sort()
        return [(model, probes) for _, model, probes in jobs]

    def _next_wakeup(self, now: float) -> float:
        times = [self._next_discovery]
        times.extend(
            max(sched.next_due.get(probe, 0.0), sched.cooldown_until)
            for sched in self.schedule.values()
            for probe in self.probes
        )
        return min(times)

    async def _run_cycle(self, jobs: list[tuple[str, list[str]]]) -> None:
        queue = deque(jobs)
        delay = self.pconf.isolation_delay

        async def slot() -> None:
            first = True
            while queue and not self._halted():
                model, probes = queue.popleft()
                for probe in probes:
                    if not first:
                        await self._sleep(delay)
                    first = False
                    if self._halted():  # a stop or a pause may have come while we slept
                        return
                    await self._run_one(model, probe)

        async with anyio.create_task_group() as tg:
            for _ in range(min(self.pconf.concurrency, len(jobs))):
                tg.start_soon(slot)

    def _halted(self) -> bool:
        return self.stopping or self._balance_paused()

    async def _run_one(self, model: str, probe: str) -> None:
        sched = self.schedule.get(model)
        if sched is None:  # dropped by a rediscovery meanwhile
            return
        started = self.clock.time()
        sched.next_due[probe] = started + self.config.probes.get(probe).interval
        if not self._fits_budget(model, probe):
            result = _skipped(self.name, model, probe, started, self.clock.time())
        else:
            result = await self.runner(self.runtime, model, probe)
        await self._apply(result)

    # -- results ------------------------------------------------------------------------------

    async def _apply(self, result: ProbeResult) -> None:
        self.state.observe_result(result)
        if self.budget is not None:
            snapshots = self.budget.snapshot()
            self.state.set_budgets(snapshots)
            snap = snapshots.get(self.name)
            self.state.set_paused(self.name, "budget", bool(snap and snap.exhausted))
        if result.verdict is Verdict.SKIPPED:
            return
        if any(r.error_type is ErrorType.INSUFFICIENT_FUNDS for r in result.requests):
            self._funds_exhausted = True
            log.warning("%s: the provider reports insufficient funds; probing paused", self.name)
        await self._track_failures(result)
        if self.store is None:
            return
        price = self.runtime.price_info(result.model)
        spend = savings = 0.0
        for record in result.requests:
            if record.ok and record.attempts:
                s, v = request_cost(price, record)
                spend += s
                savings += v
        await self.store.record_run(result, spend_usd=spend, savings_usd=savings)
        window = self.config.scheduler.reliability_window
        stats = await self.store.reliability_stats(
            since=self.clock.time() - window, provider=self.name, model=result.model
        )
        score = stats.get((self.name, result.model))
        self.state.set_reliability(
            self.name, result.model, reliability_score(score) if score else None
        )

    async def _track_failures(self, result: ProbeResult) -> None:
        sched = self.schedule.setdefault(result.model, ModelSchedule())
        cfg = self.config.scheduler
        if result.success:
            sched.successes += 1
            if sched.successes >= cfg.reset_after_successes:
                sched.failures = 0
        else:
            sched.failures += 1
            sched.successes = 0
            if sched.failures == cfg.failure_warn_after:
                log.warning(
                    "%s/%s: %d consecutive probe failures (last: %s)",
                    self.name,
                    result.model,
                    sched.failures,
                    result.error_type,
                )
            if sched.failures >= cfg.cooldown_after:
                sched.cooldown_until = self.clock.time() + cfg.cooldown
                log.warning(
                    "%s/%s: %d consecutive failures; cooling down for %.0fs",
                    self.name,
                    result.model,
                    sched.failures,
                    cfg.cooldown,
                )
        self.state.record_failures(self.name, result.model, sched.failures, sched.cooldown_until)
        if self.store is not None:
            await self.store.save_model_state(
                self.name,
                result.model,
                consecutive_failures=sched.failures,
                consecutive_successes=sched.successes,
                cooldown_until=sched.cooldown_until,
            )

    def _fits_budget(self, model: str, probe: str) -> bool:
        if self.budget is None or budget_limits(self.pconf).ledger_limits().unlimited:
            return True
        settings: ProbeSettings = probe_settings(self.config)
        adapter = self.runtime.adapter
        tokens = estimate_probe_tokens(
            probe,
            minimum=adapter.min_cacheable_for(model),
            settings=settings,
            warmup=adapter.warmup_repeats,
            max_tokens=adapter.max_tokens,
        )
        price = self.runtime.price_info(model).price
        usd = 0.0 if price is None else tokens * max(price.input, price.output) / 1e6
        return self.budget.would_fit(self.name, tokens, usd)

    # -- models -------------------------------------------------------------------------------

    async def _discover(self) -> None:
        pconf = self.pconf
        now = self.clock.time()
        try:
            if pconf.models:
                ids = list(pconf.models)
            else:
                adapter = self.runtime.adapter
                body = await self.runtime.transport.get_json(adapter, adapter.models_request())
                infos = adapter.parse_models(body)
                self.runtime.published_prices = {i.id: i.price for i in infos if i.price}
                ids = [i.id for i in infos]
        except (TransportError, BadResponse) as exc:
            self._discovery_failures += 1
            wait = min(60.0 * 2 ** (self._discovery_failures - 1), DISCOVERY_RETRY_MAX)
            self._next_discovery = now + wait
            log.warning("%s: listing models failed (%s); retrying in %.0fs", self.name, exc, wait)
            return
        self._discovery_failures = 0
        self._next_discovery = now + DISCOVERY_INTERVAL
        models = select_models(ids, pconf.include, pconf.exclude, pconf.max_models)
        if not models:
            log.warning("%s: no model matches include/exclude", self.name)
        self._set_models(models)

    def _set_models(self, models: list[str]) -> None:
        self.runtime.models = models
        for model in list(self.schedule):
            if model not in models:
                del self.schedule[model]
        for model in models:
            if model in self.schedule:
                continue
            sched = ModelSchedule()
            for probe in self.probes:
                last = self.restored.last_started.get((self.name, model, probe))
                if last is not None:
                    sched.next_due[probe] = last + self.config.probes.get(probe).interval
            saved = self.restored.model_states.get((self.name, model))
            if saved is not None:
                sched.failures, sched.successes, sched.cooldown_until = saved
                self.state.record_failures(self.name, model, sched.failures, sched.cooldown_until)
            self.schedule[model] = sched
        self.state.set_models(self.name, models, {m: self.runtime.price_info(m) for m in models})

    # -- balance ------------------------------------------------------------------------------

    def _balance_paused(self) -> bool:
        amount = self.state.balance(self.name, self.pconf.balance_currency)
        low = amount is not None and amount < self.pconf.balance_stop_threshold
        paused = low or self._funds_exhausted
        self.state.set_paused(self.name, "balance", paused)
        return paused

    async def _balance_check(self) -> None:
        """While paused: a cheap request every balance_check_interval to see if funds are back."""
        now = self.clock.time()
        if now < self._next_balance_check:
            await self._sleep(self._next_balance_check - now)
            return
        self._next_balance_check = now + self.pconf.balance_check_interval
        try:
            await self.check_balance()
        except (TransportError, BadResponse) as exc:
            log.info("%s: balance check failed: %s", self.name, exc)
            return
        # The check itself succeeded: funds may be back; the next 402 pauses again.
        self._funds_exhausted = False
        if not self._balance_paused():
            log.info("%s: balance back above the threshold; probing resumes", self.name)

    async def _fetch_balance(self) -> None:
        """The balance endpoint if the API has one, else the models list (whose response
        headers carry the balance on Venice); headers reach the state through the transport."""
        adapter = self.runtime.adapter
        balance_request = adapter.balance_request()
        body = await self.runtime.transport.get_json(
            adapter, balance_request or adapter.models_request()
        )
        if balance_request is not None:
            for currency, amount in adapter.parse_balance(body).items():
                self.state.set_balance(self.name, currency, amount)


async def sleep_unless(clock: Clock, seconds: float, event: anyio.Event) -> None:
    """Sleep ``seconds`` on ``clock``, or less if ``event`` is set meanwhile."""
    if seconds <= 0 or event.is_set():
        await anyio.lowlevel.checkpoint()
        return
    async with anyio.create_task_group() as tg:

        async def sleeper() -> None:
            await clock.sleep(seconds)
            tg.cancel_scope.cancel()

        async def waker() -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(sleeper)
        tg.start_soon(waker)


def _skipped(provider: str, model: str, probe: str, started: float, now: float) -> ProbeResult:
    return ProbeResult(
        probe=probe,
        provider=provider,
        model=model,
        run_id="",
        verdict=Verdict.SKIPPED,
        started_at=started,
        finished_at=now,
        error_type=ErrorType.BUDGET,
        error="not run: the estimated cost does not fit the budget",
    )


class Scheduler:
    """All provider workers, plus retention cleanup; reconfigurable while running."""

    def __init__(
        self,
        config: Config,
        *,
        state: State,
        store: Store | None,
        budget: Budget | None,
        clock: Clock,
        client: httpx.AsyncClient,
        env: Mapping[str, str] | None = None,
        runner: JobRunner | None = None,
        restored: Restored | None = None,
    ) -> None:
        self.config = config
        self.state = state
        self.store = store
        self.budget = budget
        self.clock = clock
        self.client = client
        self.env = env
        self.runner = runner
        self.restored = restored or Restored()
        self.workers: dict[str, ProviderWorker] = {}
        self.running = False
        self.stopped = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._stopping = False
        self._stop_event = anyio.Event()

    def _worker(self, provider: ProviderConfig) -> ProviderWorker:
        runtime = build_runtime(
            provider,
            self.config,
            client=self.client,
            clock=self.clock,
            state=self.state,
            env=self.env,
        )
        return ProviderWorker(
            runtime,
            config=self.config,
            state=self.state,
            store=self.store,
            budget=self.budget,
            clock=self.clock,
            runner=self.runner,
            restored=self.restored,
        )

    async def run(self) -> None:
        self.running = True
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for provider in self.config.providers:
                    self._start(self._worker(provider))
                tg.start_soon(self._cleanup_loop)
        finally:
            self.running = False
            self.stopped.set()

    def _start(self, worker: ProviderWorker) -> None:
        assert self._tg is not None
        self.workers[worker.name] = worker
        self._tg.start_soon(worker.run, name=f"worker {worker.name}")

    def stop(self) -> None:
        """Stop scheduling: workers finish what they are running, then return."""
        self._stopping = True
        self._stop_event.set()
        for worker in self.workers.values():
            worker.request_stop()

    async def wait_workers(self) -> None:
        for worker in list(self.workers.values()):
            await worker.done.wait()

    def apply(self, config: Config) -> None:
        """Adopt a reloaded configuration: providers whose settings (or the global probe,
        http and scheduler settings) changed get a fresh worker once the old one has
        finished its current run; removed providers stop; new ones start."""
        old = self.config
        self.config = config
        if self.budget is not None:
            self.budget.set_limits({p.name: budget_limits(p) for p in config.providers})
        global_change = (old.probes, old.http, old.scheduler) != (
            config.probes,
            config.http,
            config.scheduler,
        )
        wanted = {p.name: p for p in config.providers}
        self.state.retain_providers(set(wanted))
        for name, worker in list(self.workers.items()):
            if name not in wanted:
                worker.request_stop()
                del self.workers[name]
        for name, provider in wanted.items():
            current = self.workers.get(name)
            if current is not None and current.pconf == provider and not global_change:
                continue
            if current is not None:
                current.request_stop()
            if self._tg is not None and not self._stopping:
                self._tg.start_soon(self._replace, current, provider)

    async def _replace(self, old: ProviderWorker | None, provider: ProviderConfig) -> None:
        if old is not None:
            await old.done.wait()
        if not self._stopping:
            self._start(self._worker(provider))

    async def _cleanup_loop(self) -> None:
        if self.store is None:
            return
        while not self._stopping:
            cutoff = self.clock.time() - self.config.storage.retention_days * 86400.0
            deleted = await self.store.cleanup(older_than=cutoff)
            if deleted:
                log.info(
                    "retention: deleted %d rows older than %d days",
                    deleted,
                    self.config.storage.retention_days,
                )
            await sleep_unless(self.clock, self.config.scheduler.cleanup_interval, self._stop_event)
