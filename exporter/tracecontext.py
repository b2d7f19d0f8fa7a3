"""W3C Trace Context (https://www.w3.org/TR/trace-context/): the ``traceparent`` header.

Every probe run and every load test is one trace; every logical request of it is one span,
so a gateway's or provider's trace can be found from a run (its ``trace_id``) and a run
from a trace (``/api/runs?trace_id=``). The header we send::

    traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01

version ``00``, a 16-byte trace id and an 8-byte span (parent) id in lowercase hex, both
random and never all zero (the spec makes all-zero ids invalid), and flags ``01``: sampled,
so a gateway that samples by its caller keeps the trace.

A request's retries carry the same span id: the span is the logical request the evidence
records (``RequestRecord.attempts`` says how many HTTP requests it took), so a provider who
searches for it finds every attempt. This is small enough that a tracing SDK (a global
context, exporters, extra dependencies) would add far more than it saves.
"""

from __future__ import annotations

import re
import secrets
from typing import Final

HEADER: Final = "traceparent"
VERSION: Final = "00"
SAMPLED: Final = "01"
_TRACEPARENT: Final = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
TRACE_ID_PATTERN: Final = re.compile(r"[0-9a-f]{32}")


def _random_id(size: int) -> str:
    raw = secrets.token_bytes(size)
    if not any(raw):  # a 2**-64 (span) or 2**-128 (trace) chance; all-zero ids are invalid
        raw = raw[:-1] + b"\x01"
    return raw.hex()


def new_trace_id() -> str:
    """32 lowercase hex digits, random, not all zero."""
    return _random_id(16)


def new_span_id() -> str:
    """16 lowercase hex digits, random, not all zero."""
    return _random_id(8)


def traceparent(trace_id: str, span_id: str) -> str:
    return f"{VERSION}-{trace_id}-{span_id}-{SAMPLED}"


def parse_traceparent(value: str) -> tuple[str, str, str] | None:
    """(trace id, span id, flags) of a valid version-00 header, else None."""
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    trace_id, span_id, flags = match.groups()
    if not int(trace_id, 16) or not int(span_id, 16):
        return None
    return trace_id, span_id, flags
