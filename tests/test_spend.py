"""Money, end to end on simulated days: the real scheduler, runtime, recorder, budget and
SQLite ledger against the in-process simulator over real HTTP on 127.0.0.1, on a virtual clock
(tests/virtual_time.py). What the simulator billed is the truth every figure is checked with.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.assembly import build_adapter, probe_settings
from exporter.budget import Budget, utc_windows
from exporter.clock import VirtualClock
from exporter.config import Config, load_config
from exporter.forecast import ConfigForecast, model_forecast
from exporter.metrics import ExporterCollector, build_registry
from exporter.pricing import cost_of
from exporter.recorder import Recorder
from exporter.results import ModelPrice, Usage
from exporter.runtime import budget_limits
from exporter.scheduler import Scheduler
from exporter.simulator.config import SimConfig
from exporter.simulator.server import SimulatorHandle, serve_simulator
from exporter.state import State
from exporter.store import Store
from tests.virtual_time import TrackedStore, Work, drive, tracked_client

pytestmark = pytest.mark.anyio
# 2024-03-10 00:00:00 UTC: a simulated day is one UTC budget window.
MIDNIGHT = datetime(2024, 3, 10, tzinfo=UTC).timestamp()
DAY = 86_400.0
ONLY_BASIC = """
[probes.basic]
interval = "1m"
timeout = "50s"
[probes.prompt_sizes]
enabled = false
[probes.partial]
enabled = false
[probes.persistence]
enabled = false
[probes.ttl]
enabled = false
"""


def sim_provider(
    kind: str = "openai",
    models: tuple[str, ...] = ("sim-cache-ok",),
    *,
    budget: str = "",
    prices: str = "",
    delay: str | None = "0s",
) -> str:
    """One ``[[providers]]`` table named "sim" at the rig's simulator (``{url}``)."""
    listed = ", ".join(f'"{m}"' for m in models)
    lines = [
        "[[providers]]",
        'name = "sim"',
        f'type = "{kind}"',
        'base_url = "{url}"',
        'api_key_env = ""',
        f"models = [{listed}]",
    ]
    if delay is not None:
        lines.append(f'isolation_delay = "{delay}"')
    if budget:
        lines += ["[providers.budget]", budget]
    if prices:
        lines += ['[providers.prices."sim-cache-ok"]', prices]
    return "\n".join(lines) + "\n"


SIM_PRICES = "input = 1.0\noutput = 4.0\ncache_read = 0.1"


@dataclass
class Rig:
    clock: VirtualClock
    work: Work
    sim: SimulatorHandle
    client: httpx.AsyncClient
    tmp_path: Path

    def config(self, provider: str, probes: str = "", extra: str = "") -> Config:
        path = self.tmp_path / "config.toml"
        path.write_text(
            f'[storage]\npath = "{self.tmp_path / "db.sqlite"}"\n{extra}\n{probes}\n'
            + provider.format(url=self.sim.base_url)
        )
        return load_config(path, env={})

    def requests(self, model: str) -> int:
        stats = self.sim.state.stats_snapshot()["models"].get(model)
        return int(stats["requests"]) if stats else 0

    def billed(self, model: str, field: str = "prompt_tokens") -> float:
        stats = self.sim.state.stats_snapshot()["models"].get(model)
        return float(stats[field]) if stats else 0.0


@dataclass
class Running:
    scheduler: Scheduler
    recorder: Recorder
    state: State

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        registry = build_registry(ExporterCollector(self.state, now=self.recorder.clock.time))
        out = {}
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples().get((name, frozenset(labels.items())))


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    clock = VirtualClock(MIDNIGHT)
    work = Work()
    async with (
        serve_simulator(SimConfig(latency_scale=0.0), clock=clock) as sim,
        tracked_client(work) as client,
    ):
        yield Rig(clock, work, sim, client, tmp_path)


@pytest.fixture
async def store(rig: Rig) -> AsyncIterator[Any]:
    async with await Store.open(rig.tmp_path / "db.sqlite", clock=rig.clock) as opened:
        yield TrackedStore(opened, rig.work)


class Session:
    """A scheduler running on the rig's clock until ``close``."""

    def __init__(self, rig: Rig, config: Config, store: Any = None) -> None:
        self.rig = rig
        self.budget = (
            Budget(store, {p.name: budget_limits(p) for p in config.providers}, rig.clock)
            if store is not None
            else None
        )
        self.state = State()
        self.recorder = Recorder(self.state, store, self.budget, rig.clock, config)
        self.scheduler = Scheduler(
            config,
            recorder=self.recorder,
            budget=self.budget,
            clock=rig.clock,
            client=rig.client,
            env={},
        )
        self.running = Running(self.scheduler, self.recorder, self.state)

    async def until(self, at: float) -> None:
        await drive(self.rig.clock, self.rig.work, at)


