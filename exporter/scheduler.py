"""When to probe what: one worker per provider, every model on its own schedule.

Each (model, probe) is due one interval after it last started. A worker starts the most
overdue run whose model is idle, up to ``concurrency`` at a time; a slot rests for the
isolation delay after each run. A model runs one probe at a time, so a slow model delays only
itself. The scheduler only decides *when*: runs go through the runtime, and what they find
goes to the recorder, whose answers (``health``, ``outage``, ``balance_paused``) and the
budget's (``exhausted``) are all the scheduler reads back:

* a model whose failures opened its breaker is not run until its cooldown is over; then
  exactly one trial run decides (success: back on schedule; failure: straight back to
  cooldown);
* a provider whose models all failed like an outage (exporter.outage) runs nothing until
  ``outage_retry`` has passed; then one trial run of one model (the next in turn, its first
  probe) decides, with nothing else in flight (success: every model resumes). While a
  streak of outage failures is building, models that have not failed in it go first, so
  the streak covers every model before any one model's failures put it in cooldown;
* a provider whose balance is below its threshold (or that answered 402) is paused and
  checked cheaply until it recovers;
* a run whose cost the budget cannot cover (the probe's own estimate, the bound its requests
  reserve) is not started: the provider is paused until the budget has room again, at the
  latest when the window rolls over; with a USD budget, a model without a price is not run.

A reload replaces workers one provider at a time: the old worker is retired (nothing more is
sent), given ``shutdown_grace`` to finish, cancelled after that, and only then does the new
one start, inheriting when each probe last ran so the new intervals apply from there.
All timing goes through the injected clock, so tests drive it exactly.
"""

from __future__ import annotations

import logging
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
from exporter.forecast import models_forecast
from exporter.outage import ProviderOutage
from exporter.providers.base import BadResponse, select_models
from exporter.recorder import Recorder, Restored
from exporter.report import ResponseFacts, RunReport
from exporter.results import ErrorType, ProbeResult, Verdict
from exporter.runtime import ProviderRuntime, budget_limits, build_runtime, run_job
from exporter.transport import TransportError

log = logging.getLogger(__name__)

JobRunner = Callable[[ProviderRuntime, str, str], Awaitable[RunReport]]
# Model lists change rarely; re-read them hourly (and on every reload).
DISCOVERY_INTERVAL = 3600.0
DISCOVERY_RETRY_MAX = 900.0


@dataclass(slots=True)
class ModelSchedule:
    last_started: dict[str, float] = field(default_factory=dict)  # probe -> wall-clock time
    next_due: dict[str, float] = field(default_factory=dict)  # probe -> wall-clock time
    busy: bool = False


