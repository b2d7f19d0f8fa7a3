"""The load test's pure parts with exact numbers: percentiles, the estimate, the token cap,
the 429 bookkeeping and the hit rule applied to concurrent cold requests."""

from __future__ import annotations

import pytest

from exporter.loadtest.driver import TokenCap
from exporter.loadtest.plan import (
    CHAT_OVERHEAD_TOKENS,
    Estimate,
    LoadOptions,
    PlanError,
    default_prefix_tokens,
    plan_load,
)
from exporter.loadtest.result import Attempt, LoadRequest, judge, rate_limits
from exporter.loadtest.stats import summarize
from exporter.prompts import PromptFactory
from exporter.results import Completion, ModelPrice, RequestRecord, Usage
from exporter.simulator.tokens import chat_token_count

pytestmark = pytest.mark.anyio


def test_percentiles_interpolate_between_closest_ranks() -> None:
    summary = summarize(float(v) for v in range(1, 101))
    assert summary.count == 100
    assert (summary.min, summary.max) == (1.0, 100.0)
    assert summary.p50 == pytest.approx(50.5)
    assert summary.p95 == pytest.approx(95.05)
    assert summary.p99 == pytest.approx(99.01)
    assert summarize([0.25, None]).to_dict() == {
        "count": 1,
        "min": 0.25,
        "p50": 0.25,
        "p95": 0.25,
        "p99": 0.25,
        "max": 0.25,
    }
    assert summarize([None]).count == 0
    assert summarize([]).p50 is None
    two = summarize([1.0, 3.0])
    assert (two.p50, two.p95) == (2.0, pytest.approx(2.9))


def test_the_estimate_is_the_prompts_the_simulator_will_count_plus_a_small_margin() -> None:
    options = LoadOptions(requests=30, concurrency=4)
    plan = plan_load(
        options,
        run_id="0123456789abcdef",
        calibration_key="openai/sim-cache-ok",
        min_cacheable_tokens=1024,
        max_tokens=8,
        prompts=PromptFactory(),
    )
    assert plan.prefix_tokens == default_prefix_tokens(1024) == 1092
    assert len(plan.prompts) == 30
    assert len({p.system for p in plan.prompts}) == 1  # one shared prefix
    assert len({p.user for p in plan.prompts}) == 30  # each request its own suffix
    assert all(p.system.startswith("Run 0123456789abcdef.") for p in plan.prompts)
    counted = sum(
        chat_token_count(
            [{"role": "system", "content": p.system}, {"role": "user", "content": p.user}]
        )
        for p in plan.prompts
    )
    # The simulator counts 4 per message plus 3 (11) around the text; the estimate allows 16.
    assert plan.estimate.prompt_tokens == counted + 30 * (CHAT_OVERHEAD_TOKENS - 11)
    assert plan.estimate.completion_tokens == 30 * 8
    assert plan.estimate.refusal(plan.estimate.total_tokens) is None
    assert plan.estimate.refusal(plan.estimate.total_tokens - 1) is not None
    assert not plan.below_minimum


def test_refusal_and_price_of_an_estimate() -> None:
    estimate = Estimate(requests=400, prompt_tokens=1_000_000, completion_tokens=3_200)
    assert estimate.refusal(500_000) == (
        "estimated 1,003,200 tokens (1,000,000 prompt + 3,200 completion for 400 requests) "
        "exceed --max-total-tokens 500,000; not started (raise the cap or lower -n)"
    )
    priced = estimate.priced(ModelPrice(input=2.0, output=10.0, cache_read=0.2))
    assert priced.usd == pytest.approx(2.0 + 0.032)
    assert estimate.priced(None).usd is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"requests": 0, "concurrency": 1}, "-n: must be between 1 and 10000"),
        ({"requests": 10_001, "concurrency": 1}, "-n: must be between 1 and 10000"),
        ({"requests": 1, "concurrency": 257}, "-c: must be between 1 and 256"),
        ({"requests": 1, "concurrency": 1, "duration": 0.0}, "--duration: must be positive"),
        ({"requests": 1, "concurrency": 1, "shared_prefix": 0}, "--shared-prefix: must be"),
        ({"requests": 1, "concurrency": 1, "max_total_tokens": 0}, "--max-total-tokens: must"),
    ],
)
def test_options_are_validated(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PlanError, match=f"^{message}"):
        LoadOptions(**kwargs)  # type: ignore[arg-type]


