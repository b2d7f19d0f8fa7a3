"""The reliability score: one number per provider and model for "can I count on caching?".

Over the runs that finished in a sliding window (default 24 h)::

    score = 100 × (0.4 × success_rate + 0.3 × consistency + 0.3 × effectiveness)

    success_rate  = successful runs / runs          (skipped runs are not runs)
    consistency   = runs whose verdict says caching works / successful runs
    effectiveness = mean hit ratio of the successful runs that have one

A run is successful when it produced a verdict. With no successful run, consistency and
effectiveness are 0; with no run at all there is no score. A model whose API reports no
cache fields scores at most 40: its runs succeed but say nothing about caching.
"""

from __future__ import annotations

from dataclasses import dataclass

W_SUCCESS, W_CONSISTENCY, W_EFFECTIVENESS = 0.4, 0.3, 0.3


@dataclass(frozen=True, slots=True)
class ReliabilityStats:
    runs: int = 0
    successes: int = 0
    consistent: int = 0  # successful runs whose verdict says caching works
    hit_ratio_sum: float = 0.0  # over successful runs with a hit ratio
    hit_ratio_count: int = 0


def reliability_score(stats: ReliabilityStats) -> float | None:
    if stats.runs <= 0:
        return None
    success_rate = stats.successes / stats.runs
    consistency = stats.consistent / stats.successes if stats.successes else 0.0
    effectiveness = stats.hit_ratio_sum / stats.hit_ratio_count if stats.hit_ratio_count else 0.0
    score = 100.0 * (
        W_SUCCESS * success_rate + W_CONSISTENCY * consistency + W_EFFECTIVENESS * effectiveness
    )
    return round(min(100.0, max(0.0, score)), 6)
