"""Scheduler timing, exactly: intervals, isolation delay, concurrency, per-model scheduling,
failure tracking and the cooldown breaker, balance pause/resume, restore and reload, on a
virtual clock with a scripted probe runner (no network, no real time). The budget's pause is
tested against a real ledger and the simulator in tests/test_budget_pause.py."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from exporter.clock import VirtualClock
from exporter.config import Config, load_config
from exporter.recorder import Recorder, Restored
from exporter.report import RunReport
from exporter.results import ErrorType, ProbeResult, RequestRecord, ResponseMeta, Verdict
from exporter.runtime import ProviderRuntime
from exporter.scheduler import Scheduler
from exporter.state import State
from exporter.store import ModelState, Store

pytestmark = pytest.mark.anyio
T0 = 1_700_000_000.0


def make_config(tmp_path: Path, provider: str = "", **probes: str) -> Config:
    enabled = probes or {"basic": "5m"}
    lines = [f'[storage]\npath = "{tmp_path / "db.sqlite"}"\n']
    for name in ("basic", "prompt_sizes", "partial", "persistence", "ttl"):
        if name in enabled:
            interval, _, timeout = enabled[name].partition("/")  # "5s/4s": with a timeout
            timeout = timeout or ("2m" if name == "ttl" else "30s")  # ttl's delays need 46 s
            lines.append(f'[probes.{name}]\ninterval = "{interval}"\ntimeout = "{timeout}"\n')
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
        self.metas: Callable[[str], list[ResponseMeta]] = lambda model: []

    async def __call__(self, runtime: ProviderRuntime, model: str, probe: str) -> RunReport:
        start = self.clock.time()
        self.calls.append((start - T0, model, probe))
        if self.duration:
            await self.clock.sleep(self.duration)
        verdict = self.verdicts(model, sum(1 for c in self.calls if c[1] == model))
        records = self.records(model)
        result = ProbeResult(
            probe=probe,
            provider=runtime.name,
            model=model,
            run_id=f"r{len(self.calls)}",
            verdict=verdict,
            started_at=start,
            finished_at=self.clock.time(),
            error_type=_error_type(records) if verdict is Verdict.ERROR else None,
            requests=records,
        )
        return RunReport.of(result, runtime.price_info(model), self.metas(model))


def _error_type(records: list[RequestRecord]) -> ErrorType:
    """The failed request's error decides, as in a real probe (``error_result``)."""
    return next((r.error_type for r in reversed(records) if r.error_type), ErrorType.API_ERROR)


async def start(
    config: Config, clock: VirtualClock, runner: Runner, **kwargs: Any
) -> tuple[Scheduler, State, httpx.AsyncClient]:
    state = State()
    client = httpx.AsyncClient()
    recorder = kwargs.pop("recorder", None) or Recorder(state, None, None, clock, config)
    scheduler = Scheduler(
        config,
        recorder=recorder,
        budget=None,
        clock=clock,
        client=client,
        runner=runner,
        **kwargs,
    )
    return scheduler, recorder.state, client


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
    caplog.set_level(logging.WARNING, "exporter.recorder")
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
type = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "P_KEY"
models = ["m1"]
balance_currency = "diem"
balance_stop_threshold = 0.5
balance_check_interval = "10m"
"""
    clock = VirtualClock(T0)
    runner = Runner(clock)
    balance = {"diem": 3.0}
    # Every response reports the balance before the request, as Venice's headers do.
    runner.metas = lambda model: [ResponseMeta(balances=dict(balance))]
    config = make_config(tmp_path, provider, basic="1m")
    scheduler, state, client = await start(config, clock, runner)
    checks: list[float] = []
    async with client, anyio.create_task_group() as tg:
        tg.start_soon(scheduler.run)
        await clock.settle()
        worker = scheduler.workers["p"]

        async def check() -> dict[str, float]:
            checks.append(clock.time() - T0)
            if len(checks) == 2:
                balance["diem"] = 3.0  # topped up before the second check
            return dict(balance)

        worker.check_balance = check
        await clock.advance(61)
        assert [c[0] for c in runner.calls] == [0, 60]
        balance["diem"] = 0.2  # the run at 120 reports a balance below the threshold
        await clock.advance(3000)
        # Paused after 120: balance checks every 10 minutes, probing resumes after the second.
        assert checks == [120, 720]
        assert [c[0] for c in runner.calls][:4] == [0, 60, 120, 720]
        assert state.paused("p") == {"balance": False, "budget": False, "outage": False}
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
        # The first 402 stops the provider: m2 is not even tried.
        assert runner.calls == [(0, "m1", "basic")]
        assert state.paused("p")["balance"] is True
        scheduler.stop()
        await clock.advance(600)


async def _never_ok() -> dict[str, float]:
    from exporter.transport import TransportError

    raise TransportError(ErrorType.INSUFFICIENT_FUNDS, "HTTP 402", 402)


async def test_restored_runs_and_cooldowns_hold_after_a_restart(tmp_path: Path) -> None:
    clock = VirtualClock(T0)
    runner = Runner(clock)
    config = make_config(tmp_path)
    state = State()
    async with await Store.open(tmp_path / "db.sqlite", clock=clock) as store:
        # What the previous process left: m2 failed five times and cools down until T0+500.
        await store.save_model_state(ModelState("p", "m2", 5, 0, T0 + 500))
        recorder = Recorder(state, store, None, clock, config)
        await recorder.restore()
    recorder.store = None  # closed; the run below needs no history
    restored = Restored(last_started={("p", "m1", "basic"): T0 - 100})
    await run_for(config, 700, runner, clock, restored=restored, recorder=recorder)
    # m1 ran 100 s before the restart: next at 200. m2 is in cooldown until 500, then its
    # trial run; m1 (due at 500 too) follows after the isolation delay.
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
            recorder=Recorder(State(), store, None, clock, config),  # type: ignore[arg-type]
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


ALL_PROBES = dict.fromkeys(("basic", "prompt_sizes", "partial", "persistence", "ttl"), "5m")


async def test_cooldown_is_a_breaker_one_trial_run_decides(tmp_path: Path) -> None:
    provider = """[[providers]]
