"""Scheduler timing, exactly: intervals, isolation delay, concurrency, failure tracking,
cooldown, balance pause/resume, budget skips, restore and reload, on a virtual clock with a
scripted probe runner (no network, no real time)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from exporter.clock import VirtualClock
from exporter.config import Config, load_config
from exporter.results import ErrorType, ProbeResult, RequestRecord, Verdict
from exporter.runtime import ProviderRuntime
from exporter.scheduler import Restored, Scheduler
from exporter.state import State

pytestmark = pytest.mark.anyio
T0 = 1_700_000_000.0


def make_config(tmp_path: Path, provider: str = "", **probes: str) -> Config:
    enabled = probes or {"basic": "5m"}
    lines = [f'[storage]\npath = "{tmp_path / "db.sqlite"}"\n']
    for name in ("basic", "prompt_sizes", "partial", "persistence", "ttl"):
        if name in enabled:
            interval = enabled[name]
            lines.append(f'[probes.{name}]\ninterval = "{interval}"\ntimeout = "30s"\n')
        else:
            lines.append(f"[probes.{name}]\nenabled = false\n")
    lines.append(
        provider
        or """[[providers]]
name = "p"
type = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "P_KEY"
models = ["m1", "m2"]
isolation_delay = "5s"
"""
    )
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines))
    return load_config(path, env={})


class Runner:
    """Records (virtual time, model, probe) of every run; results come from ``verdicts``."""

    def __init__(self, clock: VirtualClock, duration: float = 0.0) -> None:
        self.clock = clock
        self.duration = duration
        self.calls: list[tuple[float, str, str]] = []
        self.verdicts: Callable[[str, int], Verdict] = lambda model, n: Verdict.WORKS
        self.records: Callable[[str], list[RequestRecord]] = lambda model: []

    async def __call__(self, runtime: ProviderRuntime, model: str, probe: str) -> ProbeResult:
        start = self.clock.time()
        self.calls.append((start - T0, model, probe))
        if self.duration:
            await self.clock.sleep(self.duration)
        verdict = self.verdicts(model, sum(1 for c in self.calls if c[1] == model))
        return ProbeResult(
            probe=probe,
            provider=runtime.name,
            model=model,
            run_id=f"r{len(self.calls)}",
            verdict=verdict,
            started_at=start,
            finished_at=self.clock.time(),
            error_type=ErrorType.API_ERROR if verdict is Verdict.ERROR else None,
            requests=self.records(model),
        )


async def start(
    config: Config, clock: VirtualClock, runner: Runner, **kwargs: Any
) -> tuple[Scheduler, State, httpx.AsyncClient]:
    state = State()
    client = httpx.AsyncClient()
    scheduler = Scheduler(
        config,
        state=state,
        store=None,
        budget=None,
        clock=clock,
        client=client,
        runner=runner,
        **kwargs,
    )
    return scheduler, state, client


async def run_for(
    config: Config, seconds: float, runner: Runner, clock: VirtualClock, **kwargs: Any
) -> tuple[Scheduler, State]:
    scheduler, state, client = await start(config, clock, runner, **kwargs)
    async with client, anyio.create_task_group() as tg:
        tg.start_soon(scheduler.run)
        await clock.advance(seconds)
        scheduler.stop()
        await clock.advance(3600)
    return scheduler, state


async def test_intervals_and_isolation_delay(tmp_path: Path) -> None:
    clock = VirtualClock(T0)
    runner = Runner(clock)
    await run_for(make_config(tmp_path), 650, runner, clock)
    # m1 at once, m2 after the 5 s isolation delay; each again one interval after it started.
    assert runner.calls == [
        (0, "m1", "basic"),
        (5, "m2", "basic"),
        (300, "m1", "basic"),
        (305, "m2", "basic"),
        (600, "m1", "basic"),
        (605, "m2", "basic"),
    ]


async def test_each_probe_type_has_its_own_interval(tmp_path: Path) -> None:
    clock = VirtualClock(T0)
    runner = Runner(clock)
    config = make_config(tmp_path, basic="5m", persistence="10m")
    await run_for(config, 700, runner, clock)
    assert [c for c in runner.calls if c[1] == "m1"] == [
        (0, "m1", "basic"),
        (5, "m1", "persistence"),
        (300, "m1", "basic"),
        (600, "m1", "basic"),
        (605, "m1", "persistence"),
    ]


async def test_concurrency_runs_models_side_by_side(tmp_path: Path) -> None:
    provider = """[[providers]]
