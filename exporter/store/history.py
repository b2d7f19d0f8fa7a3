"""The store: probe history, token usage, balances and model state, plus the ledger (mixin).

``ProbeStore`` is the narrow part the recorder and the HTTP side depend on (fakes implement
it). Faults never reach the caller: writes are queued and retried, reads return empty results,
reservations are denied (``engine``, docs/storage.md). Values are always bound parameters;
only the fixed table and column names below are put into SQL text.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, Self

import anyio.to_thread

from exporter.clock import Clock
from exporter.reliability import ReliabilityStats
from exporter.results import ProbeResult
from exporter.store.engine import DEFAULT_BUSY_TIMEOUT as _BUSY
from exporter.store.engine import DEFAULT_MAX_PENDING as _PENDING
from exporter.store.engine import (
    FAULTS,
    Connection,
    Connector,
    Engine,
    connect_sqlite,
    describe,
    integrity_problems,
)
from exporter.store.ledger import Ledger
from exporter.store.migrations import StoreError

log = logging.getLogger("exporter.store")

MAX_RECENT_RUNS: Final = 1000  # cap on one recent_runs() answer
_CLEANUP_BATCH: Final = 5000  # rows per delete transaction: the write lock is never held long
_CLEANUP_MAX_BATCHES: Final = 10_000  # per table and call, to bound the loop
# The ``operation`` label of store_errors_total. Usage is written in its run's transaction,
# so its failures count as ``write_run``; ``write_usage`` stays for the metric catalogue.
OPERATIONS: Final = ("write_run", "write_usage", "budget", "balance", "model_state", "cleanup",
                     "restore", "read")  # fmt: skip


def _upsert(table: str, columns: str, key: str) -> str:
    # Upserts: a write retried after a commit whose acknowledgement was lost is harmless.
    names = columns.split()
    updates = ", ".join(f"{c} = excluded.{c}" for c in names if c not in key.split(", "))
    marks = ", ".join("?" * len(names))
    insert = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({marks})"  # noqa: S608
    return f"{insert} ON CONFLICT ({key}) DO UPDATE SET {updates}"


_UPSERT_RUN: Final = _upsert("probe_runs", "run_id provider model probe verdict caching_works "
    "hit_ratio success error_type error started_at finished_at duration_seconds details "
    "trace_id", "run_id")  # fmt: skip
_UPSERT_USAGE: Final = _upsert("token_usage", "run_id provider model prompt_tokens cached_tokens"
    " cache_write_tokens completion_tokens spend_usd savings_usd at", "run_id")  # fmt: skip
_UPSERT_MODEL: Final = _upsert("model_state", "provider model consecutive_failures "
    "consecutive_successes cooldown_until updated_at", "provider, model")  # fmt: skip
# DISTINCT over an index, then one index seek per target: no scan of every details column.
_LATEST_RUNS: Final = """SELECT r.details FROM (SELECT DISTINCT provider, model, probe FROM
    probe_runs) t JOIN probe_runs r ON r.id = (SELECT id FROM probe_runs WHERE provider =
    t.provider AND model = t.model AND probe = t.probe ORDER BY finished_at DESC, id DESC
    LIMIT 1) ORDER BY t.provider, t.model, t.probe"""
_LATEST_BALANCES: Final = """SELECT b.provider, b.currency, b.amount, b.at FROM (SELECT DISTINCT
    provider, currency FROM balances) t JOIN balances b ON b.id = (SELECT id FROM balances
    WHERE provider = t.provider AND currency = t.currency ORDER BY at DESC, id DESC LIMIT 1)"""
_RELIABILITY: Final = """SELECT provider, model, COUNT(*), SUM(success),
    SUM(CASE WHEN success = 1 AND caching_works = 1 THEN 1 ELSE 0 END),
    SUM(CASE WHEN success = 1 THEN hit_ratio END),
    SUM(CASE WHEN success = 1 AND hit_ratio IS NOT NULL THEN 1 ELSE 0 END) FROM probe_runs"""


@dataclass(frozen=True, slots=True)
class ModelState:
    """Failure tracking for one model, persisted so a restart keeps cooldowns and counts."""

    provider: str
    model: str
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    cooldown_until: float | None = None  # wall clock; None = not in cooldown
    updated_at: float = 0.0


class ProbeStore(Protocol):
    """What the recorder, the HTTP API and the CLI need from the history store."""

    async def record_run(
        self, result: ProbeResult, *, spend_usd: float = 0.0, savings_usd: float = 0.0
    ) -> None: ...
    async def recent_runs(
        self, *, provider: str | None = None, model: str | None = None,
        probe: str | None = None, limit: int = 50, since: float | None = None,
        trace_id: str | None = None,
    ) -> list[ProbeResult]: ...  # fmt: skip
    async def latest_results(self) -> list[ProbeResult]: ...
    async def reliability_stats(
        self, *, since: float, provider: str | None = None, model: str | None = None
    ) -> dict[tuple[str, str], ReliabilityStats]: ...
    async def save_balance(self, provider: str, currency: str, amount: float) -> None: ...
    async def latest_balances(self) -> dict[tuple[str, str], tuple[float, float]]: ...
    async def save_model_state(
        self, provider: str, model: str, *, consecutive_failures: int,
        consecutive_successes: int, cooldown_until: float | None,
    ) -> None: ...  # fmt: skip
    async def load_model_states(self) -> dict[tuple[str, str], ModelState]: ...
    async def cleanup(self, *, older_than: float) -> int: ...
    async def flush(self) -> int: ...
    @property
    def healthy(self) -> bool: ...


class Store(Ledger):
    """SQLite-backed history and budget ledger. Create with ``await Store.open(...)``."""

    def __init__(self, engine: Engine, clock: Clock) -> None:
        self._db, self._clock, self._seen = engine, clock, {}
        # Bumped by every change of the run history, so readers can cache what they built.
        self.history_version = 0
        engine.on_replaced = self._carry_forward

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], *, clock: Clock,
        on_error: Callable[[str], None] | None = None, busy_timeout: float = _BUSY,
        max_pending: int = _PENDING, connector: Connector = connect_sqlite,
    ) -> Store:  # fmt: skip
        """Open (creating directories and the file), check and migrate the database.

        Raises ``StoreError`` with one line when it cannot be used at start (a newer schema:
        ``SchemaTooNewError``; a corrupted file); later faults are handled, never raised.
        ``connector`` opens the aiosqlite connection (tests inject faults with it).
        """
        engine = Engine(Path(path), clock=clock, on_error=on_error, busy_timeout=busy_timeout,
                        max_pending=max_pending, connector=connector)  # fmt: skip
        store, created = cls(engine, clock), not engine.path.exists()
        try:
            await engine.start()
            await engine.run(store._remember_open_windows)
        except StoreError:
            raise
        except FAULTS as exc:
            raise StoreError(f"cannot open database {path}: {describe(exc)}") from exc
        if created:
            log.info("store: created a new database %s (no earlier history or budget use)", path)
        return store

    async def close(self) -> None:
        """Flush queued writes (one attempt) and close. Idempotent."""
        if remaining := await self._db.close():
            log.error("store: closed with %d queued writes that could not be saved", remaining)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:  # fmt: skip
        await self.close()

    @property
    def path(self) -> Path:
        return self._db.path

    @property
    def healthy(self) -> bool:
        """Can record: the last write succeeded (a queued write after a fault: not yet)."""
        return self._db.healthy

    @property
    def pending_writes(self) -> int:
        return self._db.pending_writes

    @property
    def dropped_writes(self) -> int:
        """Queued writes discarded because the retry queue was full."""
        return self._db.dropped_writes

    async def flush(self) -> int:
        """Retry queued writes now; return how many are still waiting (0 = all saved)."""
        return await self._db.flush()

    async def record_run(
        self, result: ProbeResult, *, spend_usd: float = 0.0, savings_usd: float = 0.0
    ) -> None:
        """Store a run and its token usage in one transaction (queued for retry on failure)."""
        r = result
        try:  # the whole result is what is read back; the other columns are for filtering
            details = json.dumps(r.to_dict(), separators=(",", ":"))
        except (TypeError, ValueError) as exc:  # a bug no retry can fix: do not block the queue
            log.error("store: run %s of %s/%s not stored: %s", r.run_id, r.provider, r.model, exc)
            self._db.report("write_run")
            return

        def total(values: Iterable[int | None]) -> int | None:
            reported = [v for v in values if v is not None]
            return sum(reported) if reported else None  # None: "not reported", never 0

        works, kind, rs = r.caching_works, r.error_type, r.requests
        run = (r.run_id, r.provider, r.model, r.probe, r.verdict.value,
               None if works is None else int(works), r.hit_ratio, int(r.success),
               kind.value if kind else None, r.error, r.started_at, r.finished_at,
               r.duration_seconds, details, r.trace_id)  # fmt: skip
        usage = (r.run_id, r.provider, r.model, total(q.prompt_tokens for q in rs) or 0,
                 total(q.cached_tokens for q in rs), total(q.cache_write_tokens for q in rs),
                 total(q.completion_tokens for q in rs) or 0, float(spend_usd),
                 float(savings_usd), r.finished_at)  # fmt: skip

        async def apply(conn: Connection) -> None:
            await conn.execute_fetchall(_UPSERT_RUN, run)
            await conn.execute_fetchall(_UPSERT_USAGE, usage)

        await self._db.submit("write_run", apply)
        self.history_version += 1

    async def save_balance(self, provider: str, currency: str, amount: float) -> None:
        """Record a balance the provider reported, stamped with the store's clock."""
        sql = "INSERT INTO balances (provider, currency, amount, at) VALUES (?, ?, ?, ?)"
        row = (provider, currency, float(amount), self._clock.time())
        await self._db.submit("balance", partial(_execute, sql=sql, params=row))

    async def save_model_state(
        self, provider: str, model: str, *, consecutive_failures: int,
        consecutive_successes: int, cooldown_until: float | None,
    ) -> None:  # fmt: skip
        """Replace the model's failure-tracking state (stamped with the store's clock)."""
        row = (provider, model, int(consecutive_failures), int(consecutive_successes),
               cooldown_until, self._clock.time())  # fmt: skip
        await self._db.submit("model_state", partial(_execute, sql=_UPSERT_MODEL, params=row))

    async def _fetch(self, op: str, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return await self._db.read(op, partial(_rows, sql=sql, params=tuple(params)), [])

    async def recent_runs(
        self, *, provider: str | None = None, model: str | None = None,
        probe: str | None = None, limit: int = 50, since: float | None = None,
        trace_id: str | None = None,
    ) -> list[ProbeResult]:  # fmt: skip
        """Runs matching every filter given, newest (by finish time) first; ``limit`` is
        capped at ``MAX_RECENT_RUNS``; ``since`` keeps runs finished at or after it;
        ``trace_id`` finds the run whose requests carried that W3C trace."""
        if (limit := min(int(limit), MAX_RECENT_RUNS)) <= 0:
            return []
        filters = {"provider = ?": provider, "model = ?": model, "probe = ?": probe,
                   "finished_at >= ?": since, "trace_id = ?": trace_id}  # fmt: skip
        where = " AND ".join(["1", *(k for k, v in filters.items() if v is not None)])
        params = [v for v in filters.values() if v is not None]
        sql = f"SELECT details FROM probe_runs WHERE {where} "  # noqa: S608 - fixed clauses
        sql += "ORDER BY finished_at DESC, id DESC LIMIT ?"
        rows = await self._fetch("read", sql, [*params, limit])
        # Decoding a thousand runs takes tens of milliseconds: off the loop that times probes.
        return await anyio.to_thread.run_sync(_decode, rows)

    async def latest_results(self) -> list[ProbeResult]:
        """The latest run of every (provider, model, probe), to restore state at start."""
        return await anyio.to_thread.run_sync(_decode, await self._fetch("restore", _LATEST_RUNS))

    async def reliability_stats(
        self, *, since: float, provider: str | None = None, model: str | None = None
    ) -> dict[tuple[str, str], ReliabilityStats]:
        """Per (provider, model): aggregates of the runs finished at or after ``since``."""
        where = ["finished_at >= ?", "verdict != 'skipped'"]
        where += [f"{c} = ?" for c, v in (("provider", provider), ("model", model)) if v]
        params = [float(since), *(v for v in (provider, model) if v)]
        rows = await self._fetch("read", f"{_RELIABILITY} WHERE {' AND '.join(where)} "
                                 "GROUP BY provider, model", params)  # fmt: skip
        return {(p, m): ReliabilityStats(int(n), int(ok or 0), int(works or 0), float(hits or 0),
                                         int(count or 0))
                for p, m, n, ok, works, hits, count in rows}  # fmt: skip

    async def latest_balances(self) -> dict[tuple[str, str], tuple[float, float]]:
        """(provider, currency) -> (amount, at) of the latest balance recorded."""
        rows = await self._fetch("restore", _LATEST_BALANCES)
        return {(p, c): (float(amount), float(at)) for p, c, amount, at in rows}

    async def load_model_states(self) -> dict[tuple[str, str], ModelState]:
        rows = await self._fetch("restore", "SELECT provider, model, consecutive_failures, "
                                 "consecutive_successes, cooldown_until, updated_at "
                                 "FROM model_state")  # fmt: skip
        return {(p, m): ModelState(p, m, int(f), int(s), c, float(u)) for p, m, f, s, c, u in rows}

    async def cleanup(self, *, older_than: float) -> int:
        """Delete history older than ``older_than``; return the number of rows deleted.

        Runs and their usage, settled reservations, balances, model states not updated since.
        Open reservations stay until their month is over (they still count and may still be
        settled), window totals until the window has ended: retention never gives budget
        back. Batches release the write lock in between, so reservations never wait long.
        """
        cutoff, now = float(older_than), self._clock.time()
        batched = (("token_usage", "at < ?", (cutoff,)),
                   ("probe_runs", "finished_at < ?", (cutoff,)),
                   ("budget_ledger", "at < ? AND (settled = 1 OR month_end <= ?)", (cutoff, now)),
                   ("balances", "at < ?", (cutoff,)))  # fmt: skip
        deleted = 0
        try:
            for table, cond, params in batched:
                inner = f"SELECT id FROM {table} WHERE {cond} LIMIT ?"  # noqa: S608
                sql = f"DELETE FROM {table} WHERE id IN ({inner})"  # noqa: S608 - fixed names
                write = partial(_execute, sql=sql, params=(*params, _CLEANUP_BATCH))
                for _ in range(_CLEANUP_MAX_BATCHES):
                    count = await self._db.write(write)
                    deleted += count
                    if count < _CLEANUP_BATCH:
                        break
            # Windows still open are never cleaned, whatever cutoff the caller passes.
            single = (('DELETE FROM budget_windows WHERE "end" <= ?', min(cutoff, now)),
                      ("DELETE FROM model_state WHERE updated_at < ?", cutoff))  # fmt: skip
            for sql, param in single:
                deleted += await self._db.write(partial(_execute, sql=sql, params=(param,)))
            if deleted:  # hand free pages back to the filesystem, refresh statistics
                self.history_version += 1
                for pragma in ("PRAGMA incremental_vacuum", "PRAGMA optimize"):  # fetch: all pages
                    await self._db.run(partial(_rows, sql=pragma, params=()))
        except FAULTS as exc:
            self._db.report("cleanup", exc)
        return deleted

    async def integrity_check(self) -> str:
        """``"ok"``, or the problems found, or ``"unavailable: …"`` when unreadable."""
        try:
            return await self._db.run(integrity_problems)
        except FAULTS as exc:
            self._db.report("read", exc)
            return f"unavailable: {describe(exc)}"


async def _execute(conn: Connection, *, sql: str, params: tuple[Any, ...]) -> int:
    async with conn.execute(sql, params) as cursor:
        return max(0, cursor.rowcount)


async def _rows(conn: Connection, *, sql: str, params: tuple[Any, ...]) -> list[Any]:
    return list(await conn.execute_fetchall(sql, params))


def _decode(rows: Iterable[Any]) -> list[ProbeResult]:
    results: list[ProbeResult] = []
    for row in rows:
        try:
            results.append(ProbeResult.from_dict(json.loads(row[0])))
        except (ValueError, KeyError, TypeError) as exc:
            # One unreadable row (hand-edited, or from a newer exporter) must not hide the rest.
            log.warning("store: skipping a stored run that cannot be read: %s", exc)
    return results


def _implements_probe_store(store: Store) -> ProbeStore:  # pragma: no cover
    return store  # never called: mypy checks here that Store keeps implementing the Protocol
