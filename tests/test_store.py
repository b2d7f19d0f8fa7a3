"""The SQLite store against real database files: schema, round trips, retention, faults."""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry

from exporter.budget import Budget, BudgetLimits
from exporter.clock import FakeClock
from exporter.results import ErrorType, ProbeResult, RequestRecord, SizeOutcome, Verdict
from exporter.server import DependencyStatus, Readiness, create_app, serve
from exporter.store import (
    MAX_RECENT_RUNS,
    ModelState,
    SchemaTooNewError,
    Store,
    StoreError,
    connect_sqlite,
)
from exporter.store.engine import Engine, integrity_problems
from exporter.store.migrations import MIGRATIONS, Migration, migrate

DAY = 86_400.0
START = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


@pytest.fixture
def anyio_backend() -> str:
    # aiosqlite runs on asyncio only.
    return "asyncio"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "nested" / "exporter.db"


def query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the file through a separate, plain sqlite3 connection."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def run(
    run_id: str,
    *,
    provider: str = "venice",
    model: str = "llama-3.3-70b",
    probe: str = "basic",
    finished_at: float = START,
    verdict: Verdict = Verdict.WORKS,
    hit_ratio: float | None = 0.9,
    error: str | None = None,
) -> ProbeResult:
    return ProbeResult(
        probe=probe,
        provider=provider,
        model=model,
        run_id=run_id,
        verdict=verdict,
        started_at=finished_at - 2.0,
        finished_at=finished_at,
        duration_seconds=2.0,
        hit_ratio=hit_ratio,
        requests=[
            RequestRecord(
                label="prime", cold=True, prompt_tokens=1200, cached_tokens=0, completion_tokens=4
            ),
            RequestRecord(
                label="repeat",
                cold=False,
                prompt_tokens=1200,
                cached_tokens=1080,
                completion_tokens=4,
                hit=True,
            ),
        ],
        error=error,
    )


def rich_run() -> ProbeResult:
    """Every field set, including the awkward ones (float dict keys, enums, None vs 0)."""
    return ProbeResult(
        probe="ttl",
        provider="venice",
        model="qwen-2.5",
        run_id="0f8e-rich",
        verdict=Verdict.FLAKY,
        started_at=START,
        finished_at=START + 12.5,
        duration_seconds=12.5,
        hit_ratio=0.5,
        requests=[
            RequestRecord(
                label="prime",
                cold=True,
                started_at=START,
                status=200,
                attempts=1,
                request_id="req-1",
                streamed=True,
                prompt_tokens=1200,
                cached_tokens=0,
                cache_write_tokens=1100,
                completion_tokens=5,
                latency_seconds=1.25,
                ttfb_seconds=0.25,
                ttft_seconds=0.5,
                hit=False,
                cost={"usd": 0.00125, "diem": 0.0025},
            ),
            RequestRecord(
                label="repeat after 1s",
                cold=False,
                started_at=START + 2,
                status=200,
                attempts=1,
                prompt_tokens=1200,
                cached_tokens=1152,
                cache_write_tokens=None,
                completion_tokens=5,
                latency_seconds=0.5,
                hit=True,
            ),
            RequestRecord(
                label="repeat after 5s",
                cold=False,
                status=429,
                attempts=3,
                error_type=ErrorType.RATE_LIMIT,
                error="429 Too Many Requests",
            ),
        ],
        pollution=True,
        sizes={
            "small": SizeOutcome(1100, Verdict.BELOW_MINIMUM, None, 1100),
            "large": SizeOutcome(4096, Verdict.WORKS, 0.96875, 4100),
        },
        ttl={1.0: True, 5.0: None, 0.5: False},
        first_miss_index=3,
        shared_prefix_tokens=1024,
    )


class Errors(list[str]):
    """on_error sink."""

    def __call__(self, operation: str) -> None:
        self.append(operation)


@pytest.fixture
def errors() -> Errors:
    return Errors()


# --- schema and migrations -------------------------------------------------------------


