"""``prompt-cache-exporter run``: the long-running exporter.

Start-up: load the configuration (a bad one exits 2 with one line), open the store, restore
verdicts, failure state, balances and reliability so /metrics shows them before the first
new probe, then serve HTTP and schedule probes. SIGHUP and ``POST /-/reload`` reload the
configuration (a bad file keeps the old one and sets the reload gauge to 0). SIGTERM and
SIGINT stop scheduling, give running probes ``scheduler.shutdown_grace`` to finish, cancel
the rest, flush the store and exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

import anyio
import httpx

from exporter import __version__
from exporter.budget import Budget
from exporter.clock import Clock, SystemClock
from exporter.config import Config, ConfigError, load_config
from exporter.exits import EXIT_FAILURE, EXIT_USAGE, join_threads_started_since, listen_error
from exporter.memtrim import configure_allocator
from exporter.metrics import ExporterCollector, build_registry
from exporter.probes import PROBE_NAMES
from exporter.reliability import reliability_score
from exporter.runtime import budget_limits
from exporter.scheduler import Restored, Scheduler
from exporter.server import DependencyStatus, Readiness, create_app, serve
from exporter.state import State
from exporter.store import Store, StoreError
from exporter.webconfig import WebConfigError, WebConfigSource, load_web_config

log = logging.getLogger(__name__)
EXIT_CONFIG = EXIT_USAGE


async def restore(state: State, store: Store, config: Config, clock: Clock) -> Restored:
    """Put the last known results back into memory; return what the scheduler needs."""
    restored = Restored()
    configured = {p.name for p in config.providers}
    for result in await store.latest_results():
        if result.provider not in configured:
            continue
        state.observe_result(result, restored=True)
        restored.last_started[(result.provider, result.model, result.probe)] = result.started_at
    for (provider, model), saved in (await store.load_model_states()).items():
        if provider in configured:
            cooldown_until = saved.cooldown_until or 0.0
            restored.model_states[(provider, model)] = (
                saved.consecutive_failures,
                saved.consecutive_successes,
                cooldown_until,
            )
            state.record_failures(provider, model, saved.consecutive_failures, cooldown_until)
    for (provider, currency), (amount, _) in (await store.latest_balances()).items():
        if provider in configured:
            state.set_balance(provider, currency, amount)
    since = clock.time() - config.scheduler.reliability_window
    for (provider, model), stats in (await store.reliability_stats(since=since)).items():
        if provider in configured:
            state.set_reliability(provider, model, reliability_score(stats))
    return restored


class Daemon:
    def __init__(self, config_path: str | Path, env: Mapping[str, str]) -> None:
        self.config_path = config_path
        self.env = env
        self.clock = SystemClock()
        self.state = State()
        self.scheduler: Scheduler | None = None
        self.store: Store | None = None
        self.web: WebConfigSource | None = None

    async def reload(self) -> tuple[bool, str]:
        try:
            config = load_config(self.config_path, env=self.env)
            if self.web is not None:
                # Credentials and certificates are re-read too (they also reload on change).
                self.web.reload()
        except (ConfigError, WebConfigError) as exc:
            log.error("configuration reload failed, keeping the previous one: %s", exc)
            self.state.set_reload(False, self.clock.time())
            return False, str(exc)
        if self.scheduler is not None:
            for provider in config.providers:
                self.state.configure_provider(
                    provider.name,
                    probes=config.probes.enabled_for(provider),
                    intervals={
                        p: config.probes.get(p).interval
                        for p in config.probes.enabled_for(provider)
                    },
                )
            self.scheduler.apply(config)
        logging.getLogger().setLevel(config.log_level.upper())
        self.state.set_reload(True, self.clock.time())
        log.info("configuration reloaded")
        return True, "ok"

    def readiness(self) -> Readiness:
        store = self.store
        scheduler = self.scheduler
        store_status = DependencyStatus(
            bool(store and store.healthy),
            f"{store.pending_writes} writes queued" if store else "not open",
        )
        running = bool(scheduler and scheduler.running)
        workers = len(scheduler.workers) if scheduler else 0
        return Readiness.of(
            store=store_status,
            scheduler=DependencyStatus(running, f"{workers} provider workers"),
        )

    async def run(self) -> int:
        try:
            config = load_config(self.config_path, env=self.env)
            web = None
            if config.server.web_config_file is not None:
                web = WebConfigSource(load_web_config(config.server.web_config_file))
            self.web = web
        except (ConfigError, WebConfigError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        logging.getLogger().setLevel(config.log_level.upper())
        threads = set(threading.enumerate())
        try:
            self.store = await Store.open(
                config.storage.path, clock=self.clock, on_error=self.state.store_error
            )
        except (StoreError, OSError) as exc:
            await join_threads_started_since(threads)
            print(f"error: storage.path: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        store = self.store
        try:
            budget = Budget(store, {p.name: budget_limits(p) for p in config.providers}, self.clock)
            await budget.load()
            self.state.set_budgets(budget.snapshot())
            restored = await restore(self.state, store, config, self.clock)
            self.state.set_reload(True, self.clock.time())
            registry = build_registry(ExporterCollector(self.state, now=self.clock.time))
            async with httpx.AsyncClient(follow_redirects=False) as client:
                self.scheduler = Scheduler(
                    config,
                    state=self.state,
                    store=store,
                    budget=budget,
                    clock=self.clock,
                    client=client,
                    env=self.env,
                    restored=restored,
                )
                app = create_app(
                    registry=registry,
                    runs=store,
                    readiness=self.readiness,
                    reload=self.reload,
                    web_config=web,
                    probe_names=PROBE_NAMES,
                    version=__version__,
                )
                host, port = config.server.host, config.server.port
                listening = False
                try:
                    async with serve(app, host=host, port=port, web_config=web) as address:
                        listening = True
                        await self._supervise(config, address.url)
                except OSError as exc:
                    if listening:
                        raise
                    print(f"error: server.listen: {listen_error(host, port, exc)}", file=sys.stderr)
                    return EXIT_USAGE
        finally:
            pending = await store.flush()
            if pending:
                log.error("%d store writes could not be flushed before exit", pending)
            await store.close()
        log.info("stopped")
        return 0

    async def _supervise(self, config: Config, url: str) -> None:
        scheduler = self.scheduler
        assert scheduler is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(scheduler.run)
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                # Only now: "serving on" promises that Ctrl-C and SIGTERM stop it gracefully.
                log.info("prompt-cache-exporter %s serving on %s", __version__, url)
                async for signum in sigs:
                    if signum == signal.SIGHUP:
                        await self.reload()
                        continue
                    log.info("received %s: stopping", signal.Signals(signum).name)
                    scheduler.stop()
                    grace = scheduler.config.scheduler.shutdown_grace
                    with anyio.move_on_after(grace):
                        await scheduler.stopped.wait()
                    if not scheduler.stopped.is_set():
                        log.warning("probes still running after %.0fs: cancelling them", grace)
                    tg.cancel_scope.cancel()
                    break


def main(config_path: str | None) -> int:
    path = config_path or os.environ.get("PCE_CONFIG_FILE")
    if not path:
        print(
            "error: no config file given: use --config FILE or set PCE_CONFIG_FILE", file=sys.stderr
        )
        return EXIT_CONFIG
    configure_allocator()
    return anyio.run(Daemon(path, os.environ).run)
