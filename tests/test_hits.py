"""The hit rule (exporter.hits) on plain records, with the numbers real servers report.

The probes exercise it over HTTP (test_probes.py); here each case is one server behaviour,
with exact figures, so a change to the rule shows which behaviour it changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from exporter.hits import (
    HIT_SHARE,
    SHARED_PREFIX_CAP,
    HitRule,
    any_reported,
    polluted,
    rule_for,
    token_ratio,
    ttft_witness,
)


@dataclass(frozen=True)
class Req:
    """A request as a load test or a proxy would hand it over: plain numbers."""

    cold: bool
    prompt_tokens: int | None
    cached_tokens: int | None
    ok: bool = True
    ttft_seconds: float | None = None
    hit: bool | None = None


def judged(records: list[Req]) -> list[Req]:
    """The records with ``hit`` set by the run's rule (what ProbeContext.send does)."""
    rule = rule_for(records)
    return [
        Req(
            r.cold,
            r.prompt_tokens,
            r.cached_tokens,
            r.ok,
            r.ttft_seconds,
            rule.is_hit(r.cached_tokens, r.prompt_tokens) if r.ok else None,
        )
        for r in records
    ]


def test_the_busy_llama_cpp_server_of_the_issue_is_all_misses() -> None:
    # One slot serving another tenant: every response reports the one shared token (BOS).
    run = [Req(True, 1100, 1)] + [Req(False, 1100, 1) for _ in range(9)]
    rule = rule_for(run)
    assert rule.baseline == 1
    assert [rule.is_hit(r.cached_tokens, r.prompt_tokens) for r in run[1:]] == [False] * 9
    assert token_ratio(run[1:], rule) == 0.0
    assert not polluted(run, rule)
    # The old rule ("cached > 0") read this as a perfect cache with pollution.
    assert all((r.cached_tokens or 0) > 0 for r in run)


def test_template_tokens_on_cold_requests_are_the_baseline_not_pollution() -> None:
    prime, repeat = Req(True, 1095, 8), Req(False, 1095, 1095)
    rule = rule_for([prime, repeat])
    assert rule.baseline == 8
    assert rule.own_cached(repeat.cached_tokens) == 1087
    assert rule.is_hit(repeat.cached_tokens, repeat.prompt_tokens) is True
    assert rule.ratio(repeat.cached_tokens, repeat.prompt_tokens) == 1.0
    assert rule.is_hit(prime.cached_tokens, prime.prompt_tokens) is False
    assert not polluted([prime, repeat], rule)


def test_the_largest_cold_figure_up_to_the_cap_is_the_baseline() -> None:
    # Token-granular caches: later primes of a run also share "Run <id> -" with earlier ones.
    assert HitRule.learn([8, 12, 14]).baseline == 14
    assert HitRule.learn([None, 3]).baseline == 3
    assert HitRule.learn([]).baseline == 0
    assert HitRule.learn([None]).baseline == 0
    assert HitRule.learn([-5]).baseline == 0  # nonsense never lowers the baseline below 0


def test_a_polluted_cold_request_cannot_poison_the_baseline() -> None:
    # The cold request was served the whole prompt (a cache that ignores the run id).
    prime, repeat = Req(True, 1100, 1100), Req(False, 1100, 1100)
    rule = rule_for([prime, repeat])
    assert rule.baseline == SHARED_PREFIX_CAP == 64
    assert rule.is_hit(repeat.cached_tokens, repeat.prompt_tokens) is True
    assert rule.ratio(repeat.cached_tokens, repeat.prompt_tokens) == 1.0
    assert polluted([prime, repeat], rule)
    # Served from cache, so it is a hit too (fast in the latency histograms).
    assert rule.is_hit(prime.cached_tokens, prime.prompt_tokens) is True


def test_openai_blocks_still_count_as_hits() -> None:
    rule = HitRule(0)
    # The worst case just above the minimum: 1024 of a 1151-token prompt.
    assert rule.is_hit(1024, 1151) is True
    assert rule.ratio(1024, 1151) == pytest.approx(1024 / 1151)
    assert rule.is_hit(0, 1151) is False
    # 512-token blocks above a 1024 minimum: 1024 of 1535, two thirds.
    assert rule.is_hit(1024, 1535) is True


