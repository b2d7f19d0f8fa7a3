"""``prompt-cache-exporter history``: export recorded probe runs as CSV, JSON, text or HTML.

The formats are rendered by ``exporter.reports``; HTML is one self-contained report of the
selected provider, model and time range (verdicts, a cold-vs-warm TTFT chart, evidence).
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import TextIO

from exporter import reports
from exporter.clock import SystemClock
from exporter.config import ConfigError, load_config
from exporter.durations import parse_duration
from exporter.exits import EXIT_FAILURE, EXIT_USAGE, join_threads_started_since
from exporter.probes import PROBE_NAMES
from exporter.store import Store, StoreError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="configuration file (for storage.path)")
    parser.add_argument("--provider")
    parser.add_argument("--model")
    parser.add_argument("--probe", choices=PROBE_NAMES)
    parser.add_argument("--since", help="only runs newer than this duration, e.g. 24h")
    parser.add_argument("--limit", type=int, default=100, help="at most this many (1..1000)")
    reports.add_format_arguments(parser, default="csv")


async def run(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        config = load_config(args.config)
        since = None
        if args.since:
            since = SystemClock().time() - parse_duration(args.since)
        if not 1 <= args.limit <= 1000:
            raise ValueError("--limit: must be between 1 and 1000")
        output = reports.check_output(args.output)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not config.storage.path.exists():
        print(f"error: storage.path: no database at {config.storage.path}", file=sys.stderr)
        return EXIT_FAILURE
    threads = set(threading.enumerate())
    try:
        async with await Store.open(config.storage.path, clock=SystemClock()) as store:
            runs = await store.recent_runs(
                provider=args.provider,
                model=args.model,
                probe=args.probe,
                limit=args.limit,
                since=since,
            )
    except (StoreError, OSError) as exc:
        await join_threads_started_since(threads)
        print(f"error: storage.path: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    query = reports.HistoryQuery(args.provider, args.model, args.probe, since, args.limit)
    report = reports.HistoryReport(reports.ReportInfo(SystemClock().time()), runs, query)
    reports.write_report(reports.render_history(args.format, report), output, out)
    return 0
