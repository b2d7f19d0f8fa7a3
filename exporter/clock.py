"""Time sources. Whatever waits or timestamps takes a Clock, so tests control time exactly."""

from __future__ import annotations

import time
from typing import Protocol

import anyio
import anyio.lowlevel


class Clock(Protocol):
    """The seam between the code and time: wall time for records, monotonic for durations."""

    def time(self) -> float:
        """Wall-clock seconds since the epoch (for timestamps that are stored or exported)."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never goes backwards (for durations)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock whose sleeps return at once after advancing time by the amount slept.

    Good for code that runs one thing at a time (a probe waiting out a TTL delay, a retry
    backoff): the waits cost nothing yet everything that reads the clock sees them.
    ``sleeps`` records every requested wait so tests can assert backoff schedules.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._origin = start
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now - self._origin

    def advance(self, seconds: float) -> None:
        self._now += max(0.0, seconds)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)
        # Still a checkpoint, so cancellation and other tasks behave as with a real sleep.
        await anyio.lowlevel.checkpoint()