name = "p"
type = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "P_KEY"
models = ["m1", "m2", "m3", "m4"]
isolation_delay = "0s"
concurrency = 2
"""
    clock = VirtualClock(T0)
    runner = Runner(clock, duration=10)
    _, state = await run_for(make_config(tmp_path, provider), 100, runner, clock)
    assert runner.calls[:4] == [
        (0, "m1", "basic"),
        (0, "m2", "basic"),
        (10, "m3", "basic"),
        (10, "m4", "basic"),
    ]
    # One cycle of 4 runs of 10 s at concurrency 2 takes 20 s.
    cycle = state.snapshot().providers[0].cycle
    assert cycle.total == 20.0


async def test_failures_warn_then_cooldown_then_reset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = VirtualClock(T0)
    runner = Runner(clock)
    # m1 fails 6 times, then succeeds; m2 always works.
    runner.verdicts = lambda model, n: Verdict.ERROR if model == "m1" and n <= 6 else Verdict.WORKS
    config = make_config(tmp_path, basic="1m")
    scheduler, state, client = await start(config, clock, runner)
    caplog.set_level(logging.WARNING, "exporter.scheduler")
    async with client, anyio.create_task_group() as tg:
        tg.start_soon(scheduler.run)
        await clock.advance(4 * 60 + 1)  # runs at 0, 60, 120, 180, 240: 5 failures
        m1 = [c[0] for c in runner.calls if c[1] == "m1"]
        assert m1 == [0, 60, 120, 180, 240]
        assert "m1: 3 consecutive probe failures" in caplog.text
        series = next(m for m in state.snapshot().models if m.model == "m1")
        assert series.consecutive_failures == 5
        assert series.cooldown_until == T0 + 240 + 900  # 15 min from the 5th failure
        await clock.advance(900)  # nothing during the cooldown
        assert [c[0] for c in runner.calls if c[1] == "m1"] == [*m1, 1140]
        # The 6th failure starts another cooldown at once.
        series = next(m for m in state.snapshot().models if m.model == "m1")
        assert series.cooldown_until == T0 + 1140 + 900
        await clock.advance(900 + 60)  # 7th run works, 8th works: failures reset after 2
        assert [c[0] for c in runner.calls if c[1] == "m1"][-2:] == [2040, 2100]
        series = next(m for m in state.snapshot().models if m.model == "m1")
        assert series.consecutive_failures == 0
        scheduler.stop()
        await clock.advance(60)
    m2 = [c[0] for c in runner.calls if c[1] == "m2"]
    assert m2[:3] == [5, 65, 125]  # the other model was never held up


async def test_balance_below_threshold_pauses_and_resumes(tmp_path: Path) -> None:
    provider = """[[providers]]
name = "p"
type = "venice"
api_key_env = "P_KEY"
models = ["m1"]
balance_stop_threshold = 0.5
balance_check_interval = "10m"
"""
    clock = VirtualClock(T0)
    runner = Runner(clock)
    config = make_config(tmp_path, provider, basic="1m")
    scheduler, state, client = await start(config, clock, runner)
    checks: list[float] = []
    async with client, anyio.create_task_group() as tg:
        tg.start_soon(scheduler.run)
        await clock.settle()
        worker = scheduler.workers["p"]

        async def check() -> None:
            checks.append(clock.time() - T0)
            if len(checks) == 2:
                state.set_balance("p", "diem", 3.0)  # topped up

        worker.check_balance = check
        await clock.advance(61)
        assert [c[0] for c in runner.calls] == [0, 60]
        state.set_balance("p", "diem", 0.2)  # what a response header would report
        await clock.advance(3000)
        # Paused at 120: balance checks every 10 minutes, probing resumes after the second.
        assert checks == [120, 720]
        assert [c[0] for c in runner.calls][:3] == [0, 60, 720]
        assert state.paused("p") == {"balance": False, "budget": False}
        scheduler.stop()
        await clock.advance(60)


async def test_insufficient_funds_pauses_the_provider(tmp_path: Path) -> None:
    clock = VirtualClock(T0)
    runner = Runner(clock)
    runner.verdicts = lambda model, n: Verdict.ERROR
    runner.records = lambda model: [
        RequestRecord(
            "prime",
            True,
            attempts=1,
            status=402,
            error_type=ErrorType.INSUFFICIENT_FUNDS,
            error="HTTP 402",
        )
    ]
    config = make_config(tmp_path, basic="1m")
    scheduler, state, client = await start(config, clock, runner)
    async with client, anyio.create_task_group() as tg:
        tg.start_soon(scheduler.run)
        await clock.settle()
        scheduler.workers["p"].check_balance = _never_ok
        await clock.advance(300)
        # The first 402 stops the cycle: m2 is not even tried.
        assert runner.calls == [(0, "m1", "basic")]
        assert state.paused("p")["balance"] is True
        scheduler.stop()
        await clock.advance(600)


async def _never_ok() -> None:
    from exporter.transport import TransportError

    raise TransportError(ErrorType.INSUFFICIENT_FUNDS, "HTTP 402", 402)


class FakeBudget:
    def __init__(self) -> None:
        self.fits = False

    def would_fit(self, provider: str, tokens: int, usd: float) -> bool:
        return self.fits

    def snapshot(self) -> dict[str, Any]:
        return {}

    def set_limits(self, limits: object) -> None:
        pass


async def test_probes_that_do_not_fit_the_budget_are_skipped(tmp_path: Path) -> None:
    provider = """[[providers]]
