"""The five probes over real HTTP against the simulator: verdicts, evidence, error paths."""

from __future__ import annotations

import pytest

from exporter.probes import PROBE_NAMES, ProbeSettings
from exporter.results import ErrorType, Verdict
from exporter.simulator.config import SimConfig
from exporter.simulator.models import DEFAULT_MODELS, SimModel
from tests.conftest import SimRig

pytestmark = pytest.mark.anyio

# The right verdict of every probe for every caching behaviour the simulator offers.
# TTL delays 1/5/10/30 s: sim-cache-short-ttl (TTL 3 s) hits only after 1 s, which is a
# working cache with a short TTL, not a broken one.
EXPECTED: dict[str, dict[str, Verdict]] = {
    "sim-cache-ok": dict.fromkeys(PROBE_NAMES, Verdict.WORKS),
    "sim-cache-broken": dict.fromkeys(PROBE_NAMES, Verdict.BROKEN),
    "sim-cache-short-ttl": dict.fromkeys(PROBE_NAMES, Verdict.WORKS),
    "sim-no-cache-fields": dict.fromkeys(PROBE_NAMES, Verdict.NOT_REPORTED),
}


@pytest.mark.parametrize("model", sorted(EXPECTED))
@pytest.mark.parametrize("probe", PROBE_NAMES)
async def test_verdicts(rig: SimRig, model: str, probe: str) -> None:
    result = await rig.probe(probe, model)
    assert result.verdict is EXPECTED[model][probe], result.error
    assert result.error_type is None
    assert not result.pollution
    expected_works = {Verdict.WORKS: True, Verdict.BROKEN: False}.get(result.verdict)
    assert result.caching_works is expected_works
    cold = [r for r in result.requests if r.cold]
    assert cold, "every probe starts cold"
    for record in result.requests:
        assert record.ok
        assert record.status == 200
        assert record.attempts == 1
        assert record.streamed
        assert record.ttft_seconds is not None
        if model == "sim-no-cache-fields":
            assert record.cached_tokens is None
            assert record.hit is None
        else:
            assert record.cached_tokens is not None
    # The evidence is what the upstream saw: compare with the simulator's own request log.
    log = rig.sim.state.log_entries(model, len(result.requests))
    assert [e["prompt_tokens"] for e in log] == [r.prompt_tokens for r in result.requests]
    if model != "sim-no-cache-fields":
        assert [e["cached_tokens"] for e in log] == [r.cached_tokens for r in result.requests]


async def test_basic_numbers_match_the_simulators_cache(rig: SimRig) -> None:
    result = await rig.probe("basic", "sim-cache-ok")
    prime, repeat = result.requests
    assert (prime.label, repeat.label) == ("prime", "repeat")
    assert prime.cached_tokens == 0
    assert repeat.prompt_tokens == prime.prompt_tokens
    assert prime.prompt_tokens is not None
    assert prime.prompt_tokens >= 1024
    # 128-token blocks, only whole blocks above the 1024 minimum count.
    assert repeat.cached_tokens == prime.prompt_tokens // 128 * 128
    assert result.hit_ratio == pytest.approx(repeat.cached_tokens / repeat.prompt_tokens)


