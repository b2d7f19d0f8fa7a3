"""Forward-only schema migrations; ``PRAGMA user_version`` = migrations applied. Never edit a
released migration: append a new one (docs/storage.md, "Schema" and "Migrations")."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import NamedTuple, TypeVar

import aiosqlite

T = TypeVar("T")
Connection = aiosqlite.Connection
Body = Callable[[Connection], Awaitable[T]]


class StoreError(Exception):
    """The store cannot be opened. The message is one line an operator can act on."""


class SchemaTooNewError(StoreError):
    """The file was written by a newer exporter; downgrading the schema is not supported."""


class Migration(NamedTuple):
    """One schema step; its version is its place in the list (``MIGRATIONS[0]`` is 1)."""

    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "initial schema",
        (
            """CREATE TABLE probe_runs (id INTEGER PRIMARY KEY, run_id TEXT NOT NULL UNIQUE,
            provider TEXT NOT NULL, model TEXT NOT NULL, probe TEXT NOT NULL, verdict TEXT NOT NULL,
            caching_works INTEGER CHECK (caching_works IN (0, 1)), hit_ratio REAL,
            success INTEGER NOT NULL CHECK (success IN (0, 1)), error_type TEXT, error TEXT,
            started_at REAL NOT NULL, finished_at REAL NOT NULL, duration_seconds REAL NOT NULL,
            details TEXT NOT NULL)""",
            "CREATE INDEX probe_runs_target ON probe_runs (provider, model, probe, finished_at)",
            "CREATE INDEX probe_runs_probe ON probe_runs (probe, finished_at)",
            "CREATE INDEX probe_runs_finished ON probe_runs (finished_at)",
            """CREATE TABLE token_usage (id INTEGER PRIMARY KEY, run_id TEXT NOT NULL UNIQUE
            REFERENCES probe_runs (run_id) ON DELETE CASCADE, provider TEXT NOT NULL,
            model TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, cached_tokens INTEGER,
            cache_write_tokens INTEGER, completion_tokens INTEGER NOT NULL,
            spend_usd REAL NOT NULL, savings_usd REAL NOT NULL, at REAL NOT NULL)""",
            "CREATE INDEX token_usage_at ON token_usage (at)",
            "CREATE INDEX token_usage_target ON token_usage (provider, model, at)",
            """CREATE TABLE budget_ledger (id INTEGER PRIMARY KEY, provider TEXT NOT NULL,
            reserved_tokens INTEGER NOT NULL CHECK (reserved_tokens >= 0),
            reserved_nanousd INTEGER NOT NULL CHECK (reserved_nanousd >= 0),
            actual_tokens INTEGER CHECK (actual_tokens >= 0),
            actual_nanousd INTEGER CHECK (actual_nanousd >= 0),
            settled INTEGER NOT NULL DEFAULT 0 CHECK (settled IN (0, 1)), at REAL NOT NULL,
            settled_at REAL, day_start INTEGER NOT NULL, month_start INTEGER NOT NULL,
            month_end INTEGER NOT NULL)""",
            "CREATE INDEX budget_ledger_provider ON budget_ledger (provider, at)",
            "CREATE INDEX budget_ledger_at ON budget_ledger (at)",
            """CREATE TABLE budget_windows (provider TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('day', 'month')), start INTEGER NOT NULL,
            "end" INTEGER NOT NULL, tokens INTEGER NOT NULL DEFAULT 0, nanousd INTEGER NOT NULL
            DEFAULT 0, PRIMARY KEY (provider, kind, start)) WITHOUT ROWID""",
            'CREATE INDEX budget_windows_end ON budget_windows ("end")',
            """CREATE TABLE balances (id INTEGER PRIMARY KEY, provider TEXT NOT NULL,
            currency TEXT NOT NULL, amount REAL NOT NULL, at REAL NOT NULL)""",
            "CREATE INDEX balances_latest ON balances (provider, currency, at)",
            "CREATE INDEX balances_at ON balances (at)",
            """CREATE TABLE model_state (provider TEXT NOT NULL, model TEXT NOT NULL,
            consecutive_failures INTEGER NOT NULL, consecutive_successes INTEGER NOT NULL,
            cooldown_until REAL, updated_at REAL NOT NULL, PRIMARY KEY (provider, model))
            WITHOUT ROWID""",
        ),
    ),
    Migration(
        "probe_runs.trace_id",
        (
            "ALTER TABLE probe_runs ADD COLUMN trace_id TEXT",
            "CREATE INDEX probe_runs_trace ON probe_runs (trace_id) WHERE trace_id IS NOT NULL",
        ),
    ),
)

_AUDIT_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,
    name TEXT NOT NULL, applied_at REAL NOT NULL)"""


async def atomically(conn: Connection, body: Body[T]) -> T:
    """``body`` in one transaction, committed whole or rolled back. IMMEDIATE takes the write
    lock before anything is read, so nothing ``body`` reads can change before it writes."""
    await conn.execute_fetchall("BEGIN IMMEDIATE")
    try:
        result = await body(conn)
        await conn.execute_fetchall("COMMIT")
    except BaseException:
        if conn.in_transaction:
            await conn.execute_fetchall("ROLLBACK")
        raise
    return result


async def schema_version(conn: Connection) -> int:
    ((version,),) = await conn.execute_fetchall("PRAGMA user_version")
    return int(version)


async def migrate(
    conn: Connection, *, now: float, migrations: Sequence[Migration] = MIGRATIONS
) -> int:
    """Bring the schema up to date, one transaction per migration; return the version after.
    Raises ``SchemaTooNewError`` for a file from (or migrated meanwhile by) a newer exporter."""
    version = await schema_version(conn)
    for number, migration in enumerate(migrations[version:], start=version + 1):
        await atomically(conn, partial(_apply, migration=migration, number=number, now=now))
    if (version := await schema_version(conn)) > len(migrations):
        raise SchemaTooNewError(
            f"database schema version {version} is newer than this exporter supports "
            f"({len(migrations)}); upgrade the exporter or point it at another database file"
        )
    return version


async def _apply(conn: Connection, *, migration: Migration, number: int, now: float) -> None:
    # Re-read under the write lock: another process may have migrated meanwhile.
    if await schema_version(conn) >= number:
        return
    for statement in (_AUDIT_TABLE, *migration.statements, f"PRAGMA user_version = {number}"):
        await conn.execute_fetchall(statement)  # (a PRAGMA binds no parameters)
    await conn.execute_fetchall(
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
        (number, migration.name, now),
    )