def test_a_block_or_two_of_a_partly_evicted_prompt_is_a_miss() -> None:
    rule = HitRule(8)
    assert rule.is_hit(8 + 16, 1083) is False  # the head block of a vLLM cache
    assert rule.ratio(8 + 16, 1083) == pytest.approx(16 / 1075)
    # The threshold is exactly half of the run-specific part (1075 → 537.5 tokens).
    assert HIT_SHARE == 0.5
    assert rule.is_hit(8 + 537, 1083) is False
    assert rule.is_hit(8 + 538, 1083) is True


def test_not_reported_is_neither_hit_nor_miss() -> None:
    rule = HitRule(0)
    assert rule.is_hit(None, 1100) is None
    assert rule.ratio(None, 1100) is None
    assert rule.own_cached(None) is None
    assert not rule.polluted(None)
    assert not any_reported([Req(True, 1100, None), Req(False, 1100, None)])
    assert token_ratio([Req(False, 1100, None)], rule) is None
    # A failed request's figures do not count either way.
    assert not any_reported([Req(False, None, 5, ok=False)])


def test_partial_prefix_is_judged_against_the_shared_prefix() -> None:
    rule = HitRule(8)
    # The variant's user message differs; only the ~1100-token system prefix can be cached.
    assert rule.is_hit(8 + 1024, 1100) is True
    assert rule.ratio(8 + 1024, 1100) == pytest.approx(1024 / 1092)
    assert rule.ratio(8, 8) is None  # nothing run-specific to cache: no ratio


def test_token_ratio_sums_over_requests() -> None:
    rule = HitRule(8)
    records = [Req(False, 1108, 1108), Req(False, 2008, 8), Req(False, None, None, ok=False)]
    assert token_ratio(records, rule) == pytest.approx(1100 / (1100 + 2000))


def test_a_fixed_baseline_replaces_the_learned_one_and_its_cap() -> None:
    # A gateway injects a 300-token system prompt before ours on every request.
    cold = [Req(True, 1400, 300)]
    learned = rule_for(cold)
    assert learned.baseline == SHARED_PREFIX_CAP
    assert polluted(cold, learned)  # without the override it reads as pollution
    fixed = rule_for(cold, fixed=300)
    assert fixed.baseline == 300
    assert not polluted(cold, fixed)
    assert fixed.is_hit(1400, 1400) is True
    assert fixed.is_hit(300, 1400) is False


def test_ttft_witness_pairs_each_hit_with_the_cold_request_before_it() -> None:
    run = judged(
        [
            Req(True, 1100, 0, ttft_seconds=0.30),
            Req(False, 1100, 1024, ttft_seconds=0.08),  # hit, faster
            Req(False, 1100, 1024, ttft_seconds=0.31),  # hit, no faster than its prime
            Req(False, 1100, 0, ttft_seconds=0.40),  # a miss is never flagged
            Req(False, 1100, 1024, ok=False, ttft_seconds=0.5),  # failed: left out
            Req(True, 2000, 0, ttft_seconds=0.50),  # the next size's prime
            Req(False, 2000, 1920, ttft_seconds=0.45),  # hit, faster than *its* prime
            Req(False, 2000, None, ttft_seconds=None),
        ]
    )
    witness = ttft_witness(run)
    assert witness.no_faster == (None, False, True, None, None, None, False, None)
    assert witness.slow_hits == 1
    assert witness.cold_seconds == pytest.approx(0.40)
    assert witness.warm_seconds == pytest.approx((0.08 + 0.31 + 0.40 + 0.45) / 4)
    assert witness.hit_seconds == pytest.approx((0.08 + 0.31 + 0.45) / 3)


def test_ttft_witness_without_timings_or_cold_requests() -> None:
    witness = ttft_witness([Req(False, 1100, 1024, hit=True, ttft_seconds=0.1)])
    assert witness.no_faster == (None,)
    assert (witness.cold_seconds, witness.warm_seconds, witness.hit_seconds) == (None, 0.1, 0.1)
    empty = ttft_witness([])
    assert (empty.cold_seconds, empty.slow_hits, empty.no_faster) == (None, 0, ())