class ProviderWorker:
    def __init__(
        self,
        runtime: ProviderRuntime,
        *,
        config: Config,
        recorder: Recorder,
        budget: Budget | None,
        clock: Clock,
        runner: JobRunner | None = None,
        last_started: Mapping[tuple[str, str], float] | None = None,
    ) -> None:
        self.runtime = runtime
        self.config = config
        self.recorder = recorder
        self.budget = budget
        self.clock = clock
        self.runner: JobRunner = runner or partial(
            run_job, config=config, budget=budget, clock=clock
        )
        # (model, probe) -> when it last started, before this worker (restart or reload).
        self._inherited = dict(last_started or {})
        self.probes = config.probes.enabled_for(runtime.config)
        self.schedule: dict[str, ModelSchedule] = {}
        self._order: list[str] = []
        self.stopping = False
        self.done = anyio.Event()
        self._stopped = anyio.Event()
        self._wake = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._free = self.pconf.concurrency
        self._running = 0
        self._cycle_start: float | None = None
        self._last_end = 0.0
        self._next_discovery = 0.0
        self._discovery_failures = 0
        self._next_balance_check = 0.0
        self._next_trial = 0  # index into _order: outage trials take the models in turn
        # The cheap request that refreshes the balance while paused (replaceable in tests).
        self.check_balance: Callable[[], Awaitable[Mapping[str, float]]] = self._fetch_balance

    @property
    def name(self) -> str:
        return self.runtime.name

    @property
    def pconf(self) -> ProviderConfig:
        return self.runtime.config

    def request_stop(self) -> None:
        self.stopping = True
        self._stopped.set()
        self._wake.set()

    def retire(self) -> None:
        """A reload removed or replaced this provider: stop, and send nothing more."""
        self.runtime.retired = True
        self.request_stop()

    def last_started(self) -> dict[tuple[str, str], float]:
        """When each (model, probe) last started, for the worker that replaces this one."""
        out = dict(self._inherited)
        for model, sched in self.schedule.items():
            for probe, at in sched.last_started.items():
                out[(model, probe)] = at
        return out

    # -- main loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            self.recorder.provider_started(self.pconf, self.probes)
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await self._loop()
        finally:
            self.done.set()

    async def _loop(self) -> None:
        while not self.stopping:
            now = self.clock.time()
            if now >= self._next_discovery:
                await self._discover()
                continue
            if self.recorder.balance_paused(self.name):
                await self._balance_check()
                continue
            if self.budget is not None and self.budget.exhausted(self.name):
                await self._wait(self.budget.next_window() - now)
                self.recorder.budget_changed(self.name)  # room again, or a new window
                continue
            outage = self.recorder.outage(self.name)
            if outage.open:
                await self._outage_trial(outage, now)
                continue
            job = self._next_job(now)
            if job is None:
                self._end_cycle()
                await self._wait(self._next_wakeup(now) - now)
            elif self._free <= 0:
                await self._wait(None)  # a slot frees up when a run (and its rest) is over
            else:
                await self._dispatch(*job, now)

    async def _wait(self, seconds: float | None) -> None:
        """Sleep on the injected clock (None: until woken), cut short by ``_wake``."""
        event = self._wake
        if self.stopping or event.is_set():
            await anyio.lowlevel.checkpoint()
        elif seconds is None:
            await event.wait()
        else:
            await sleep_unless(self.clock, seconds, event)
        if event.is_set() and not self.stopping:
            self._wake = anyio.Event()

    async def _outage_trial(self, outage: ProviderOutage, now: float) -> None:
        """Paused for an outage: wait out ``outage_retry``, then start one trial run once
        nothing else is in flight."""
        if outage.cooling(now):
            await self._wait(outage.open_until - now)
            return
        if self._running or self._free <= 0:
            await self._wait(None)  # runs that started before it opened finish first
            return
        order = self._order
        for i in range(len(order)):
            model = order[(self._next_trial + i) % len(order)]
            if not self.recorder.health(self.name, model).cooling(now):
                self._next_trial = (self._next_trial + i + 1) % len(order)
                await self._dispatch(model, self.probes[0], now)
                break
        if not self._running:
            # No model could run (cooling, unpriced, no room in the budget): try again later.
            await self._wait(self.config.scheduler.outage_retry)

    def _next_job(self, now: float) -> tuple[str, str] | None:
        best: tuple[bool, float, int, int] | None = None
        chosen: tuple[str, str] | None = None
        # A streak of outage failures is building: the models it has not reached go first.
        suspects = self.recorder.outage(self.name).models
        for mi, model in enumerate(self._order):
            sched = self.schedule[model]
            health = self.recorder.health(self.name, model)
            if sched.busy or health.cooling(now):
                continue
            due = [
                (sched.next_due.get(probe, 0.0), pi, probe)
                for pi, probe in enumerate(self.probes)
                if sched.next_due.get(probe, 0.0) <= now
            ]
            if not due:
                continue
            if health.trial(now):
                # The breaker's one trial run: the first probe in order (basic if enabled).
                at, pi, probe = min(due, key=lambda d: d[1])
                at = min(d[0] for d in due)
            else:
                at, pi, probe = min(due)
            key = (model in suspects, at, mi, pi)
            if best is None or key < best:
                best, chosen = key, (model, probe)
        return chosen

    def _next_wakeup(self, now: float) -> float:
        times = [self._next_discovery]
        for model, sched in self.schedule.items():
            if sched.busy:
                continue  # its end wakes the loop
            cooldown = self.recorder.health(self.name, model).cooldown_until
            times.extend(max(sched.next_due.get(p, 0.0), cooldown) for p in self.probes)
        return min(times)

    async def _dispatch(self, model: str, probe: str, now: float) -> None:
        sched = self.schedule[model]
        interval = self.config.probes.get(probe).interval
        if self.budget is not None and self.budget.limited(self.name):
            usd_limited = self.budget.usd_limited(self.name)
            unpriced = usd_limited and self.runtime.price(model) is None
            if usd_limited:
                self.recorder.set_unpriced(self.name, model, unpriced)
            if unpriced:
                # No upper bound of its cost in USD: it cannot be reserved, so it does not run.
                sched.next_due[probe] = now + interval
                return
            tokens, usd = self.runtime.precheck(model, probe)
            if not self.budget.could_ever_fit(self.name, tokens, usd):
                # Larger than the whole budget: waiting for room would block every probe.
                sched.next_due[probe] = now + interval
                self.recorder.too_expensive(self.name, model, probe, tokens, usd)
                return
            if not self.budget.admit(self.name, tokens, usd):
                # Stays due: it runs first once the budget has room.
                detail = f"not run: needs room for up to {tokens} tokens"
                if usd:
                    detail += f" / ${usd:.6f}"
                await self.recorder.record(
                    RunReport(_skipped(self.name, model, probe, now, detail), sent=False)
                )
                return
        sched.busy = True
        sched.last_started[probe] = now
        sched.next_due[probe] = now + interval
        if self._running == 0 and self._free == self.pconf.concurrency:
            self._cycle_start = self.clock.monotonic()
        self._free -= 1
        self._running += 1
        assert self._tg is not None
        self._tg.start_soon(self._run, model, probe, sched, name=f"{self.name}/{model} {probe}")

    async def _run(self, model: str, probe: str, sched: ModelSchedule) -> None:
        try:
            report = await self.runner(self.runtime, model, probe)
            await self.recorder.record(report)
        except Exception:  # a bug must not take the other models down with it
            log.exception("%s/%s: %s run failed", self.name, model, probe)
        finally:
            sched.busy = False
            self._running -= 1
            self._last_end = self.clock.monotonic()
            self._wake.set()
        try:
            # The slot rests before its next run (cut short by a stop).
            await sleep_unless(self.clock, self.pconf.isolation_delay, self._stopped)
        finally:
            self._free += 1
            self._wake.set()

    def _end_cycle(self) -> None:
        """Nothing due and every slot idle: the busy period since the first run is a cycle."""
        if self._cycle_start is not None and self._free == self.pconf.concurrency:
            self.recorder.cycle(self.name, self._last_end - self._cycle_start)
            self._cycle_start = None

    # -- models -------------------------------------------------------------------------------

    async def _discover(self) -> None:
        """The models to probe: the configured list, or the models endpoint filtered. A
        provider that publishes prices is asked even for a configured list: its prices are
        what spend and a USD budget are computed from."""
        pconf = self.pconf
        adapter = self.runtime.adapter
        now = self.clock.time()
        listed = list(pconf.models)
        ids = listed
        if not listed or adapter.publishes_prices_at(pconf.base_url):
            try:
                reply = await self.runtime.transport.get_json(adapter, adapter.models_request())
                await self.recorder.response_facts(self.name, ResponseFacts.of([reply.meta]))
                infos = adapter.parse_models(reply.body)
            except (TransportError, BadResponse) as exc:
                if isinstance(exc, TransportError):
                    await self.recorder.response_facts(self.name, ResponseFacts.of([exc.meta]))
                self._discovery_failures += 1
                wait = min(60.0 * 2 ** (self._discovery_failures - 1), DISCOVERY_RETRY_MAX)
                self._next_discovery = now + wait
                log.warning(
                    "%s: listing models failed (%s); retrying in %.0fs", self.name, exc, wait
                )
                if listed and not self.schedule:
                    self._set_models(listed)  # probe what is configured meanwhile
                return
            self.runtime.published_prices = {i.id: i.price for i in infos if i.price}
            ids = listed or [i.id for i in infos]
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
                last = self._inherited.get((model, probe))
                if last is not None:
                    sched.last_started[probe] = last
                    sched.next_due[probe] = last + self.config.probes.get(probe).interval
            self.schedule[model] = sched
        self._order = list(models)
        prices = {m: self.runtime.price_info(m) for m in models}
        forecast = models_forecast(
            self.config,
            self.pconf,
            self.runtime.adapter,
            models,
            {m: info.price for m, info in prices.items()},
        )
        self.recorder.models_selected(self.name, models, prices, forecast.gauges())

    # -- balance ------------------------------------------------------------------------------

    async def _balance_check(self) -> None:
        """While paused: a cheap request every balance_check_interval to see if funds are back."""
        now = self.clock.time()
        if now < self._next_balance_check:
            await self._wait(self._next_balance_check - now)
            return
        self._next_balance_check = now + self.pconf.balance_check_interval
        try:
            balances = await self.check_balance()
        except (TransportError, BadResponse) as exc:
            if isinstance(exc, TransportError):
                await self.recorder.response_facts(self.name, ResponseFacts.of([exc.meta]))
            log.info("%s: balance check failed: %s", self.name, exc)
            return
        await self.recorder.balance_checked(self.name, balances)

    async def _fetch_balance(self) -> Mapping[str, float]:
        """The balance endpoint if the API has one, else the models list (whose response
        headers carry the balance on Venice)."""
        adapter = self.runtime.adapter
        balance_request = adapter.balance_request()
        reply = await self.runtime.transport.get_json(
            adapter, balance_request or adapter.models_request()
        )
        facts = ResponseFacts.of([reply.meta])
        if balance_request is None:
            return dict(facts.balances)
        await self.recorder.response_facts(self.name, facts)
        return adapter.parse_balance(reply.body)


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