async def test_token_cap_reserves_settles_and_denies() -> None:
    cap = TokenCap(1000)
    first = await cap.reserve(600)
    assert first is not None
    assert await cap.reserve(500) is None  # 600 reserved + 500 > 1000
    assert cap.denied == 1
    await cap.settle(first, Completion(Usage(300, 0, None, 8)), billed=True)
    assert (cap.used, cap.reserved) == (308, 0)
    refused = await cap.reserve(600)
    assert refused is not None
    await cap.settle(refused, None, billed=False)  # a 429: nothing was charged
    assert (cap.used, cap.reserved) == (308, 0)
    lost = await cap.reserve(600)
    assert lost is not None
    await cap.settle(lost, None, billed=True)  # a read timeout: it may have been charged
    assert (cap.used, cap.reserved) == (908, 0)
    assert await cap.reserve(93) is None
    assert await cap.reserve(92) is not None


def _request(index: int, *attempts: Attempt, **record: object) -> LoadRequest:
    return LoadRequest(
        index=index,
        sent_at=attempts[0].sent_at if attempts else 0.0,
        record=RequestRecord(label=f"request {index}", **record),  # type: ignore[arg-type]
        attempts=list(attempts),
    )


def test_429s_are_counted_and_each_retry_checked_against_retry_after() -> None:
    honoured = _request(
        1,
        Attempt(0.0, 429, 0.01, retry_after=1.0),
        Attempt(1.02, 200, 1.2),
        cold=True,
    )
    early = _request(2, Attempt(0.0, 429, 0.01, retry_after=1.0), Attempt(0.5, 200, 0.6), cold=True)
    given_up = _request(
        3,
        Attempt(0.0, 429, 0.01, retry_after=0.1),
        Attempt(0.2, 429, 0.21, retry_after=0.1),
        cold=False,
    )
    limits = rate_limits([honoured, early, given_up])
    assert limits.responses == 4
    assert limits.retried == 3  # the last attempt's 429 is not retried
    assert limits.honoured == 2  # request 2 came back after 0.49 s of the 1 s asked for
    assert limits.waited_seconds == pytest.approx(1.01 + 0.49 + 0.19)


def test_cold_requests_served_from_a_concurrent_prefix_do_not_lift_the_baseline() -> None:
    def done(index: int, cold: bool, cached: int) -> LoadRequest:
        request = _request(index, cold=cold, status=200, prompt_tokens=1161, cached_tokens=cached)
        request.cacheable_tokens = 1102
        return request

    # The first wave: one miss, and two that the server served from the first one's prefix.
    requests = [done(1, True, 0), done(2, True, 1024), done(3, True, 1024), done(4, False, 1024)]
    rule = judge(requests)
    assert rule is not None
    assert rule.baseline == 0  # not 64 (the cap): 1024 cached is the run's own prefix
    assert [r.record.hit for r in requests] == [False, True, True, True]
    assert requests[3].record.baseline_tokens == 0
    # A template every prompt shares is still learned from the cold requests.
    template = [done(1, True, 8), done(2, True, 1032), done(3, False, 1032)]
    rule = judge(template)
    assert rule is not None
    assert rule.baseline == 8
    assert [r.record.hit for r in template] == [False, True, True]
    # No cache fields at all: nothing is judged.
    assert judge([_request(1, cold=True, status=200, prompt_tokens=9)]) is None
