"""Human-readable durations for the configuration: ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h30m"``.

A duration is written as one or more ``<number><unit>`` parts, largest unit first, each unit at
most once (Prometheus style), or as a plain number of seconds (``30``, ``0.5``, ``"30"``).
Units: ``ms``, ``s``, ``m``, ``h``, ``d`` (24 h), ``w`` (7 d). Values are stored as float
seconds, so code downstream never parses strings.

>>> parse_duration("1h30m")
5400.0
>>> format_duration(5400)
'1h30m'
>>> format_duration(0.25)
'250ms'

``Duration`` (non-negative) and ``PositiveDuration`` are pydantic annotated types built on
these two functions; they serialise back to the canonical string.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

__all__ = [
    "Duration",
    "PositiveDuration",
    "format_duration",
    "parse_duration",
]

# Largest first: parts must appear in this order, each at most once.
_UNITS: dict[str, float] = {
    "w": 7 * 86400.0,
    "d": 86400.0,
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 0.001,
}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|[wdhms])")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_EXAMPLES = '"500ms", "30s", "5m", "1h30m" or a number of seconds'


def parse_duration(text: str | float) -> float:
    """Seconds in ``text``. Raises ValueError with a one-line message naming the input.

    Negative, infinite and NaN durations are rejected; zero is allowed here (fields that need
    a positive duration use ``PositiveDuration``).
    """
    if isinstance(text, bool):  # bool is an int: `timeout = true` is a mistake, not 1 s
        raise ValueError(f"invalid duration {text!r} (expected e.g. {_EXAMPLES})")
    if isinstance(text, int | float):
        seconds = float(text)
        if not math.isfinite(seconds):
            raise ValueError(f"invalid duration {text!r} (expected e.g. {_EXAMPLES})")
        if seconds < 0:
            raise ValueError("must not be negative")
        return seconds
    if not isinstance(text, str):
        raise ValueError(f"invalid duration (expected a string such as {_EXAMPLES})")
    raw = text.strip()
    if raw.startswith("-") and (_NUMBER.fullmatch(raw[1:]) or _parts(raw[1:]) is not None):
        raise ValueError("must not be negative")
    if _NUMBER.fullmatch(raw):
        return float(raw)
    total = _parts(raw)
    if total is None:
        raise ValueError(f"invalid duration {_quote(text)} (expected e.g. {_EXAMPLES})")
    return total


def _parts(raw: str) -> float | None:
    """Sum of ``<number><unit>`` parts, or None if ``raw`` is not exactly such a sequence."""
    if not raw:
        return None
    total = 0.0
    pos = 0
    order = list(_UNITS)
    last = -1
    while pos < len(raw):
        match = _PART.match(raw, pos)
        if match is None:
            return None
        rank = order.index(match.group(2))
        if rank <= last:  # units out of order or repeated ("5m1h", "1s1s")
            return None
        last = rank
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    return total


def format_duration(seconds: float) -> str:
    """The canonical short form of ``seconds``: ``300`` → ``"5m"``, ``0.5`` → ``"500ms"``.

    Rounded to the millisecond; days are the largest unit used (weeks read worse in
    messages). ``parse_duration(format_duration(x)) == x`` for any whole number of ms.
    """
    if not math.isfinite(seconds):
        return str(seconds)
    sign = "-" if seconds < 0 else ""
    ms = round(abs(seconds) * 1000)
    if ms == 0:
        return "0s"
    out = []
    for unit, size_ms in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        count, ms = divmod(ms, size_ms)
        if count:
            out.append(f"{count}{unit}")
    if ms:
        out.append(f"{ms}ms")
    return sign + "".join(out)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _duration(value: Any) -> float:
    return parse_duration(value)


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be positive")
    return seconds


_serialize = PlainSerializer(format_duration, return_type=str)

#: A duration of zero or more seconds (float), written as a string or a number.
Duration = Annotated[float, BeforeValidator(_duration), _serialize]
#: A duration of more than zero seconds.
PositiveDuration = Annotated[float, BeforeValidator(_positive_duration), _serialize]
