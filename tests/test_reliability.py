"""The reliability score, with exact numbers, from the formula and from real SQLite rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.clock import FakeClock
from exporter.reliability import ReliabilityStats, reliability_score
from exporter.results import ErrorType, ProbeResult, Verdict
from exporter.store import Store


def test_no_runs_no_score() -> None:
    assert reliability_score(ReliabilityStats()) is None


def test_perfect_model_scores_100() -> None:
    assert reliability_score(ReliabilityStats(10, 10, 10, 10.0, 10)) == 100.0


def test_exact_mixture() -> None:
    # 10 runs, 8 succeeded, 6 of those say caching works, mean hit ratio 0.75 over 8.
    stats = ReliabilityStats(
        runs=10, successes=8, consistent=6, hit_ratio_sum=6.0, hit_ratio_count=8
    )
    # 100 × (0.4 × 0.8 + 0.3 × 0.75 + 0.3 × 0.75) = 32 + 22.5 + 22.5
    assert reliability_score(stats) == 77.0


def test_all_failures_score_zero() -> None:
    assert reliability_score(ReliabilityStats(runs=5)) == 0.0


def test_not_reported_caps_at_40() -> None:
    # Every run succeeds but no run can say anything about caching.
    assert reliability_score(ReliabilityStats(runs=4, successes=4)) == 40.0


def _run(run_id: str, verdict: Verdict, hit: float | None, at: float) -> ProbeResult:
    return ProbeResult(
        probe="basic",
        provider="p",
        model="m",
        run_id=run_id,
        verdict=verdict,
        started_at=at - 1,
        finished_at=at,
        hit_ratio=hit,
        error_type=ErrorType.API_ERROR if verdict is Verdict.ERROR else None,
    )


@pytest.mark.anyio
async def test_stats_from_the_store_over_the_window(tmp_path: Path) -> None:
    clock = FakeClock(1_000_000.0)
    async with await Store.open(tmp_path / "db.sqlite", clock=clock) as store:
        runs = [
            _run("old", Verdict.ERROR, None, 1_000_000.0 - 90_000),  # outside 24 h
            _run("a", Verdict.WORKS, 0.9, 999_000.0),
            _run("b", Verdict.WORKS, 0.7, 999_100.0),
            _run("c", Verdict.BROKEN, 0.0, 999_200.0),
            _run("d", Verdict.NOT_REPORTED, None, 999_300.0),
            _run("e", Verdict.ERROR, None, 999_400.0),
        ]
        for run in runs:
            await store.record_run(run)
        stats = await store.reliability_stats(since=1_000_000.0 - 86_400)
    got = stats[("p", "m")]
    assert got == ReliabilityStats(
        runs=5, successes=4, consistent=2, hit_ratio_sum=1.6, hit_ratio_count=3
    )
    # 100 × (0.4 × 4/5 + 0.3 × 2/4 + 0.3 × (1.6/3)) = 32 + 15 + 16
    assert reliability_score(got) == pytest.approx(63.0)
