"""JSON and CSV: the same facts as the other formats, for machines and spreadsheets.

JSON keeps every field (the shapes of ``ProbeResult.to_dict`` and ``LoadResult.to_dict``);
CSV has one row per request (probe, load test) or per run (history). Cells that a
spreadsheet would run as a formula (text from upstreams starting with ``=``, ``+``, ``-``,
``@``) are prefixed with a quote.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from exporter.loadtest.result import LoadRequest
from exporter.reports.model import (
    HistoryReport,
    LoadReport,
    ProbeReport,
    ReportInfo,
    rfc3339,
)
from exporter.results import ProbeResult

HISTORY_COLUMNS = (
    "time",
    "provider",
    "model",
    "probe",
    "verdict",
    "caching_works",
    "hit_ratio",
    "prompt_tokens",
    "cached_tokens",
    "request_count",
    "cold_ttft_seconds",
    "warm_ttft_seconds",
    "duration_seconds",
    "error_type",
    "error",
    "run_id",
    "trace_id",
)
_REQUEST_COLUMNS = (
    "label",
    "cold",
    "status",
    "attempts",
    "prompt_tokens",
    "cached_tokens",
    "run_cached_tokens",
    "cache_write_tokens",
    "completion_tokens",
    "latency_seconds",
    "ttfb_seconds",
    "ttft_seconds",
    "hit",
    "baseline_tokens",
    "request_id",
    "error_type",
    "error",
)
PROBE_COLUMNS = ("probe", "run_id", "verdict", "index", *_REQUEST_COLUMNS, "trace_id", "span_id")
LOAD_COLUMNS = (
    "index",
    "sent_at",
    "cancelled",
    "attempt_statuses",
    "cacheable_tokens",
    *_REQUEST_COLUMNS,
    "trace_id",
    "span_id",
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _meta(info: ReportInfo) -> dict[str, Any]:
    return {"exporter_version": info.version, "generated_at": rfc3339(info.generated_at)}


def _dumps(payload: Mapping[str, Any]) -> str:
    return json.dumps(payload, indent=2) + "\n"


def _safe(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        try:
            float(value)
        except ValueError:
            return "'" + value
    return value


def _csv(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _safe(v) for k, v in row.items()})
    return buffer.getvalue()


# -- probe ------------------------------------------------------------------------------------


def probe_payload(report: ProbeReport) -> dict[str, Any]:
    """What ``probe --json`` prints: the target, the exit status and every result."""
    return {
        "provider_type": report.provider_type,
        "base_url": report.base_url,
        "model": report.model,
        "exit_status": report.exit_status,
        "evidence_dir": report.evidence_dir,
        **_meta(report.info),
        "probes": [r.to_dict() for r in report.results],
    }


def probe_json(report: ProbeReport) -> str:
    return _dumps(probe_payload(report))


def _probe_rows(result: ProbeResult) -> Iterable[dict[str, Any]]:
    for i, record in enumerate(result.requests, 1):
        yield {
            "probe": result.probe,
            "run_id": result.run_id,
            "verdict": result.verdict.value,
            "index": i,
            **record.to_dict(),
            "trace_id": result.trace_id,
        }


def probe_csv(report: ProbeReport) -> str:
    return _csv(PROBE_COLUMNS, (row for r in report.results for row in _probe_rows(r)))


# -- load test --------------------------------------------------------------------------------


def load_json(report: LoadReport) -> str:
    return _dumps({"kind": "loadtest", **_meta(report.info), **report.result.to_dict()})


def _load_row(request: LoadRequest, trace: str | None) -> dict[str, Any]:
    statuses = " ".join("-" if a.status is None else str(a.status) for a in request.attempts)
    return {
        "index": request.index,
        "sent_at": round(request.sent_at, 6),
        "cancelled": request.cancelled,
        "attempt_statuses": statuses,
        "cacheable_tokens": request.cacheable_tokens,
        **request.record.to_dict(),
        "trace_id": trace,
    }


def load_csv(report: LoadReport) -> str:
    result = report.result
    return _csv(LOAD_COLUMNS, (_load_row(r, result.trace_id) for r in result.requests))


# -- history ----------------------------------------------------------------------------------


def history_rows(report: HistoryReport) -> list[dict[str, Any]]:
    """Runs as ``/api/runs`` shows them (one shape for the API and the export)."""
    from exporter.server import run_to_json  # the HTTP side is heavy; only history needs it

    return [run_to_json(r) for r in report.runs]


def history_json(report: HistoryReport) -> str:
    return _dumps({**_meta(report.info), "runs": history_rows(report)})


def history_csv(report: HistoryReport) -> str:
    return _csv(HISTORY_COLUMNS, history_rows(report))
