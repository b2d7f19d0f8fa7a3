"""The budget against a real SQLite ledger: accounting, windows, crashes, other processes."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from exporter.budget import (
    Budget,
    BudgetLimits,
    Reservation,
    nano_to_usd,
    usd_to_nano,
    utc_windows,
)
from exporter.clock import FakeClock
from exporter.store import Store
from exporter.store.engine import integrity_problems

REPO = Path(__file__).resolve().parent.parent
# Child processes import the package from this checkout, whatever else the environment holds.
CHILD_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
}
DAY = 86_400
JAN_31_235959 = 1_706_745_599.0  # 2024-01-31 23:59:59 UTC
FEB_10_235959 = 1_707_609_599.0  # 2024-02-10 23:59:59 UTC
NOV_30_2000 = 1_701_374_400.0  # 2023-11-30 20:00:00 UTC


@pytest.fixture
def anyio_backend() -> str:
    # aiosqlite runs on asyncio only.
    return "asyncio"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "budget.db"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(FEB_10_235959 - 3600)


@pytest.fixture
async def store(db_path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    async with await Store.open(db_path, clock=clock) as opened:
        yield opened


def query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def used(budget: Budget, provider: str = "venice") -> dict[str, float]:
    snap = budget.snapshot()[provider]
    return {f"{u.window}_{u.unit}": u.used for u in snap.usage}


def assert_ledger_within(path: Path, limits: BudgetLimits, provider: str = "venice") -> None:
    """The invariant, computed from the ledger rows themselves: per window, settled actual
    plus open reserved amounts stay within every limit, and the running totals agree."""
    counted = "CASE WHEN settled = 1 THEN actual_{0} ELSE reserved_{0} END"
    ledger_limits = limits.ledger_limits()
    for kind, limit_tokens, limit_nano in (
        ("day", ledger_limits.day_tokens, ledger_limits.day_nanousd),
        ("month", ledger_limits.month_tokens, ledger_limits.month_nanousd),
    ):
        rows = query(
            path,
            f"SELECT {kind}_start, sum({counted.format('tokens')}), "  # noqa: S608
            f"sum({counted.format('nanousd')}) FROM budget_ledger WHERE provider = ? "
            f"GROUP BY {kind}_start",
            (provider,),
        )
        for start, tokens, nanousd in rows:
            if limit_tokens is not None:
                assert tokens <= limit_tokens, (kind, start)
            if limit_nano is not None:
                assert nanousd <= limit_nano, (kind, start)
            totals = query(
                path,
                "SELECT tokens, nanousd FROM budget_windows WHERE "
                "provider = ? AND kind = ? AND start = ?",
                (provider, kind, start),
            )
            assert totals == [(tokens, nanousd)], (kind, start)


# --- units and windows -----------------------------------------------------------------


def test_usd_is_counted_in_exact_nano_usd() -> None:
    assert usd_to_nano(0.3, rounding="ROUND_CEILING") == 300_000_000
    assert usd_to_nano(0.1, rounding="ROUND_CEILING") + usd_to_nano(
        0.2, rounding="ROUND_CEILING"
    ) == usd_to_nano(0.3, rounding="ROUND_CEILING")
    # Below a nano: amounts round up, limits down (both conservative).
    assert usd_to_nano(1e-10, rounding="ROUND_CEILING") == 1
    assert usd_to_nano(1.0000000009, rounding="ROUND_FLOOR") == 1_000_000_000
    assert usd_to_nano(None, rounding="ROUND_FLOOR") == 0
    assert nano_to_usd(300_000_000) == 0.3


@pytest.mark.parametrize(
    ("at", "day", "day_end", "month", "month_end"),
    [
        # 23:59:59 is still the old day; the end is exclusive.
        (JAN_31_235959, "2024-01-31", "2024-02-01", "2024-01-01", "2024-02-01"),
        (JAN_31_235959 + 1, "2024-02-01", "2024-02-02", "2024-02-01", "2024-03-01"),
        (1_709_208_000.0, "2024-02-29", "2024-03-01", "2024-02-01", "2024-03-01"),  # leap day
        (1_704_067_199.0, "2023-12-31", "2024-01-01", "2023-12-01", "2024-01-01"),  # new year
    ],
)
def test_windows_are_utc_calendar_days_and_months(
    at: float, day: str, day_end: str, month: str, month_end: str
) -> None:
    def epoch(date: str) -> int:
        return int(datetime.fromisoformat(date).replace(tzinfo=UTC).timestamp())

    windows = utc_windows(at)
    assert (windows.day_start, windows.day_end) == (epoch(day), epoch(day_end))
    assert (windows.month_start, windows.month_end) == (epoch(month), epoch(month_end))


def test_limits_validate_and_zero_means_unlimited() -> None:
    with pytest.raises(ValueError, match="daily_usd must be a non-negative number"):
        BudgetLimits(daily_usd=-1.0)
    with pytest.raises(ValueError, match="monthly_tokens"):
        BudgetLimits(monthly_tokens=-5)
    with pytest.raises(ValueError, match="monthly_usd"):
        BudgetLimits(monthly_usd=float("nan"))
    assert BudgetLimits(daily_tokens=0, monthly_usd=0.0).ledger_limits().unlimited
    assert BudgetLimits().ledger_limits().unlimited
    # A positive limit too small to count is "nothing allowed", not "unlimited".
    assert BudgetLimits(daily_usd=1e-12).ledger_limits().day_nanousd == 0


# --- accounting ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_exact_accounting_and_denial_at_the_limit(
    store: Store, db_path: Path, clock: FakeClock
) -> None:
    limits = BudgetLimits(daily_tokens=100, daily_usd=1.0)
    budget = Budget(store, {"venice": limits}, clock)
    await budget.load()
    assert used(budget) == {"day_tokens": 0, "day_usd": 0, "month_tokens": 0, "month_usd": 0}

    first = await budget.reserve("venice", 60, 0.3)
    second = await budget.reserve("venice", 40, 0.7)  # exactly at both limits
    assert first is not None
    assert second is not None
    assert used(budget) == {
        "day_tokens": 100,
        "day_usd": 1.0,
        "month_tokens": 100,
        "month_usd": 1.0,
    }
    snap = budget.snapshot()["venice"]
    assert snap.exhausted
    assert snap.get("day", "tokens").limit == 100
    assert snap.get("month", "usd").limit is None
    # Committed before reserve() returned: another connection sees both rows.
    assert query(
        db_path, "SELECT reserved_tokens, reserved_nanousd, settled FROM budget_ledger ORDER BY id"
    ) == [(60, 300_000_000, 0), (40, 700_000_000, 0)]

    assert not budget.would_fit("venice", 1, 0.0)
    assert await budget.reserve("venice", 1, 0.0) is None  # tokens
    assert await budget.reserve("venice", 0, 1e-9) is None  # one nano-USD
    assert await budget.reserve("venice", 0, 0.0) is not None  # nothing costs nothing
    assert query(db_path, "SELECT count(*) FROM budget_ledger") == [(3,)]
    assert_ledger_within(db_path, limits)


@pytest.mark.anyio
async def test_settle_lower_higher_and_unknown(
    store: Store, db_path: Path, clock: FakeClock
) -> None:
    limits = BudgetLimits(daily_tokens=100, daily_usd=1.0)
    budget = Budget(store, {"venice": limits}, clock)
    a = await budget.reserve("venice", 50, 0.5)
    b = await budget.reserve("venice", 50, 0.5)
    assert a is not None
    assert b is not None
    assert await budget.reserve("venice", 10, 0.0) is None
    assert budget.snapshot()["venice"].exhausted

    # Lower: the difference is given back.
    await budget.settle(a, tokens=20, usd=0.125)
    assert used(budget)["day_tokens"] == 70
    assert used(budget)["day_usd"] == 0.625
    assert not budget.snapshot()["venice"].exhausted  # the denied 10 tokens would fit now
    # Unknown (None): the reserved amount stays spent, per unit.
    await budget.settle(b, tokens=None, usd=0.25)
    assert used(budget)["day_tokens"] == 70
    assert used(budget)["day_usd"] == 0.375
    # Settling again changes nothing.
    await budget.settle(a, tokens=0, usd=0.0)
    assert used(budget)["day_tokens"] == 70
    assert query(
        db_path, "SELECT actual_tokens, actual_nanousd, settled FROM budget_ledger ORDER BY id"
    ) == [(20, 125_000_000, 1), (50, 250_000_000, 1)]

    # Higher than reserved: the ledger records the truth, and nothing more is granted.
    c = await budget.reserve("venice", 30, 0.1)
    assert c is not None
    await budget.settle(c, tokens=45, usd=0.1)
    assert used(budget)["day_tokens"] == 115
    assert budget.snapshot()["venice"].exhausted
    assert await budget.reserve("venice", 1, 0.0) is None
    assert query(db_path, "SELECT tokens FROM budget_windows WHERE kind = 'day'") == [(115,)]


@pytest.mark.anyio
async def test_unlimited_and_unknown_providers_are_recorded_but_never_denied(
    store: Store, db_path: Path, clock: FakeClock
) -> None:
    budget = Budget(store, {"local": BudgetLimits()}, clock)
    for _ in range(3):
        reservation = await budget.reserve("local", 1_000_000, 100.0)
        assert reservation is not None
        assert reservation.id is not None
    assert await budget.reserve("unconfigured", 5, 0.0) is not None
    snap = budget.snapshot()
    assert set(snap) == {"local", "unconfigured"}
    assert not snap["local"].exhausted
    assert snap["local"].get("day", "tokens").limit is None
    assert snap["local"].get("day", "tokens").used == 3_000_000
    assert budget.would_fit("local", 10**12, 10**6)


@pytest.mark.anyio
async def test_limits_can_change_at_runtime(store: Store, clock: FakeClock) -> None:
    budget = Budget(store, {"venice": BudgetLimits(daily_tokens=100)}, clock)
    assert await budget.reserve("venice", 80, 0.0) is not None
    budget.set_limits({"venice": BudgetLimits(daily_tokens=50)})
    assert budget.snapshot()["venice"].exhausted
    assert await budget.reserve("venice", 1, 0.0) is None
    budget.set_limits({"venice": BudgetLimits(daily_tokens=200)})
    assert await budget.reserve("venice", 120, 0.0) is not None


@pytest.mark.anyio
async def test_amounts_must_be_non_negative(store: Store, clock: FakeClock) -> None:
    budget = Budget(store, {}, clock)
    with pytest.raises(ValueError, match="non-negative"):
        await budget.reserve("venice", -1, 0.0)
    with pytest.raises(ValueError, match="non-negative"):
        budget.would_fit("venice", 1, float("inf"))


# --- windows ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_day_rolls_over_at_utc_midnight_month_keeps_counting(
    db_path: Path,
) -> None:
    clock = FakeClock(FEB_10_235959)
    limits = BudgetLimits(daily_tokens=100, monthly_tokens=250)
    async with await Store.open(db_path, clock=clock) as store:
        budget = Budget(store, {"venice": limits}, clock)
        late = await budget.reserve("venice", 100, 0.0)
        assert late is not None
        assert await budget.reserve("venice", 1, 0.0) is None

        clock.advance(1)  # 2024-02-11 00:00:00 UTC
        # No database call needed for the snapshot to roll over.
        assert used(budget)["day_tokens"] == 0
        assert used(budget)["month_tokens"] == 100
        assert not budget.snapshot()["venice"].exhausted
        assert budget.would_fit("venice", 100, 0.0)
        assert await budget.reserve("venice", 100, 0.0) is not None
        # Settling yesterday's reservation after midnight changes yesterday and the month.
        await budget.settle(late, tokens=40, usd=None)
        assert used(budget) == {
            "day_tokens": 100,
            "day_usd": 0,
            "month_tokens": 140,
            "month_usd": 0,
        }
        assert query(
            db_path, "SELECT kind, start, tokens FROM budget_windows ORDER BY kind, start"
        ) == [
            ("day", 1_707_523_200, 40),
            ("day", 1_707_609_600, 100),
            ("month", 1_706_745_600, 140),
        ]
        # The month limit still binds across days.
        clock.advance(DAY)
        assert await budget.reserve("venice", 100, 0.0) is not None  # month: 240
        clock.advance(DAY)  # a fresh day, an almost full month
        assert await budget.reserve("venice", 11, 0.0) is None
        assert await budget.reserve("venice", 10, 0.0) is not None
        assert_ledger_within(db_path, limits)


@pytest.mark.anyio
async def test_month_rolls_over_at_the_first_utc(db_path: Path) -> None:
    clock = FakeClock(JAN_31_235959)
    limits = BudgetLimits(monthly_tokens=100, monthly_usd=1.0)
    async with await Store.open(db_path, clock=clock) as store:
        budget = Budget(store, {"venice": limits}, clock)
        assert await budget.reserve("venice", 100, 1.0) is not None
        assert await budget.reserve("venice", 0, 0.01) is None
        clock.advance(1)  # 2024-02-01 00:00:00 UTC
        assert used(budget)["month_tokens"] == 0
        assert await budget.reserve("venice", 100, 1.0) is not None
        # A restart in February counts February only.
        reloaded = Budget(store, {"venice": limits}, clock)
        await reloaded.load()
        assert used(reloaded)["month_usd"] == 1.0
        assert used(reloaded)["month_tokens"] == 100
        assert_ledger_within(db_path, limits)


# --- crashes and concurrency -----------------------------------------------------------


@pytest.mark.anyio
async def test_unsettled_reservations_of_a_crashed_process_count_in_full(db_path: Path) -> None:
    clock = FakeClock(FEB_10_235959 - 3600)
    limits = {"venice": BudgetLimits(daily_tokens=100, daily_usd=1.0)}
    store = await Store.open(db_path, clock=clock)
    budget = Budget(store, limits, clock)
    assert await budget.reserve("venice", 70, 0.5) is not None  # request sent, then: crash
    settled = await budget.reserve("venice", 20, 0.25)
    assert settled is not None
    await budget.settle(settled, tokens=5, usd=0.05)
    await store.close()

    async with await Store.open(db_path, clock=clock) as store:
        restarted = Budget(store, limits, clock)
        await restarted.load()
        assert used(restarted)["day_tokens"] == 75
        assert used(restarted)["day_usd"] == 0.55
        assert not restarted.would_fit("venice", 26, 0.0)
        assert await restarted.reserve("venice", 26, 0.0) is None
        assert await restarted.reserve("venice", 25, 0.45) is not None
    assert_ledger_within(db_path, limits["venice"])


@pytest.mark.anyio
@pytest.mark.parametrize("seed", range(6))
async def test_random_interleavings_never_exceed_the_limits(db_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    clock = FakeClock(NOV_30_2000)  # the steps cross midnight and the month boundary
    limits = BudgetLimits(daily_tokens=1_000, monthly_tokens=2_500, daily_usd=1.0, monthly_usd=2.0)
    store = await Store.open(db_path, clock=clock)
    budget = Budget(store, {"venice": limits}, clock)
    await budget.load()
    open_reservations: list[Reservation] = []
    granted = denied = crashes = 0
    try:
        for _ in range(250):
            action = rng.random()
            if action < 0.5:
                tokens = rng.randint(0, 300)
                usd = round(rng.uniform(0, 0.3), 6)
                fits = budget.would_fit("venice", tokens, usd)
                reservation = await budget.reserve("venice", tokens, usd)
                # One process: the in-memory pre-check agrees with the database.
                assert (reservation is not None) == fits
                if reservation is None:
                    denied += 1
                else:
                    granted += 1
                    open_reservations.append(reservation)
            elif action < 0.8 and open_reservations:
                reservation = open_reservations.pop(rng.randrange(len(open_reservations)))
                tokens_actual = rng.choice([None, rng.randint(0, reservation.tokens)])
                usd_actual = rng.choice([None, round(rng.uniform(0, reservation.usd), 9)])
                await budget.settle(reservation, tokens=tokens_actual, usd=usd_actual)
            elif action < 0.9:
                # Crash: the open reservations are never settled; a new process takes over.
                crashes += 1
                await store.close()
                open_reservations.clear()
                store = await Store.open(db_path, clock=clock)
                budget = Budget(store, {"venice": limits}, clock)
                await budget.load()
            else:
                clock.advance(rng.choice([600, 3 * 3600, 9 * 3600]))
            assert_ledger_within(db_path, limits)
    finally:
        await store.close()
    assert granted > 0
    assert denied > 0


@pytest.mark.anyio
async def test_two_connections_cannot_over_reserve(db_path: Path) -> None:
    clock = FakeClock(FEB_10_235959 - 3600)
    limits = BudgetLimits(daily_tokens=100)
    async with (
        await Store.open(db_path, clock=clock) as store_a,
        await Store.open(db_path, clock=clock) as store_b,
    ):
        budgets = [
            Budget(store_a, {"venice": limits}, clock),
            Budget(store_b, {"venice": limits}, clock),
        ]
        # Sequentially: B's in-memory view is stale, the database decides.
        assert await budgets[0].reserve("venice", 60, 0.0) is not None
        assert budgets[1].would_fit("venice", 60, 0.0)  # stale
        assert await budgets[1].reserve("venice", 60, 0.0) is None
        assert used(budgets[1])["day_tokens"] == 60  # refreshed by the answer

        # Concurrently, on two connections (two threads doing SQLite work at once).
        results: list[Reservation | None] = []

        async def grab(budget: Budget) -> None:
            results.append(await budget.reserve("venice", 7, 0.0))

        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(grab, budgets[i % 2])
    assert sum(r is not None for r in results) == (100 - 60) // 7
    assert_ledger_within(db_path, limits)
    assert query(db_path, "SELECT sum(reserved_tokens) FROM budget_ledger") == [(95,)]


CHILD = """
import sys
import anyio
from pathlib import Path
from exporter.budget import Budget, BudgetLimits
from exporter.clock import FakeClock
from exporter.store import Store

