"""The connection, its transactions, and what happens when the database misbehaves.

One aiosqlite connection behind an anyio lock; writes are ``BEGIN IMMEDIATE … COMMIT`` under a
cancel shield. Faults never escape ``submit``/``read``: one log line, ``on_error(operation)``,
and failed writes wait in a bounded FIFO queue that lands in order on the next write or flush.
"""

from __future__ import annotations

import itertools
import logging
import os
import sqlite3
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Final, TypeVar

import aiosqlite
import anyio

from exporter.clock import Clock
from exporter.store.migrations import StoreError, migrate

log = logging.getLogger("exporter.store")
T = TypeVar("T")

DEFAULT_BUSY_TIMEOUT: Final = 5.0  # seconds to wait for another connection's write lock
DEFAULT_MAX_PENDING: Final = 10_000  # failed writes kept in memory for retry
_DRAIN_BATCH: Final = 500  # queued writes committed per transaction when draining
# "Not usable right now": sqlite3 errors, OSError (mkdir), ValueError (aiosqlite's connection
# is gone), StoreError (reopening failed: a newer schema, a corrupted file).
FAULTS: Final = (sqlite3.Error, OSError, ValueError, StoreError)
_CONTENTION: Final = ("SQLITE_BUSY", "SQLITE_LOCKED")  # the connection itself is fine
_POISON: Final = (sqlite3.IntegrityError, sqlite3.DataError)  # the row itself is refused

Connection = aiosqlite.Connection
Connector = Callable[[Path, float], Awaitable[Connection]]
"""Opens the connection: ``(path, busy_timeout_seconds) -> connection`` in autocommit mode."""
Apply = Callable[[Connection], Awaitable[object]]
_Item = tuple[str, Apply, list[str]]  # (operation, write, [pending | landed | dropped])


async def connect_sqlite(path: Path, busy_timeout: float) -> Connection:
    # Autocommit: transactions are explicit, never opened behind the store's back.
    return await aiosqlite.connect(path, timeout=busy_timeout, isolation_level=None)


