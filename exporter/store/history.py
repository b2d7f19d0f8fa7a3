"""The store: probe history, token usage, balances and model state, on top of the ledger.

``ProbeStore`` is the part the recorder and the HTTP side depend on (fakes implement it).
Values are always bound parameters; only the fixed table and column names below go into SQL.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Protocol

import anyio.to_thread

from exporter.reliability import ReliabilityStats
from exporter.results import ProbeResult
from exporter.store.engine import FAULTS, Connection, describe, integrity_problems
from exporter.store.ledger import Ledger

log = logging.getLogger("exporter.store")

MAX_RECENT_RUNS: Final = 1000  # cap on one recent_runs() answer
_CLEANUP_BATCH: Final = 5000  # rows per delete transaction: the write lock is never held long
_CLEANUP_MAX_BATCHES: Final = 10_000  # per table and call, to bound the loop
_RUN_COLUMNS: Final = (
    "run_id provider model probe verdict caching_works hit_ratio error_type error started_at "
    "finished_at duration_seconds"
).split()
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
# What retention deletes, by key, in batches. Windows still open are never cleaned, whatever
# cutoff the caller passes; nor are open reservations of a month that is not over.
_CLEANUP: Final = (
    ("token_usage", "id", "at < :cutoff"),
    ("probe_runs", "id", "finished_at < :cutoff"),
    ("budget_ledger", "id", "at < :cutoff AND (settled = 1 OR month_end <= :now)"),
    ("balances", "id", "at < :cutoff"),
    ("budget_windows", "provider, kind, start", '"end" <= min(:cutoff, :now)'),
    ("model_state", "provider, model", "updated_at < :cutoff"),
)


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
        self,
        *,
        provider: str | None = None,
        model: str | None = None,
        probe: str | None = None,
        limit: int = 50,
        since: float | None = None,
    ) -> list[ProbeResult]: ...
    async def latest_results(self) -> list[ProbeResult]: ...
    async def reliability_stats(
        self, *, since: float, provider: str | None = None, model: str | None = None
    ) -> dict[tuple[str, str], ReliabilityStats]: ...
    async def save_balance(self, provider: str, currency: str, amount: float) -> None: ...
    async def latest_balances(self) -> dict[tuple[str, str], tuple[float, float]]: ...
    async def save_model_state(
        self,
        provider: str,
        model: str,
        *,
        consecutive_failures: int,
        consecutive_successes: int,
        cooldown_until: float | None,
    ) -> None: ...
    async def load_model_states(self) -> dict[tuple[str, str], ModelState]: ...
    async def cleanup(self, *, older_than: float) -> int: ...
    async def flush(self) -> int: ...
    @property
    def healthy(self) -> bool: ...


class Store(Ledger):
    """SQLite-backed history and budget ledger. Create with ``await Store.open(...)``."""

    # Bumped by every change of the run history, so readers can cache what they built.
    history_version = 0

    async def record_run(
        self, result: ProbeResult, *, spend_usd: float = 0.0, savings_usd: float = 0.0
    ) -> None:
        """Store a run and its token usage in one transaction (queued for retry on failure)."""
        r = result
        try:  # the whole result is what is read back; the other columns are for filtering
            data = r.to_dict()
            details = json.dumps(data, separators=(",", ":"))
        except (TypeError, ValueError) as exc:  # a bug no retry can fix: do not block the queue
            log.error("store: run %s of %s/%s not stored: %s", r.run_id, r.provider, r.model, exc)
            self.report("write_run")
            return
        run = {name: data[name] for name in _RUN_COLUMNS}
        run |= {"success": r.success, "details": details}
        usage = {
            "run_id": r.run_id,
            "provider": r.provider,
            "model": r.model,
            "prompt_tokens": _total(q.prompt_tokens for q in r.requests) or 0,
            "cached_tokens": _total(q.cached_tokens for q in r.requests),
            "cache_write_tokens": _total(q.cache_write_tokens for q in r.requests),
            "completion_tokens": _total(q.completion_tokens for q in r.requests) or 0,
            "spend_usd": float(spend_usd),
            "savings_usd": float(savings_usd),
            "at": r.finished_at,
        }

        async def write(conn: Connection) -> None:
            await _replace(conn, "probe_runs", run)
            await _replace(conn, "token_usage", usage)

        await self.submit("write_run", write)
        self.history_version += 1

    async def save_balance(self, provider: str, currency: str, amount: float) -> None:
        """Record a balance the provider reported, stamped with the store's clock."""
        row = {"provider": provider, "currency": currency, "amount": float(amount)}
        row["at"] = self._clock.time()
        await self.submit("balance", partial(_replace, table="balances", row=row))

    async def save_model_state(
        self,
        provider: str,
        model: str,
        *,
        consecutive_failures: int,
        consecutive_successes: int,
        cooldown_until: float | None,
    ) -> None:
        """Replace the model's failure-tracking state (stamped with the store's clock)."""
        row = {
            "provider": provider,
            "model": model,
            "consecutive_failures": int(consecutive_failures),
            "consecutive_successes": int(consecutive_successes),
            "cooldown_until": cooldown_until,
            "updated_at": self._clock.time(),
        }
        await self.submit("model_state", partial(_replace, table="model_state", row=row))

    async def recent_runs(
        self,
        *,
        provider: str | None = None,
        model: str | None = None,
        probe: str | None = None,
        limit: int = 50,
        since: float | None = None,
    ) -> list[ProbeResult]:
        """Runs matching every filter given, newest (by finish time) first; ``limit`` is
        capped at ``MAX_RECENT_RUNS``; ``since`` keeps runs finished at or after it."""
        if (limit := min(int(limit), MAX_RECENT_RUNS)) <= 0:
            return []
        where, params = _where(provider=provider, model=model, probe=probe, since=since)
        sql = f"SELECT details FROM probe_runs WHERE {where} "  # noqa: S608 - fixed clauses
        rows = await self._select(
            "read", sql + "ORDER BY finished_at DESC, id DESC LIMIT ?", [*params, limit]
        )
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
        return {
            (p, m): ReliabilityStats(n, ok or 0, works or 0, float(hits or 0), count or 0)
            for p, m, n, ok, works, hits, count in await self._select("read", sql, params)
        }

    async def latest_balances(self) -> dict[tuple[str, str], tuple[float, float]]:
        """(provider, currency) -> (amount, at) of the latest balance recorded."""
        rows = await self._select("restore", _LATEST_BALANCES)
        return {(p, c): (amount, at) for p, c, amount, at in rows}

    async def load_model_states(self) -> dict[tuple[str, str], ModelState]:
        columns = "consecutive_failures, consecutive_successes, cooldown_until, updated_at"
        rows = await self._select("restore", f"SELECT provider, model, {columns} FROM model_state")
        return {(row[0], row[1]): ModelState(*row) for row in rows}

    async def cleanup(self, *, older_than: float) -> int:
        """Delete history older than ``older_than``; return the number of rows deleted.

        Retention never gives budget back (docs/storage.md, "Retention"). Each batch is its
        own transaction, so reservations never wait long for the write lock.
        """
        params = {"cutoff": float(older_than), "now": self._clock.time()}
        deleted = 0
        try:
            for table, key, condition in _CLEANUP:
                sql = (
                    f"DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} "  # noqa: S608
                    f"WHERE {condition} LIMIT {_CLEANUP_BATCH}) RETURNING 1"
                )
                for _ in range(_CLEANUP_MAX_BATCHES):
                    count = await self.run(
                        partial(_count, sql=sql, params=params), transaction=True
                    )
                    deleted += count
                    if count < _CLEANUP_BATCH:
                        break
            if deleted:  # hand free pages back to the filesystem, refresh statistics
                self.history_version += 1
                await self.run(_vacuum)
        except FAULTS as exc:
            self.report("cleanup", exc)
        return deleted

    async def integrity_check(self) -> str:
        """``"ok"``, or the problems found, or ``"unavailable: …"`` when unreadable."""
        try:
            return await self.run(integrity_problems)
        except FAULTS as exc:
            self.report("read", exc)
            return f"unavailable: {describe(exc)}"

    async def _select(self, op: str, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        return await self.read(op, partial(_rows, sql=sql, params=tuple(params)), [])


def _total(values: Iterable[int | None]) -> int | None:
    reported = [v for v in values if v is not None]
    return sum(reported) if reported else None  # None: "not reported", never 0


def _where(**filters: object) -> tuple[str, list[object]]:
    """``col = ?`` (``finished_at >= ?`` for since) for every filter given."""
    given = {name: value for name, value in filters.items() if value is not None}
    clauses = ["finished_at >= ?" if name == "since" else f"{name} = ?" for name in given]
    return " AND ".join(["1", *clauses]), list(given.values())


async def _replace(conn: Connection, table: str, row: Mapping[str, object]) -> None:
    # A write retried after a commit whose acknowledgement was lost then changes nothing.
    names, marks = ", ".join(row), ", ".join(f":{name}" for name in row)
    await conn.execute_fetchall(f"INSERT OR REPLACE INTO {table} ({names}) VALUES ({marks})", row)  # noqa: S608


async def _vacuum(conn: Connection) -> None:
    await conn.executescript("PRAGMA incremental_vacuum; PRAGMA optimize")


async def _rows(conn: Connection, *, sql: str, params: tuple[Any, ...]) -> list[Any]:
    return list(await conn.execute_fetchall(sql, params))


async def _count(conn: Connection, *, sql: str, params: Mapping[str, object]) -> int:
    return len(list(await conn.execute_fetchall(sql, params)))


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
