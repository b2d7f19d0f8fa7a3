"""``prompt-cache-exporter history``: export recorded probe runs as CSV or JSON."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import threading
from typing import TextIO

from exporter.clock import SystemClock
from exporter.config import ConfigError, load_config
from exporter.durations import parse_duration
from exporter.exits import EXIT_FAILURE, EXIT_USAGE, join_threads_started_since
from exporter.probes import PROBE_NAMES
from exporter.server import run_to_json
from exporter.store import Store, StoreError

COLUMNS = (
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
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="configuration file (for storage.path)")
    parser.add_argument("--provider")
    parser.add_argument("--model")
    parser.add_argument("--probe", choices=PROBE_NAMES)
    parser.add_argument("--since", help="only runs newer than this duration, e.g. 24h")
    parser.add_argument("--limit", type=int, default=100, help="at most this many (1..1000)")
    parser.add_argument("--format", choices=("csv", "json"), default="csv")


async def run(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        config = load_config(args.config)
        since = None
        if args.since:
            since = SystemClock().time() - parse_duration(args.since)
        if not 1 <= args.limit <= 1000:
            raise ValueError("--limit: must be between 1 and 1000")
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
    rows = [run_to_json(r) for r in runs]
    if args.format == "json":
        json.dump({"runs": rows}, out, indent=2)
        out.write("\n")
    else:
        writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return 0