name = "p"
type = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "P_KEY"
models = ["m1"]
[providers.budget]
daily_tokens = 1000
"""
    clock = VirtualClock(T0)
    runner = Runner(clock)
    config = make_config(tmp_path, provider, basic="1m")
    budget = FakeBudget()
    state = State()
    async with httpx.AsyncClient() as client, anyio.create_task_group() as tg:
        scheduler = Scheduler(
            config,
            state=state,
            store=None,
            budget=budget,  # type: ignore[arg-type]
            clock=clock,
            client=client,
            runner=runner,
        )
        tg.start_soon(scheduler.run)
        await clock.advance(150)
        assert runner.calls == []  # never sent
        snap = state.snapshot()
        assert snap.models[0].runs[("basic", "skipped")] == 3
        assert snap.models[0].probes["basic"].last_run == 0.0  # no verdict was replaced
        budget.fits = True
        await clock.advance(60)
        assert [c[0] for c in runner.calls] == [180]
        scheduler.stop()
        await clock.advance(60)


async def test_restored_runs_are_not_repeated_at_start(tmp_path: Path) -> None:
    clock = VirtualClock(T0)
    runner = Runner(clock)
    restored = Restored(
        last_started={("p", "m1", "basic"): T0 - 100},
        model_states={
            (
                "p",
                "m2",
            ): (5, 0, T0 + 500)
        },  # type: ignore[dict-item]
    )
    await run_for(make_config(tmp_path), 700, runner, clock, restored=restored)
    # m1 ran 100 s before the restart: next at 200. m2 is in cooldown until 500.
    # Both due at 500: m2 (due since start) first, m1 after the isolation delay.
    assert runner.calls[:3] == [(200, "m1", "basic"), (500, "m2", "basic"), (505, "m1", "basic")]


async def test_stop_lets_the_running_probe_finish(tmp_path: Path) -> None:
    clock = VirtualClock(T0)
    runner = Runner(clock, duration=30)
    config = make_config(tmp_path)
    scheduler, _, client = await start(config, clock, runner)
    async with client, anyio.create_task_group() as tg:
        tg.start_soon(scheduler.run)
        await clock.advance(10)
        scheduler.stop()
        await clock.advance(15)
        assert not scheduler.stopped.is_set()  # m1's run (0 to 30 s) is still going
        await clock.advance(10)
        assert scheduler.stopped.is_set()
    assert runner.calls == [(0, "m1", "basic")]  # m2 was never started


async def test_reload_adds_and_removes_providers(tmp_path: Path) -> None:
    clock = VirtualClock(T0)
    runner = Runner(clock)
    config = make_config(tmp_path, basic="1m")
    other = make_config(
        tmp_path,
        """[[providers]]
name = "q"
type = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "Q_KEY"
models = ["x"]
""",
        basic="1m",
    )
    scheduler, state, client = await start(config, clock, runner)
    async with client, anyio.create_task_group() as tg:
        tg.start_soon(scheduler.run)
        await clock.advance(30)
        scheduler.apply(other)
        await clock.advance(100)
        assert set(scheduler.workers) == {"q"}
        assert (60, "m1", "basic") not in runner.calls
        assert (30, "x", "basic") in runner.calls
        assert {p.name for p in state.snapshot().providers} == {"q"}
        scheduler.stop()
        await clock.advance(60)


class CleanupStore:
    """Only what the cleanup loop and result handling touch, recording the cutoffs."""

    def __init__(self) -> None:
        self.cutoffs: list[float] = []

    async def cleanup(self, *, older_than: float) -> int:
        self.cutoffs.append(older_than)
        return 0

    async def record_run(self, result: ProbeResult, **_: float) -> None:
        pass

    async def save_model_state(self, *_: object, **__: object) -> None:
        pass

    async def reliability_stats(self, **_: object) -> dict[Any, Any]:
        return {}


async def test_retention_cleanup_runs_at_start_and_every_interval(tmp_path: Path) -> None:
    clock = VirtualClock(T0)
    runner = Runner(clock)
    config = make_config(tmp_path, basic="1h")
    store = CleanupStore()
    async with httpx.AsyncClient() as client, anyio.create_task_group() as tg:
        scheduler = Scheduler(
            config,
            state=State(),
            store=store,  # type: ignore[arg-type]
            budget=None,
            clock=clock,
            client=client,
            runner=runner,
        )
        tg.start_soon(scheduler.run)
        await clock.advance(2 * 86400 + 10)
        scheduler.stop()
        await clock.advance(3600)
    retention = 30 * 86400  # the default retention_days
    assert store.cutoffs == [T0 - retention, T0 + 86400 - retention, T0 + 2 * 86400 - retention]
