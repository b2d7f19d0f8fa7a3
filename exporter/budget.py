"""The spend budget: tokens and USD per provider, per UTC calendar day and UTC calendar month.

Before a request is sent, ``reserve`` checks every limit and records the reservation in the
SQLite ledger in one ``BEGIN IMMEDIATE`` transaction, committed (fsynced) before it returns;
``settle`` then replaces the reserved amount by what the provider reported. So:

* two processes sharing the database cannot both pass the check for the same room: the
  second waits for the write lock and then sees the first one's reservation;
* a crash loses nothing that counts: a reservation is on disk before its request is sent,
  and one never settled (the process died) keeps counting at its reserved amount;
* a reservation that cannot be written is denied. Never exceeding the budget beats probing.

What is never exceeded is the sum, over a window, of every settled reservation's actual
amount plus every open reservation's reserved amount, provided reservations are upper bounds
of what a request can cost (the scheduler reserves prompt tokens plus ``max_tokens``). If a
provider reports more than was reserved, the ledger records the truth, a warning is logged,
and nothing more is granted until the window has room again. docs/storage.md has the argument.

Money is kept in integer nano-USD (1e-9 USD) so sums are exact; amounts round up, limits
round down. A window is ``[start, end)`` in UTC; a reservation counts in the day and month
windows it was made in, even when it is settled after midnight.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Final, Literal

from exporter.clock import Clock
from exporter.store import LedgerLimits, LedgerTotals, LedgerWindows, Store, WindowTotals

log = logging.getLogger(__name__)

Window = Literal["day", "month"]
Unit = Literal["tokens", "usd"]
WINDOWS: Final[tuple[Window, ...]] = ("day", "month")
UNITS: Final[tuple[Unit, ...]] = ("tokens", "usd")
NANO_PER_USD: Final = 1_000_000_000


@dataclass(frozen=True, slots=True)
class BudgetLimits:
    """One provider's limits. 0 or None means unlimited."""

    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    daily_usd: float | None = None
    monthly_usd: float | None = None

    def __post_init__(self) -> None:
        for name in ("daily_tokens", "monthly_tokens", "daily_usd", "monthly_usd"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"budget {name} must be a non-negative number, got {value!r}")

    def ledger_limits(self) -> LedgerLimits:
        def nano(limit: float | None) -> int | None:
            # Unlimited only when configured so: a positive limit below a nano-USD is 0.
            return usd_to_nano(limit, rounding=ROUND_FLOOR) if limit else None

        return LedgerLimits(
            day_tokens=int(self.daily_tokens) if self.daily_tokens else None,
            month_tokens=int(self.monthly_tokens) if self.monthly_tokens else None,
            day_nanousd=nano(self.daily_usd),
            month_nanousd=nano(self.monthly_usd),
        )


UNLIMITED: Final = BudgetLimits()


@dataclass(frozen=True, slots=True)
class Reservation:
    """A granted reservation. Pass it to ``Budget.settle`` once the request is done."""

    id: int | None  # ledger row; None: not recorded (unlimited provider, store unavailable)
    provider: str
    tokens: int
    usd: float
    at: float
    day_start: int
    month_start: int


@dataclass(frozen=True, slots=True)
class BudgetUsage:
    window: Window
    unit: Unit
    limit: float | None  # None = unlimited
    used: float  # reserved amounts of open reservations + actual amounts of settled ones


@dataclass(frozen=True, slots=True)
class BudgetSnapshot:
    provider: str
    usage: tuple[BudgetUsage, ...]  # every window × unit, day/tokens first
    # A limit is reached, or the last reservation denied in the current windows would still
    # not fit: the next probe will not run.
    exhausted: bool

    def get(self, window: Window, unit: Unit) -> BudgetUsage:
        for usage in self.usage:
            if usage.window == window and usage.unit == unit:
                return usage
        raise KeyError((window, unit))