@pytest.mark.anyio
async def test_open_creates_directories_schema_and_wal(db_path: Path, errors: Errors) -> None:
    async with await Store.open(db_path, clock=FakeClock(START), on_error=errors):
        assert await anyio.Path(db_path).exists()
        assert query(db_path, "PRAGMA journal_mode") == [("wal",)]
        assert query(db_path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
        assert query(db_path, "PRAGMA auto_vacuum") == [(2,)]  # incremental
        tables = {
            name
            for (name,) in query(db_path, "SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        assert {
            "schema_migrations",
            "probe_runs",
            "token_usage",
            "budget_ledger",
            "budget_windows",
            "balances",
            "model_state",
        } <= tables
        indexes = {
            name
            for (name,) in query(db_path, "SELECT name FROM sqlite_master WHERE type = 'index'")
        }
        assert {"probe_runs_target", "probe_runs_finished", "budget_ledger_provider"} <= indexes
    assert errors == []


@pytest.mark.anyio
async def test_reopen_is_idempotent_and_keeps_data(db_path: Path) -> None:
    clock = FakeClock(START)
    async with await Store.open(db_path, clock=clock) as store:
        await store.record_run(run("r1"))
    clock.advance(60)
    async with await Store.open(db_path, clock=clock) as store:
        assert [r.run_id for r in await store.recent_runs()] == ["r1"]
    applied = [(n, START) for n in range(1, len(MIGRATIONS) + 1)]  # at the first open only
    assert query(db_path, "SELECT version, applied_at FROM schema_migrations") == applied
    assert query(db_path, "PRAGMA user_version") == [(len(MIGRATIONS),)]


@pytest.mark.anyio
async def test_a_database_from_a_newer_exporter_is_refused(db_path: Path) -> None:
    async with await Store.open(db_path, clock=FakeClock(START)):
        pass
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(SchemaTooNewError) as caught:
        await Store.open(db_path, clock=FakeClock(START))
    message = str(caught.value)
    assert "99" in message
    assert f"newer than this exporter supports ({len(MIGRATIONS)})" in message
    assert "\n" not in message
    # Refusing did not touch the file.
    assert query(db_path, "PRAGMA user_version") == [(99,)]


@pytest.mark.anyio
async def test_a_failing_migration_is_rolled_back_whole(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    good = Migration("one", ("CREATE TABLE a (x INTEGER)",))
    bad = Migration("two", ("CREATE TABLE b (x INTEGER)", "INSERT INTO nowhere VALUES (1)"))
    async with aiosqlite.connect(path, isolation_level=None) as conn:
        with pytest.raises(sqlite3.OperationalError):
            await migrate(conn, now=START, migrations=(good, bad))
        assert await migrate(conn, now=START, migrations=(good,)) == 1
    tables = {name for (name,) in query(path, "SELECT name FROM sqlite_master")}
    assert "a" in tables
    assert "b" not in tables  # the half-applied migration left nothing behind
    assert query(path, "PRAGMA user_version") == [(1,)]


@pytest.mark.anyio
async def test_two_stores_opening_a_new_file_at_once_migrate_it_once(db_path: Path) -> None:
    stores: list[Store] = []

    async def open_one() -> None:
        stores.append(await Store.open(db_path, clock=FakeClock(START)))

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(open_one)
    for store in stores:
        await store.close()
    assert query(db_path, "SELECT count(*) FROM schema_migrations") == [(len(MIGRATIONS),)]


@pytest.mark.anyio
async def test_unopenable_path_is_a_one_line_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot open database") as caught:
        await Store.open(blocker / "x.db", clock=FakeClock(START))
    assert "\n" not in str(caught.value)


# --- runs ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_record_round_trips_every_field(db_path: Path, errors: Errors) -> None:
    result = rich_run()
    async with await Store.open(db_path, clock=FakeClock(START), on_error=errors) as store:
        await store.record_run(result, spend_usd=0.0125, savings_usd=0.0075)
        assert await store.recent_runs() == [result]
        assert await store.latest_results() == [result]
    async with await Store.open(db_path, clock=FakeClock(START)) as store:
        restored = await store.latest_results()
    assert restored == [result]
    assert restored[0].ttl == {1.0: True, 5.0: None, 0.5: False}
    assert restored[0].requests[2].error_type is ErrorType.RATE_LIMIT
    assert errors == []

    row = query(
        db_path,
        "SELECT run_id, provider, model, probe, verdict, caching_works, "
        "hit_ratio, success, error_type, started_at, finished_at, details "
        "FROM probe_runs",
    )[0]
    assert row[:11] == (
        "0f8e-rich",
        "venice",
        "qwen-2.5",
        "ttl",
        "flaky",
        1,
        0.5,
        1,
        None,
        START,
        START + 12.5,
    )
    assert json.loads(row[11]) == result.to_dict()
    usage = query(
        db_path,
        "SELECT run_id, prompt_tokens, cached_tokens, cache_write_tokens, "
        "completion_tokens, spend_usd, savings_usd, at FROM token_usage",
    )
    # The failed request reported nothing; cache_write only by the prime.
    assert usage == [("0f8e-rich", 2400, 1152, 1100, 10, 0.0125, 0.0075, START + 12.5)]


@pytest.mark.anyio
async def test_usage_keeps_not_reported_apart_from_zero(db_path: Path) -> None:
    result = run("no-cache-fields", verdict=Verdict.NOT_REPORTED, hit_ratio=None)
    for request in result.requests:
        request.cached_tokens = None
    async with await Store.open(db_path, clock=FakeClock(START)) as store:
        await store.record_run(result)
    assert query(
        db_path, "SELECT cached_tokens, cache_write_tokens, prompt_tokens FROM token_usage"
    ) == [(None, None, 2400)]
    assert query(db_path, "SELECT caching_works, success FROM probe_runs") == [(None, 1)]


@pytest.mark.anyio
async def test_recording_the_same_run_twice_keeps_one_row(db_path: Path) -> None:
    async with await Store.open(db_path, clock=FakeClock(START)) as store:
        await store.record_run(run("r1", hit_ratio=0.5))
        await store.record_run(run("r1", hit_ratio=0.75))
        assert [r.hit_ratio for r in await store.recent_runs()] == [0.75]
    assert query(db_path, "SELECT count(*) FROM token_usage") == [(1,)]


@pytest.mark.anyio
async def test_recent_runs_filters_orders_and_limits(db_path: Path) -> None:
    runs = [
        run("a1", provider="a", model="m1", probe="basic", finished_at=START + 1),
        run("a2", provider="a", model="m1", probe="ttl", finished_at=START + 2),
        run("a3", provider="a", model="m2", probe="basic", finished_at=START + 3),
        run("b1", provider="b", model="m1", probe="basic", finished_at=START + 4),
        run("b2", provider="b", model="m1", probe="basic", finished_at=START + 4),  # same time
    ]
    async with await Store.open(db_path, clock=FakeClock(START)) as store:
        for r in runs:
            await store.record_run(r)

        async def ids(**kwargs: Any) -> list[str]:
            return [r.run_id for r in await store.recent_runs(**kwargs)]

        # Newest first; equal finish times: the later insert first.
        assert await ids() == ["b2", "b1", "a3", "a2", "a1"]
        assert await ids(provider="a") == ["a3", "a2", "a1"]
        assert await ids(provider="a", model="m1") == ["a2", "a1"]
        assert await ids(provider="a", model="m1", probe="basic") == ["a1"]
        assert await ids(probe="basic") == ["b2", "b1", "a3", "a1"]
        assert await ids(model="m1", probe="basic") == ["b2", "b1", "a1"]
        assert await ids(since=START + 3) == ["b2", "b1", "a3"]
        assert await ids(limit=2) == ["b2", "b1"]
        assert await ids(limit=0) == []
        assert await ids(limit=-5) == []
        assert await ids(provider="nobody") == []


@pytest.mark.anyio
async def test_recent_runs_limit_is_capped(db_path: Path) -> None:
    async with await Store.open(db_path, clock=FakeClock(START)) as store:
        await store.record_run(run("seed"))
    # Bulk-insert the rest directly: the cap is about reads.
    details = query(db_path, "SELECT details FROM probe_runs")[0][0]
    conn = sqlite3.connect(db_path)
    with conn:
        conn.executemany(
            "INSERT INTO probe_runs (run_id, provider, model, probe, verdict, success, "
            "started_at, finished_at, duration_seconds, details) "
            "VALUES (?, 'venice', 'm', 'basic', 'works', 1, ?, ?, 1, ?)",
            [(f"bulk-{i}", START + i, START + i, details) for i in range(MAX_RECENT_RUNS + 5)],
        )
    conn.close()
    async with await Store.open(db_path, clock=FakeClock(START)) as store:
        assert len(await store.recent_runs(limit=10_000)) == MAX_RECENT_RUNS


@pytest.mark.anyio
async def test_an_unreadable_stored_run_is_skipped_not_fatal(db_path: Path) -> None:
    async with await Store.open(db_path, clock=FakeClock(START)) as store:
        await store.record_run(run("good", finished_at=START))
        await store.record_run(run("bad", finished_at=START + 1))
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute("UPDATE probe_runs SET details = '{\"verdict\": \"??\"}' WHERE run_id = 'bad'")
    conn.close()
    async with await Store.open(db_path, clock=FakeClock(START)) as store:
        assert [r.run_id for r in await store.recent_runs()] == ["good"]


@pytest.mark.anyio
async def test_latest_results_gives_the_newest_run_per_target(db_path: Path) -> None:
    async with await Store.open(db_path, clock=FakeClock(START)) as store:
        assert await store.latest_results() == []
        # Recorded out of order: "latest" is by finish time, not by insertion.
        await store.record_run(run("new", finished_at=START + 10))
        await store.record_run(run("old", finished_at=START))
        await store.record_run(run("ttl", probe="ttl", finished_at=START + 1))
        await store.record_run(run("other", model="m2", finished_at=START + 2))
        latest = await store.latest_results()
    assert sorted(r.run_id for r in latest) == ["new", "other", "ttl"]


# --- balances and model state ----------------------------------------------------------


@pytest.mark.anyio
async def test_balances_round_trip_latest_per_currency(db_path: Path) -> None:
    clock = FakeClock(START)
    async with await Store.open(db_path, clock=clock) as store:
        assert await store.latest_balances() == {}
        await store.save_balance("venice", "usd", 10.5)
        await store.save_balance("venice", "diem", 3.25)
        clock.advance(60)
        await store.save_balance("venice", "usd", 10.25)
        await store.save_balance("deepseek", "usd", 1.0)
    async with await Store.open(db_path, clock=clock) as store:
        assert await store.latest_balances() == {
            ("venice", "usd"): (10.25, START + 60),
            ("venice", "diem"): (3.25, START),
            ("deepseek", "usd"): (1.0, START + 60),
        }


@pytest.mark.anyio
async def test_model_state_round_trip(db_path: Path) -> None:
    clock = FakeClock(START)
    async with await Store.open(db_path, clock=clock) as store:
        assert await store.load_model_states() == {}
        await store.save_model_state(ModelState("venice", "m1", 1, 0, None))
        clock.advance(5)
        await store.save_model_state(ModelState("venice", "m1", 5, 0, START + 905))
        await store.save_model_state(ModelState("venice", "m2", 0, 2, None))
    async with await Store.open(db_path, clock=clock) as store:
        assert await store.load_model_states() == {
            ("venice", "m1"): ModelState("venice", "m1", 5, 0, START + 905, START + 5),
            ("venice", "m2"): ModelState("venice", "m2", 0, 2, None, START + 5),
        }


# --- retention -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_cleanup_deletes_old_history_but_never_open_budget(db_path: Path) -> None:
    now = 1_710_936_000.0  # 2024-03-20 12:00 UTC; 30 days of retention reach into February
    cutoff = now - 30 * DAY
    clock = FakeClock(now - 40 * DAY)
    limits = {"venice": BudgetLimits(monthly_tokens=1_000_000)}
    async with await Store.open(db_path, clock=clock) as store:
        budget = Budget(store, limits, clock)
        # February, before the cutoff: history, one settled and one never settled reservation
        # (its process crashed; its month is over, so it no longer matters).
        await store.record_run(run("old", finished_at=clock.time()))
        await store.save_balance("venice", "usd", 5.0)
        await store.save_model_state(ModelState("venice", "gone", 3, 0, None))
        settled = await budget.reserve("venice", 100, 0.0)
        assert settled is not None
        await budget.settle(settled, tokens=50, usd=None)
        assert await budget.reserve("venice", 7, 0.0) is not None
        # March: one open and one settled reservation of the current month.
        clock.advance(21 * DAY)
        assert await budget.reserve("venice", 11, 0.0) is not None
        this_month = await budget.reserve("venice", 13, 0.0)
        assert this_month is not None
        await budget.settle(this_month, tokens=13, usd=None)
        clock.advance(19 * DAY)
        assert clock.time() == now
        await store.record_run(run("new", finished_at=now - 60))
        await store.save_balance("venice", "usd", 4.0)
        await store.save_model_state(ModelState("venice", "live", 0, 2, None))

        deleted = await store.cleanup(older_than=cutoff)

        # run + its usage, 2 February reservations, 1 balance, 1 model state, and the totals
        # of the February day (the February month ended after the cutoff: kept for now).
        assert deleted == 2 + 2 + 1 + 1 + 1
        assert [r.run_id for r in await store.recent_runs()] == ["new"]
        assert await store.latest_balances() == {("venice", "usd"): (4.0, now)}
        assert set(await store.load_model_states()) == {("venice", "live")}
        assert query(db_path, "SELECT reserved_tokens, settled FROM budget_ledger ORDER BY id") == [
            (11, 0),
            (13, 1),
        ]
        assert query(db_path, "SELECT kind, tokens FROM budget_windows ORDER BY start, kind") == [
            ("month", 57),
            ("day", 24),
            ("month", 24),
        ]
        # What the current month has used is untouched by retention.
        reloaded = Budget(store, limits, clock)
        await reloaded.load()
        assert reloaded.snapshot()["venice"].get("month", "tokens").used == 24
        assert await store.read("read", integrity_problems, "unavailable") == "ok"
        assert await store.cleanup(older_than=cutoff) == 0


@pytest.mark.anyio
async def test_cleanup_keeps_open_reservations_of_the_current_month(db_path: Path) -> None:
    # Retention shorter than a month: open reservations of this month must stay, and a
    # cutoff in the future must not erase the totals of windows still open.
    now = 1_710_936_000.0  # 2024-03-20 12:00 UTC
    clock = FakeClock(now - 15 * DAY)
    limits = {"venice": BudgetLimits(monthly_tokens=100)}
    async with await Store.open(db_path, clock=clock) as store:
        budget = Budget(store, limits, clock)
        assert await budget.reserve("venice", 60, 0.0) is not None
        clock.advance(15 * DAY)
        await store.cleanup(older_than=now + DAY)
        assert query(db_path, "SELECT reserved_tokens, settled FROM budget_ledger") == [(60, 0)]
        assert await budget.reserve("venice", 41, 0.0) is None
        assert await budget.reserve("venice", 40, 0.0) is not None


# --- faults ----------------------------------------------------------------------------


class FaultyConnector:
    """Opens real connections and injects real SQLite faults into them.

    ``readonly``: new connections open the file read-only (``mode=ro``); the live one gets
    ``PRAGMA query_only``. ``full``: ``PRAGMA max_page_count`` pinned to the current size, so
    the next page SQLite allocates fails with SQLITE_FULL. The faults come from SQLite itself;
    the store has to notice, and to reopen its connection to recover, as it would in life.
    """

    def __init__(self) -> None:
        self.fault: str | None = None
        self.connections: list[aiosqlite.Connection] = []

    async def __call__(self, path: Path, busy_timeout: float) -> aiosqlite.Connection:
        if self.fault == "readonly":
            conn = await aiosqlite.connect(
                f"file:{path}?mode=ro", uri=True, timeout=busy_timeout, isolation_level=None
            )
        else:
            conn = await connect_sqlite(path, busy_timeout)
        self.connections.append(conn)
        await self._apply(conn)
        return conn

    async def inject(self, fault: str) -> None:
        self.fault = fault
        for conn in self.connections:
            try:
                await self._apply(conn)
            except ValueError:
                continue  # closed by the store meanwhile

    def clear(self) -> None:
        # Only future connections are clean: the store must reopen to recover.
        self.fault = None

    async def _apply(self, conn: aiosqlite.Connection) -> None:
        if self.fault == "readonly":
            await conn.execute_fetchall("PRAGMA query_only = ON")
        elif self.fault == "full":
            (pages,) = next(iter(await conn.execute_fetchall("PRAGMA page_count")))
            await conn.execute_fetchall(f"PRAGMA max_page_count = {pages}")


def big_run(run_id: str, finished_at: float = START) -> ProbeResult:
    # 256 KiB of error text needs new pages whatever free space the file has.
    return run(
        run_id, finished_at=finished_at, verdict=Verdict.ERROR, hit_ratio=None, error="x" * 262_144
    )


async def write_everything(store: Store, tag: str, clock: FakeClock) -> None:
    await store.record_run(big_run(f"run-{tag}", finished_at=clock.time()))
    await store.save_balance("venice", "usd", 1.5)
    await store.save_model_state(ModelState("venice", f"m-{tag}", 1, 0, None))


async def assert_recovered(store: Store, db_path: Path, run_ids: list[str]) -> None:
    assert await store.flush() == 0
    assert store.pending_writes == 0
    assert store.healthy
    assert sorted(r.run_id for r in await store.recent_runs()) == sorted(run_ids)
    assert await store.read("read", integrity_problems, "unavailable") == "ok"
    assert query(db_path, "PRAGMA integrity_check") == [("ok",)]


@pytest.mark.anyio
async def test_read_only_database(db_path: Path, errors: Errors) -> None:
    clock = FakeClock(START)
    connector = FaultyConnector()
    async with await Store.open(
        db_path, clock=clock, on_error=errors, connector=connector
    ) as store:
        budget = Budget(store, {"venice": BudgetLimits(daily_tokens=1000)}, clock)
        await store.record_run(run("before"))
        await connector.inject("readonly")

        await write_everything(store, "during", clock)  # raises nothing
        assert errors == ["write_run", "balance", "model_state"]
        assert store.pending_writes == 3
        assert not store.healthy
        # Reads still work on a read-only file.
        assert [r.run_id for r in await store.recent_runs()] == ["before"]
        # A reservation that cannot be committed is a denial.
        assert await budget.reserve("venice", 10, 0.0) is None
        assert errors[-1] == "budget"
        # ... but a provider without a budget keeps probing.
        unrecorded = await budget.reserve("local", 10, 0.0)
        assert unrecorded is not None
        assert unrecorded.id is None
        assert await store.flush() == 3  # still failing: nothing lost, nothing raised
        assert query(db_path, "SELECT count(*) FROM probe_runs") == [(1,)]

        connector.clear()
        await assert_recovered(store, db_path, ["before", "run-during"])
        assert await store.load_model_states() != {}
        assert await budget.reserve("venice", 10, 0.0) is not None


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root ignores file permissions; test_read_only_database covers it",
)
@pytest.mark.anyio
async def test_file_replaced_by_a_read_only_copy(db_path: Path, errors: Errors) -> None:
    # An operator restores a backup that happens to be read-only, then fixes its mode.
    async with await Store.open(db_path, clock=FakeClock(START), on_error=errors) as store:
        await store.record_run(run("before"))
        copy = db_path.with_name("restored.db")
        source, target = sqlite3.connect(db_path), sqlite3.connect(copy)
        source.backup(target)
        target.execute("PRAGMA journal_mode = WAL")
        source.close()
        target.close()
        copy.chmod(0o444)
        copy.replace(db_path)

        await store.record_run(run("during"))
        assert errors == ["write_run"]
        assert store.pending_writes == 1
        assert [r.run_id for r in await store.recent_runs()] == ["before"]  # reads work

        # SQLite created the -shm (and -wal) files with the database's mode: fix them too.
        for path in db_path.parent.glob(f"{db_path.name}*"):
            path.chmod(0o644)
        # The connection was opened read-only: recovering needs the reopen.
        await assert_recovered(store, db_path, ["before", "during"])


@pytest.fixture
def locker(db_path: Path) -> Iterator[Callable[[], sqlite3.Connection]]:
    conn: sqlite3.Connection | None = None

    def lock() -> sqlite3.Connection:
        nonlocal conn
        conn = sqlite3.connect(db_path, isolation_level=None, timeout=0)
        conn.execute("BEGIN EXCLUSIVE")  # holds the write lock until released
        return conn

    yield lock
    if conn is not None:
        conn.close()


@pytest.mark.anyio
async def test_database_locked_by_another_connection(
    db_path: Path, errors: Errors, locker: Any
) -> None:
    clock = FakeClock(START)
    async with await Store.open(db_path, clock=clock, on_error=errors, busy_timeout=0.05) as store:
        budget = Budget(store, {"venice": BudgetLimits(daily_tokens=1000)}, clock)
        await store.record_run(run("before"))
        holder = locker()

        await write_everything(store, "during", clock)
        assert errors == ["write_run", "balance", "model_state"]
        assert await budget.reserve("venice", 10, 0.0) is None
        assert await store.cleanup(older_than=START) == 0
        assert errors[-2:] == ["budget", "cleanup"]
        # WAL: readers are not blocked by a writer.
        assert [r.run_id for r in await store.recent_runs()] == ["before"]

        holder.execute("ROLLBACK")
        # The next write drains the queue first, in order.
        await store.record_run(run("after", finished_at=START + 1))
        assert store.pending_writes == 0
        await assert_recovered(store, db_path, ["before", "run-during", "after"])
        assert len(errors) == 5  # nothing after the lock was released


@pytest.mark.anyio
async def test_disk_full(db_path: Path, errors: Errors) -> None:
    clock = FakeClock(START)
    connector = FaultyConnector()
    async with await Store.open(
        db_path, clock=clock, on_error=errors, connector=connector
    ) as store:
        await store.record_run(run("before"))
        await connector.inject("full")

        await store.record_run(big_run("big"))
        assert errors == ["write_run"]
        await store.record_run(big_run("big-2", finished_at=START + 1))
        assert errors == ["write_run", "write_run"]
        assert store.pending_writes == 2
        assert await store.flush() == 2
        assert errors[-1] == "write_run"

        connector.clear()
        await assert_recovered(store, db_path, ["before", "big", "big-2"])


@pytest.mark.anyio
async def test_directory_replaced_underneath(tmp_path: Path, errors: Errors) -> None:
    data = tmp_path / "data"
    db_path = data / "exporter.db"
    async with await Store.open(db_path, clock=FakeClock(START), on_error=errors) as store:
        await store.record_run(run("r1"))
        data.rename(tmp_path / "moved")
        data.mkdir()
        # SQLite would keep writing to the moved file; the store notices and reopens.
        await store.record_run(run("r2"))
        assert [r.run_id for r in await store.recent_runs()] == ["r2"]
        assert errors == []
    assert query(db_path, "SELECT run_id FROM probe_runs") == [("r2",)]
    assert query(tmp_path / "moved" / "exporter.db", "SELECT run_id FROM probe_runs") == [("r1",)]


@pytest.mark.anyio
async def test_directory_gone_then_back(tmp_path: Path, errors: Errors) -> None:
    data = tmp_path / "data"
    db_path = data / "exporter.db"
    clock = FakeClock(START)
    async with await Store.open(db_path, clock=clock, on_error=errors) as store:
        budget = Budget(store, {"venice": BudgetLimits(daily_tokens=1000)}, clock)
        await store.record_run(run("r1"))
        shutil.rmtree(data)
        data.write_text("a file where the directory was")  # nothing can be opened there

        await write_everything(store, "during", clock)
        assert await store.recent_runs() == []
        assert await store.latest_results() == []
        assert await store.latest_balances() == {}
        assert await store.load_model_states() == {}
        assert await store.reliability_stats(since=0) == {}
        assert await budget.reserve("venice", 1, 0.0) is None
        assert await store.cleanup(older_than=START) == 0
        assert await store.read("read", integrity_problems, "unavailable") == "unavailable"
        assert errors == [
            "write_run",
            "balance",
            "model_state",
            "read",
            "restore",
            "restore",
            "restore",
            "read",
            "budget",
            "cleanup",
            "read",
        ]

        data.unlink()
        await assert_recovered(store, db_path, ["run-during"])  # r1 went with the directory


@pytest.mark.anyio
async def test_retry_queue_is_bounded_and_drops_the_oldest(
    db_path: Path, errors: Errors, locker: Any
) -> None:
    async with await Store.open(
        db_path, clock=FakeClock(START), on_error=errors, busy_timeout=0.01, max_pending=3
    ) as store:
        holder = locker()
        for i in range(5):
            await store.record_run(run(f"r{i}", finished_at=START + i))
        assert store.pending_writes == 3
        assert store.dropped_writes == 2
        holder.execute("ROLLBACK")
        await assert_recovered(store, db_path, ["r2", "r3", "r4"])


@pytest.mark.anyio
async def test_a_write_the_database_rejects_is_dropped_not_retried_forever(
    db_path: Path, errors: Errors, locker: Any
) -> None:
    async with await Store.open(
        db_path, clock=FakeClock(START), on_error=errors, busy_timeout=0.01
    ) as store:
        holder = locker()
        await store.record_run(run("good-1"))
        poisoned = run("poison")
        poisoned.started_at = math.nan  # SQLite stores NaN as NULL: NOT NULL fails
        await store.record_run(poisoned)
        await store.record_run(run("good-2", finished_at=START + 1))
        assert store.pending_writes == 3
        holder.execute("ROLLBACK")
        assert await store.flush() == 0
        assert sorted(r.run_id for r in await store.recent_runs()) == ["good-1", "good-2"]
        assert errors.count("write_run") == 4  # three queued, then the rejected one


@pytest.mark.anyio
async def test_a_failing_on_error_hook_is_contained(db_path: Path, locker: Any) -> None:
    def explode(operation: str) -> None:
        raise RuntimeError(operation)

    async with await Store.open(
        db_path, clock=FakeClock(START), on_error=explode, busy_timeout=0.01
    ) as store:
        holder = locker()
        await store.record_run(run("r1"))
        holder.execute("ROLLBACK")
        assert await store.flush() == 0


@pytest.mark.anyio
async def test_cancelling_a_caller_never_leaves_a_half_open_transaction(
    db_path: Path, errors: Errors, locker: Any
) -> None:
    async with await Store.open(
        db_path, clock=FakeClock(START), on_error=errors, busy_timeout=0.3
    ) as store:
        holder = locker()
        with anyio.move_on_after(0.05) as scope:
            # The deadline passes while the transaction waits out the busy timeout; the
            # shield lets it finish (and fail) cleanly before the cancellation lands.
            await store.record_run(run("cancelled"))
            await anyio.sleep(5)
        assert scope.cancelled_caught
        holder.execute("ROLLBACK")
        # The shielded transaction ran to its end (a busy timeout) and the write was queued.
        await assert_recovered(store, db_path, ["cancelled"])


@pytest.mark.anyio
async def test_close_is_idempotent_and_reports_unsaved_writes(
    db_path: Path, errors: Errors, locker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = await Store.open(db_path, clock=FakeClock(START), on_error=errors, busy_timeout=0.01)
    holder = locker()
    await store.record_run(run("r1"))
    await store.close()
    await store.close()
    holder.execute("ROLLBACK")
    assert "closed with 1 queued writes that could not be saved" in caplog.text
    assert not store.healthy


@pytest.mark.anyio
async def test_switching_a_file_to_wal_waits_for_another_writer(db_path: Path) -> None:
    # Another process writing the file in rollback-journal mode makes the switch to WAL fail
    # at once (SQLite skips the busy handler there, to avoid a deadlock): the store retries
    # within busy_timeout instead of failing to start.
    db_path.parent.mkdir(parents=True)
    writer = sqlite3.connect(db_path, isolation_level=None)
    writer.execute("CREATE TABLE other (x INTEGER)")
    writer.execute("BEGIN IMMEDIATE")
    opened: list[Store] = []

    async def open_store() -> None:
        opened.append(await Store.open(db_path, clock=FakeClock(START), busy_timeout=5.0))

    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(open_store)
                await anyio.sleep(0.2)
                assert opened == []  # still waiting for the writer
                writer.execute("COMMIT")
    finally:
        writer.close()
    await opened[0].close()
    assert query(db_path, "PRAGMA journal_mode") == [("wal",)]


@pytest.mark.anyio
async def test_a_migration_applied_meanwhile_by_another_process_is_skipped(
    tmp_path: Path,
) -> None:
    path = tmp_path / "m.db"
    migration = Migration("one", ("CREATE TABLE a (x INTEGER)",))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA journal_mode = WAL")  # so the version can be read meanwhile
    other.execute("BEGIN EXCLUSIVE")
    try:
        async with aiosqlite.connect(path, isolation_level=None, timeout=10) as conn:
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:

                    async def run_migrate() -> None:
                        assert await migrate(conn, now=START, migrations=(migration,)) == 1

                    tg.start_soon(run_migrate)  # reads version 0, then waits for the lock
                    await anyio.sleep(0.2)
                    other.execute("CREATE TABLE a (x INTEGER)")
                    other.execute("PRAGMA user_version = 1")
                    other.execute("COMMIT")
    finally:
        other.close()
    # Re-read under the lock: no "table a already exists", and no second audit row.
    assert query(path, "SELECT name FROM sqlite_master WHERE name = 'schema_migrations'") == []


@pytest.mark.anyio
async def test_a_write_that_fails_with_a_bug_does_not_block_the_queue(
    db_path: Path, errors: Errors
) -> None:
    engine = await Engine.open(db_path, clock=FakeClock(START), on_error=errors)
    try:

        async def buggy(conn: aiosqlite.Connection) -> None:
            raise TypeError("a bug in the write")

        async def good(conn: aiosqlite.Connection) -> None:
            await conn.execute_fetchall(
                "INSERT INTO balances (provider, currency, amount, at) VALUES ('p', 'usd', 1, 0)"
            )

        assert not await engine.submit("balance", buggy)
        assert await engine.submit("balance", good)
        assert errors == ["balance"]
        assert engine.pending_writes == 0
    finally:
        assert await engine.close() == 0
    assert query(db_path, "SELECT count(*) FROM balances") == [(1,)]


# --- the ledger survives deletion; corruption is refused -------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["delete", "replace"])
async def test_deleting_or_replacing_the_database_does_not_reset_the_budget(
    tmp_path: Path, errors: Errors, how: str
) -> None:
    # Issue 8 item 4: `rm data/store.db*` while running used to start a fresh ledger.
    db_path = tmp_path / "data" / "store.db"
    clock = FakeClock(START)
    async with await Store.open(db_path, clock=clock, on_error=errors) as store:
        budget = Budget(store, {"venice": BudgetLimits(daily_tokens=1000)}, clock)
        assert await budget.reserve("venice", 600, 0.0) is not None
        for path in db_path.parent.glob("store.db*"):
            path.unlink()
        if how == "replace":  # an older, emptier database put in its place
            async with await Store.open(db_path, clock=clock) as other:
                await other.record_run(run("other"))
        assert await budget.reserve("venice", 500, 0.0) is None  # 600 + 500 > 1000
        assert await budget.reserve("venice", 400, 0.0) is not None
        assert query(db_path, "SELECT kind, tokens FROM budget_windows ORDER BY kind") == [
            ("day", 1000),
            ("month", 1000),
        ]
    assert errors == []


@pytest.mark.anyio
async def test_while_the_carried_ledger_cannot_be_written_reservations_are_denied(
    tmp_path: Path, errors: Errors
) -> None:
    data = tmp_path / "data"
    db_path = data / "store.db"
    clock = FakeClock(START)
    async with await Store.open(db_path, clock=clock, on_error=errors) as store:
        budget = Budget(store, {"venice": BudgetLimits(daily_tokens=1000)}, clock)
        assert await budget.reserve("venice", 600, 0.0) is not None
        shutil.rmtree(data)
        data.write_text("not a directory")
        assert await budget.reserve("venice", 10, 0.0) is None  # refuses: nothing to carry into
        data.unlink()
        assert await budget.reserve("venice", 500, 0.0) is None  # trusted again: 600 carried
        assert await budget.reserve("venice", 400, 0.0) is not None
    assert "budget" in errors


CORRUPTIONS = {
    # Each damages a real file the way a disk, a bad copy or a hand edit would.
    "page bytes": lambda path: _overwrite(
        path, _page_of(path, "probe_runs_target") + 8, b"\xff" * 64
    ),
    "table page": lambda path: _overwrite(path, _page_of(path, "budget_windows"), b"\x07" * 16),
    "truncated": lambda path: os.truncate(path, os.path.getsize(path) // 2),
    "ledger totals": lambda path: _sql(
        path, "UPDATE budget_windows SET tokens = 'lots' WHERE kind = 'day'"
    ),
    "negative totals": lambda path: _sql(path, "UPDATE budget_windows SET tokens = -5"),
    "index": lambda path: _sql(
        path,
        "PRAGMA writable_schema = ON",
        "UPDATE sqlite_master SET sql = replace(sql, 'provider, model, probe, finished_at', "
        "'finished_at, provider, model, probe') WHERE name = 'probe_runs_target'",
    ),
}


def _page_of(path: Path, name: str) -> int:
    (root,) = query(path, "SELECT rootpage FROM sqlite_master WHERE name = ?", (name,))[0]
    (size,) = query(path, "PRAGMA page_size")[0]
    return int((root - 1) * size)


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def _sql(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path)
    with conn:
        for statement in statements:
            conn.execute(statement)
    conn.close()


@pytest.mark.anyio
@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
async def test_a_corrupted_database_is_refused_at_start_with_one_line(
    tmp_path: Path, kind: str
) -> None:
    db_path = tmp_path / "store.db"
    clock = FakeClock(START)
    async with await Store.open(db_path, clock=clock) as store:
        budget = Budget(store, {"venice": BudgetLimits(daily_tokens=1000)}, clock)
        assert await budget.reserve("venice", 100, 0.0) is not None
        for i in range(40):
            await store.record_run(run(f"r{i}", finished_at=START + i))
    _sql(db_path, "PRAGMA wal_checkpoint(TRUNCATE)")
    CORRUPTIONS[kind](db_path)
    with pytest.raises(StoreError) as caught:
        await Store.open(db_path, clock=clock)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"database {db_path} is corrupted (") or message.startswith(
        f"cannot open database {db_path}: "
    )
    assert "move it aside" in message or "malformed" in message or "not a database" in message


# --- readers caching on history_version ----------------------------------------------------


@pytest.mark.anyio
async def test_api_runs_answers_are_cached_until_the_history_changes(db_path: Path) -> None:
    reads: list[str] = []

    class CountingStore:
        """The real store, counting the reads /api/runs makes."""

        def __init__(self, store: Store) -> None:
            self.store = store

        @property
        def history_version(self) -> int:
            return self.store.history_version

        async def recent_runs(self, **query: Any) -> list[ProbeResult]:
            reads.append(str(query))
            return await self.store.recent_runs(**query)

    clock = FakeClock(START)
    async with await Store.open(db_path, clock=clock) as store:
        app = create_app(
            registry=CollectorRegistry(),
            runs=CountingStore(store),  # type: ignore[arg-type]
            readiness=lambda: Readiness.of(store=DependencyStatus(True)),
            reload=None,
            web_config=None,
            probe_names=("basic",),
            version="t",
        )
        await store.record_run(run("r1", finished_at=START - 2 * DAY))
        async with serve(app, host="127.0.0.1", port=0) as address:

            async def ids() -> list[str]:
                async with httpx.AsyncClient(base_url=address.url, timeout=10) as client:
                    response = await client.get("/api/runs")
                return [r["run_id"] for r in response.json()["runs"]]

            assert await ids() == ["r1"]
            assert await ids() == ["r1"]
            assert len(reads) == 1  # the second answer came from the cache
            await store.record_run(run("r2", finished_at=START))
            assert await ids() == ["r2", "r1"]  # a new run is never hidden by the cache
            assert await store.cleanup(older_than=START - DAY) == 2  # r1 and its usage
            assert await ids() == ["r2"]
            assert len(reads) == 3


@pytest.mark.anyio
async def test_a_cleanup_that_faults_part_way_still_invalidates_cached_answers(
    db_path: Path,
) -> None:
    errors: list[str] = []
    async with await Store.open(db_path, clock=FakeClock(START), on_error=errors.append) as store:
        await store.record_run(run("old", finished_at=START - 2 * DAY))
        await store.save_balance("venice", "usd", 5.0)
        # A real SQLite fault after the runs are deleted: balances are cleaned after them.
        with sqlite3.connect(db_path) as other:
            other.execute(
                "CREATE TRIGGER refuse BEFORE DELETE ON balances"
                " BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"
            )
        version = store.history_version

        assert await store.cleanup(older_than=START + 1) == 2  # the run and its usage row
        assert errors == ["cleanup"]  # one report: cleanup stopped at the fault
        assert await store.recent_runs() == []
        # Readers caching on the version (/api/runs) must not serve the deleted run.
        assert store.history_version > version
