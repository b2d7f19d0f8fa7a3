"""Choosing a report's format and where it goes.

A report file is written whole or not at all (a temporary file renamed into place), and
its destination is checked before the work starts, so a typo in ``--output`` fails at once
instead of losing a finished run. Should writing fail anyway, the report goes to standard
output instead.

Request bodies that the terminal's curl commands read go to a new directory per run under
the user's cache (``$XDG_CACHE_HOME/prompt-cache-exporter/<command>/``); only the last
``KEEP_EVIDENCE_RUNS`` are kept, so they do not pile up the way ``/tmp/pce-probe-*`` did.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

FORMATS: tuple[str, ...] = ("text", "json", "csv", "html")
KEEP_EVIDENCE_RUNS = 10
_EVIDENCE_RUN = re.compile(r"\d{8}-\d{6}-.+")


class OutputError(ValueError):
    """An unusable ``--output``; the message is one line."""


def add_format_arguments(
    parser: argparse.ArgumentParser,
    *,
    default: str | None = "text",
    formats: Sequence[str] = FORMATS,
) -> None:
    shown = "text" if default is None else default
    parser.add_argument(
        "--format",
        choices=list(formats),
        default=default,
        help=f"report format (default: {shown}); html is one self-contained file",
    )
    parser.add_argument(
        "--output", "-o", metavar="FILE", help="write the report to FILE (default: stdout)"
    )


def check_output(path: str | None) -> Path | None:
    """The output path, once it is known that a file can be written there."""
    if not path:
        return None
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"--output: {path} is a directory")
    parent = target.parent
    if not parent.is_dir():
        raise OutputError(f"--output: no such directory: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"--output: cannot write in {parent}")
    return target


def write_report(text: str, path: Path | None, out: TextIO, err: TextIO | None = None) -> None:
    """``text`` into ``path`` atomically, or onto ``out`` (also when the file fails)."""
    if path is None:
        out.write(text)
        out.flush()
        return
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
                handle.write(text)
            os.chmod(tmp, 0o644)  # a report is meant to be read and shared
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        print(
            f"error: --output: cannot write {path}: {exc.strerror or exc}; "
            "the report follows on stdout",
            file=err or sys.stderr,
        )
        out.write(text)
        out.flush()
        return
    print(f"report written to {path}", file=err or sys.stderr)


def new_evidence_dir(env: Mapping[str, str], command: str) -> Path:
    """A fresh directory for this run's request bodies under the user's cache directory;
    runs beyond the last KEEP_EVIDENCE_RUNS are removed. A temp directory if there is none."""
    try:
        cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        home = cache / "prompt-cache-exporter" / command
        home.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=home))
    except (OSError, RuntimeError):  # RuntimeError: no home directory to be found
        return Path(tempfile.mkdtemp(prefix=f"pce-{command}-"))
    runs = sorted(p for p in home.iterdir() if p.is_dir() and _EVIDENCE_RUN.fullmatch(p.name))
    for old in runs[:-KEEP_EVIDENCE_RUNS]:
        if old != path:
            shutil.rmtree(old, ignore_errors=True)
    return path