name = "p"
type = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "P_KEY"
models = ["m1"]
isolation_delay = "1s"
"""
    clock = VirtualClock(T0)
    runner = Runner(clock)
    runner.verdicts = lambda model, n: Verdict.ERROR if n <= 6 else Verdict.WORKS
    config = make_config(tmp_path, provider, **ALL_PROBES)
    scheduler, state, client = await start(config, clock, runner)
    async with client, anyio.create_task_group() as tg:
        tg.start_soon(scheduler.run)
        await clock.advance(60)
        # Five probes due at once, five failures, one second apart: the breaker opens.
        assert [c[0] for c in runner.calls] == [0, 1, 2, 3, 4]
        await clock.advance(4 + 900 - 60 - 1)  # the cooldown runs from the 5th failure, at 4 s
        assert len(runner.calls) == 5  # nothing while it is open
        await clock.advance(30)
        # Expired at 904: exactly one trial run (basic), it fails, straight back to cooldown.
        assert runner.calls[5:] == [(904, "m1", "basic")]
        snap = next(m for m in state.snapshot().models if m.model == "m1")
        assert snap.cooldown_until == T0 + 904 + 900
        await clock.advance(900)
        # The second trial succeeds: back on schedule, every overdue probe runs again.
        assert runner.calls[6] == (1804, "m1", "basic")
        assert [c[2] for c in runner.calls[7:11]] == [
            "prompt_sizes",
            "partial",
            "persistence",
            "ttl",
        ]
        scheduler.stop()
        await clock.advance(60)


async def test_a_slow_model_delays_only_itself(tmp_path: Path) -> None:
    provider = """[[providers]]