async def session(
    rig: Rig, config: Config, store: Any, seconds: float
) -> tuple[Running, Budget | None]:
    """Run ``config`` for ``seconds`` of virtual time from now, then stop it."""
    s = Session(rig, config, store)
    if s.budget is not None:
        await s.budget.load()
    async with anyio.create_task_group() as tg:
        tg.start_soon(s.scheduler.run)
        await s.until(rig.clock.time() + seconds)
        s.scheduler.stop()
        await s.until(rig.clock.time() + 3600)
    return s.running, s.budget


SIM_OK = sim_provider(delay=None, prices=SIM_PRICES)  # the default isolation delay


async def test_the_forecast_is_what_a_simulated_day_of_the_default_schedule_bills(
    rig: Rig,
) -> None:
    config = rig.config(SIM_OK)  # the default schedule, the default isolation delay
    provider = config.providers[0]
    forecast = model_forecast(
        config,
        provider,
        build_adapter(provider, {}),
        probe_settings(config.probes),
        "sim-cache-ok",
        provider.price_for("sim-cache-ok"),
    )
    assert forecast.prompt_tokens <= 600_000  # issue 9: one model's default cost
    # check-config prints the same figure.
    lines = ConfigForecast(config).provider(provider)
    assert lines[0].startswith(f"  forecast: {forecast.prompt_tokens:.0f} prompt tokens/day")

    running, _ = await session(rig, config, None, DAY - 1)

    billed = rig.billed("sim-cache-ok")
    assert billed == pytest.approx(forecast.prompt_tokens, rel=0.05), (billed, forecast)
    cost = rig.billed("sim-cache-ok", "cost_usd") + rig.billed("sim-cache-ok", "cost_diem")
    assert forecast.usd is not None
    assert cost == pytest.approx(forecast.usd, rel=0.05), (cost, forecast.usd)
    # The running exporter exposes the same forecast.
    assert running.value(
        "llmcache_budget_forecast", provider="sim", window="day", unit="prompt_tokens"
    ) == pytest.approx(forecast.prompt_tokens)
    runs = running.value(
        "llmcache_probe_runs_total",
        provider="sim",
        model="sim-cache-ok",
        probe="basic",
        outcome="success",
    )
    assert runs == 144  # every 10 minutes, all day


SIM_ERROR = sim_provider(models=("sim-error",), delay=None)


async def test_after_a_cooldown_exactly_one_trial_run_reaches_the_simulator(rig: Rig) -> None:
    # Every probe enabled (the defaults); every request of sim-error fails with a 500 and is
    # tried 3 times (http.attempts), 2 s and 4 s apart.
    config = rig.config(SIM_ERROR)
    s = Session(rig, config)
    start = rig.clock.time()
    async with anyio.create_task_group() as tg:
        tg.start_soon(s.scheduler.run)
        await s.until(start + 120)
        # Five probes were due at once: five failed runs of one request (3 attempts) each.
        assert rig.requests("sim-error") == 15
        health = s.recorder.health("sim", "sim-error")
        assert health.failures == 5
        opened = health.cooldown_until
        await s.until(opened - 1)
        assert rig.requests("sim-error") == 15  # nothing while the breaker is open
        await s.until(opened + 60)
        # Exactly one trial run (one request, three attempts), and straight back to cooldown.
        assert rig.requests("sim-error") == 18
        reopened = s.recorder.health("sim", "sim-error").cooldown_until
        assert reopened > opened
        await s.until(reopened - 1)
        assert rig.requests("sim-error") == 18
        await s.until(reopened + 60)
        assert rig.requests("sim-error") == 21
        s.scheduler.stop()
        await s.until(rig.clock.time() + 3600)


SIM_TOKEN_BUDGET = sim_provider(budget="daily_tokens = 30000")


