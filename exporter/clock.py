"""Time sources. Whatever waits or timestamps takes a Clock, so tests control time exactly."""

from __future__ import annotations

import heapq
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


class VirtualClock:
    """Time that moves only when a test advances it; concurrent sleepers wake in order.

    ``advance`` walks through every deadline it passes, waking those sleepers and letting
    the woken tasks run (a few scheduler passes) before moving on, so code that sleeps
    again in response is woken at the right virtual time too. For code whose only waits
    are clock sleeps (the scheduler with a fake probe runner), timing is exact.
    """

    def __init__(self, start: float = 1_700_000_000.0, settle_passes: int = 50) -> None:
        self._now = start
        self._origin = start
        self._settle = settle_passes
        self._seq = 0
        self._sleepers: list[tuple[float, int, anyio.Event]] = []

    def time(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now - self._origin

    @property
    def sleepers(self) -> int:
        return len(self._sleepers)

    @property
    def next_deadline(self) -> float | None:
        """When the earliest sleeper wakes (None: nobody sleeps), for drivers that jump
        from one event to the next."""
        return self._sleepers[0][0] if self._sleepers else None

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        self._seq += 1
        entry = (self._now + seconds, self._seq, event)
        heapq.heappush(self._sleepers, entry)
        try:
            await event.wait()
        finally:
            if not event.is_set():  # cancelled: nobody waits for this deadline any more
                self._sleepers.remove(entry)
                heapq.heapify(self._sleepers)

    async def settle(self) -> None:
        """Let every runnable task run until it blocks again."""
        for _ in range(self._settle):
            await anyio.lowlevel.checkpoint()

    async def advance(self, seconds: float) -> None:
        target = self._now + max(0.0, seconds)
        await self.settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, event = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            event.set()
            await self.settle()
        self._now = target
        await self.settle()
