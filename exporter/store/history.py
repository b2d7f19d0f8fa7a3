"""The store: probe history, token usage, balances and model state, on top of the ledger.
Values are always bound parameters; only the fixed names below go into SQL text."""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import partial
from typing import Any, Final, NamedTuple

import anyio.to_thread

from exporter.reliability import ReliabilityStats
from exporter.results import ProbeResult
from exporter.store.engine import log
from exporter.store.ledger import Ledger
from exporter.store.migrations import Connection

MAX_RECENT_RUNS: Final = 1000  # cap on one recent_runs() answer
_CLEANUP_BATCH: Final = 5000  # rows per delete transaction: the write lock is never held long
_VACUUM: Final = "PRAGMA incremental_vacuum; PRAGMA optimize"  # free pages back, statistics
# INSERT OR REPLACE: a write retried after a commit whose acknowledgement was lost is harmless.
_INSERT_RUN: Final = """INSERT OR REPLACE INTO probe_runs (run_id, provider, model, probe,
    verdict, caching_works, hit_ratio, success, error_type, error, started_at, finished_at,
    duration_seconds, details, trace_id) VALUES (:run_id, :provider, :model, :probe, :verdict,
    :caching_works, :hit_ratio, :success, :error_type, :error, :started_at, :finished_at,
    :duration_seconds, :details, :trace_id)"""
# Sums over the run's requests; sum() of only NULLs is NULL: "not reported", never 0.
_INSERT_USAGE: Final = """INSERT OR REPLACE INTO token_usage (run_id, provider, model,
    prompt_tokens, cached_tokens, cache_write_tokens, completion_tokens, spend_usd, savings_usd,
    at) SELECT :run_id, :provider, :model,
    coalesce(sum(json_extract(value, '$.prompt_tokens')), 0),
    sum(json_extract(value, '$.cached_tokens')), sum(json_extract(value, '$.cache_write_tokens')),
    coalesce(sum(json_extract(value, '$.completion_tokens')), 0),
    :spend_usd, :savings_usd, :finished_at FROM json_each(:details, '$.requests')"""
_SAVE_MODEL_STATE: Final = """INSERT OR REPLACE INTO model_state (provider, model,
    consecutive_failures, consecutive_successes, cooldown_until, updated_at)
    VALUES (?, ?, ?, ?, ?, ?)"""