name = "p"
type = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "P_KEY"
models = ["fast1", "fast2", "slow"]
isolation_delay = "0s"
concurrency = 2
"""
    clock = VirtualClock(T0)

    class SlowRunner(Runner):
        async def __call__(self, runtime: ProviderRuntime, model: str, probe: str) -> RunReport:
            self.duration = 20.0 if model == "slow" else 0.5
            return await super().__call__(runtime, model, probe)

    runner = SlowRunner(clock)
    config = make_config(tmp_path, provider, basic="5s/4s")
    await run_for(config, 120, runner, clock)
    for model in ("fast1", "fast2"):
        starts = [c[0] for c in runner.calls if c[1] == model]
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        # Every 5 s (the interval), although one slot is held by the slow model for 20 s.
        assert max(gaps) <= 5.5, (model, gaps)
        assert len(starts) >= 20
    slow = [c[0] for c in runner.calls if c[1] == "slow"]
    assert all(b - a >= 20 for a, b in itertools.pairwise(slow))


PROVIDER_Q = """[[providers]]
name = "q"
type = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "Q_KEY"
models = ["x"]
isolation_delay = "{delay}"
"""


async def test_reloads_replace_the_worker_once_and_coalesce(tmp_path: Path) -> None:
    clock = VirtualClock(T0)
    runner = Runner(clock, duration=8)  # shorter than the 10 s grace
    config = make_config(tmp_path, PROVIDER_Q.format(delay="1s"), basic="30s/25s")
    scheduler, _state, client = await start(config, clock, runner)
    async with client, anyio.create_task_group() as tg:
        tg.start_soon(scheduler.run)
        await clock.advance(5)  # x's first run (0 to 8 s) is in flight
        first = scheduler.workers["q"]
        for delay in ("2s", "3s", "4s"):  # a change mid-probe, then two more back to back
            changed = make_config(tmp_path, PROVIDER_Q.format(delay=delay), basic="30s/25s")
            scheduler.apply(changed)
        await clock.advance(1)
        assert first.runtime.retired  # nothing more is sent by the old worker
        assert scheduler.workers["q"] is first  # still draining: no second worker yet
        await clock.advance(20)
        # The old worker finished its run; ONE new worker, with the last configuration.
        worker = scheduler.workers["q"]
        assert worker is not first
        assert first.done.is_set()
        assert worker.pconf.isolation_delay == 4.0
        assert not worker.runtime.retired
        assert [c[0] for c in runner.calls] == [0]  # next due 30 s after the last start
        await clock.advance(30)
        assert [c[0] for c in runner.calls] == [0, 30]
        scheduler.stop()
        await clock.advance(60)


async def test_a_changed_interval_applies_from_the_last_run(tmp_path: Path) -> None:
    clock = VirtualClock(T0)
    runner = Runner(clock)
    config = make_config(tmp_path, PROVIDER_Q.format(delay="0s"), basic="30s/25s")
    scheduler, _, client = await start(config, clock, runner)
    async with client, anyio.create_task_group() as tg:
        tg.start_soon(scheduler.run)
        await clock.advance(70)
        assert [c[0] for c in runner.calls] == [0, 30, 60]
        scheduler.apply(make_config(tmp_path, PROVIDER_Q.format(delay="0s"), basic="10m"))
        await clock.advance(3600)
        # No old 30 s cadence and no run at reload: 10 minutes after the last start, then on.
        assert [c[0] for c in runner.calls] == [0, 30, 60, 660, 1260, 1860, 2460, 3060, 3660]
        scheduler.stop()
        await clock.advance(60)


async def test_a_removed_provider_stops_within_its_grace(tmp_path: Path) -> None:
    clock = VirtualClock(T0)
    runner = Runner(clock, duration=600)  # far longer than the grace
    config = make_config(tmp_path, PROVIDER_Q.format(delay="0s"), basic="30m")
    other = make_config(tmp_path, basic="30m")  # provider p only
    scheduler, state, client = await start(config, clock, runner)
    async with client, anyio.create_task_group() as tg:
        tg.start_soon(scheduler.run)
        await clock.advance(5)
        worker = scheduler.workers["q"]
        scheduler.apply(other)
        # At once: not counted (/readyz), its series gone, nothing more sent.
        assert "q" not in scheduler.workers
        assert "q" not in {p.name for p in state.snapshot().providers}
        assert worker.runtime.retired
        await clock.advance(10)  # the default grace is 10 s: its run was cancelled
        assert worker.done.is_set()
        assert "q" not in {p.name for p in state.snapshot().providers}
        assert set(scheduler.workers) == {"p"}
        scheduler.stop()
        await clock.advance(900)


# --- the provider-wide outage breaker (exporter.outage) ---------------------------------------

THREE_MODELS = """[[providers]]
name = "p"
type = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "P_KEY"
models = ["m1", "m2", "m3"]
isolation_delay = "1s"
"""


def _failed(status: int | None, error_type: ErrorType) -> list[RequestRecord]:
    return [RequestRecord("prime", True, attempts=3, status=status, error_type=error_type)]


def _models(state: State) -> dict[str, tuple[int, float]]:
    """Per model: (consecutive failures, cooldown until)."""
    return {m.model: (m.consecutive_failures, m.cooldown_until) for m in state.snapshot().models}


async def test_an_outage_pauses_the_provider_trials_one_model_at_a_time_and_resumes_all(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every model fails with 503 or a connection error: after one failed run of each (the
    streak reaches the models it has not covered first) the provider is paused, one trial run
    every outage_retry (5 min) takes the models in turn, and the first success resumes every
    model; meanwhile no model's own failures grow into a cooldown."""
    clock = VirtualClock(T0)
    runner = Runner(clock)
    down = {"up": False}
    outage = {"m1": _failed(503, ErrorType.API_ERROR), "m2": _failed(None, ErrorType.CONNECTION)}
    outage["m3"] = _failed(None, ErrorType.TIMEOUT)
    runner.verdicts = lambda model, n: Verdict.WORKS if down["up"] else Verdict.ERROR
    runner.records = lambda model: [] if down["up"] else outage[model]
    config = make_config(tmp_path, THREE_MODELS, **ALL_PROBES)
    scheduler, state, client = await start(config, clock, runner)
    caplog.set_level(logging.INFO, "exporter.recorder")
    async with client, anyio.create_task_group() as tg:
        tg.start_soon(scheduler.run)
        await clock.advance(10)
        # Fifteen probes were due at once: basic of m1, m2, m3, then the breaker opened.
        assert runner.calls == [(0, "m1", "basic"), (1, "m2", "basic"), (2, "m3", "basic")]
        assert state.paused("p")["outage"] is True
        assert "p: every model failed with connection errors, timeouts or 5xx" in caplog.text
        await clock.advance(290)
        assert len(runner.calls) == 3  # open: nothing until 2 + 300
        await clock.advance(1200)
        # Half-open every 300 s: exactly one trial run, the models in turn, their first probe.
        assert runner.calls[3:] == [
            (302, "m1", "basic"),
            (602, "m2", "basic"),
            (902, "m3", "basic"),
            (1202, "m1", "basic"),
        ]
        # No per-model cooldown storm: the trials' failures are the outage's.
        assert _models(state) == {"m1": (1, 0.0), "m2": (1, 0.0), "m3": (1, 0.0)}
        assert state.paused("p")["outage"] is True
        down["up"] = True
        await clock.advance(300)
        # The trial at 1502 succeeds: every model resumes, overdue probes first.
        assert runner.calls[7] == (1502, "m2", "basic")
        assert state.paused("p")["outage"] is False
        assert "p: outage over: m2 basic got an answer" in caplog.text
        resumed = runner.calls[8:]
        assert {(m, p) for _, m, p in resumed} >= {
            (m, p) for m in ("m1", "m2", "m3") for p in ALL_PROBES if p != "basic"
        }
        assert all(t >= 1503 for t, _, _ in resumed)
        # Their successes reset the one failure each had from the streak.
        assert _models(state) == {"m1": (0, 0.0), "m2": (0, 0.0), "m3": (0, 0.0)}
        scheduler.stop()
        await clock.advance(600)