class Budget:
    """Per-provider spend limits over UTC day and month windows, kept in the store's ledger.

    One instance per process; several processes may share one database file.
    """

    def __init__(self, store: Store, limits: Mapping[str, BudgetLimits], clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self._limits: dict[str, BudgetLimits] = dict(limits)
        # What each (provider, window kind) had used as of the last database answer. Another
        # process may have reserved since; reserve() always decides on the database's figures.
        self._used: dict[tuple[str, Window], WindowTotals] = {}
        # provider -> the last reservation denied for lack of room: (windows, tokens, nanousd).
        self._denied: dict[str, tuple[LedgerWindows, int, int]] = {}

    def set_limits(self, limits: Mapping[str, BudgetLimits]) -> None:
        """New limits (a configuration reload); they apply to the next reservation."""
        self._limits = dict(limits)

    async def load(self) -> None:
        """Read what the current windows have used (including reservations a crashed
        process never settled, at their reserved amount)."""
        windows = utc_windows(self._clock.time())
        for provider in self._limits:
            totals = await self._store.budget_totals(provider, windows)
            if totals is not None:
                self._remember(totals)

    async def reserve(self, provider: str, tokens: int, usd: float) -> Reservation | None:
        """Reserve an upper bound of what the next request can cost; None = do not send it."""
        _check_amounts(tokens, usd)
        now = self._clock.time()
        windows = utc_windows(now)
        limits = self._limits.get(provider, UNLIMITED).ledger_limits()
        nanousd = usd_to_nano(usd, rounding=ROUND_CEILING)
        decision = await self._store.budget_reserve(
            provider, tokens=tokens, nanousd=nanousd, at=now, windows=windows, limits=limits
        )
        if decision is None:
            if limits.unlimited:
                # Nothing to exceed: a broken database must not stop probing a provider
                # without a budget. The request simply goes unrecorded in the ledger.
                return Reservation(
                    None, provider, tokens, usd, now, windows.day_start, windows.month_start
                )
            log.warning("budget: %s: reservation denied, the ledger could not be written", provider)
            return None
        self._remember(decision.totals)
        if decision.reservation_id is None:
            previous = self._denied.get(provider)
            self._denied[provider] = (windows, tokens, nanousd)
            if previous is None or previous[0] != windows:  # once per window, not per probe
                # DEBUG: the recorder logs the pause this causes, once (one line per episode).
                log.debug(
                    "budget: %s: reservation of %d tokens / %.6f USD denied: a limit would be "
                    "exceeded; probes wait for room or the next window",
                    provider,
                    tokens,
                    usd,
                )
            return None
        self._denied.pop(provider, None)
        return Reservation(
            decision.reservation_id,
            provider,
            tokens,
            usd,
            now,
            windows.day_start,
            windows.month_start,
        )

    async def settle(
        self, reservation: Reservation, *, tokens: int | None, usd: float | None
    ) -> None:
        """Replace the reserved amounts by the actual ones; None = unknown, keep the reserved
        amount (conservative). Settling twice changes nothing."""
        _check_amounts(tokens or 0, usd or 0.0)
        if reservation.id is None:
            return
        # Only a limited unit can be overrun (a token budget reserves no USD, and the other
        # way round).
        limits = self._limits.get(reservation.provider, UNLIMITED)
        token_limited = bool(limits.daily_tokens or limits.monthly_tokens)
        usd_limited = bool(limits.daily_usd or limits.monthly_usd)
        if (token_limited and tokens is not None and tokens > reservation.tokens) or (
            usd_limited and usd is not None and usd > reservation.usd
        ):
            log.warning(
                "budget: %s used more than it reserved (%s tokens / %s USD reserved, %s / %s "
                "used); the ledger records what was used",
                reservation.provider,
                reservation.tokens,
                reservation.usd,
                tokens,
                usd,
            )
        nanousd = None if usd is None else usd_to_nano(usd, rounding=ROUND_CEILING)
        totals = await self._store.budget_settle(reservation.id, tokens=tokens, nanousd=nanousd)
        if totals is not None:
            self._remember(totals)

    def would_fit(self, provider: str, tokens: int, usd: float) -> bool:
        """In-memory check (no I/O): would a reservation of this size pass now, as far as
        this process knows? ``reserve`` still decides. Changes nothing."""
        _check_amounts(tokens, usd)
        limits = self._limits.get(provider, UNLIMITED).ledger_limits()
        if limits.unlimited:
            return True
        totals = self._current(provider, utc_windows(self._clock.time()))
        return limits.admits(totals, tokens, usd_to_nano(usd, rounding=ROUND_CEILING))

    def admit(self, provider: str, tokens: int, usd: float) -> bool:
        """The scheduler's pre-check before a probe run (no I/O): ``would_fit``, and a run
        that does not fit counts as a denial, exactly like a denied reservation: the provider
        is ``exhausted`` until room appears or the window rolls over."""
        if self.would_fit(provider, tokens, usd):
            return True
        windows = utc_windows(self._clock.time())
        self._denied[provider] = (windows, tokens, usd_to_nano(usd, rounding=ROUND_CEILING))
        return False

    def could_ever_fit(self, provider: str, tokens: int, usd: float) -> bool:
        """Whether this much fits in an empty window at all (no I/O)."""
        _check_amounts(tokens, usd)
        limits = self._limits.get(provider, UNLIMITED).ledger_limits()
        windows = utc_windows(self._clock.time())
        empty = LedgerTotals(
            provider, WindowTotals(windows.day_start), WindowTotals(windows.month_start)
        )
        return limits.admits(empty, tokens, usd_to_nano(usd, rounding=ROUND_CEILING))

    def exhausted(self, provider: str) -> bool:
        """Whether the next probe of ``provider`` is known not to fit (see ``snapshot``)."""
        snap = self.snapshot().get(provider)
        return bool(snap and snap.exhausted)

    def next_window(self) -> float:
        """When the current UTC day ends: the earliest moment a full budget can have room."""
        return float(utc_windows(self._clock.time()).day_end)

    def limited(self, provider: str) -> bool:
        return not self._limits.get(provider, UNLIMITED).ledger_limits().unlimited

    def usd_limited(self, provider: str) -> bool:
        limits = self._limits.get(provider, UNLIMITED)
        return bool(limits.daily_usd or limits.monthly_usd)

    def snapshot(self) -> dict[str, BudgetSnapshot]:
        """Limits and use of the current windows, per provider: pure in-memory read."""
        windows = utc_windows(self._clock.time())
        providers = set(self._limits) | {provider for provider, _ in self._used}
        out: dict[str, BudgetSnapshot] = {}
        for provider in sorted(providers):
            limits = self._limits.get(provider, UNLIMITED)
            ledger_limits = limits.ledger_limits()
            totals = self._current(provider, windows)
            figures: tuple[tuple[Window, Unit, int | None, int, float | None, float], ...] = (
                (
                    "day",
                    "tokens",
                    ledger_limits.day_tokens,
                    totals.day.tokens,
                    _limit(limits.daily_tokens),
                    float(totals.day.tokens),
                ),
                (
                    "day",
                    "usd",
                    ledger_limits.day_nanousd,
                    totals.day.nanousd,
                    _limit(limits.daily_usd),
                    nano_to_usd(totals.day.nanousd),
                ),
                (
                    "month",
                    "tokens",
                    ledger_limits.month_tokens,
                    totals.month.tokens,
                    _limit(limits.monthly_tokens),
                    float(totals.month.tokens),
                ),
                (
                    "month",
                    "usd",
                    ledger_limits.month_nanousd,
                    totals.month.nanousd,
                    _limit(limits.monthly_usd),
                    nano_to_usd(totals.month.nanousd),
                ),
            )
            reached = any(lim is not None and used >= lim for _, _, lim, used, _, _ in figures)
            denied = self._denied.get(provider)
            # The last denied request would still not fit (settlements may have made room).
            blocked = (
                denied is not None
                and denied[0] == windows
                and not ledger_limits.admits(totals, denied[1], denied[2])
            )
            out[provider] = BudgetSnapshot(
                provider,
                tuple(BudgetUsage(w, u, limit, used) for w, u, _, _, limit, used in figures),
                exhausted=(reached or blocked) and not ledger_limits.unlimited,
            )
        return out

    def _current(self, provider: str, windows: LedgerWindows) -> LedgerTotals:
        """In-memory totals of the current windows; a window not seen yet has used nothing."""
        day = self._used.get((provider, "day"))
        month = self._used.get((provider, "month"))
        return LedgerTotals(
            provider,
            day if day and day.start == windows.day_start else WindowTotals(windows.day_start),
            month
            if month and month.start == windows.month_start
            else WindowTotals(windows.month_start),
        )

    def _remember(self, totals: LedgerTotals) -> None:
        # Never let the answer about an older window (a late settlement) replace a newer one.
        pairs: tuple[tuple[Window, WindowTotals], ...] = (
            ("day", totals.day),
            ("month", totals.month),
        )
        for kind, window in pairs:
            known = self._used.get((totals.provider, kind))
            if known is None or window.start >= known.start:
                self._used[(totals.provider, kind)] = window


def utc_windows(at: float) -> LedgerWindows:
    """The UTC calendar day and month containing ``at``, as epoch seconds [start, end)."""
    moment = datetime.fromtimestamp(at, tz=UTC)
    day = datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
    month = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    next_month = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    return LedgerWindows(
        day_start=int(day.timestamp()),
        day_end=int((day + timedelta(days=1)).timestamp()),
        month_start=int(month.timestamp()),
        month_end=int(next_month.timestamp()),
    )


def usd_to_nano(usd: float | None, *, rounding: str) -> int:
    """USD to integer nano-USD, exact for the decimal the float was written as (0.3 is
    300000000, not 299999999.99…); ``rounding`` decides below the nano (up for amounts,
    down for limits, both conservative)."""
    if not usd:
        return 0
    nano = (Decimal(repr(float(usd))) * NANO_PER_USD).to_integral_value(rounding=rounding)
    return int(nano)


def nano_to_usd(nano: int) -> float:
    return nano / NANO_PER_USD


def _limit(value: float | None) -> float | None:
    return float(value) if value else None


def _check_amounts(tokens: int, usd: float) -> None:
    if tokens < 0 or not math.isfinite(usd) or usd < 0:
        raise ValueError(f"budget amounts must be non-negative, got {tokens} tokens, {usd} USD")
