"""The budget ledger: reserve before sending, settle after, totals that never reset silently.

A reservation checks the limits and inserts in ONE ``BEGIN IMMEDIATE`` transaction (no other
connection can reserve in between), committed and fsynced before it returns.
``budget_windows`` keeps running totals per provider and window in the same transactions.
The store remembers the totals of the open windows it has seen; when the file is deleted or
replaced while running they are carried into the new file (never lowering what it holds)
before anything else runs there, and while that cannot be written every reservation fails,
that is, is denied (docs/storage.md, "Deleting the database").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

from exporter.clock import Clock
from exporter.store.engine import FAULTS, Connection, Engine

log = logging.getLogger("exporter.store")


@dataclass(frozen=True, slots=True)
class LedgerWindows:
    """The day and month windows (epoch seconds, end exclusive) a reservation counts in."""

    day_start: int
    day_end: int
    month_start: int
    month_end: int


@dataclass(frozen=True, slots=True)
class WindowTotals:
    """What one window has used: reserved amounts of open reservations plus settled actuals."""

    start: int
    tokens: int = 0
    nanousd: int = 0


@dataclass(frozen=True, slots=True)
class LedgerTotals:
    provider: str
    day: WindowTotals
    month: WindowTotals


@dataclass(frozen=True, slots=True)
class LedgerLimits:
    """Limits in ledger units; None = unlimited."""

    day_tokens: int | None = None
    month_tokens: int | None = None
    day_nanousd: int | None = None
    month_nanousd: int | None = None

    def admits(self, totals: LedgerTotals, tokens: int, nanousd: int) -> bool:
        """Whether adding this much to both windows stays within every limit."""
        d, m = totals.day, totals.month
        return all(
            limit is None or used + amount <= limit
            for limit, used, amount in (
                (self.day_tokens, d.tokens, tokens),
                (self.month_tokens, m.tokens, tokens),
                (self.day_nanousd, d.nanousd, nanousd),
                (self.month_nanousd, m.nanousd, nanousd),
            )
        )

    @property
    def unlimited(self) -> bool:
        return (self.day_tokens, self.month_tokens, self.day_nanousd, self.month_nanousd) == (
            (None,) * 4
        )


@dataclass(frozen=True, slots=True)
class LedgerDecision:
    """Outcome of a reservation attempt that reached the database."""

    reservation_id: int | None  # None: a limit would have been exceeded; nothing was written
    totals: LedgerTotals  # the windows' use after the decision


_UPSERT = ('INSERT INTO budget_windows (provider, kind, start, "end", tokens, nanousd) VALUES '
           "(?, ?, ?, ?, ?, ?) ON CONFLICT (provider, kind, start) DO UPDATE SET ")  # fmt: skip
_ADD = _UPSERT + "tokens = tokens + excluded.tokens, nanousd = nanousd + excluded.nanousd"
_AT_LEAST = (_UPSERT + "tokens = max(tokens, excluded.tokens), "
             "nanousd = max(nanousd, excluded.nanousd)")  # fmt: skip


class Ledger:
    """The ledger half of ``Store`` (a mixin: ``Store`` provides the engine and the clock)."""

    _db: Engine
    _clock: Clock
    # (provider, kind, start) -> (end, tokens, nanousd) of the windows this process has seen.
    _seen: dict[tuple[str, str, int], tuple[int, int, int]]

    async def _remember_open_windows(self, conn: Connection) -> None:
        rows = await conn.execute_fetchall('SELECT provider, kind, start, "end", tokens, nanousd '
                                           'FROM budget_windows WHERE "end" > ?',
                                           (self._clock.time(),))  # fmt: skip
        self._seen.update({(p, k, int(s)): (int(e), int(t), int(n)) for p, k, s, e, t, n in rows})

    async def _carry_forward(self, conn: Connection) -> None:
        """The file changed underneath: it must not hold less than we know was used."""
        now = self._clock.time()
        kept = [(*key, *v) for key, v in self._seen.items() if v[0] > now]
        await conn.execute_fetchall("BEGIN IMMEDIATE")
        try:
            for row in kept:
                await conn.execute_fetchall(_AT_LEAST, row)
            await conn.execute_fetchall("COMMIT")
        except BaseException:
            if conn.in_transaction:
                await conn.execute_fetchall("ROLLBACK")
            raise
        if kept:
            log.warning("store: %s was replaced or removed while running: carried the totals of "
                        "%d open budget windows into it (the budget does not restart from zero)",
                        self._db.path, len(kept))  # fmt: skip
        await self._remember_open_windows(conn)

    async def _totals(self, conn: Connection, provider: str, day: int, month: int) -> LedgerTotals:
        used = {"day": (0, 0), "month": (0, 0)}
        for kind, start, end, tokens, nanousd in await conn.execute_fetchall(
            'SELECT kind, start, "end", tokens, nanousd FROM budget_windows WHERE provider = ? '
            "AND ((kind = 'day' AND start = ?) OR (kind = 'month' AND start = ?))",
            (provider, day, month),
        ):
            used[kind] = (int(tokens), int(nanousd))
            self._seen[(provider, kind, int(start))] = (int(end), int(tokens), int(nanousd))
        return LedgerTotals(provider, WindowTotals(day, *used["day"]),
                            WindowTotals(month, *used["month"]))  # fmt: skip

    async def budget_reserve(
        self, provider: str, *, tokens: int, nanousd: int, at: float, windows: LedgerWindows,
        limits: LedgerLimits,
    ) -> LedgerDecision | None:  # fmt: skip
        """Check the limits and insert the reservation in one write transaction. None when
        the database could not be written: the caller must treat that as a denial."""
        w = windows

        async def body(conn: Connection) -> LedgerDecision:
            totals = await self._totals(conn, provider, w.day_start, w.month_start)
            if not limits.admits(totals, tokens, nanousd):
                return LedgerDecision(None, totals)
            row = await conn.execute_insert(
                "INSERT INTO budget_ledger (provider, reserved_tokens, reserved_nanousd, at, "
                "day_start, month_start, month_end) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (provider, tokens, nanousd, at, w.day_start, w.month_start, w.month_end),
            )
            for kind, start, end in (("day", w.day_start, w.day_end),
                                     ("month", w.month_start, w.month_end)):  # fmt: skip
                await conn.execute_fetchall(_ADD, (provider, kind, start, end, tokens, nanousd))
            after = await self._totals(conn, provider, w.day_start, w.month_start)
            return LedgerDecision(int(row[0]) if row else None, after)

        try:
            return await self._db.write(body)
        except FAULTS as exc:
            self._db.report("budget", exc)
            return None

    async def budget_settle(
        self, reservation_id: int, *, tokens: int | None, nanousd: int | None
    ) -> LedgerTotals | None:
        """Replace a reservation's reserved amounts by the actual ones (None = keep reserved).

        Returns its windows' totals afterwards; None when it was already settled or is gone,
        or when the write failed. A failed settlement is queued like a history write: until
        it lands the reservation counts at its reserved amount (the safe side).
        """
        outcome: list[LedgerTotals] = []
        at = self._clock.time()
        await self._db.submit("budget", partial(self._settle, reservation_id, tokens, nanousd,
                                                at, outcome))  # fmt: skip
        return outcome[0] if outcome else None

    async def _settle(self, rid: int, tokens: int | None, nanousd: int | None, at: float,
                      outcome: list[LedgerTotals], conn: Connection) -> None:  # fmt: skip
        rows = list(await conn.execute_fetchall(
            "SELECT provider, reserved_tokens, reserved_nanousd, day_start, month_start "
            "FROM budget_ledger WHERE id = ? AND settled = 0", (rid,)))  # fmt: skip
        if not rows:  # already settled (a retried settlement) or gone: nothing to change
            return
        provider, reserved_tokens, reserved_nanousd, day, month = rows[0]
        tokens = reserved_tokens if tokens is None else tokens  # unknown: keep the reservation
        nanousd = reserved_nanousd if nanousd is None else nanousd
        await conn.execute_fetchall(
            "UPDATE budget_ledger SET settled = 1, actual_tokens = ?, actual_nanousd = ?, "
            "settled_at = ? WHERE id = ?", (tokens, nanousd, at, rid))  # fmt: skip
        await conn.execute_fetchall(
            "UPDATE budget_windows SET tokens = tokens + ?, nanousd = nanousd + ? WHERE "
            "provider = ? AND ((kind = 'day' AND start = ?) OR (kind = 'month' AND start = ?))",
            (tokens - reserved_tokens, nanousd - reserved_nanousd, provider, day, month),
        )
        outcome.append(await self._totals(conn, provider, day, month))

    async def budget_totals(self, provider: str, windows: LedgerWindows) -> LedgerTotals | None:
        """What the windows have used so far (None when the database cannot be read)."""
        query = partial(self._totals, provider=provider, day=windows.day_start,
                        month=windows.month_start)  # fmt: skip
        return await self._db.read("budget", query, None)