def _skipped(provider: str, model: str, probe: str, at: float, detail: str) -> ProbeResult:
    return ProbeResult(
        probe=probe,
        provider=provider,
        model=model,
        run_id="",
        verdict=Verdict.SKIPPED,
        started_at=at,
        finished_at=at,
        error_type=ErrorType.BUDGET,
        error=detail,
    )


@dataclass(slots=True)
class _Slot:
    """One provider's place in the scheduler: the configuration wanted and the worker."""

    want: ProviderConfig | None
    changed: anyio.Event = field(default_factory=anyio.Event)
    worker: ProviderWorker | None = None


class Scheduler:
    """All provider workers, plus retention cleanup; reconfigurable while running."""

    def __init__(
        self,
        config: Config,
        *,
        recorder: Recorder,
        budget: Budget | None,
        clock: Clock,
        client: httpx.AsyncClient,
        env: Mapping[str, str] | None = None,
        runner: JobRunner | None = None,
        restored: Restored | None = None,
    ) -> None:
        self.config = config
        self.recorder = recorder
        self.budget = budget
        self.clock = clock
        self.client = client
        self.env = env
        self.runner = runner
        self.restored = restored or Restored()
        # The worker in force per provider (what /readyz counts); retired ones are not here.
        self.workers: dict[str, ProviderWorker] = {}
        self.running = False
        self.stopped = anyio.Event()
        self._slots: dict[str, _Slot] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._stopping = False
        self._stop_event = anyio.Event()

    def _worker(self, provider: ProviderConfig, previous: ProviderWorker | None) -> ProviderWorker:
        runtime = build_runtime(
            provider, self.config, client=self.client, clock=self.clock, env=self.env
        )
        if previous is not None:
            last = previous.last_started()
        else:
            last = {
                (model, probe): at
                for (name, model, probe), at in self.restored.last_started.items()
                if name == provider.name
            }
        return ProviderWorker(
            runtime,
            config=self.config,
            recorder=self.recorder,
            budget=self.budget,
            clock=self.clock,
            runner=self.runner,
            last_started=last,
        )

    async def run(self) -> None:
        self.running = True
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for provider in self.config.providers:
                    self._add(provider)
                tg.start_soon(self._cleanup_loop)
        finally:
            self.running = False
            self.stopped.set()

    def _add(self, provider: ProviderConfig) -> None:
        assert self._tg is not None
        self._slots[provider.name] = _Slot(provider)
        self._tg.start_soon(self._supervise, provider.name, name=f"provider {provider.name}")

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        """Stop scheduling: workers finish what they are running, then return."""
        self._stopping = True
        self._stop_event.set()
        for slot in self._slots.values():
            slot.changed.set()
            if slot.worker is not None:
                slot.worker.request_stop()

    def apply(self, config: Config) -> None:
        """Adopt a reloaded configuration (the caller serialises reloads). Budget limits
        apply at once; a provider whose settings (or the global probe, http and scheduler
        settings) changed gets a fresh worker once the old one has stopped; a removed
        provider's worker is retired and its series go now."""
        old = self.config
        self.config = config
        self.recorder.configure(config)
        if self.budget is not None:
            self.budget.set_limits({p.name: budget_limits(p) for p in config.providers})
        global_change = (old.probes, old.http, old.scheduler) != (
            config.probes,
            config.http,
            config.scheduler,
        )
        wanted = {p.name: p for p in config.providers}
        for name, slot in self._slots.items():
            want = wanted.get(name)
            if want == slot.want and not global_change:
                continue
            slot.want = want
            slot.changed.set()
            if slot.worker is not None:
                slot.worker.retire()  # at once: nothing more is sent under the old settings
            if want is None:
                self.workers.pop(name, None)
                self.recorder.provider_removed(name)
        for name, provider in wanted.items():
            if name not in self._slots and self._tg is not None and not self._stopping:
                self._add(provider)

    async def _supervise(self, name: str) -> None:
        """Run ``name``'s worker; on a change, retire it, wait out its grace (then cancel it)
        and start one for the latest configuration. Changes that arrive meanwhile coalesce."""
        slot = self._slots[name]
        previous: ProviderWorker | None = None
        try:
            while not self._stopping and slot.want is not None:
                slot.changed = anyio.Event()
                worker = self._worker(slot.want, previous)
                slot.worker = worker
                self.workers[name] = worker
                async with anyio.create_task_group() as tg:
                    tg.start_soon(worker.run, name=f"worker {name}")
                    await _wait_any(slot.changed, worker.done)
                    if self.stopping:
                        return  # the worker finishes its runs; the daemon bounds the wait
                    if not worker.done.is_set():
                        worker.retire()
                        grace = self.config.scheduler.shutdown_grace
                        await sleep_unless(self.clock, grace, worker.done)
                        if not worker.done.is_set():
                            log.warning(
                                "%s: probes still running %.0fs after a reload: cancelling them",
                                name,
                                grace,
                            )
                            tg.cancel_scope.cancel()
                previous = worker
        finally:
            if slot.want is None:
                if self.workers.get(name) is slot.worker:
                    del self.workers[name]
                if self._slots.get(name) is slot:
                    del self._slots[name]

    async def _cleanup_loop(self) -> None:
        while not self._stopping:
            await self.recorder.cleanup()
            await sleep_unless(self.clock, self.config.scheduler.cleanup_interval, self._stop_event)


async def _wait_any(*events: anyio.Event) -> None:
    async with anyio.create_task_group() as tg:
        for event in events:

            async def waiter(event: anyio.Event = event) -> None:
                await event.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(waiter)
