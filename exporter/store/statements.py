"""The SQL the store runs, as small functions of a connection (inside a transaction the engine
opens, or as a plain read). Values are always bound parameters; the only text interpolated
into SQL is the fixed table and column names below."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any, Final

from exporter.reliability import ReliabilityStats
from exporter.results import ProbeResult, Verdict
from exporter.store.engine import Connection
from exporter.store.models import (
    LedgerDecision,
    LedgerLimits,
    LedgerTotals,
    LedgerWindows,
    ModelState,
    WindowTotals,
)

log = logging.getLogger("exporter.store")

_RUN_COLUMNS: Final = (
    "run_id",
    "provider",
    "model",
    "probe",
    "verdict",
    "caching_works",
    "hit_ratio",
    "success",
    "error_type",
    "error",
    "started_at",
    "finished_at",
    "duration_seconds",
    "details",
)
_USAGE_COLUMNS: Final = (
    "run_id",
    "provider",
    "model",
    "prompt_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "completion_tokens",
    "spend_usd",
    "savings_usd",
    "at",
)


def _upsert_sql(table: str, columns: Sequence[str], key: str) -> str:
    # An upsert, so a write retried after a commit whose acknowledgement was lost is harmless.
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != key)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) "  # noqa: S608 - fixed names only
        f"VALUES ({', '.join('?' for _ in columns)}) "
        f"ON CONFLICT ({key}) DO UPDATE SET {updates}"
    )


_UPSERT_RUN: Final = _upsert_sql("probe_runs", _RUN_COLUMNS, "run_id")
_UPSERT_USAGE: Final = _upsert_sql("token_usage", _USAGE_COLUMNS, "run_id")

# --- history writes -----------------------------------------------------------------------


def run_row(result: ProbeResult) -> tuple[Any, ...]:
    """The probe_runs row; raises TypeError/ValueError if the result is not serialisable."""
    works = result.caching_works
    return (
        result.run_id,
        result.provider,
        result.model,
        result.probe,
        result.verdict.value,
        None if works is None else int(works),
        result.hit_ratio,
        int(result.success),
        result.error_type.value if result.error_type else None,
        result.error,
        result.started_at,
        result.finished_at,
        result.duration_seconds,
        # The whole result: the columns above are for filtering, this is what is read back.
        json.dumps(result.to_dict(), separators=(",", ":")),
    )


def usage_row(result: ProbeResult, spend_usd: float, savings_usd: float) -> tuple[Any, ...]:
    def total(values: Iterable[int | None]) -> int | None:
        reported = [v for v in values if v is not None]
        return sum(reported) if reported else None

    requests = result.requests
    return (
        result.run_id,
        result.provider,
        result.model,
        total(r.prompt_tokens for r in requests) or 0,
        # None when no request reported the field: "not reported" is not "0 cached".
        total(r.cached_tokens for r in requests),
        total(r.cache_write_tokens for r in requests),
        total(r.completion_tokens for r in requests) or 0,
        float(spend_usd),
        float(savings_usd),
        result.finished_at,
    )


async def upsert_run(conn: Connection, *, run: tuple[Any, ...], usage: tuple[Any, ...]) -> None:
    await conn.execute_fetchall(_UPSERT_RUN, run)
    await conn.execute_fetchall(_UPSERT_USAGE, usage)


async def insert_balance(conn: Connection, *, row: tuple[Any, ...]) -> None:
    await conn.execute_fetchall(
        "INSERT INTO balances (provider, currency, amount, at) VALUES (?, ?, ?, ?)", row
    )


async def upsert_model_state(conn: Connection, *, row: tuple[Any, ...]) -> None:
    await conn.execute_fetchall(
        "INSERT INTO model_state (provider, model, consecutive_failures, "
        "consecutive_successes, cooldown_until, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (provider, model) DO UPDATE SET "
        "consecutive_failures = excluded.consecutive_failures, "
        "consecutive_successes = excluded.consecutive_successes, "
        "cooldown_until = excluded.cooldown_until, updated_at = excluded.updated_at",
        row,
    )


async def delete(conn: Connection, *, sql: str, params: tuple[Any, ...]) -> int:
    async with conn.execute(sql, params) as cursor:
        return max(0, cursor.rowcount)


# --- history reads ------------------------------------------------------------------------


def decode_runs(rows: Iterable[Any]) -> list[ProbeResult]:
    results: list[ProbeResult] = []
    for row in rows:
        try:
            results.append(ProbeResult.from_dict(json.loads(row[0])))
        except (ValueError, KeyError, TypeError) as exc:
            # One unreadable row (hand-edited, or from a newer exporter) must not hide the rest.
            log.warning("store: skipping a stored run that cannot be read: %s", exc)
    return results


async def select_recent_runs(
    conn: Connection,
    *,
    provider: str | None,
    model: str | None,
    probe: str | None,
    since: float | None,
    limit: int,
) -> list[ProbeResult]:
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (("provider", provider), ("model", model), ("probe", probe)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if since is not None:
        clauses.append("finished_at >= ?")
        params.append(float(since))
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    params.append(limit)
    rows = await conn.execute_fetchall(
        f"SELECT details FROM probe_runs {where} "  # noqa: S608 - fixed column names only
        "ORDER BY finished_at DESC, id DESC LIMIT ?",
        params,
    )
    return decode_runs(rows)


async def select_latest_runs(conn: Connection) -> list[ProbeResult]:
    # DISTINCT over the (provider, model, probe, finished_at) index, then one index seek per
    # target: no scan of the details column of every run.
    rows = await conn.execute_fetchall(
        """
        SELECT r.details
        FROM (SELECT DISTINCT provider, model, probe FROM probe_runs) AS t
        JOIN probe_runs AS r ON r.id = (
            SELECT id FROM probe_runs
            WHERE provider = t.provider AND model = t.model AND probe = t.probe
            ORDER BY finished_at DESC, id DESC
            LIMIT 1
        )
        ORDER BY t.provider, t.model, t.probe
        """
    )
    return decode_runs(rows)


async def select_reliability_inputs(
    conn: Connection, *, since: float
) -> dict[tuple[str, str], list[tuple[Verdict, float | None]]]:
    rows = await conn.execute_fetchall(
        "SELECT provider, model, verdict, hit_ratio FROM probe_runs "
        "WHERE finished_at >= ? ORDER BY finished_at, id",
        (float(since),),
    )
    out: dict[tuple[str, str], list[tuple[Verdict, float | None]]] = {}
    for provider, model, verdict, hit_ratio in rows:
        try:
            parsed = Verdict(verdict)
        except ValueError:
            continue  # written by a newer exporter: not ours to score
        out.setdefault((provider, model), []).append((parsed, hit_ratio))
    return out


async def select_reliability_stats(
    conn: Connection, *, since: float, provider: str | None, model: str | None
) -> dict[tuple[str, str], ReliabilityStats]:
    """Aggregates for the reliability score, computed by SQLite over the window."""
    where = ["finished_at >= ?", "verdict != 'skipped'"]
    params: list[object] = [float(since)]
    if provider is not None:
        where.append("provider = ?")
        params.append(provider)
    if model is not None:
        where.append("model = ?")
        params.append(model)
    # Only fixed clauses are joined into the text; every value is a bound parameter.
    query = (
        "SELECT provider, model, COUNT(*), SUM(success), "  # noqa: S608
        "SUM(CASE WHEN success = 1 AND caching_works = 1 THEN 1 ELSE 0 END), "
        "SUM(CASE WHEN success = 1 THEN hit_ratio END), "
        "SUM(CASE WHEN success = 1 AND hit_ratio IS NOT NULL THEN 1 ELSE 0 END) "
        f"FROM probe_runs WHERE {' AND '.join(where)} "
        "GROUP BY provider, model"
    )
    rows = await conn.execute_fetchall(query, params)
    return {
        (prov, mod): ReliabilityStats(
            runs=int(runs),
            successes=int(successes or 0),
            consistent=int(consistent or 0),
            hit_ratio_sum=float(ratio_sum or 0.0),
            hit_ratio_count=int(ratio_count or 0),
        )
        for prov, mod, runs, successes, consistent, ratio_sum, ratio_count in rows
    }


async def select_latest_balances(conn: Connection) -> dict[tuple[str, str], tuple[float, float]]:
    rows = await conn.execute_fetchall(
        """
        SELECT b.provider, b.currency, b.amount, b.at
        FROM (SELECT DISTINCT provider, currency FROM balances) AS t
        JOIN balances AS b ON b.id = (
            SELECT id FROM balances
            WHERE provider = t.provider AND currency = t.currency
            ORDER BY at DESC, id DESC
            LIMIT 1
        )
        """
    )
    return {(p, c): (float(amount), float(at)) for p, c, amount, at in rows}


async def select_model_states(conn: Connection) -> dict[tuple[str, str], ModelState]:
    rows = await conn.execute_fetchall(
        "SELECT provider, model, consecutive_failures, consecutive_successes, "
        "cooldown_until, updated_at FROM model_state"
    )
    return {
        (p, m): ModelState(p, m, int(failures), int(successes), cooldown, float(updated))
        for p, m, failures, successes, cooldown, updated in rows
    }


async def integrity_problems(conn: Connection) -> str:
    problems = [
        str(row[0])
        for row in await conn.execute_fetchall("PRAGMA integrity_check")
        if str(row[0]) != "ok"
    ]
    problems += [
        f"foreign key violation: {row[0]} rowid {row[1]} references {row[2]}"
        for row in await conn.execute_fetchall("PRAGMA foreign_key_check")
    ]
    return "\n".join(problems) if problems else "ok"


async def maintain(conn: Connection) -> None:
    """After deleting rows: hand free pages back to the filesystem, refresh statistics."""
    await conn.execute_fetchall("PRAGMA incremental_vacuum")
    await conn.execute_fetchall("PRAGMA optimize")


# --- budget ledger ------------------------------------------------------------------------


async def read_totals(
    conn: Connection, provider: str, day_start: int, month_start: int
) -> LedgerTotals:
    rows = await conn.execute_fetchall(
        "SELECT kind, tokens, nanousd FROM budget_windows WHERE provider = ? AND "
        "((kind = 'day' AND start = ?) OR (kind = 'month' AND start = ?))",
        (provider, day_start, month_start),
    )
    used = {kind: (int(tokens), int(nanousd)) for kind, tokens, nanousd in rows}
    day = used.get("day", (0, 0))
    month = used.get("month", (0, 0))
    return LedgerTotals(
        provider,
        WindowTotals(day_start, day[0], day[1]),
        WindowTotals(month_start, month[0], month[1]),
    )


async def reserve(
    conn: Connection,
    *,
    provider: str,
    tokens: int,
    nanousd: int,
    at: float,
    windows: LedgerWindows,
    limits: LedgerLimits,
) -> LedgerDecision:
    """Check and insert; the caller's transaction must hold the write lock (BEGIN IMMEDIATE)."""
    totals = await read_totals(conn, provider, windows.day_start, windows.month_start)
    if not limits.admits(totals, tokens, nanousd):
        return LedgerDecision(None, totals)
    row = await conn.execute_insert(
        "INSERT INTO budget_ledger (provider, reserved_tokens, reserved_nanousd, at, "
        "day_start, month_start, month_end) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (provider, tokens, nanousd, at, windows.day_start, windows.month_start, windows.month_end),
    )
    if row is None:  # pragma: no cover - execute_insert always returns the rowid row
        raise LookupError("no rowid for the reservation")
    for kind, start, end in (
        ("day", windows.day_start, windows.day_end),
        ("month", windows.month_start, windows.month_end),
    ):
        await conn.execute_fetchall(
            'INSERT INTO budget_windows (provider, kind, start, "end", tokens, nanousd) '
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (provider, kind, start) DO UPDATE "
            "SET tokens = tokens + excluded.tokens, nanousd = nanousd + excluded.nanousd",
            (provider, kind, start, end, tokens, nanousd),
        )
    after = await read_totals(conn, provider, windows.day_start, windows.month_start)
    return LedgerDecision(int(row[0]), after)


