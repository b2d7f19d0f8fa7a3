"""Reports of probes, load tests and history as text, JSON, CSV or one self-contained HTML file.

Renderers are pure: a report value in, a string out. The commands decide where it goes
(``write_report``). The probe's text report is also printed live, row by row, by
``exporter.probe_progress`` from the same pieces of ``exporter.reports.text``.
"""

from __future__ import annotations

from collections.abc import Callable

from exporter.reports import html, tabular, text
from exporter.reports.curl import Replay, curl_command, file_replays, inline_replays
from exporter.reports.model import (
    HistoryQuery,
    HistoryReport,
    LoadReport,
    ProbeReport,
    ReportInfo,
)
from exporter.reports.output import (
    FORMATS,
    KEEP_EVIDENCE_RUNS,
    OutputError,
    add_format_arguments,
    check_output,
    new_evidence_dir,
    write_report,
)

_PROBE: dict[str, Callable[[ProbeReport], str]] = {
    "text": text.probe_text,
    "json": tabular.probe_json,
    "csv": tabular.probe_csv,
    "html": html.probe_html,
}
_LOAD: dict[str, Callable[[LoadReport], str]] = {
    "text": text.load_text,
    "json": tabular.load_json,
    "csv": tabular.load_csv,
    "html": html.load_html,
}
_HISTORY: dict[str, Callable[[HistoryReport], str]] = {
    "text": text.history_text,
    "json": tabular.history_json,
    "csv": tabular.history_csv,
    "html": html.history_html,
}
PROBE_FORMATS = tuple(_PROBE)


def render_probe(fmt: str, report: ProbeReport) -> str:
    return _PROBE[fmt](report)


def render_load(fmt: str, report: LoadReport) -> str:
    return _LOAD[fmt](report)


def render_history(fmt: str, report: HistoryReport) -> str:
    return _HISTORY[fmt](report)


__all__ = [
    "FORMATS",
    "KEEP_EVIDENCE_RUNS",
    "PROBE_FORMATS",
    "HistoryQuery",
    "HistoryReport",
    "LoadReport",
    "OutputError",
    "ProbeReport",
    "Replay",
    "ReportInfo",
    "add_format_arguments",
    "check_output",
    "curl_command",
    "file_replays",
    "inline_replays",
    "new_evidence_dir",
    "render_history",
    "render_load",
    "render_probe",
    "write_report",
]