async def test_an_exhausted_budget_pauses_visibly_and_resumes_at_the_next_window(
    rig: Rig, store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "exporter.recorder")
    config = rig.config(SIM_TOKEN_BUDGET, ONLY_BASIC)
    s = Session(rig, config, store)
    assert s.budget is not None
    await s.budget.load()
    start = rig.clock.time()
    async with anyio.create_task_group() as tg:
        tg.start_soon(s.scheduler.run)
        await s.until(start + 3600)
        billed = rig.billed("sim-cache-ok") + rig.billed("sim-cache-ok", "completion_tokens")
        requests = rig.requests("sim-cache-ok")
        assert 0.8 * 30000 < billed <= 30000
        # Paused, visibly: the gauges the alerts read, one log line.
        assert s.running.value("llmcache_budget_exhausted", provider="sim") == 1
        assert s.running.value("llmcache_provider_paused", provider="sim", reason="budget") == 1
        pauses = [r for r in caplog.records if "budget cannot cover the next probe" in r.message]
        assert len(pauses) == 1, caplog.text
        assert "provider paused" in pauses[0].message
        assert "tokens used this day" in pauses[0].message
        skipped = s.running.value(
            "llmcache_probe_runs_total",
            provider="sim",
            model="sim-cache-ok",
            probe="basic",
            outcome="skipped",
        )
        assert skipped == 1  # paused, not retried every minute
        await s.until(start + DAY - 60)
        assert rig.requests("sim-cache-ok") == requests  # nothing more all day
        assert len([r for r in caplog.records if "cannot cover" in r.message]) == 1
        # The window rolls over at midnight: probing resumes by itself.
        await s.until(start + DAY + 120)
        assert rig.requests("sim-cache-ok") > requests
        assert s.running.value("llmcache_budget_exhausted", provider="sim") == 0
        assert s.running.value("llmcache_provider_paused", provider="sim", reason="budget") == 0
        assert "there is room again; probing resumes" in caplog.text
        s.scheduler.stop()
        await s.until(rig.clock.time() + 3600)
    totals = await store.budget_totals("sim", utc_windows(start))
    assert totals.day.tokens <= 30000  # the ledger never exceeded the budget


SIM_USD_ANTHROPIC = sim_provider("anthropic", budget="daily_usd = 0.2", prices=SIM_PRICES)


async def test_a_usd_budget_with_config_prices_holds(rig: Rig, store: Any) -> None:
    # The simulator's Anthropic API reports no cost: spend comes from the price table.
    config = rig.config(SIM_USD_ANTHROPIC, ONLY_BASIC)
    running, budget = await session(rig, config, store, 6 * 3600)
    assert budget is not None
    price = ModelPrice(1.0, 4.0, 0.1)
    entries = [e for e in rig.sim.state.log if e.model == "sim-cache-ok" and e.billed]
    assert entries
    expected = sum(
        cost_of(
            price,
            Usage(e.prompt_tokens, e.cached_tokens, e.cache_write_tokens, e.completion_tokens),
        )[0]
        for e in entries
    )
    used = budget.snapshot()["sim"].get("day", "usd").used
    assert used == pytest.approx(expected, abs=1e-8)
    assert used <= 0.2
    assert used > 0.2 * 0.7  # it really ran until the budget was spent
    assert running.value("llmcache_budget_exhausted", provider="sim") == 1
    spend = running.value("llmcache_spend_usd_total", provider="sim", model="sim-cache-ok")
    assert spend == pytest.approx(expected, abs=1e-8)


SIM_USD_REPORTED = sim_provider(
    budget="daily_usd = 0.05", prices="input = 2.0\noutput = 8.0\ncache_read = 0.2"
)


async def test_a_usd_budget_reconciles_with_the_cost_the_provider_reports(
    rig: Rig, store: Any
) -> None:
    # The configured prices are twice the simulator's: reservations are priced (high) from
    # the table, and each settles at what the response's `cost` says was charged.
    config = rig.config(SIM_USD_REPORTED, ONLY_BASIC)
    running, budget = await session(rig, config, store, 6 * 3600)
    assert budget is not None
    charged = rig.billed("sim-cache-ok", "cost_usd") + rig.billed("sim-cache-ok", "cost_diem")
    assert charged > 0
    used = budget.snapshot()["sim"].get("day", "usd").used
    assert used == pytest.approx(charged, abs=1e-8)
    assert used <= 0.05
    assert used > 0.05 * 0.7
    spend = running.value("llmcache_spend_usd_total", provider="sim", model="sim-cache-ok")
    assert spend == pytest.approx(charged, abs=1e-8)


SIM_VENICE_USD = sim_provider(
    "venice", ("sim-cache-ok", "sim-not-published"), budget="daily_usd = 1.0"
)


async def test_under_a_usd_budget_a_model_without_a_price_is_not_probed(
    rig: Rig, store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Venice publishes prices, so the configuration is valid; the models endpoint has none
    # for one of the listed models: it is not probed, and says so.
    caplog.set_level(logging.WARNING, "exporter.recorder")
    config = rig.config(SIM_VENICE_USD, ONLY_BASIC)
    running, _ = await session(rig, config, store, 600)
    assert rig.requests("sim-cache-ok") > 0
    log_entries = [e for e in rig.sim.state.log if e.model == "sim-not-published"]
    assert log_entries == []
    assert running.value("llmcache_model_unpriced", provider="sim", model="sim-not-published") == 1
    assert running.value("llmcache_model_unpriced", provider="sim", model="sim-cache-ok") == 0
    warnings = [r.message for r in caplog.records if "not probed" in r.message]
    assert len(warnings) == 1
    assert "sim/sim-not-published" in warnings[0]
