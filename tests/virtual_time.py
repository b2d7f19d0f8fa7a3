"""A simulated day in seconds: the real exporter code and the in-process simulator over real
HTTP on 127.0.0.1, on one VirtualClock that jumps from one sleeper to the next.

Time may only jump while nothing is in flight: every HTTP exchange (until its body is closed)
and every store call counts as work in progress, so a jump never happens mid-request. Between
jumps the driver lets runnable tasks run (``VirtualClock.settle``) and polls real time in small
steps while work is in flight; a jump needs one whole settle in which no work ended, so what
finished work unblocked has run too. Bounded: ``drive`` gives up after ``max_real`` real seconds.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx

from exporter.clock import VirtualClock


class Work:
    """How many exchanges and store calls are in flight, and how many have ended."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.ended = 0

    def end(self) -> None:
        self.in_flight -= 1
        self.ended += 1


class _TrackedStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, work: Work) -> None:
        self._inner = inner
        self._work = work
        self._open = True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            if self._open:
                self._open = False
                self._work.end()


class TrackedTransport(httpx.AsyncBaseTransport):
    """httpx's own transport, counting each exchange from request to closed body."""

    def __init__(self, work: Work) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._work = work

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self._work.in_flight += 1
        try:
            response = await self._inner.handle_async_request(request)
        except BaseException:
            self._work.end()
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_TrackedStream(response.stream, self._work),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


class TrackedStore:
    """A real Store whose coroutine methods count as work in flight while they run."""

    def __init__(self, store: Any, work: Work) -> None:
        self._store = store
        self._work = work

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        @functools.wraps(attr)
        async def tracked(*args: Any, **kwargs: Any) -> Any:
            self._work.in_flight += 1
            try:
                return await attr(*args, **kwargs)
            finally:
                self._work.end()

        return tracked


def tracked_client(work: Work) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=TrackedTransport(work), trust_env=False)


async def drive(
    clock: VirtualClock,
    work: Work,
    until: float,
    *,
    stop_when: Callable[[], bool] | None = None,
    max_real: float = 120.0,
) -> None:
    """Advance ``clock`` to ``until`` (wall-clock seconds), one sleeper at a time."""
    deadline = time.monotonic() + max_real
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"virtual time stuck at {clock.time()} (work: {work.in_flight})")
        ended = work.ended
        await clock.settle()
        if work.in_flight or work.ended != ended:
            # Busy, or work ended while settling: what it unblocked may not have run yet.
            await anyio.sleep(0.0005)
            continue
        if stop_when is not None and stop_when():
            return
        upcoming = clock.next_deadline
        if upcoming is None or upcoming > until:
            break
        await clock.advance(max(0.0, upcoming - clock.time()))
    await clock.advance(max(0.0, until - clock.time()))