class Engine:
    def __init__(
        self,
        path: Path,
        *,
        clock: Clock,
        on_error: Callable[[str], None] | None,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        max_pending: int = DEFAULT_MAX_PENDING,
        connector: Connector = connect_sqlite,
    ) -> None:
        self.path, self._clock, self._on_error = path, clock, on_error
        self._busy_timeout, self._connector = busy_timeout, connector
        self._lock, self._pending = anyio.Lock(), deque[_Item]()
        self._conn: Connection | None = None
        self._max_pending, self.dropped_writes = max(1, max_pending), 0
        # (st_dev, st_ino) when opened: SQLite keeps writing to an unlinked inode without an
        # error, so every use compares it with what the path holds now.
        self._identity: tuple[int, int] | None = None
        # _broken: reopen before the next operation; _reopen_for_write: before the next write
        # even if a read reopened meanwhile (a read works on a read-only file).
        self._broken = self._reopen_for_write = self._closed = False
        self._healthy = True
        # Runs on a file that replaced ours before anything else does (the ledger carries its
        # totals over); _replaced: still owed, and every operation fails until it succeeds.
        self.on_replaced: Callable[[Connection], Awaitable[None]] | None = None
        self._replaced = False

    @property
    def healthy(self) -> bool:
        """Can record: the last write (or drain) succeeded and the store is open."""
        return self._healthy and not self._closed

    @property
    def pending_writes(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        """Connect, check and migrate; raises (StoreError or a fault) when impossible."""
        try:
            await self.run(_connected)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._disconnect()
            raise

    async def close(self) -> int:
        """Flush once, close; return the number of writes that could not be saved."""
        if not self._closed:
            with anyio.CancelScope(shield=True):
                await self.flush()
                async with self._lock:
                    self._closed = True
                    await self._disconnect()
        return len(self._pending)

    async def submit(self, op: str, apply: Apply) -> bool:
        """Queue a write behind earlier failed ones, commit the queue; True if it landed."""
        item: _Item = (op, apply, ["pending"])
        async with self._lock:
            if len(self._pending) >= self._max_pending:
                oldest = self._pending.popleft()
                oldest[2][0] = "dropped"
                self.dropped_writes += 1
                log.error("store: retry queue full (%d writes); dropped the oldest %s write "
                          "(%d dropped since start)", self._max_pending, oldest[0],
                          self.dropped_writes)  # fmt: skip
            self._pending.append(item)
            error = await self._drain_locked()
        if item[2][0] == "pending":
            self.report(op, error)
        return item[2][0] == "landed"

    async def flush(self) -> int:
        """Retry queued writes now; return how many are still waiting (0 = all saved)."""
        async with self._lock:
            error = await self._drain_locked()
            head = self._pending[0][0] if self._pending else None
        if error is not None and head is not None:
            self.report(head, error)
        return len(self._pending)

    async def read(self, op: str, query: Callable[[Connection], Awaitable[T]], default: T) -> T:
        """Run a query; on a fault report ``op`` and return ``default``."""
        try:
            result = await self.run(query)
        except FAULTS as exc:
            self.report(op, exc)
            return default
        # The database answers; but writes still queued mean it cannot record yet.
        self._healthy = self._healthy or not self._pending
        return result

    async def write(self, body: Callable[[Connection], Awaitable[T]]) -> T:
        """One transaction now, not queued; faults are raised (after bookkeeping)."""
        return await self.run(body, transaction=True)

    async def run(self, body: Callable[[Connection], Awaitable[T]], *, transaction: bool = False
                  ) -> T:  # fmt: skip
        """``body`` on the connection (in a transaction if asked); faults are raised."""
        async with self._lock:
            try:
                with anyio.CancelScope(shield=True):
                    conn = None if transaction else await self._connection()
                    result = await (body(conn) if conn else self._transaction(body))
            except FAULTS as exc:
                self._healthy, self._broken = False, self._broken or _needs_reopen(exc)
                raise
        return result

    def report(self, op: str, exc: BaseException | None = None) -> None:
        """Log a fault of ``op`` (one line) and tell ``on_error``."""
        if exc is not None:
            queued = f"; {len(self._pending)} writes queued for retry" if self._pending else ""
            log.warning("store: %s failed: %s%s", op, describe(exc), queued)
        if self._on_error is not None:
            try:
                self._on_error(op)
            except Exception:  # a broken metrics hook must not turn a handled fault unhandled
                log.exception("store: on_error callback failed")

    async def _drain_locked(self) -> BaseException | None:
        """Commit queued writes in order, in batches; stop at the first fault and return it."""
        for _ in range(len(self._pending) // _DRAIN_BATCH + 1):
            if not self._pending:
                break
            batch = list(itertools.islice(self._pending, _DRAIN_BATCH))
            try:
                with anyio.CancelScope(shield=True):
                    rejected = await self._transaction(partial(_apply_batch, batch=batch))
            except FAULTS as exc:
                self._healthy, self._broken = False, self._broken or _needs_reopen(exc)
                return exc
            for item in batch:
                self._pending.popleft()
                item[2][0] = "landed"
            for (op, _, state), why in rejected:
                state[0] = "dropped"
                log.error("store: %s write rejected by the database and dropped: %s", op,
                          describe(why))  # fmt: skip
                self.report(op)
        return None

    async def _transaction(self, body: Callable[[Connection], Awaitable[T]]) -> T:
        # IMMEDIATE takes the write lock up front: a deferred read-then-write could find its
        # snapshot stale, and the budget check must read totals nobody can change meanwhile.
        conn = await self._connection(write=True)
        try:
            await conn.execute_fetchall("BEGIN IMMEDIATE")
            result = await body(conn)
            await conn.execute_fetchall("COMMIT")
        except BaseException as exc:
            try:
                if conn.in_transaction:
                    await conn.execute_fetchall("ROLLBACK")
            except FAULTS:
                self._broken = True  # cannot tell what state it is in: start afresh
            self._reopen_for_write = self._reopen_for_write or _needs_reopen(exc)
            raise
        self._healthy, self._reopen_for_write = True, False
        return result

    async def _connection(self, *, write: bool = False) -> Connection:
        """The open connection, (re)opened first when needed. The caller holds the lock."""
        if self._closed:
            raise StoreError("store is closed")
        conn, before = self._conn, self._identity
        if conn is not None and not self._broken and not (write and self._reopen_for_write):
            if _file_identity(self.path) == before:
                return conn
            log.warning("store: database file %s was replaced or removed; reopening", self.path)
        await self._disconnect()
        # Compared before reopening: a new file may well reuse the freed inode number.
        changed = before is not None and _file_identity(self.path) != before
        self._replaced = self._replaced or changed
        conn = await self._connect(check=before is None or changed)
        if self._replaced and self.on_replaced is not None:
            try:
                await self.on_replaced(conn)
            except BaseException:
                await _close_quietly(conn)
                raise
            self._replaced = False
        self._conn, self._broken = conn, False
        return conn

    async def _connect(self, *, check: bool) -> Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = await self._connector(self.path, self._busy_timeout)
        try:
            conn.row_factory = sqlite3.Row
            # auto_vacuum lets cleanup return pages without VACUUM; it can only be set before
            # the first table exists, and setting it is a write (fails on a read-only file).
            if next(iter(await conn.execute_fetchall("SELECT count(*) FROM sqlite_master")))[0]:
                if check:  # at start, and on a file that replaced ours
                    await _refuse_if_corrupted(conn, self.path)
            else:
                await conn.execute_fetchall("PRAGMA auto_vacuum = INCREMENTAL")
            if (mode := await self._enable_wal(conn)) != "wal":
                log.warning("store: %s is not in WAL mode (journal_mode=%s); readers may block "
                            "writers", self.path, mode)  # fmt: skip
            # FULL: every commit is fsynced, so a committed reservation survives power loss.
            await conn.execute_fetchall("PRAGMA synchronous = FULL")
            await conn.execute_fetchall("PRAGMA foreign_keys = ON")
            # 512 KiB of page cache instead of 2 MiB: the queries read a few recent pages
            # and the OS caches the file; measured 1.6 MB less resident at 500 models.
            await conn.execute_fetchall("PRAGMA cache_size = -512")
            # Again, so that a custom connector cannot leave it at 0 (fail on any contention).
            busy_ms = max(0, int(self._busy_timeout * 1000))
            await conn.execute_fetchall(f"PRAGMA busy_timeout = {busy_ms}")
            await migrate(conn, now=self._clock.time())
            self._identity = _file_identity(self.path)
        except BaseException:
            await _close_quietly(conn)
            raise
        return conn

    async def _enable_wal(self, conn: Connection) -> str:
        # While another connection holds the write lock of a rollback-journal file, SQLite
        # fails the switch at once (no busy handler): retry in real time within busy_timeout.
        mode = await _journal_mode(conn, "PRAGMA journal_mode")
        attempts = max(1, int(self._busy_timeout / 0.02))
        for attempt in range(attempts if mode != "wal" else 0):
            try:
                return await _journal_mode(conn, "PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError as exc:
                if not _contention(exc) or attempt == attempts - 1:
                    raise
                await anyio.sleep(0.02)
        return mode

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close_quietly(conn)


async def _connected(conn: Connection) -> None:
    return None


async def _apply_batch(conn: Connection, *, batch: list[_Item]) -> list[tuple[_Item, Exception]]:
    """Apply queued writes in the caller's transaction; return those the database rejected,
    each undone through its own savepoint (the others are kept)."""
    rejected: list[tuple[_Item, Exception]] = []
    for item in batch:
        await conn.execute_fetchall("SAVEPOINT pending_write")
        try:
            await item[1](conn)
        except Exception as exc:
            if isinstance(exc, FAULTS) and not isinstance(exc, _POISON):
                raise  # the database's state, not the write: retry the whole batch later
            if not isinstance(exc, _POISON):  # a bug: would fail on every retry
                log.exception("store: %s write failed with an unexpected error", item[0])
            await conn.execute_fetchall("ROLLBACK TO pending_write")
            rejected.append((item, exc))
        await conn.execute_fetchall("RELEASE pending_write")
    return rejected


_HAS_LEDGER: Final = "SELECT 1 FROM sqlite_master WHERE name = 'budget_windows'"
_BAD_TOTALS: Final = """SELECT count(*) FROM budget_windows WHERE typeof(tokens) != 'integer'
    OR tokens < 0 OR typeof(nanousd) != 'integer' OR nanousd < 0 OR typeof(start) != 'integer'"""


async def integrity_problems(conn: Connection) -> str:
    """``"ok"``, or what integrity_check, foreign_key_check and the ledger's rules found."""
    found = [str(r[0]) for r in await conn.execute_fetchall("PRAGMA integrity_check")]
    problems = [p for p in found if p != "ok"] + [
        f"foreign key violation: {r[0]} rowid {r[1]} references {r[2]}"
        for r in await conn.execute_fetchall("PRAGMA foreign_key_check")
    ]
    # Values SQLite accepts but the ledger cannot: such totals deny (or grant) everything.
    if not problems and list(await conn.execute_fetchall(_HAS_LEDGER)):
        rows = list(await conn.execute_fetchall(_BAD_TOTALS))
        problems += [f"budget_windows: {rows[0][0]} rows with invalid totals"] if rows[0][0] else []
    return "\n".join(problems) if problems else "ok"


async def _refuse_if_corrupted(conn: Connection, path: Path) -> None:
    try:
        found = await integrity_problems(conn)
    except sqlite3.DatabaseError as exc:
        found = describe(exc)
    if found != "ok":
        first = " ".join(found.splitlines()[0].split())[:200]
        raise StoreError(f"database {path} is corrupted ({first}); move it aside (a new one is "
                         "then created) or restore a backup")  # fmt: skip


def _contention(exc: BaseException) -> bool:
    return (getattr(exc, "sqlite_errorname", None) or "").startswith(_CONTENTION)


def _needs_reopen(exc: BaseException) -> bool:
    """Anything but contention or a refused row may have left the connection unusable."""
    return isinstance(exc, FAULTS) and not isinstance(exc, _POISON) and not _contention(exc)


async def _journal_mode(conn: Connection, pragma: str) -> str:
    rows = list(await conn.execute_fetchall(pragma))
    return str(rows[0][0]).lower() if rows else "?"


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def describe(exc: BaseException) -> str:
    """One line: the SQLite error name where there is one, and the message."""
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    text = " ".join(str(exc).split())
    return f"{name}: {text}" if text else name


async def _close_quietly(conn: Connection) -> None:
    try:
        await conn.close()
    except FAULTS as exc:
        log.debug("store: closing the connection failed: %s", describe(exc))
