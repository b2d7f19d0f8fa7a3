"""Order statistics of a load test: min, p50, p95, p99, max.

Percentiles interpolate linearly between the closest ranks (the "inclusive" method of
``statistics.quantiles``, numpy's default, Excel's PERCENTILE.INC), so p50 is the median and
p0/p100 would be the extremes; with one sample every percentile is that sample.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

PERCENTILES = (50, 95, 99)


@dataclass(frozen=True, slots=True)
class Summary:
    count: int
    min: float | None = None
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def items(self) -> list[tuple[str, float | None]]:
        """(name, value) in display order."""
        return [
            ("min", self.min),
            ("p50", self.p50),
            ("p95", self.p95),
            ("p99", self.p99),
            ("max", self.max),
        ]


def summarize(values: Iterable[float | None]) -> Summary:
    """The summary of the values that are present (None: not measured, left out)."""
    data = sorted(v for v in values if v is not None)
    if not data:
        return Summary(0)
    if len(data) == 1:
        only = data[0]
        return Summary(1, only, only, only, only, only)
    cuts = statistics.quantiles(data, n=100, method="inclusive")
    p50, p95, p99 = (cuts[p - 1] for p in PERCENTILES)
    return Summary(len(data), data[0], p50, p95, p99, data[-1])