@pytest.mark.parametrize(
    "others",
    [
        pytest.param([], id="the-other-models-work"),
        pytest.param(_failed(404, ErrorType.API_ERROR), id="the-provider-answers-404"),
        pytest.param(_failed(401, ErrorType.AUTH), id="the-provider-answers-401"),
    ],
)
async def test_a_model_problem_is_not_an_outage(
    tmp_path: Path, others: list[RequestRecord]
) -> None:
    """m1 fails with 500s; the others work, or fail in a way that proves the provider answers:
    the streak never covers every model, the provider is never paused, and m1 gets its own
    cooldown after five failures, as before."""
    clock = VirtualClock(T0)
    runner = Runner(clock)
    runner.verdicts = lambda model, n: (
        Verdict.WORKS if model != "m1" and not others else (Verdict.ERROR)
    )
    runner.records = lambda model: _failed(500, ErrorType.API_ERROR) if model == "m1" else others
    config = make_config(tmp_path, THREE_MODELS, basic="1m")
    scheduler, state, client = await start(config, clock, runner)
    async with client, anyio.create_task_group() as tg:
        tg.start_soon(scheduler.run)
        for _ in range(6):
            await clock.advance(60)
            assert state.paused("p")["outage"] is False
        assert [c[0] for c in runner.calls if c[1] == "m1"] == [0, 60, 120, 180, 240]
        assert _models(state)["m1"] == (5, T0 + 240 + 900)
        assert not scheduler.recorder.outage("p").open
        scheduler.stop()
        await clock.advance(600)


async def test_the_outage_breaker_can_be_turned_off(tmp_path: Path) -> None:
    clock = VirtualClock(T0)
    runner = Runner(clock)
    runner.verdicts = lambda model, n: Verdict.ERROR
    runner.records = lambda model: _failed(None, ErrorType.CONNECTION)
    config = make_config(tmp_path, THREE_MODELS + "[scheduler]\noutage_after = 0\n", basic="1m")
    _, state = await run_for(config, 245, runner, clock)
    # Each model on its own: five failures each, five cooldowns; no outage pause.
    assert state.paused("p")["outage"] is False
    assert {m: f for m, (f, _) in _models(state).items()} == {"m1": 5, "m2": 5, "m3": 5}
