"""Live output of ``probe``: each request's row as it completes, and what every wait is for.

A ttl probe with minute-long delays, or a request backing off after a 429, would otherwise
leave the terminal blank. Waits are announced through the Clock the probe and the transport
already take (``ProgressClock``), so neither needs to know that anyone is watching; the
transport only says beforehand why it is about to wait (``Transport(on_wait=...)``). On a
terminal a wait is a countdown that is erased when it ends; elsewhere it is one plain line.
The rows and findings are those of the text report (``exporter.reports.text``).

If the reader of the output goes away (``probe | head``), the probes are cancelled: nothing
more is worth paying for.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TextIO

import anyio

from exporter.clock import Clock
from exporter.durations import format_duration
from exporter.hits import ttft_witness
from exporter.reports import text
from exporter.results import ProbeResult, RequestRecord
from exporter.transport import WaitReason

# Shorter waits are over before a reader could act on a line about them.
ANNOUNCE_WAITS_FROM: Final = 1.0
_CLEAR_LINE: Final = "\r\x1b[K"


class Progress:
    """Writes probe progress to one stream; cancels ``scope`` if the stream's reader is gone."""

    def __init__(
        self,
        stream: TextIO,
        *,
        clock: Clock,
        ttl_delays: Sequence[float] = (),
    ) -> None:
        self.stream = stream
        self.scope = anyio.CancelScope()
        self.closed = False
        self._clock = clock
        self._tty = _isatty(stream)
        self._delays = sorted(set(ttl_delays))
        self._probe = ""
        self._records: list[RequestRecord] = []
        self._repeats = 0
        self._retry_reason: WaitReason | None = None

    # -- what the probe CLI reports --------------------------------------------------------

    def line(self, text: str = "") -> None:
        self._write(text + "\n")

    def start_probe(self, name: str) -> None:
        self._probe, self._records, self._repeats = name, [], 0
        for heading in text.probe_heading(name):
            self.line(heading)

    def request_done(self, record: RequestRecord) -> None:
        self._records.append(record)
        if not record.cold:
            self._repeats += 1
        # A hit is compared with the cold request before it, so its flag is final already.
        slow = ttft_witness(self._records).no_faster[-1]
        self.line(text.probe_row(len(self._records), record, slow))

    def probe_done(self, result: ProbeResult) -> None:
        """The findings only the whole run shows (verdict, baseline, TTFT witness, ...)."""
        for finding in text.probe_findings(result):
            self.line(finding)

    def retry_planned(self, seconds: float, reason: WaitReason) -> None:
        """Transport hook (``on_wait``): why the sleep that follows is taken."""
        self._retry_reason = reason

    # -- waits -----------------------------------------------------------------------------

    def probe_wait(self) -> str:
        """What a probe's own sleep is for (only the ttl probe sleeps)."""
        if self._probe == "ttl" and self._repeats < len(self._delays):
            delay = self._delays[self._repeats]
            return f"the repeat after {delay:g}s (ttl: is its prime still cached?)"
        return f"the next request of {self._probe or 'the probe'}"

    def retry_wait(self) -> str:
        """What a transport sleep is for: a server's Retry-After, or our own backoff."""
        reason, self._retry_reason = self._retry_reason, None
        if reason == "retry_after":
            return "the server's Retry-After (rate limited), then retrying"
        return "backoff, then retrying the failed request"

    async def wait(
        self, seconds: float, what: str, sleep: Callable[[float], Awaitable[None]]
    ) -> None:
        """Sleep ``seconds`` with ``sleep``, saying what for: a countdown on a terminal."""
        if seconds < ANNOUNCE_WAITS_FROM or self.closed:
            await sleep(seconds)
            return
        if not self._tty:
            self.line(f"  waiting {_shown(seconds)} for {what}")
            await sleep(seconds)
            return
        end = self._clock.monotonic() + seconds
        try:
            while (left := end - self._clock.monotonic()) > 0:
                self._write(f"{_CLEAR_LINE}  waiting {math.ceil(left)}s for {what}")
                # Wake on the next whole second left, so the count moves in steps of one.
                await sleep(left - math.ceil(left) + 1 if left > 1 else left)
        finally:
            self._write(_CLEAR_LINE)

    # -- output ----------------------------------------------------------------------------

    def _write(self, text: str) -> None:
        if self.closed:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.EINVAL):
                raise
            self.closed = True
            self.scope.cancel()


class ProgressClock:
    """A Clock whose sleeps are announced through ``progress``; time comes from ``base``."""

    def __init__(self, base: Clock, progress: Progress, *, retries: bool) -> None:
        self._base = base
        self._progress = progress
        self._retries = retries

    def time(self) -> float:
        return self._base.time()

    def monotonic(self) -> float:
        return self._base.monotonic()

    async def sleep(self, seconds: float) -> None:
        progress = self._progress
        what = progress.retry_wait() if self._retries else progress.probe_wait()
        await progress.wait(seconds, what, self._base.sleep)


def _shown(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else format_duration(round(seconds))


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
