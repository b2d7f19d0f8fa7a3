"""``prompt-cache-exporter run``: the long-running exporter.

Start-up: load the configuration (a bad one exits 2 with one line), open the store, restore
verdicts, failure state, balances (with the pause they imply) and reliability so /metrics
shows them before the first new probe, then serve HTTP and schedule probes. SIGHUP and
``POST /-/reload`` reload the configuration, one at a time, read off the event loop (a bad
file keeps the old one and sets the reload gauge to 0; the answer names the keys, never their
values); settings read only at start (``RESTART_SETTINGS``) are reported as needing a restart.
SIGTERM and SIGINT stop scheduling, give running probes ``scheduler.shutdown_grace`` to
finish, cancel the rest, flush the store and exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import httpx
from prometheus_client import CollectorRegistry

from exporter import __version__
from exporter.budget import Budget
from exporter.clock import SystemClock
from exporter.config import Config, ConfigError, load_config
from exporter.exits import EXIT_FAILURE, EXIT_USAGE, join_threads_started_since, listen_error
from exporter.exposition import Exposition, Refresher
from exporter.memtrim import configure_allocator
from exporter.metrics import build_registry
from exporter.probes import PROBE_NAMES
from exporter.recorder import Recorder
from exporter.runtime import budget_limits
from exporter.scheduler import Scheduler
from exporter.server import DependencyStatus, Readiness, create_app, serve
from exporter.state import State
from exporter.store import Store, StoreError

if TYPE_CHECKING:
    from exporter.proxy import ProxyListenError
    from exporter.webconfig import WebConfigSource

log = logging.getLogger(__name__)
EXIT_CONFIG = EXIT_USAGE
# Settings read once at start: a reload that changes them says so instead of ignoring them.
RESTART_SETTINGS = (
    "server.listen",
    "server.web_config_file",
    "server.per_model_histograms",
    "storage.path",
)


def needs_restart(old: Config, new: Config) -> list[str]:
    """The RESTART_SETTINGS that differ between ``old`` and ``new``."""
    changed = []
    for dotted in RESTART_SETTINGS:
        section, key = dotted.split(".")
        if getattr(getattr(old, section), key) != getattr(getattr(new, section), key):
            changed.append(dotted)
    return changed


def first_busy_listener(config: Config) -> str | None:
    """``<field>: cannot listen on …`` for the first listen address already taken, else None.

    A bind with SO_REUSEADDR, as uvicorn's, closed at once: a port that another process
    takes in the moment after is still reported by the servers themselves.
    """
    listeners = [("server.listen", config.server.host, config.server.port)]
    listeners += [(f"proxies.{p.name}.listen", p.host, p.port) for p in config.proxies]
    for field, host, port in listeners:
        if port == 0:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
        except OSError as exc:
            return f"{field}: {listen_error(host, port, exc)}"
    return None


class Daemon:
    def __init__(self, config_path: str | Path, env: Mapping[str, str]) -> None:
        self.config_path = config_path
        self.env = env
        self.clock = SystemClock()
        self.state = State()
        self.config: Config | None = None
        self.recorder: Recorder | None = None
        self.scheduler: Scheduler | None = None
        self.store: Store | None = None
        self.web: WebConfigSource | None = None
        # SIGHUP and POST /-/reload: one reload at a time, each applied completely.
        self._reload_lock = anyio.Lock()

    def _load(self) -> Config:
        return load_config(self.config_path, env=self.env)

    async def reload(self) -> tuple[bool, str]:
        """Re-read the configuration; (ok, message). The message never quotes the file's
        values: it goes back to whoever asked for the reload."""
        async with self._reload_lock:
            return await self._reload()

    async def _reload(self) -> tuple[bool, str]:
        try:
            # Off the event loop: probes are measuring latencies meanwhile.
            config = await anyio.to_thread.run_sync(self._load)
            if self.web is not None:
                # Credentials and certificates are re-read too (they also reload on change).
                await anyio.to_thread.run_sync(reload_web_config, self.web)
        except ConfigError as exc:
            log.error("configuration reload failed, keeping the previous one: %s", exc)
            if self.recorder is not None:
                self.recorder.reload_result(False)
            return False, exc.public
        restart = needs_restart(self.config, config) if self.config is not None else []
        self.config = config
        if self.scheduler is not None:
            self.scheduler.apply(config)
        logging.getLogger().setLevel(config.log_level.upper())
        if self.recorder is not None:
            self.recorder.reload_result(True)
        if restart:
            message = (
                f"configuration reloaded; {', '.join(restart)} changed and takes effect only "
                "after a restart (the running exporter keeps the previous value)"
            )
            log.warning("%s", message)
            return True, message
        log.info("configuration reloaded")
        return True, "ok"

    def _store_error(self, operation: str) -> None:
        # The recorder exists before the first operation after Store.open (which raises).
        if self.recorder is not None:
            self.recorder.store_error(operation)

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
            config = self._load()
            web = None
            if config.server.web_config_file is not None:
                web = open_web_config(config.server.web_config_file)
            self.web = web
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        self.config = config
        self.state = State(per_model_histograms=config.server.per_model_histograms)
        if (busy := first_busy_listener(config)) is not None:
            # Checked before anything starts or logs, so a busy port is the one line printed.
            print(f"error: {busy}", file=sys.stderr)
            return EXIT_USAGE
        logging.getLogger().setLevel(config.log_level.upper())
        threads = set(threading.enumerate())
        try:
            self.store = await Store.open(
                config.storage.path, clock=self.clock, on_error=self._store_error
            )
        except (StoreError, OSError) as exc:
            await join_threads_started_since(threads)
            print(f"error: storage.path: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        store = self.store
        try:
            budget = Budget(store, {p.name: budget_limits(p) for p in config.providers}, self.clock)
            recorder = Recorder(self.state, store, budget, self.clock, config)
            self.recorder = recorder
            await budget.load()
            restored = await recorder.restore()
            recorder.reload_result(True)
            # The llmcache_ families are rendered when the state changes (exposition); the
            # registry holds what is rendered live per scrape (process metrics, proxies).
            exposition = Exposition(self.state, now=self.clock.time)
            registry = build_registry()
            async with httpx.AsyncClient(follow_redirects=False) as client:
                self.scheduler = Scheduler(
                    config,
                    recorder=recorder,
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
                    exposition=exposition,
                )
                host, port = config.server.host, config.server.port
                listening = False
                try:
                    async with serve(app, host=host, port=port, web_config=web) as address:
                        listening = True
                        async with _proxies(config, registry):
                            with Refresher(exposition, self.state):
                                await self._supervise(address.url)
                except OSError as exc:
                    if listening:
                        raise
                    print(f"error: server.listen: {listen_error(host, port, exc)}", file=sys.stderr)
                    return EXIT_USAGE
                except Exception as exc:
                    # A proxy listener starts inside a task group: its bind error may come
                    # wrapped in a group.
                    found = _proxy_listen_error(exc)
                    if found is None:
                        raise
                    print(f"error: {found}", file=sys.stderr)
                    return EXIT_USAGE
        finally:
            pending = await store.flush()
            if pending:
                log.error("%d store writes could not be flushed before exit", pending)
            await store.close()
        log.info("stopped")
        return 0

    async def _supervise(self, url: str) -> None:
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


def _proxies(config: Config, registry: CollectorRegistry) -> AbstractAsyncContextManager[object]:
    """The configured proxy listeners. Imported only where one is configured: the proxy code
    with aiohttp is 9 MB resident, 15 % of an exporter that probes 500 models."""
    if not config.proxies:
        return nullcontext()
    from exporter.proxy import serve_proxies

    return serve_proxies(config, registry)


def _proxy_listen_error(exc: BaseException) -> ProxyListenError | None:
    if "exporter.proxy" not in sys.modules:  # no proxy configured: it cannot be one
        return None
    from exporter.proxy import ProxyListenError

    return ProxyListenError.find(exc)


def open_web_config(path: Path) -> WebConfigSource:
    """``server.web_config_file`` loaded and followed; its errors as ConfigError. The web
    config machinery (yaml, bcrypt, its pydantic models: 1.5 MB resident) is imported only
    here and below, so an exporter without a web config never loads it."""
    from exporter.webconfig import WebConfigError, WebConfigSource, load_web_config

    try:
        return WebConfigSource(load_web_config(path))
    except WebConfigError as exc:
        raise ConfigError(str(exc)) from exc


def reload_web_config(source: WebConfigSource) -> None:
    """Re-read the web config's files (credentials, certificates); its errors as ConfigError."""
    from exporter.webconfig import WebConfigError

    try:
        source.reload()
    except WebConfigError as exc:
        raise ConfigError(str(exc)) from exc


def main(config_path: str | None) -> int:
    path = config_path or os.environ.get("PCE_CONFIG_FILE")
    if not path:
        print(
            "error: no config file given: use --config FILE or set PCE_CONFIG_FILE", file=sys.stderr
        )
        return EXIT_CONFIG
    configure_allocator()
    return anyio.run(Daemon(path, os.environ).run)
