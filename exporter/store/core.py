"""The store: probe history, token usage, balances, model state and the budget ledger.

``Store`` is the narrow async interface the scheduler, the HTTP API, the CLI and
``exporter.budget`` use; ``ProbeStore`` is the part of it the scheduler and HTTP side need
(fakes implement that). Faults never reach the caller: writes are queued and retried, reads
return empty results, budget reservations are denied (``engine`` and docs/storage.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol, Self

from exporter.clock import Clock
from exporter.reliability import ReliabilityStats
from exporter.results import ProbeResult, Verdict
from exporter.store import statements as sql
from exporter.store.engine import (
    DEFAULT_BUSY_TIMEOUT,
    DEFAULT_MAX_PENDING,
    FAULTS,
    Connection,
    Connector,
    Engine,
    connect_sqlite,
    describe,
)
from exporter.store.migrations import StoreError
from exporter.store.models import (
    LedgerDecision,
    LedgerLimits,
    LedgerTotals,
    LedgerWindows,
    ModelState,
)

log = logging.getLogger("exporter.store")

MAX_RECENT_RUNS: Final = 1000  # cap on one recent_runs() answer
_CLEANUP_BATCH: Final = 5000  # rows per delete transaction: the write lock is never held long
_CLEANUP_MAX_BATCHES: Final = 10_000  # per table and call, to bound the loop

# The operation names passed to on_error (the ``operation`` label of store_errors_total).
# ``write_usage`` is listed for the metric catalogue; usage is written in the same transaction
# as its run, so its failures are reported as ``write_run``.
OPERATIONS: Final = (
    "write_run",
    "write_usage",
    "budget",
    "balance",
    "model_state",
    "cleanup",
    "restore",
    "read",
)


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

    async def reliability_inputs(
        self, *, since: float
    ) -> dict[tuple[str, str], list[tuple[Verdict, float | None]]]: ...

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


class Store:
    """SQLite-backed history and budget ledger. Create with ``await Store.open(...)``."""

    def __init__(self, engine: Engine, clock: Clock) -> None:
        self._db = engine
        self._clock = clock

    # --- lifecycle ----------------------------------------------------------------------

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
    ) -> Store:
        """Open (creating parent directories and the file) and migrate the database.

        Raises ``StoreError`` (``SchemaTooNewError`` for a file from a newer exporter) with a
        one-line message when the database cannot be opened at start; faults after that are
        handled, never raised. ``connector`` opens the aiosqlite connection (tests use it to
        inject faults).
        """
        engine = Engine(
            Path(path),
            clock=clock,
            on_error=on_error,
            busy_timeout=busy_timeout,
            max_pending=max_pending,
            connector=connector,
        )
        try:
            await engine.start()
        except StoreError:
            raise
        except FAULTS as exc:
            raise StoreError(f"cannot open database {path}: {describe(exc)}") from exc
        return cls(engine, clock)

    async def close(self) -> None:
        """Flush queued writes (one attempt) and close. Idempotent."""
        remaining = await self._db.close()
        if remaining:
            log.error("store: closed with %d queued writes that could not be saved", remaining)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def path(self) -> Path:
        return self._db.path

    @property
    def healthy(self) -> bool:
        """The last database operation succeeded and no write is waiting for a retry."""
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

    # --- history writes -----------------------------------------------------------------

    async def record_run(
        self, result: ProbeResult, *, spend_usd: float = 0.0, savings_usd: float = 0.0
    ) -> None:
        """Store a run and its token usage in one transaction (queued for retry on failure)."""
        try:
            run = sql.run_row(result)
        except (TypeError, ValueError) as exc:
            # Not serialisable: a bug upstream that no retry can fix; do not block the queue.
            log.error(
                "store: run %s of %s/%s not stored: %s",
                result.run_id,
                result.provider,
                result.model,
                exc,
            )
            self._db.report("write_run")
            return
        usage = sql.usage_row(result, spend_usd, savings_usd)
        await self._db.submit("write_run", partial(sql.upsert_run, run=run, usage=usage))

    async def save_balance(self, provider: str, currency: str, amount: float) -> None:
        """Record a balance the provider reported, stamped with the store's clock."""
        row = (provider, currency, float(amount), self._clock.time())
        await self._db.submit("balance", partial(sql.insert_balance, row=row))

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
        row = (
            provider,
            model,
            int(consecutive_failures),
            int(consecutive_successes),
            cooldown_until,
            self._clock.time(),
        )
        await self._db.submit("model_state", partial(sql.upsert_model_state, row=row))

    # --- reads --------------------------------------------------------------------------

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
        limit = min(int(limit), MAX_RECENT_RUNS)
        if limit <= 0:
            return []
        query = partial(
            sql.select_recent_runs,
            provider=provider,
            model=model,
            probe=probe,
            since=since,
            limit=limit,
        )
        return await self._db.read("read", query, [])

    async def latest_results(self) -> list[ProbeResult]:
        """The latest run of every (provider, model, probe), to restore state at start."""
        return await self._db.read("restore", sql.select_latest_runs, [])

    async def reliability_inputs(
        self, *, since: float
    ) -> dict[tuple[str, str], list[tuple[Verdict, float | None]]]:
        """Per (provider, model): (verdict, hit_ratio) of each run finished at or after
        ``since``, oldest first."""
        query = partial(sql.select_reliability_inputs, since=since)
        return await self._db.read("read", query, {})

    async def reliability_stats(
        self, *, since: float, provider: str | None = None, model: str | None = None
    ) -> dict[tuple[str, str], ReliabilityStats]:
        """Per (provider, model): aggregates of the runs finished at or after ``since``."""
        query = partial(sql.select_reliability_stats, since=since, provider=provider, model=model)
        return await self._db.read("read", query, {})

    async def latest_balances(self) -> dict[tuple[str, str], tuple[float, float]]:
        """(provider, currency) -> (amount, at) of the latest balance recorded."""
        return await self._db.read("restore", sql.select_latest_balances, {})

    async def load_model_states(self) -> dict[tuple[str, str], ModelState]:
        return await self._db.read("restore", sql.select_model_states, {})

    # --- maintenance --------------------------------------------------------------------

    async def cleanup(self, *, older_than: float) -> int:
        """Delete history older than ``older_than``; return the number of rows deleted.

        Runs and their usage, settled reservations, balances, and model states not updated
        since. Unsettled reservations stay until their month window is over (they still count
        against it, and may still be settled), and window totals stay until the window has
        ended, so retention can never give budget back. Deletes in batches, releasing the
        write lock in between, so a reservation never waits behind a long cleanup.
        """
        cutoff = float(older_than)
        now = self._clock.time()
        # Window totals go once the window has ended before the cutoff; windows still open are
        # never cleaned, whatever cutoff the caller passes.
        ended = min(cutoff, now)
        batched: tuple[tuple[str, tuple[float, ...]], ...] = (
            (
                "DELETE FROM token_usage WHERE id IN "
                "(SELECT id FROM token_usage WHERE at < ? LIMIT ?)",
                (cutoff,),
            ),
            (
                "DELETE FROM probe_runs WHERE id IN "
                "(SELECT id FROM probe_runs WHERE finished_at < ? LIMIT ?)",
                (cutoff,),
            ),
            (
                "DELETE FROM budget_ledger WHERE id IN (SELECT id FROM budget_ledger "
                "WHERE at < ? AND (settled = 1 OR month_end <= ?) LIMIT ?)",
                (cutoff, now),
            ),
            (
                "DELETE FROM balances WHERE id IN (SELECT id FROM balances WHERE at < ? LIMIT ?)",
                (cutoff,),
            ),
        )
        # One row per window or per model: a single statement each.
        single: tuple[tuple[str, tuple[float, ...]], ...] = (
            ('DELETE FROM budget_windows WHERE "end" <= ?', (ended,)),
            ("DELETE FROM model_state WHERE updated_at < ?", (cutoff,)),
        )
        deleted = 0
        try:
            for statement, params in batched:
                for _ in range(_CLEANUP_MAX_BATCHES):
                    count = await self._db.write(
                        partial(sql.delete, sql=statement, params=(*params, _CLEANUP_BATCH))
                    )
                    deleted += count
                    if count < _CLEANUP_BATCH:
                        break
            for statement, params in single:
                deleted += await self._db.write(partial(sql.delete, sql=statement, params=params))
            if deleted:
                await self._db.run(sql.maintain)
        except FAULTS as exc:
            self._db.report("cleanup", exc)
        return deleted

    async def integrity_check(self) -> str:
        """``"ok"``, or the problems ``PRAGMA integrity_check``/``foreign_key_check`` found,
        or ``"unavailable: …"`` when the database cannot be read."""
        try:
            return await self._db.run(sql.integrity_problems)
        except FAULTS as exc:
            self._db.report("read", exc)
            return f"unavailable: {describe(exc)}"

    # --- budget ledger primitives (exporter.budget converts units and windows) ----------

    async def budget_reserve(
        self,
        provider: str,
        *,
        tokens: int,
        nanousd: int,
        at: float,
        windows: LedgerWindows,
        limits: LedgerLimits,
    ) -> LedgerDecision | None:
        """Check the limits and insert the reservation in ONE write transaction.

        ``BEGIN IMMEDIATE`` takes the database write lock before the totals are read, so no
        other connection, in this process or another, can reserve between the check and the
        insert. Committed (fsynced: synchronous=FULL) before returning. None when the
        database could not be written: the caller must treat that as a denial.
        """
        body = partial(
            sql.reserve,
            provider=provider,
            tokens=tokens,
            nanousd=nanousd,
            at=at,
            windows=windows,
            limits=limits,
        )
        try:
            return await self._db.write(body)
        except FAULTS as exc:
            self._db.report("budget", exc)
            return None

    async def budget_settle(
        self, reservation_id: int, *, tokens: int | None, nanousd: int | None
    ) -> LedgerTotals | None:
        """Replace a reservation's reserved amounts by the actual ones (None = keep reserved).

        Returns the totals of the reservation's windows afterwards; None when it was already
        settled or is gone, or when the write failed. A failed settlement is queued like a
        history write: until it lands the reservation counts at its reserved amount, which
        errs on the safe side.
        """
        outcome: list[LedgerTotals] = []
        body = partial(
            sql.settle,
            reservation_id=reservation_id,
            tokens=tokens,
            nanousd=nanousd,
            settled_at=self._clock.time(),
            outcome=outcome,
        )
        await self._db.submit("budget", body)
        return outcome[0] if outcome else None

    async def budget_totals(self, provider: str, windows: LedgerWindows) -> LedgerTotals | None:
        """What the windows have used so far (None when the database cannot be read)."""

        async def query(conn: Connection) -> LedgerTotals | None:
            return await sql.read_totals(conn, provider, windows.day_start, windows.month_start)

        return await self._db.read("budget", query, None)


def _implements_probe_store(store: Store) -> ProbeStore:  # pragma: no cover
    # Never called: mypy checks here that Store keeps implementing the Protocol.
    return store
