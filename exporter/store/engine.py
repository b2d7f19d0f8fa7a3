"""The connection, its transactions, and what happens when the database misbehaves.

Faults never escape ``submit`` and ``read``: one log line, ``on_error(operation)``, and a
failed write waits in a bounded FIFO queue that lands, in order, on the next write or flush.
"""

from __future__ import annotations

import itertools
import logging
import os
import sqlite3
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Final, Literal, Self, TypeVar

import aiosqlite
import anyio

from exporter.clock import Clock
from exporter.store.migrations import StoreError, atomically, migrate

log = logging.getLogger("exporter.store")
T = TypeVar("T")

DEFAULT_BUSY_TIMEOUT: Final = 5.0  # seconds to wait for another connection's write lock
DEFAULT_MAX_PENDING: Final = 10_000  # failed writes kept in memory for retry
_DRAIN_BATCH: Final = 500  # queued writes committed per transaction when draining
# "Not usable right now": sqlite3 errors, OSError (mkdir), ValueError (aiosqlite's connection
# is gone), StoreError (reopening failed: a newer schema, a corrupted file).
FAULTS: Final = (sqlite3.Error, OSError, ValueError, StoreError)
_POISON: Final = (sqlite3.IntegrityError, sqlite3.DataError)  # the row itself is refused

Connection = aiosqlite.Connection
Body = Callable[[Connection], Awaitable[T]]
Connector = Callable[[Path, float], Awaitable[Connection]]
"""Opens the connection: ``(path, busy_timeout_seconds) -> connection`` in autocommit mode."""


async def connect_sqlite(path: Path, busy_timeout: float) -> Connection:
    # Autocommit: transactions are explicit, never opened behind the store's back.
    return await aiosqlite.connect(path, timeout=busy_timeout, isolation_level=None)


@dataclass(slots=True)
class _Write:
    op: str
    apply: Body[object]
    state: Literal["pending", "landed", "dropped"] = "pending"


