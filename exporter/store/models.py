"""Plain values the store returns besides ProbeResult."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelState:
    """Failure tracking for one model, persisted so a restart keeps cooldowns and counts."""

    provider: str
    model: str
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    cooldown_until: float | None = None  # wall clock; None = not in cooldown
    updated_at: float = 0.0


# --- budget ledger values (budget.py converts to and from USD floats) ------------------------


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
        checks = (
            (self.day_tokens, totals.day.tokens, tokens),
            (self.month_tokens, totals.month.tokens, tokens),
            (self.day_nanousd, totals.day.nanousd, nanousd),
            (self.month_nanousd, totals.month.nanousd, nanousd),
        )
        return all(limit is None or used + amount <= limit for limit, used, amount in checks)

    @property
    def unlimited(self) -> bool:
        return (
            self.day_tokens is None
            and self.month_tokens is None
            and self.day_nanousd is None
            and self.month_nanousd is None
        )


@dataclass(frozen=True, slots=True)
class LedgerDecision:
    """Outcome of a reservation attempt that reached the database."""

    reservation_id: int | None  # None: a limit would have been exceeded; nothing was written
    totals: LedgerTotals  # the windows' use after the decision
