"""The connection, its transactions and its faults (docs/storage.md, "Fault behaviour")."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Self

import aiosqlite
import anyio

from exporter.clock import Clock
from exporter.store.migrations import Body, Connection, StoreError, T, atomically, migrate

log = logging.getLogger("exporter.store")

# Not usable now: SQLite, OSError (mkdir), ValueError (connection gone), StoreError (reopening).
FAULTS: Final = (sqlite3.Error, OSError, ValueError, StoreError)
_POISON: Final = (sqlite3.IntegrityError, sqlite3.DataError)  # the row itself is refused
_CONTENTION: Final = ("SQLITE_BUSY", "SQLITE_LOCKED")  # the connection itself is fine

Connector = Callable[[Path, float], Awaitable[Connection]]  # (path, busy timeout) -> connection


async def connect_sqlite(path: Path, busy_timeout: float) -> Connection:
    # Autocommit: transactions are explicit, never opened behind the store's back.
    return await aiosqlite.connect(path, timeout=busy_timeout, isolation_level=None)


@dataclass(slots=True, eq=False)  # eq=False: found in the queue by identity
class _Write:
    op: str
    apply: Body[object]
    landed: bool = False


class Engine:
    """One aiosqlite connection behind a lock, (re)opened when needed; work on it runs under a
    cancel shield, so a cancelled caller never leaves a transaction half done."""

    def __init__(
        self,
        path: Path,
        clock: Clock,
        on_error: Callable[[str], None] | None,
        busy_timeout: float,
        max_pending: int,
        connector: Connector,
    ) -> None:
        self.path, self._clock, self._on_error = path, clock, on_error
        self._busy_timeout, self._connector = busy_timeout, connector
        self._max_pending, self.dropped_writes = max(1, max_pending), 0
        self._lock, self._pending = anyio.Lock(), deque[_Write]()
        self._conn: Connection | None = None
        # (st_dev, st_ino) of the file opened, and if a write opened it: storage.md, "Reconnection".
        self._identity: tuple[int, int] | None = None
        self._writable = self._closed = False
        self._healthy = True

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        clock: Clock,
        on_error: Callable[[str], None] | None = None,
        busy_timeout: float = 5.0,  # seconds to wait for another connection's write lock
        max_pending: int = 10_000,  # failed writes kept in memory for retry
        connector: Connector = connect_sqlite,
    ) -> Self:
        """Open (creating directories and the file), check and migrate the database; raise
        ``StoreError`` (one line) when it cannot be used. Tests inject faults via ``connector``."""
        store = cls(Path(path), clock, on_error, busy_timeout, max_pending, connector)
        try:
            await store._connection(write=True)  # checks and migrates (not shared yet: no lock)
        except (sqlite3.Error, OSError, ValueError) as exc:
            raise StoreError(f"cannot open database {path}: {describe(exc)}") from exc
        return store

    async def close(self) -> int:
        """Flush once and close (idempotent); return how many writes could not be saved."""
        if not self._closed:
            with anyio.CancelScope(shield=True):
                await self.flush()
                async with self._lock:
                    self._closed = True
                    await self._disconnect()
            if lost := len(self._pending):
                log.error("store: closed with %d queued writes that could not be saved", lost)
        return len(self._pending)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def healthy(self) -> bool:
        return self._healthy and not self._closed

    @property
    def pending_writes(self) -> int:
        return len(self._pending)

    async def submit(self, op: str, apply: Body[object]) -> bool:
        """Queue a write behind earlier failed ones and commit the queue; True if it landed."""
        write = _Write(op, apply)
        async with self._lock:
            if len(self._pending) >= self._max_pending:
                self.dropped_writes += 1
                why = f"the retry queue is full ({self.dropped_writes} dropped since start)"
                self._drop(self._pending[0], why)
            self._pending.append(write)
            await self._drain(op)
        return write.landed

    async def flush(self) -> int:
        """Retry queued writes now; return how many are still waiting (0 = all saved)."""
        async with self._lock:
            await self._drain()
        return len(self._pending)

    async def read(self, op: str, query: Body[T], default: T, *, transaction: bool = False) -> T:
        """``query``'s result (in a write transaction if asked); on a fault, report ``op``."""
        try:
            async with self._lock:
                with anyio.CancelScope(shield=True):
                    result = await self._run(query, transaction=transaction)
        except FAULTS as exc:
            self.report(op, exc)
            return default
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
        """The ledger's hook, run on every new connection before anything else."""

    async def _run(self, body: Body[T], *, transaction: bool) -> T:
        try:
            conn = await self._connection(write=transaction)
            result = await (atomically(conn, body) if transaction else body(conn))
        except FAULTS as exc:
            self._healthy = False
            # Anything but contention or a refused row may have left the connection unusable.
            if not isinstance(exc, _POISON) and not _contention(exc):
                await self._disconnect()
            raise
        self._healthy = transaction or not self._pending  # a read does not land queued writes
        return result

    async def _drain(self, op: str | None = None) -> None:
        """Commit queued writes in order, one transaction each, dropping those that would fail
        every retry (docs/storage.md); stop at a fault, reported as ``op`` or the head's."""
        while self._pending:  # bounded: every pass lands or drops the head, or returns
            write = self._pending[0]
            with anyio.CancelScope(shield=True):
                try:
                    await self._run(write.apply, transaction=True)
                    write.landed = True
                    self._pending.popleft()
                except _POISON as exc:
                    self.report(self._drop(write, describe(exc)))
                except FAULTS as exc:
                    self.report(op or write.op, exc)
                    return
                except Exception:
                    log.exception("store: %s write failed with an unexpected error", write.op)
                    self.report(self._drop(write, "a bug"))

    def _drop(self, write: _Write, why: str) -> str:
        log.error("store: %s write dropped: %s", write.op, why)
        self._pending.remove(write)
        return write.op

    async def _connection(self, *, write: bool = False) -> Connection:
        """The open connection, (re)opened first when needed. The caller holds the lock."""
        if self._closed:
            raise StoreError("store is closed")
        current = _file_identity(self.path)
        if self._conn is not None and (self._writable or not write):
            if current == self._identity:
                return self._conn
            log.warning("store: database file %s was replaced or removed; reopening", self.path)
        await self._disconnect()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = await self._connector(self.path, self._busy_timeout)
        try:
            if not await conn.execute_fetchall("SELECT 1 FROM sqlite_master LIMIT 1"):
                # Only before the first table exists (and a write: fails on a read-only file).
                await conn.execute_fetchall("PRAGMA auto_vacuum = INCREMENTAL")
                log.info("store: creating a new database %s", self.path)
            elif current != self._identity:  # opened first, or a replacing file
                await _refuse_if_corrupted(conn, self.path)
            if (mode := await self._enable_wal(conn)) != "wal":
                log.warning("store: %s is not in WAL mode (journal_mode=%s)", self.path, mode)
            # docs/storage.md, "Durability and locking" (busy_timeout again: any connector).
            busy_ms = max(0, int(self._busy_timeout * 1000))
            await conn.executescript(
                "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;"
                f" PRAGMA busy_timeout = {busy_ms}; PRAGMA cache_size = -512"
            )
            await migrate(conn, now=self._clock.time())
            # ``current`` was taken before connecting: a new file may well reuse the freed inode
            # number. Until _prepare succeeds on a replacing file, _identity stays the old one's.
            await self._prepare(conn, replaced=self._identity not in (None, current))
        except BaseException:
            with contextlib.suppress(*FAULTS):
                await conn.close()
            raise
        self._conn, self._identity, self._writable = conn, _file_identity(self.path), write
        return conn

    async def _enable_wal(self, conn: Connection) -> str:
        # A rollback-journal file's writer fails the switch at once (no busy handler): retry.
        attempts = max(1, int(self._busy_timeout / 0.02))
        for attempt in range(1, attempts + 1):
            try:
                ((mode,),) = await conn.execute_fetchall("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as exc:
                if not _contention(exc) or attempt == attempts:
                    raise
                await anyio.sleep(0.02)
        return str(mode).lower()

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        with contextlib.suppress(*FAULTS):
            if conn is not None:
                await conn.close()


_HAS_LEDGER: Final = "SELECT 1 FROM sqlite_master WHERE name = 'budget_windows'"
_BAD_TOTALS: Final = """SELECT count(*) FROM budget_windows WHERE typeof(tokens) != 'integer'
    OR tokens < 0 OR typeof(nanousd) != 'integer' OR nanousd < 0 OR typeof(start) != 'integer'"""


async def integrity_problems(conn: Connection) -> str:
    """``"ok"``, or what integrity_check, foreign_key_check and the ledger's rules found."""
    problems = [r for (r,) in await conn.execute_fetchall("PRAGMA integrity_check") if r != "ok"]
    for table, rowid, parent, _ in await conn.execute_fetchall("PRAGMA foreign_key_check"):
        problems.append(f"foreign key violation: {table} rowid {rowid} references {parent}")
    # Values SQLite accepts but the ledger cannot: such totals deny (or grant) everything.
    if not problems and await conn.execute_fetchall(_HAS_LEDGER):
        ((bad,),) = await conn.execute_fetchall(_BAD_TOTALS)
        problems += [f"budget_windows: {bad} rows with invalid totals"] if bad else []
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
    return str(getattr(exc, "sqlite_errorname", "")).startswith(_CONTENTION)


def _file_identity(path: Path) -> tuple[int, int] | None:
    with contextlib.suppress(OSError):
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    return None


def describe(exc: BaseException) -> str:
    """One line: the SQLite error name where there is one, and the message."""
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    text = " ".join(str(exc).split())
    return f"{name}: {text}" if text else name
