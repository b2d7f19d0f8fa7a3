"""Resident memory of a process, from /proc/<pid>/status (Linux)."""

from __future__ import annotations

from pathlib import Path


def rss_mb(pid: int | str = "self") -> tuple[float, float]:
    """(resident, peak resident) in MB: VmRSS and VmHWM."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
