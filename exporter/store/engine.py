"""The connection, its transactions, and what happens when the database misbehaves.

One aiosqlite connection, serialised by an anyio lock so one task's statements never land
inside another task's transaction. Writes are explicit ``BEGIN IMMEDIATE`` … ``COMMIT``
transactions run under a cancel shield, so a cancelled caller cannot leave the connection
half way through a transaction.

Faults (locked, read-only, disk full, I/O errors, the file or its directory replaced) are
never raised by ``submit``/``read``: each is logged on one line and reported through
``on_error(operation)``. Writes wait in a bounded FIFO queue and land, in order, on the next
write or ``flush()`` once the fault clears. After any fault other than plain lock contention
the connection is reopened before the next operation: that is what recovers from a file that
was read-only when it was opened, or a directory swapped underneath the process.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import sqlite3
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
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
_WAL_RETRY_SECONDS: Final = 0.02

# What "the database is not usable right now" looks like from here: sqlite3 errors, OSError
# from creating the directory, ValueError from aiosqlite when its connection is gone, and
# StoreError when reopening fails (e.g. the file was replaced by one from a newer exporter).
FAULTS: Final = (sqlite3.Error, OSError, ValueError, StoreError)
# Lock contention: another connection holds the lock; the connection itself is fine.
_CONTENTION: Final = ("SQLITE_BUSY", "SQLITE_LOCKED")
# The database rejects the row itself, not its current state: retrying cannot help, so such
# a write is dropped (and reported) instead of blocking the queue behind it forever.
_POISON: Final = (sqlite3.IntegrityError, sqlite3.DataError)

Connection = aiosqlite.Connection
Connector = Callable[[Path, float], Awaitable[Connection]]
"""Opens the connection: ``(path, busy_timeout_seconds) -> connection`` in autocommit mode."""
Apply = Callable[[Connection], Awaitable[None]]


async def connect_sqlite(path: Path, busy_timeout: float) -> Connection:
    """The default connector."""
    # isolation_level=None: autocommit. Transactions are explicit, so the sqlite3 module never
    # opens a (deferred, lock-upgrading) transaction behind the store's back.
    return await aiosqlite.connect(path, timeout=busy_timeout, isolation_level=None)


class _State(enum.Enum):
    PENDING = "pending"
    LANDED = "landed"
    DROPPED = "dropped"


@dataclass(slots=True, eq=False)
class _PendingWrite:
    """A write waiting to be committed. ``apply`` runs inside a transaction the engine opens."""

    op: str
    apply: Apply
    state: _State = _State.PENDING


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
        self.path = path
        self._clock = clock
        self._on_error = on_error
        self._busy_timeout = busy_timeout
        self._connector = connector
        self._lock = anyio.Lock()
        self._conn: Connection | None = None
        # (st_dev, st_ino) of the file when it was opened. A different answer from os.stat
        # later means the file or its directory was replaced: SQLite would keep writing to
        # the unlinked inode without any error, so the engine checks before every use.
        self._identity: tuple[int, int] | None = None
        self._broken = False  # reopen the connection before the next operation
        # Reopen before the next write even if a read reopened meanwhile: a read works on a
        # file that is read-only, so a read's reconnect says nothing about writability.
        self._reopen_for_write = False
        self._closed = False
        self._healthy = True
        self._pending: deque[_PendingWrite] = deque()
        self._max_pending = max(1, max_pending)
        self.dropped_writes = 0  # queued writes discarded because the queue was full

    @property
    def healthy(self) -> bool:
        """The last database operation succeeded and no write is waiting for a retry."""
        return self._healthy and not self._pending and not self._closed

    @property
    def pending_writes(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        """Connect and migrate; raises (StoreError or a fault) when that is impossible."""
        async with self._lock:
            try:
                with anyio.CancelScope(shield=True):
                    await self._connection()
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._disconnect()
                raise

    async def close(self) -> int:
        """Flush once, close; return the number of writes that could not be saved."""
        if self._closed:
            return len(self._pending)
        with anyio.CancelScope(shield=True):
            remaining = await self.flush()
            async with self._lock:
                self._closed = True
                await self._disconnect()
        return remaining

    # --- the operations ---------------------------------------------------------------

    async def submit(self, op: str, apply: Apply) -> bool:
        """Queue a write behind any earlier failed ones and try to commit the queue.

        Returns whether this write landed. A write that did not is reported as a fault of
        ``op`` and stays queued.
        """
        item = _PendingWrite(op, apply)
        async with self._lock:
            self._enqueue(item)
            error = await self._drain_locked()
        if item.state is _State.PENDING:
            self.report(op, error)
        return item.state is _State.LANDED

    async def flush(self) -> int:
        """Retry queued writes now; return how many are still waiting (0 = all saved)."""
        async with self._lock:
            error = await self._drain_locked()
            # The write that failed is the one now at the head of the queue.
            head = self._pending[0].op if self._pending else None
        if error is not None and head is not None:
            self.report(head, error)
        return len(self._pending)

    async def read(self, op: str, query: Callable[[Connection], Awaitable[T]], default: T) -> T:
        """Run a query; on a fault report ``op`` and return ``default``."""
        async with self._lock:
            try:
                with anyio.CancelScope(shield=True):
                    result = await query(await self._connection())
            except FAULTS as exc:
                self._note_failure(exc)
                self.report(op, exc)
                return default
            self._healthy = True
            return result

    async def write(self, body: Callable[[Connection], Awaitable[T]]) -> T:
        """One transaction now, not queued. Faults are raised (after bookkeeping), because
        the callers (budget reservations, cleanup) each decide what a failure means."""
        async with self._lock:
            try:
                with anyio.CancelScope(shield=True):
                    result = await self._transaction(body)
            except FAULTS as exc:
                self._note_failure(exc)
                raise
            return result

    async def run(self, body: Callable[[Connection], Awaitable[T]]) -> T:
        """Statements that must run outside a transaction (VACUUM-like pragmas); raises."""
        async with self._lock:
            try:
                with anyio.CancelScope(shield=True):
                    result = await body(await self._connection())
            except FAULTS as exc:
                self._note_failure(exc)
                raise
            return result

    def report(self, op: str, exc: BaseException | None = None) -> None:
        """Log a fault of ``op`` (one line) and tell ``on_error``."""
        if exc is not None:
            queued = f"; {len(self._pending)} writes queued for retry" if self._pending else ""
            log.warning("store: %s failed: %s%s", op, describe(exc), queued)
        if self._on_error is None:
            return
        try:
            self._on_error(op)
        except Exception:
            # A broken metrics hook must not turn a handled fault into an unhandled one.
            log.exception("store: on_error callback failed")

    # --- queue --------------------------------------------------------------------------

    def _enqueue(self, item: _PendingWrite) -> None:
        if len(self._pending) >= self._max_pending:
            oldest = self._pending.popleft()
            oldest.state = _State.DROPPED
            self.dropped_writes += 1
            log.error(
                "store: retry queue full (%d writes); dropped the oldest %s write "
                "(%d dropped since start)",
                self._max_pending,
                oldest.op,
                self.dropped_writes,
            )
        self._pending.append(item)

    async def _drain_locked(self) -> BaseException | None:
        """Commit queued writes in order, in batches; stop at the first fault and return it.

        The caller holds the lock, so nothing else touches the queue meanwhile.
        """
        for _ in range(len(self._pending) // _DRAIN_BATCH + 1):
            if not self._pending:
                break
            batch = list(itertools.islice(self._pending, _DRAIN_BATCH))
            try:
                with anyio.CancelScope(shield=True):
                    rejected = await self._transaction(partial(_apply_batch, batch=batch))
            except FAULTS as exc:
                self._note_failure(exc)
                return exc
            for item in batch:
                self._pending.popleft()
                item.state = _State.LANDED
            for item, why in rejected:
                item.state = _State.DROPPED
                log.error(
                    "store: %s write rejected by the database and dropped: %s",
                    item.op,
                    describe(why),
                )
                self.report(item.op)
        return None

    # --- connection ---------------------------------------------------------------------

    async def _transaction(self, body: Callable[[Connection], Awaitable[T]]) -> T:
        """``body`` inside BEGIN IMMEDIATE … COMMIT. The caller holds the lock and a shield."""
        conn = await self._connection(write=True)
        # IMMEDIATE takes the write lock up front: a deferred transaction that reads first
        # could find its snapshot stale when it tries to write (SQLITE_BUSY_SNAPSHOT), and
        # the budget check must read totals nobody else can change before its insert.
        try:
            await conn.execute_fetchall("BEGIN IMMEDIATE")
            result = await body(conn)
            await conn.execute_fetchall("COMMIT")
        except BaseException as exc:
            await self._rollback(conn)
            if _needs_reopen(exc):
                self._reopen_for_write = True
            raise
        self._healthy = True
        self._reopen_for_write = False
        return result

    async def _rollback(self, conn: Connection) -> None:
        try:
            if conn.in_transaction:
                await conn.execute_fetchall("ROLLBACK")
        except FAULTS:
            # Cannot tell what state the connection is in: start afresh next time.
            self._broken = True

    async def _connection(self, *, write: bool = False) -> Connection:
        """The open connection, (re)opened first when needed. The caller holds the lock."""
        if self._closed:
            raise StoreError("store is closed")
        if self._conn is not None and not self._broken and not (write and self._reopen_for_write):
            if _file_identity(self.path) == self._identity:
                return self._conn
            log.warning("store: database file %s was replaced or removed; reopening", self.path)
        await self._disconnect()
        self._conn = await self._connect()
        self._broken = False
        return self._conn

    async def _connect(self) -> Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = await self._connector(self.path, self._busy_timeout)
        try:
            conn.row_factory = sqlite3.Row
            # Lets cleanup hand freed pages back to the filesystem without a full VACUUM.
            # Only possible before the first table exists, and setting it at all is a write
            # (which would fail on a read-only file), so only for a new file.
            tables = list(await conn.execute_fetchall("SELECT count(*) FROM sqlite_master"))
            if tables[0][0] == 0:
                await conn.execute_fetchall("PRAGMA auto_vacuum = INCREMENTAL")
            mode = await self._enable_wal(conn)
            if mode != "wal":
                log.warning(
                    "store: %s is not in WAL mode (journal_mode=%s); readers may block writers",
                    self.path,
                    mode,
                )
            # FULL: every commit is fsynced, so a committed budget reservation survives power
            # loss, not only a crash of the process (docs/storage.md). At a few commits a
            # minute the cost does not matter.
            await conn.execute_fetchall("PRAGMA synchronous = FULL")
            await conn.execute_fetchall("PRAGMA foreign_keys = ON")
            # The connector's timeout sets it already; repeated so that a custom connector
            # cannot leave it at 0 (fail at once on any contention).
            busy_ms = max(0, int(self._busy_timeout * 1000))
            await conn.execute_fetchall(f"PRAGMA busy_timeout = {busy_ms}")
            await migrate(conn, now=self._clock.time())
            self._identity = _file_identity(self.path)
        except BaseException:
            await _close_quietly(conn)
            raise
        return conn

    async def _enable_wal(self, conn: Connection) -> str:
        """Switch a new file to WAL (a no-op, and no lock, once it is in WAL mode).

        The switch needs an exclusive lock. While another connection holds the write lock of
        a rollback-journal file (another process creating the same file at the same moment),
        SQLite fails the switch at once instead of running the busy handler, to avoid a
        deadlock. So retry, in real time (another process is what we wait for), within the
        busy timeout.
        """
        mode = await _journal_mode(conn, "PRAGMA journal_mode")
        if mode == "wal":
            return mode
        attempts = max(1, int(self._busy_timeout / _WAL_RETRY_SECONDS))
        for attempt in range(attempts):
            try:
                return await _journal_mode(conn, "PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError as exc:
                name = getattr(exc, "sqlite_errorname", None) or ""
                if not name.startswith(_CONTENTION) or attempt == attempts - 1:
                    raise
                await anyio.sleep(_WAL_RETRY_SECONDS)
        return mode  # pragma: no cover - the loop returns or raises

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close_quietly(conn)

    def _note_failure(self, exc: BaseException) -> None:
        self._healthy = False
        if _needs_reopen(exc):
            self._broken = True


async def _apply_batch(
    conn: Connection, *, batch: Sequence[_PendingWrite]
) -> list[tuple[_PendingWrite, BaseException]]:
    """Apply queued writes inside the caller's transaction; return those the database
    rejected (each undone through its own savepoint, the others kept)."""
    rejected: list[tuple[_PendingWrite, BaseException]] = []
    for item in batch:
        await conn.execute_fetchall("SAVEPOINT pending_write")
        try:
            await item.apply(conn)
        except _POISON as exc:
            await conn.execute_fetchall("ROLLBACK TO pending_write")
            rejected.append((item, exc))
        except FAULTS:
            raise  # the database's state, not the write: retry the whole batch later
        except Exception as exc:
            # A bug in the write itself would fail the same way on every retry and block
            # everything queued behind it.
            log.exception("store: %s write failed with an unexpected error", item.op)
            await conn.execute_fetchall("ROLLBACK TO pending_write")
            rejected.append((item, exc))
        await conn.execute_fetchall("RELEASE pending_write")
    return rejected


def _needs_reopen(exc: BaseException) -> bool:
    """Anything but lock contention or a rejected row may have left the connection unusable
    (read-only handle, I/O error, a file swapped underneath): start afresh."""
    if not isinstance(exc, FAULTS) or isinstance(exc, _POISON):
        return False
    name = getattr(exc, "sqlite_errorname", None) or ""
    return not name.startswith(_CONTENTION)


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