_MODEL_STATES: Final = """SELECT provider, model, consecutive_failures, consecutive_successes,
    cooldown_until, updated_at FROM model_state"""
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
    TOTAL(CASE WHEN success = 1 THEN hit_ratio END),
    SUM(CASE WHEN success = 1 AND hit_ratio IS NOT NULL THEN 1 ELSE 0 END) FROM probe_runs"""
# (table, key, condition) of what retention deletes: never an open window (docs/storage.md).
_CLEANUP: Final = (
    ("token_usage", "id", "at < :cutoff"),
    ("probe_runs", "id", "finished_at < :cutoff"),
    ("budget_ledger", "id", "at < :cutoff AND (settled = 1 OR month_end <= :now)"),
    ("balances", "id", "at < :cutoff"),
    ("budget_windows", "provider, kind, start", '"end" <= min(:cutoff, :now)'),
    ("model_state", "provider, model", "updated_at < :cutoff"),
)


class ModelState(NamedTuple):
    """Failure tracking for one model, persisted so a restart keeps cooldowns and counts."""

    provider: str
    model: str
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    cooldown_until: float | None = None  # wall clock; None = not in cooldown
    updated_at: float = 0.0


class Store(Ledger):
    """SQLite-backed history and budget ledger. Create with ``await Store.open(...)``."""

    # Bumped by every change of the run history, so readers can cache what they built.
    history_version = 0

    async def record_run(
        self, result: ProbeResult, *, spend_usd: float = 0.0, savings_usd: float = 0.0
    ) -> None:
        """Store a run and its token usage in one transaction (queued for retry on failure)."""
        data = result.to_dict()
        row = data | {"success": result.success, "spend_usd": spend_usd, "savings_usd": savings_usd}

        async def write(conn: Connection) -> None:
            details = json.dumps(data, separators=(",", ":"))  # a bug here drops the write
            for sql in (_INSERT_RUN, _INSERT_USAGE):
                await conn.execute_fetchall(sql, row | {"details": details})

        await self.submit("write_run", write)
        self.history_version += 1

    async def save_balance(self, provider: str, currency: str, amount: float) -> None:
        """Record a balance the provider reported, stamped with the store's clock."""
        sql = "INSERT INTO balances (provider, currency, amount, at) VALUES (?, ?, ?, ?)"
        row = (provider, currency, float(amount), self._clock.time())
        await self.submit("balance", lambda conn: conn.execute_fetchall(sql, row))

    async def save_model_state(self, state: ModelState) -> None:
        """Replace the model's failure-tracking state (``updated_at``: the store's clock)."""
        row = state._replace(updated_at=self._clock.time())
        await self.submit("model_state", lambda conn: conn.execute_fetchall(_SAVE_MODEL_STATE, row))

    async def recent_runs(
        self,
        *,
        provider: str | None = None,
        model: str | None = None,
        probe: str | None = None,
        limit: int = 50,
        since: float | None = None,
        trace_id: str | None = None,
    ) -> list[ProbeResult]:
        """Runs matching every filter given (``since``: finished at or after), newest first,
        at most ``MAX_RECENT_RUNS``."""
        limit = max(0, min(limit, MAX_RECENT_RUNS))  # a negative LIMIT would mean none
        filters = {"provider": provider, "model": model, "probe": probe, "trace_id": trace_id}
        where, params = _where(**filters, since=since)
        order = "ORDER BY finished_at DESC, id DESC LIMIT ?"
        sql = f"SELECT details FROM probe_runs WHERE {where} {order}"  # noqa: S608 - fixed clauses
        rows = await self._select("read", sql, [*params, limit])
        # Decoding a thousand runs takes tens of milliseconds: off the loop that times probes.
        return await anyio.to_thread.run_sync(_decode, rows)

    async def latest_results(self) -> list[ProbeResult]:
        """The latest run of every (provider, model, probe), to restore state at start."""
        return await anyio.to_thread.run_sync(_decode, await self._select("restore", _LATEST_RUNS))

    async def reliability_stats(
        self, *, since: float, provider: str | None = None, model: str | None = None
    ) -> dict[tuple[str, str], ReliabilityStats]:
        """Per (provider, model): aggregates of the runs finished at or after ``since``."""
        where, params = _where(provider=provider, model=model, since=float(since))
        sql = f"{_RELIABILITY} WHERE {where} AND verdict != 'skipped' GROUP BY provider, model"
        rows = await self._select("read", sql, params)  # TOTAL(): 0.0, never NULL
        return {(p, m): ReliabilityStats(*stats) for p, m, *stats in rows}

    async def latest_balances(self) -> dict[tuple[str, str], tuple[float, float]]:
        """(provider, currency) -> (amount, at) of the latest balance recorded."""
        rows = await self._select("restore", _LATEST_BALANCES)
        return {(p, c): (amount, at) for p, c, amount, at in rows}

    async def load_model_states(self) -> dict[tuple[str, str], ModelState]:
        rows = await self._select("restore", _MODEL_STATES)
        return {(row[0], row[1]): ModelState(*row) for row in rows}

    async def cleanup(self, *, older_than: float) -> int:
        """Delete history older than ``older_than`` (see ``_CLEANUP``); return the rows deleted."""
        params = {"cutoff": float(older_than), "now": self._clock.time()}
        deleted = 0
        try:
            for table, key, condition in _CLEANUP:
                sql = (
                    f"DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} "  # noqa: S608
                    f"WHERE {condition} LIMIT {_CLEANUP_BATCH}) RETURNING 1"
                )
                delete = partial(Connection.execute_fetchall, sql=sql, parameters=params)
                for _ in range(10_000):  # bounds the loop: 50 M rows a table and call
                    if (rows := await self.read("cleanup", delete, None, transaction=True)) is None:
                        return deleted  # the fault is reported; the next cleanup continues
                    deleted += (count := len(list(rows)))
                    if count < _CLEANUP_BATCH:
                        break
            if deleted:
                await self.read("cleanup", lambda conn: conn.executescript(_VACUUM), None)
        finally:
            if deleted:  # after a fault too: readers caching on the version must not serve it
                self.history_version += 1
        return deleted

    async def _select(self, op: str, sql: str, params: Iterable[object] = ()) -> Iterable[Any]:
        return await self.read(op, lambda conn: conn.execute_fetchall(sql, tuple(params)), [])


def _where(**filters: object) -> tuple[str, list[object]]:
    """``column = ?`` for every filter given (``finished_at >= ?`` for ``since``)."""
    given = {name: value for name, value in filters.items() if value is not None}
    clauses = ["finished_at >= ?" if name == "since" else f"{name} = ?" for name in given]
    return " AND ".join(["1", *clauses]), list(given.values())


def _decode(rows: Iterable[Any]) -> list[ProbeResult]:
    results: list[ProbeResult] = []
    for row in rows:
        try:
            results.append(ProbeResult.from_dict(json.loads(row[0])))
        except (ValueError, KeyError, TypeError) as exc:
            # One unreadable row (hand-edited, or from a newer exporter) must not hide the rest.
            log.warning("store: skipping a stored run that cannot be read: %s", exc)
    return results