async def test_prompt_sizes_reports_every_size(rig: SimRig) -> None:
    result = await rig.probe("prompt_sizes", "sim-cache-ok")
    assert set(result.sizes) == {"small", "medium", "large", "xlarge"}
    for name, size in result.sizes.items():
        assert size.verdict is Verdict.WORKS, name
        assert size.prompt_tokens is not None
        assert abs(size.prompt_tokens - size.target_tokens) / size.target_tokens < 0.03
        assert size.hit_ratio == pytest.approx(size.prompt_tokens // 128 * 128 / size.prompt_tokens)


async def test_sizes_below_the_minimum_are_not_failures(rig: SimRig) -> None:
    settings = ProbeSettings(sizes={"tiny": 300, "small": 1100, "large": 4000})
    result = await rig.probe(
        "prompt_sizes", "sim-cache-ok", settings=settings, min_cacheable_tokens=2048
    )
    assert result.sizes["tiny"].verdict is Verdict.BELOW_MINIMUM
    assert result.sizes["small"].verdict is Verdict.BELOW_MINIMUM
    assert result.sizes["large"].verdict is Verdict.WORKS
    assert result.verdict is Verdict.WORKS
    # Sizes below the minimum are not sent: they cost nothing.
    assert [r.label for r in result.requests] == ["large prime", "large repeat"]


async def test_partial_measures_the_shared_prefix(rig: SimRig) -> None:
    result = await rig.probe("partial", "sim-cache-ok")
    assert [r.label for r in result.requests] == ["prime", "variant 1", "variant 2"]
    shared = result.shared_prefix_tokens
    assert shared is not None
    assert shared >= 1024
    for variant in result.requests[1:]:
        # Cached ≈ the shared prefix, in whole blocks; never the (different) user message.
        assert variant.cached_tokens is not None
        assert shared - 128 < variant.cached_tokens <= shared
        assert variant.prompt_tokens is not None
        assert variant.cached_tokens < variant.prompt_tokens


async def test_persistence_of_a_flaky_cache(rig: SimRig) -> None:
    result = await rig.probe("persistence", "sim-cache-flaky")
    assert len(result.requests) == 10
    assert result.verdict is Verdict.FLAKY
    hits = [r.hit for r in result.requests[1:]]
    assert result.hit_ratio == pytest.approx(sum(hits) / 9)
    assert 0 < result.hit_ratio < 1
    assert result.first_miss_index == 2 + hits.index(False)


async def test_flaky_cache_over_many_basic_runs(rig: SimRig) -> None:
    verdicts = [(await rig.probe("basic", "sim-cache-flaky")).verdict for _ in range(20)]
    assert set(verdicts) <= {Verdict.WORKS, Verdict.BROKEN}
    # "About half": the seeded simulator is deterministic; both outcomes occur often.
    assert 5 <= verdicts.count(Verdict.WORKS) <= 15


async def test_ttl_schedule_and_max_hit_delay(rig: SimRig) -> None:
    result = await rig.probe("ttl", "sim-cache-short-ttl")
    assert result.ttl == {1.0: True, 5.0: False, 10.0: False, 30.0: False}
    assert result.ttl_max_hit_delay == 1.0
    assert result.hit_ratio == 0.25
    # All primes first, then each repeat when its delay is up: the probe takes the longest
    # delay, not the sum of all of them.
    assert result.duration_seconds == pytest.approx(30.0)
    ok = await rig.probe("ttl", "sim-cache-ok")
    assert ok.ttl == {1.0: True, 5.0: True, 10.0: True, 30.0: True}
    assert ok.ttl_max_hit_delay == 30.0


async def test_error_model_fails_after_three_attempts(rig: SimRig) -> None:
    result = await rig.probe("basic", "sim-error")
    assert result.verdict is Verdict.ERROR
    assert result.error_type is ErrorType.API_ERROR
    (prime,) = result.requests
    assert prime.attempts == 3
    assert prime.status == 500
    assert [e["status"] for e in rig.sim.state.log_entries("sim-error", 10)] == [500] * 3
    # Backoff doubles from the configured base: 0.01 then 0.02 s.
    assert rig.clock.sleeps == [0.01, 0.02]
    assert result.caching_works is None


EVERY_4TH = SimModel("sim-every-4th", ratelimit_period=4, retry_after=1.0)


@pytest.mark.parametrize("sim_config", [SimConfig(latency_scale=0.0, models=(EVERY_4TH,))])
async def test_throttled_model_honours_retry_after_then_gives_up(rig: SimRig) -> None:
    # Only every 4th request is served: 1-3 get 429 with Retry-After: 1.
    result = await rig.probe("basic", "sim-every-4th")
    assert result.error_type is ErrorType.RATE_LIMIT
    assert result.requests[0].attempts == 3
    assert rig.clock.sleeps == [1.0, 1.0]  # Retry-After, not the (tiny) backoff
    # The next run starts at the 4th request: served, then the repeat is throttled again.
    second = await rig.probe("basic", "sim-every-4th")
    assert [r.ok for r in second.requests] == [True, False]
    assert second.requests[1].attempts == 3
    statuses = [e["status"] for e in rig.sim.state.log_entries("sim-every-4th", 10)]
    assert statuses == [429, 429, 429, 200, 429, 429, 429]


async def test_ratelimited_model_fails_only_sometimes(rig: SimRig) -> None:
    # sim-ratelimited throttles a third of its requests: retries (Retry-After) save most
    # requests, so some runs succeed and some fail, as against a busy provider.
    outcomes = []
    for _ in range(12):
        result = await rig.probe("persistence", "sim-ratelimited")
        assert result.error_type in (None, ErrorType.RATE_LIMIT)
        outcomes.append(result.error_type is None)
        if result.error_type is None:
            assert result.verdict is Verdict.WORKS
    assert 0 < sum(outcomes) < len(outcomes), outcomes
    retried = [r for r in rig.sim.state.log_entries("sim-ratelimited", 1000) if r["status"] == 429]
    assert retried
    assert {s for s in rig.clock.sleeps if s > 0} == {1.0}  # each wait: the Retry-After


async def test_non_streaming_requests(rig: SimRig) -> None:
    result = await rig.probe("basic", "sim-cache-ok", stream=False)
    assert result.verdict is Verdict.WORKS
    assert all(not r.streamed and r.ttft_seconds is None for r in result.requests)


@pytest.mark.parametrize("probe", PROBE_NAMES)
async def test_anthropic_messages_api(rig: SimRig, probe: str) -> None:
    result = await rig.probe(
        probe, "sim-cache-ok", provider_type="anthropic", min_cacheable_tokens=1024
    )
    assert result.verdict is Verdict.WORKS, result.error
    warm = [r for r in result.requests if not r.cold]
    assert any(r.cached_tokens for r in warm)
    # Total prompt = input + cache reads + cache writes: identical across prime and repeat.
    assert all(r.prompt_tokens and r.prompt_tokens >= 1024 for r in result.requests)


async def test_venice_adapter_against_the_simulator(rig: SimRig) -> None:
    result = await rig.probe("basic", "sim-cache-write", provider_type="venice")
    assert result.verdict is Verdict.WORKS
    prime, repeat = result.requests
    assert prime.cache_write_tokens
    assert prime.cache_write_tokens > 0
    assert repeat.cached_tokens
    assert repeat.cached_tokens > 0
    assert prime.cost  # Venice reports the cost of each request


async def test_every_default_model_gets_a_result_and_never_raises(rig: SimRig) -> None:
    for model in DEFAULT_MODELS:
        for probe in PROBE_NAMES:
            result = await rig.probe(probe, model.name)
            assert result.run_id
            assert result.provider == "sim"
            assert result.model == model.name
            assert result.finished_at >= result.started_at


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(latency_scale=0.0)


@pytest.mark.parametrize("probe", PROBE_NAMES)
async def test_flaky_cache_verdicts_follow_the_evidence(rig: SimRig, probe: str) -> None:
    """sim-cache-flaky hits about half the time (seeded): every verdict must be the one its
    own requests support, and over a few runs the flakiness must show."""
    verdicts = []
    for _ in range(6):
        result = await rig.probe(probe, "sim-cache-flaky")
        assert result.error_type is None
        warm_hits = [r.hit for r in result.requests if not r.cold]
        if probe == "prompt_sizes":
            expected = {Verdict.WORKS, Verdict.PARTIAL, Verdict.BROKEN}
            by_size = {s.verdict for s in result.sizes.values()}
            if by_size == {Verdict.WORKS}:
                assert result.verdict is Verdict.WORKS
            elif by_size == {Verdict.BROKEN}:
                assert result.verdict is Verdict.BROKEN
            else:
                assert result.verdict is Verdict.PARTIAL
        elif probe == "ttl":
            expected = {Verdict.WORKS, Verdict.FLAKY, Verdict.BROKEN}
            hits = [result.ttl[d] for d in sorted(result.ttl)]
            if not any(hits):
                assert result.verdict is Verdict.BROKEN
        elif probe == "basic":
            expected = {Verdict.WORKS, Verdict.BROKEN}
            assert (result.verdict is Verdict.WORKS) == bool(warm_hits[-1])
        else:
            expected = {Verdict.WORKS, Verdict.FLAKY, Verdict.BROKEN}
            if all(warm_hits):
                assert result.verdict is Verdict.WORKS
            elif not any(warm_hits):
                assert result.verdict is Verdict.BROKEN
            else:
                assert result.verdict is Verdict.FLAKY
        assert result.verdict in expected
        verdicts.append(result.verdict)
    assert set(verdicts) != {Verdict.WORKS}, "six runs of a flaky cache never missed"