async def main(path: str, ready: str, go: str, attempts: int, seed: int) -> None:
    import random
    rng = random.Random(seed)
    clock = FakeClock({now})
    async with await Store.open(path, clock=clock, busy_timeout=30.0) as store:
        budget = Budget(store, {{"venice": BudgetLimits(daily_tokens={limit})}}, clock)
        await budget.load()
        Path(ready).touch()
        for _ in range(2000):  # wait for the others, bounded (20 s)
            if Path(go).exists():
                break
            await anyio.sleep(0.01)
        granted = 0
        for _ in range(attempts):
            reservation = await budget.reserve("venice", 7, 0.0)
            if reservation is None:
                continue
            granted += 1
            await budget.settle(reservation, tokens=rng.choice([None, 7, 3]), usd=None)
        print(granted)

anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]),
          backend="asyncio")
"""

KILLED_CHILD = """
import os, signal, sys
import anyio
from exporter.budget import Budget, BudgetLimits
from exporter.clock import FakeClock
from exporter.store import Store

async def main(path: str) -> None:
    clock = FakeClock({now})
    store = await Store.open(path, clock=clock)
    budget = Budget(store, {{"venice": BudgetLimits(daily_tokens=100)}}, clock)
    assert await budget.reserve("venice", 60, 0.5) is not None
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no flush, no settle

