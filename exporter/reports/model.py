"""What a report shows, independent of its format.

Reports are built from the values the probes and the load test already produce
(``ProbeResult`` with its ``RequestRecord`` evidence, ``LoadResult``); nothing here sends,
stores or decides anything. Trace context (a run's ``trace_id``, a request's ``span_id``) is
shown wherever the evidence carries it; evidence stored before it was recorded (None) shows
nothing extra.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from exporter import __version__
from exporter.loadtest.result import LoadResult
from exporter.reports.curl import Replay
from exporter.results import ProbeResult, RequestRecord


@dataclass(frozen=True, slots=True)
class ReportInfo:
    """Where a report came from: shown at its top, so an attached file explains itself."""

    generated_at: float
    version: str = __version__


@dataclass(frozen=True, slots=True)
class ProbeReport:
    """One ``probe`` command: its target, its results and the requests to replay them."""

    info: ReportInfo
    provider_type: str
    base_url: str
    model: str
    exit_status: int
    results: Sequence[ProbeResult]
    replays: Sequence[Replay] = ()
    evidence_dir: str | None = None
    key_var: str | None = None


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """The filters a history export was made with (None: not filtered on)."""

    provider: str | None = None
    model: str | None = None
    probe: str | None = None
    since: float | None = None
    limit: int = 100


@dataclass(frozen=True, slots=True)
class HistoryReport:
    info: ReportInfo
    runs: Sequence[ProbeResult]  # newest first, as the store returns them
    query: HistoryQuery = field(default_factory=HistoryQuery)


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(math.floor(epoch), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def outcome(record: RequestRecord, no_faster: bool | None = None) -> str:
    """The result column of an evidence table."""
    if not record.ok:
        return str(record.error_type)
    if record.status is None:
        return "no answer"
    if record.hit is None:
        return "n/r"  # the API reported no cache fields
    if record.hit and no_faster:
        return "hit, no faster than cold"
    return "hit" if record.hit else "miss"


@dataclass(frozen=True, slots=True)
class LoadReport:
    """One ``loadtest`` run and the requests (one cold, one warm) to replay it."""

    info: ReportInfo
    result: LoadResult
    replays: Sequence[Replay] = ()
    key_var: str | None = None
