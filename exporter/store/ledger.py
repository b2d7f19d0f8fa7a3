"""The budget ledger: reserve before sending, settle after, totals that never reset silently
(docs/storage.md, "Budget")."""

from __future__ import annotations

from typing import Final, NamedTuple

from exporter.store.engine import Engine, log
from exporter.store.migrations import Connection, atomically


class LedgerWindows(NamedTuple):
    """The day and month windows (epoch seconds, end exclusive) a reservation counts in."""

    day_start: int
    day_end: int
    month_start: int
    month_end: int


class WindowTotals(NamedTuple):
    """What one window has used: reserved amounts of open reservations plus settled actuals."""

    start: int
    tokens: int = 0
    nanousd: int = 0


class LedgerTotals(NamedTuple):
    provider: str
    day: WindowTotals
    month: WindowTotals


class LedgerLimits(NamedTuple):
    """Limits in ledger units; None = unlimited."""

    day_tokens: int | None = None
    month_tokens: int | None = None
    day_nanousd: int | None = None
    month_nanousd: int | None = None

    def admits(self, totals: LedgerTotals, tokens: int, nanousd: int) -> bool:
        """Whether adding this much to both windows stays within every limit."""
        d, m = totals.day, totals.month
        used = (d.tokens + tokens, m.tokens + tokens, d.nanousd + nanousd, m.nanousd + nanousd)
        return all(cap is None or u <= cap for cap, u in zip(self, used, strict=True))

    @property
    def unlimited(self) -> bool:
        return self == LedgerLimits()


class LedgerDecision(NamedTuple):
    """Outcome of a reservation attempt that reached the database."""

    reservation_id: int | None  # None: a limit would have been exceeded; nothing was written
    totals: LedgerTotals  # the windows' use after the decision


_WINDOWS: Final = """SELECT kind, start, "end", tokens, nanousd FROM budget_windows
    WHERE provider = ? AND ((kind = 'day' AND start = ?) OR (kind = 'month' AND start = ?))"""
_OPEN_WINDOWS: Final = """SELECT provider, kind, start, "end", tokens, nanousd FROM budget_windows
    WHERE "end" > ?"""
_RESERVE: Final = """INSERT INTO budget_ledger (provider, reserved_tokens, reserved_nanousd, at,
    day_start, month_start, month_end) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id"""
_UPSERT: Final = """INSERT INTO budget_windows (provider, kind, start, "end", tokens, nanousd)
    VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (provider, kind, start) DO UPDATE SET tokens ="""
_ADD: Final = f"{_UPSERT} tokens + excluded.tokens, nanousd = nanousd + excluded.nanousd"
_FLOOR: Final = f"{_UPSERT} max(tokens, excluded.tokens), nanousd = max(nanousd, excluded.nanousd)"
# "settled = 0": settling again (a retry) changes nothing; NULL (unknown) keeps the reserved.
_SETTLE: Final = """UPDATE budget_ledger SET settled = 1, settled_at = ?,
    actual_tokens = coalesce(?, reserved_tokens), actual_nanousd = coalesce(?, reserved_nanousd)
    WHERE id = ? AND settled = 0 RETURNING actual_tokens - reserved_tokens,
    actual_nanousd - reserved_nanousd, provider, day_start, month_start"""
_SETTLE_WINDOWS: Final = """UPDATE budget_windows SET tokens = tokens + ?, nanousd = nanousd + ?
    WHERE provider = ? AND ((kind = 'day' AND start = ?) OR (kind = 'month' AND start = ?))"""


class Ledger(Engine):
    """The ledger half of ``Store``."""

    # (provider, kind, start) -> (end, tokens, nanousd) of the open windows seen since open.
    _seen: dict[tuple[str, str, int], tuple[int, int, int]]

    async def _prepare(self, conn: Connection, *, replaced: bool) -> None:
        """A file deleted or replaced while running first gets the totals of the open windows
        seen (never lowering what it holds); then remember what its open windows hold."""
        now = self._clock.time()
        if replaced and (kept := [(*k, *v) for k, v in self._seen.items() if v[0] > now]):
            await atomically(conn, lambda conn: conn.executemany(_FLOOR, kept))
            log.warning(
                "store: %s was replaced or removed while running: carried the totals of %d "
                "open budget windows into it (the budget does not restart from zero)",
                self.path,
                len(kept),
            )
        rows = await conn.execute_fetchall(_OPEN_WINDOWS, (now,))
        self._seen = {(p, k, s): (e, t, n) for p, k, s, e, t, n in rows}

    async def _totals(self, conn: Connection, provider: str, day: int, month: int) -> LedgerTotals:
        used = {"day": WindowTotals(day), "month": WindowTotals(month)}
        rows = await conn.execute_fetchall(_WINDOWS, (provider, day, month))
        for kind, start, end, tokens, nanousd in rows:
            used[kind] = WindowTotals(start, tokens, nanousd)
            self._seen[(provider, kind, start)] = (end, tokens, nanousd)
        return LedgerTotals(provider, used["day"], used["month"])

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
        """Check the limits and insert the reservation in one write transaction. None when
        the database could not be written: the caller must treat that as a denial."""
        w = windows

        async def reserve(conn: Connection) -> LedgerDecision:
            totals = await self._totals(conn, provider, w.day_start, w.month_start)
            if not limits.admits(totals, tokens, nanousd):
                return LedgerDecision(None, totals)
            row = (provider, tokens, nanousd, at, w.day_start, w.month_start, w.month_end)
            ((reservation_id,),) = await conn.execute_fetchall(_RESERVE, row)
            day, month = ("day", w.day_start, w.day_end), ("month", w.month_start, w.month_end)
            await conn.executemany(_ADD, [(provider, *k, tokens, nanousd) for k in (day, month)])
            after = await self._totals(conn, provider, w.day_start, w.month_start)
            return LedgerDecision(reservation_id, after)

        return await self.read("budget", reserve, None, transaction=True)

    async def budget_settle(
        self, reservation_id: int, *, tokens: int | None, nanousd: int | None
    ) -> LedgerTotals | None:
        """Replace a reservation's reserved amounts by the actual ones (None = keep reserved);
        return its windows' totals afterwards, None when it was already settled or is gone or
        the write failed (then queued: until it lands the reserved amount counts)."""
        outcome: list[LedgerTotals] = []
        at = self._clock.time()

        async def settle(conn: Connection) -> None:
            # At most one row: (extra tokens, extra nanousd, provider, day start, month start).
            for row in await conn.execute_fetchall(_SETTLE, (at, tokens, nanousd, reservation_id)):
                await conn.execute_fetchall(_SETTLE_WINDOWS, row)
                outcome.append(await self._totals(conn, *row[2:]))

        landed = await self.submit("budget", settle)
        return outcome[-1] if landed and outcome else None

    async def budget_totals(self, provider: str, windows: LedgerWindows) -> LedgerTotals | None:
        """What the windows have used so far (None when the database cannot be read)."""
        key = (provider, windows.day_start, windows.month_start)
        return await self.read("budget", lambda conn: self._totals(conn, *key), None)