anyio.run(main, sys.argv[1], backend="asyncio")
"""


@pytest.mark.slow
@pytest.mark.anyio
async def test_processes_sharing_the_file_cannot_over_reserve(tmp_path: Path) -> None:
    db_path = tmp_path / "shared.db"
    now, limit, processes, attempts = FEB_10_235959 - 3600, 500, 4, 60
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(now=now, limit=limit))
    go = tmp_path / "go"
    outputs: list[str] = []

    async def child(index: int) -> None:
        result = await anyio.run_process(
            [
                sys.executable,
                str(script),
                str(db_path),
                str(tmp_path / f"ready-{index}"),
                str(go),
                str(attempts),
                str(index),
            ],
            cwd=REPO,
            env=CHILD_ENV,
            check=True,
        )
        outputs.append(result.stdout.decode().strip())

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for index in range(processes):
                tg.start_soon(child, index)
            # Release them together, once all have the database open.
            for _ in range(3000):
                if all((tmp_path / f"ready-{i}").exists() for i in range(processes)):
                    break
                await anyio.sleep(0.01)
            go.touch()

    granted = sum(int(out) for out in outputs)
    assert len(outputs) == processes
    # Demand (4 × 60 × 7 tokens) far exceeds the limit: it was reached, never passed.
    assert granted >= limit // 7
    assert_ledger_within(db_path, BudgetLimits(daily_tokens=limit))
    assert query(db_path, "SELECT count(*) FROM budget_ledger") == [(granted,)]
    assert query(db_path, "SELECT count(*) FROM budget_ledger WHERE settled = 0") == [(0,)]


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_reservation_survives_sigkill(tmp_path: Path) -> None:
    db_path = tmp_path / "killed.db"
    now = FEB_10_235959 - 3600
    script = tmp_path / "killed.py"
    script.write_text(KILLED_CHILD.format(now=now))
    with anyio.fail_after(30):
        result = await anyio.run_process(
            [sys.executable, str(script), str(db_path)],
            cwd=REPO,
            env=CHILD_ENV,
            check=False,
        )
    assert result.returncode == -signal.SIGKILL
    clock = FakeClock(now)
    async with await Store.open(db_path, clock=clock) as store:
        budget = Budget(store, {"venice": BudgetLimits(daily_tokens=100)}, clock)
        await budget.load()
        assert used(budget)["day_tokens"] == 60
        assert await budget.reserve("venice", 41, 0.0) is None
        assert await store.read("read", integrity_problems, "unavailable") == "ok"


@pytest.mark.anyio
async def test_a_ledger_that_cannot_be_written_denies_and_settles_later(
    db_path: Path, clock: FakeClock
) -> None:
    errors: list[str] = []
    limits = BudgetLimits(daily_tokens=100)
    async with await Store.open(
        db_path, clock=clock, on_error=errors.append, busy_timeout=0.05
    ) as store:
        budget = Budget(store, {"venice": limits}, clock)
        reservation = await budget.reserve("venice", 80, 0.0)
        assert reservation is not None
        holder = sqlite3.connect(db_path, isolation_level=None, timeout=0)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            assert await budget.reserve("venice", 10, 0.0) is None
            # The settlement is queued; meanwhile the reservation counts in full.
            await budget.settle(reservation, tokens=20, usd=None)
            assert errors == ["budget", "budget"]
            assert used(budget)["day_tokens"] == 80
            holder.execute("ROLLBACK")
        finally:
            holder.close()
        assert await store.flush() == 0
        reloaded = Budget(store, {"venice": limits}, clock)
        await reloaded.load()
        assert used(reloaded)["day_tokens"] == 20
        assert_ledger_within(db_path, limits)