@dataclass(eq=False)
class Engine:
    """One aiosqlite connection behind an anyio lock: the base of ``Store``.

    Every write is one transaction under a cancel shield. The connection is reopened after a
    fault, and when the path no longer holds the file it opened (docs/storage.md).
    """

    path: Path
    _clock: Clock
    _on_error: Callable[[str], None] | None
    _busy_timeout: float
    _max_pending: int
    _connector: Connector
    dropped_writes: int = field(default=0, init=False)  # writes dropped from a full queue
    _lock: anyio.Lock = field(default_factory=anyio.Lock, init=False)
    _pending: deque[_Write] = field(default_factory=deque, init=False)
    _conn: Connection | None = field(default=None, init=False)
    # (st_dev, st_ino) when opened: SQLite keeps writing to an unlinked inode without an
    # error, so every use compares it with what the path holds now.
    _identity: tuple[int, int] | None = field(default=None, init=False)
    _broken: bool = field(default=False, init=False)  # reopen before the next operation
    # Reopen before the next write even if a read reopened meanwhile (a read works on a
    # read-only file).
    _reopen_for_write: bool = field(default=False, init=False)
    # _prepare still owes the file that replaced ours its replaced=True run: nothing else
    # runs there until it succeeds.
    _replaced: bool = field(default=False, init=False)
    _closed: bool = field(default=False, init=False)
    _healthy: bool = field(default=True, init=False)

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        clock: Clock,
        on_error: Callable[[str], None] | None = None,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        max_pending: int = DEFAULT_MAX_PENDING,
        connector: Connector = connect_sqlite,
    ) -> Self:
        """Open (creating directories and the file), check and migrate the database.

        Raises ``StoreError`` with one line when it cannot be used at start (a newer schema:
        ``SchemaTooNewError``; a corrupted file); later faults are handled, never raised.
        ``connector`` opens the aiosqlite connection (tests inject faults with it).
        """
        store = cls(Path(path), clock, on_error, busy_timeout, max(1, max_pending), connector)
        created = not store.path.exists()
        try:
            await store.run(_nothing)
        except StoreError:
            raise
        except FAULTS as exc:
            raise StoreError(f"cannot open database {path}: {describe(exc)}") from exc
        if created:
            log.info("store: created a new database %s (no earlier history or budget use)", path)
        return store

    async def close(self) -> int:
        """Flush once and close; return the number of writes that could not be saved."""
        if not self._closed:
            with anyio.CancelScope(shield=True):
                await self.flush()
                async with self._lock:
                    self._closed = True
                    await self._disconnect()
            if self._pending:
                unsaved = len(self._pending)
                log.error("store: closed with %d queued writes that could not be saved", unsaved)
        return len(self._pending)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def healthy(self) -> bool:
        """Can record: the last write (or drain) succeeded and the store is open."""
        return self._healthy and not self._closed

    @property
    def pending_writes(self) -> int:
        return len(self._pending)

    async def submit(self, op: str, apply: Body[object]) -> bool:
        """Queue a write behind earlier failed ones and commit the queue; True if it landed."""
        write = _Write(op, apply)
        async with self._lock:
            if len(self._pending) >= self._max_pending:
                oldest = self._pending.popleft()
                oldest.state = "dropped"
                self.dropped_writes += 1
                log.error(
                    "store: retry queue full, dropped the oldest %s write (%d dropped since start)",
                    oldest.op,
                    self.dropped_writes,
                )
            self._pending.append(write)
            error = await self._drain()
        if write.state == "pending":
            self.report(op, error)
        return write.state == "landed"

    async def flush(self) -> int:
        """Retry queued writes now; return how many are still waiting (0 = all saved)."""
        async with self._lock:
            error = await self._drain()
        if error is not None and self._pending:
            self.report(self._pending[0].op, error)
        return len(self._pending)

    async def read(self, op: str, query: Body[T], default: T) -> T:
        """Run ``query``; on a fault report ``op`` and return ``default``."""
        try:
            result = await self.run(query)
        except FAULTS as exc:
            self.report(op, exc)
            return default
        # The database answers; but writes still queued mean it cannot record yet.
        self._healthy = self._healthy or not self._pending
        return result

    async def run(self, body: Body[T], *, transaction: bool = False) -> T:
        """``body`` on the connection, in a write transaction if asked; faults are raised."""
        async with self._lock:
            try:
                with anyio.CancelScope(shield=True):
                    if transaction:
                        result = await self._transaction(body)
                    else:
                        result = await body(await self._connection())
            except FAULTS as exc:
                self._fault(exc)
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

    async def _prepare(self, conn: Connection, *, replaced: bool) -> None:
        """Runs on every new connection before anything else (the ledger's hook)."""

    def _fault(self, exc: BaseException) -> None:
        self._healthy = False
        # Anything but contention or a refused row may have left the connection unusable.
        if not isinstance(exc, _POISON) and not _contention(exc):
            self._broken = self._reopen_for_write = True

    async def _drain(self) -> BaseException | None:
        """Commit queued writes in order, in batches; stop at the first fault and return it."""
        for _ in range(len(self._pending) // _DRAIN_BATCH + 1):
            batch = list(itertools.islice(self._pending, _DRAIN_BATCH))
            if not batch:
                break
            try:
                with anyio.CancelScope(shield=True):
                    rejected = await self._transaction(partial(_apply_batch, batch=batch))
            except FAULTS as exc:
                self._fault(exc)
                return exc
            for write in batch:
                self._pending.popleft()
                write.state = "landed"
            for write, why in rejected:
                write.state = "dropped"
                why_text = describe(why)
                log.error(
                    "store: %s write rejected by the database and dropped: %s", write.op, why_text
                )
                self.report(write.op)
        return None

    async def _transaction(self, body: Body[T]) -> T:
        result = await atomically(await self._connection(write=True), body)
        self._healthy = True
        self._reopen_for_write = False
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
        try:
            await self._prepare(conn, replaced=self._replaced)
        except BaseException:
            await _close_quietly(conn)
            raise
        self._conn, self._broken, self._replaced = conn, False, False
        return conn

    async def _connect(self, *, check: bool) -> Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = await self._connector(self.path, self._busy_timeout)
        try:
            if not (await conn.execute_fetchall("SELECT 1 FROM sqlite_master LIMIT 1")):
                # Lets cleanup return pages without VACUUM. Only possible before the first
                # table exists, and a write (which fails on a read-only file).
                await conn.execute_fetchall("PRAGMA auto_vacuum = INCREMENTAL")
            elif check:  # at start, and on a file that replaced ours
                await _refuse_if_corrupted(conn, self.path)
            if (mode := await self._enable_wal(conn)) != "wal":
                log.warning("store: %s is not in WAL mode (journal_mode=%s)", self.path, mode)
            # FULL: every commit is fsynced, so a committed reservation survives power loss.
            # busy_timeout again, so that a custom connector cannot leave it at 0.
            busy_ms = max(0, int(self._busy_timeout * 1000))
            await conn.executescript(
                f"PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = {busy_ms}"
            )
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


async def _nothing(conn: Connection) -> None:
    return None


async def _apply_batch(conn: Connection, *, batch: list[_Write]) -> list[tuple[_Write, Exception]]:
    """Apply queued writes in the caller's transaction; return those the database rejected,
    each undone through its own savepoint (the others are kept)."""
    rejected: list[tuple[_Write, Exception]] = []
    for write in batch:
        await conn.execute_fetchall("SAVEPOINT pending_write")
        try:
            await write.apply(conn)
        except Exception as exc:
            if isinstance(exc, FAULTS) and not isinstance(exc, _POISON):
                raise  # the database's state, not the write: retry the whole batch later
            if not isinstance(exc, _POISON):  # a bug: would fail on every retry
                log.exception("store: %s write failed with an unexpected error", write.op)
            await conn.execute_fetchall("ROLLBACK TO pending_write")
            rejected.append((write, exc))
        await conn.execute_fetchall("RELEASE pending_write")
    return rejected


_HAS_LEDGER: Final = "SELECT 1 FROM sqlite_master WHERE name = 'budget_windows'"
_BAD_TOTALS: Final = """SELECT count(*) FROM budget_windows WHERE typeof(tokens) != 'integer'
    OR tokens < 0 OR typeof(nanousd) != 'integer' OR nanousd < 0 OR typeof(start) != 'integer'"""


async def integrity_problems(conn: Connection) -> str:
    """``"ok"``, or what integrity_check, foreign_key_check and the ledger's rules found."""
    found = [str(r[0]) for r in await conn.execute_fetchall("PRAGMA integrity_check")]
    problems = [p for p in found if p != "ok"]
    for table, rowid, parent, _ in await conn.execute_fetchall("PRAGMA foreign_key_check"):
        problems.append(f"foreign key violation: {table} rowid {rowid} references {parent}")
    # Values SQLite accepts but the ledger cannot: such totals deny (or grant) everything.
    if not problems and await conn.execute_fetchall(_HAS_LEDGER):
        ((bad,),) = await conn.execute_fetchall(_BAD_TOTALS)
        if bad:
            problems.append(f"budget_windows: {bad} rows with invalid totals")
    return "\n".join(problems) or "ok"


async def _refuse_if_corrupted(conn: Connection, path: Path) -> None:
    try:
        found = await integrity_problems(conn)
    except sqlite3.DatabaseError as exc:
        found = describe(exc)
    if found != "ok":
        first = " ".join(found.splitlines()[0].split())[:200]
        raise StoreError(
            f"database {path} is corrupted ({first}); move it aside (a new one is then created)"
            " or restore a backup"
        )


def _contention(exc: BaseException) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED: the connection itself is fine."""
    return (getattr(exc, "sqlite_errorname", None) or "").startswith(
        ("SQLITE_BUSY", "SQLITE_LOCKED")
    )


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