async def settle(
    conn: Connection,
    *,
    reservation_id: int,
    tokens: int | None,
    nanousd: int | None,
    settled_at: float,
    outcome: list[LedgerTotals],
) -> None:
    """Replace reserved by actual amounts, in the ledger row and its windows' totals.

    Appends the windows' totals afterwards to ``outcome`` (the engine's queued writes return
    nothing). A reservation already settled is left alone, so a retried settlement is
    harmless.
    """
    rows = list(
        await conn.execute_fetchall(
            "SELECT provider, reserved_tokens, reserved_nanousd, day_start, month_start "
            "FROM budget_ledger WHERE id = ? AND settled = 0",
            (reservation_id,),
        )
    )
    if not rows:
        return
    provider, reserved_tokens, reserved_nanousd, day_start, month_start = rows[0]
    # Unknown actuals keep the reserved amount: the conservative choice.
    actual_tokens = reserved_tokens if tokens is None else tokens
    actual_nanousd = reserved_nanousd if nanousd is None else nanousd
    await conn.execute_fetchall(
        "UPDATE budget_ledger SET settled = 1, actual_tokens = ?, actual_nanousd = ?, "
        "settled_at = ? WHERE id = ?",
        (actual_tokens, actual_nanousd, settled_at, reservation_id),
    )
    await conn.execute_fetchall(
        "UPDATE budget_windows SET tokens = tokens + ?, nanousd = nanousd + ? "
        "WHERE provider = ? AND ((kind = 'day' AND start = ?) OR (kind = 'month' AND start = ?))",
        (
            actual_tokens - reserved_tokens,
            actual_nanousd - reserved_nanousd,
            provider,
            day_start,
            month_start,
        ),
    )
    outcome.append(await read_totals(conn, provider, day_start, month_start))
