"""The five probes over real HTTP against the simulator: verdicts, evidence, error paths."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest

from exporter.hits import SHARED_PREFIX_CAP
from exporter.probes import PROBE_NAMES, ProbeSettings, run_probe
from exporter.results import ErrorType, ProbeResult, Verdict
from exporter.server import run_to_json
from exporter.simulator.config import SimConfig
from exporter.simulator.models import DEFAULT_MODELS, SimModel
from exporter.store import Store
from tests.conftest import EVERY_4TH, SimRig, open_rig

pytestmark = pytest.mark.anyio


@dataclass(frozen=True)
class Expect:
    """What every probe must find for one simulated model."""

    verdict: Verdict | None  # None: sim-cache-flaky, checked against its own evidence
    ratio: tuple[float, float] | None  # inclusive bounds of hit_ratio; None: no ratio
    baseline: tuple[int, int] | None = (0, 0)  # bounds of baseline_tokens; None: not reported
    error: ErrorType | None = None


WORKS = Expect(Verdict.WORKS, (0.9, 1.0))
BROKEN = Expect(Verdict.BROKEN, (0.0, 0.0))
# Token-granular with an 8-token template: cold requests report 8, or up to 14 when they
# also share "<|im_start|> <|system|> <|im_sep|> Run <id> -" with the run's earlier primes.
TEMPLATE = Expect(Verdict.WORKS, (0.99, 1.0), (8, 14))
NO_VERDICT = Expect(Verdict.NOT_REPORTED, None, None)


def expect(model: str, probe: str) -> Expect:
    """The right finding of every probe for every model the simulator serves by default.

    TTL delays 1/5/10/30 s: sim-cache-short-ttl (TTL 3 s) hits only after 1 s, which is a
    working cache with a short TTL (ratio 1/4), not a broken one.
    """
    if model == "sim-cache-short-ttl" and probe == "ttl":
        return Expect(Verdict.WORKS, (0.25, 0.25))
    return {
        "sim-cache-ok": WORKS,
        "sim-cache-write": WORKS,
        "sim-cache-blocks": WORKS,
        "sim-cache-short-ttl": WORKS,
        "sim-cache-broken": BROKEN,
        "sim-cache-flaky": Expect(None, (0.0, 1.0)),
        "sim-no-cache-fields": NO_VERDICT,
        "sim-cache-template": TEMPLATE,
        # Only the 8 template tokens are ever served: the evicted prompt reads 0, not 1.0.
        "sim-cache-evicting": Expect(Verdict.BROKEN, (0.0, 0.0), (8, 8)),
        "sim-error": Expect(Verdict.ERROR, None, None, ErrorType.API_ERROR),
        # A third of its requests get 429 (seeded): a run works, or fails as rate_limit when
        # one request's attempts all got 429. Checked in test_verdicts' own branch.
        "sim-ratelimited": Expect(None, None, None, ErrorType.RATE_LIMIT),
    }[model]


def test_the_matrix_covers_every_default_model() -> None:
    for model in DEFAULT_MODELS:
        expect(model.name, "basic")


@pytest.mark.parametrize("model", [m.name for m in DEFAULT_MODELS])
@pytest.mark.parametrize("probe", PROBE_NAMES)
async def test_verdicts(rig: SimRig, model: str, probe: str) -> None:
    result = await rig.probe(probe, model)
    want = expect(model, probe)
    if model == "sim-ratelimited":
        # Throttling comes and goes (test_ratelimited_model_fails_only_sometimes has the rates).
        assert result.error_type in (None, ErrorType.RATE_LIMIT), result.error
        assert result.verdict is (Verdict.ERROR if result.error_type else Verdict.WORKS)
        assert not result.pollution
        return
    assert result.error_type is want.error, result.error
    assert not result.pollution
    if want.verdict is None:
        assert_verdict_follows_the_evidence(result)
    else:
        assert result.verdict is want.verdict, result.error
    expected_works = {Verdict.WORKS: True, Verdict.BROKEN: False}.get(result.verdict)
    if result.verdict in (Verdict.FLAKY, Verdict.PARTIAL):
        expected_works = True
    assert result.caching_works is expected_works
    if want.ratio is None:
        assert result.hit_ratio is None
    else:
        assert result.hit_ratio is not None
        assert want.ratio[0] <= result.hit_ratio <= want.ratio[1], result.hit_ratio
    if want.baseline is None:
        assert result.baseline_tokens is None
    else:
        assert result.baseline_tokens is not None
        assert want.baseline[0] <= result.baseline_tokens <= want.baseline[1]
        # The baseline is the most any cold request reported: never more than a cold
        # request really saw cached.
        cold_cached = [r.cached_tokens or 0 for r in result.requests if r.cold]
        assert result.baseline_tokens == max(cold_cached)
    if want.error is not None:
        return
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
            assert record.run_cached_tokens is None
        else:
            assert record.cached_tokens is not None
            assert record.baseline_tokens is not None
            assert record.run_cached_tokens == max(0, record.cached_tokens - record.baseline_tokens)
        if record.cold and model != "sim-no-cache-fields":
            assert record.hit is False  # what a cold request reports is the baseline
    warm = [r for r in result.requests if not r.cold]
    if result.verdict is Verdict.BROKEN:
        assert not any(r.hit for r in warm)
    if result.verdict is Verdict.WORKS and probe in ("partial", "persistence"):
        assert all(r.hit for r in warm)
    # The evidence is what the upstream saw: compare with the simulator's own request log.
    log = rig.sim.state.log_entries(model, len(result.requests))
    assert [e["prompt_tokens"] for e in log] == [r.prompt_tokens for r in result.requests]
    if model != "sim-no-cache-fields":
        assert [e["cached_tokens"] for e in log] == [r.cached_tokens for r in result.requests]


def assert_verdict_follows_the_evidence(result: ProbeResult) -> None:
    """The verdict a flaky cache's run must give, from its own per-request hits."""
    warm_hits = [bool(r.hit) for r in result.requests if not r.cold]
    if result.probe == "prompt_sizes":
        by_size = {s.verdict for s in result.sizes.values()}
        want = {
            frozenset({Verdict.WORKS}): Verdict.WORKS,
            frozenset({Verdict.BROKEN}): Verdict.BROKEN,
        }.get(frozenset(by_size), Verdict.PARTIAL)
    elif result.probe == "ttl":
        hits = [bool(result.ttl[d]) for d in sorted(result.ttl)]
        first_miss = hits.index(False) if False in hits else len(hits)
        want = (
            Verdict.BROKEN
            if not any(hits)
            else Verdict.WORKS
            if not any(hits[first_miss:])
            else Verdict.FLAKY
        )
    elif result.probe == "basic":
        want = Verdict.WORKS if warm_hits[-1] else Verdict.BROKEN
    else:
        want = (
            Verdict.WORKS
            if all(warm_hits)
            else Verdict.BROKEN
            if not any(warm_hits)
            else Verdict.FLAKY
        )
    assert result.verdict is want, (result.probe, warm_hits)


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


ANTHROPIC: dict[str, Expect] = {
    "sim-cache-ok": Expect(Verdict.WORKS, (0.99, 1.0)),
    "sim-cache-broken": BROKEN,
    # Breakpoints cache exact marked prefixes, so cold requests report just the template.
    "sim-cache-template": Expect(Verdict.WORKS, (0.99, 1.0), (8, 8)),
    "sim-cache-evicting": Expect(Verdict.BROKEN, (0.0, 0.0), (8, 8)),
}


@pytest.mark.parametrize("model", sorted(ANTHROPIC))
@pytest.mark.parametrize("probe", PROBE_NAMES)
async def test_anthropic_messages_api(rig: SimRig, probe: str, model: str) -> None:
    """Breakpoint caching through the simulator's /v1/messages, judged by the same rule."""
    result = await rig.probe(probe, model, provider_type="anthropic", min_cacheable_tokens=1024)
    want = ANTHROPIC[model]
    assert result.verdict is want.verdict, result.error
    assert not result.pollution
    assert want.ratio is not None
    assert want.baseline is not None
    assert result.hit_ratio is not None
    assert want.ratio[0] <= result.hit_ratio <= want.ratio[1]
    assert result.baseline_tokens == want.baseline[0]
    warm = [r for r in result.requests if not r.cold]
    assert all(r.hit is (want.verdict is Verdict.WORKS) for r in warm)
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
        assert_verdict_follows_the_evidence(result)
        verdicts.append(result.verdict)
    assert set(verdicts) != {Verdict.WORKS}, "six runs of a flaky cache never missed"


# -- the hit rule on servers that report cached tokens for what every prompt shares --------


def timed(*models: SimModel) -> SimConfig:
    """Real simulated latencies on the fake clock. Output tokens take no time, so the server
    cannot run ahead of the client between the first token and its arrival: TTFT is exact."""
    return SimConfig(
        models=tuple(m.replace(output_token_seconds=0.0) for m in models or DEFAULT_MODELS),
        latency_scale=1.0,
    )


async def test_the_evicting_server_of_the_issue_reads_broken_not_perfect() -> None:
    """llama.cpp serving another tenant: every response reports the shared template tokens
    as cached and every request takes the full cold time. This once read "works, hit ratio
    1.000, cache pollution"."""
    async with open_rig(timed()) as rig:
        result = await rig.probe("persistence", "sim-cache-evicting")
    assert result.verdict is Verdict.BROKEN
    assert result.caching_works is False
    assert result.hit_ratio == 0.0
    assert result.first_miss_index == 2
    assert not result.pollution
    assert result.baseline_tokens == 8
    assert [r.cached_tokens for r in result.requests] == [8] * 10
    assert [r.run_cached_tokens for r in result.requests] == [0] * 10
    assert [r.hit for r in result.requests] == [False] * 10
    # The TTFT witness agrees: warm requests take exactly as long as the cold one (the
    # simulator's prefill of every token but the template's, on the fake clock).
    prompt = result.requests[0].prompt_tokens
    assert prompt is not None
    ttft = result.ttft
    assert ttft.cold_seconds == pytest.approx(0.05 + 0.0002 * (prompt - 8))
    assert ttft.warm_seconds == pytest.approx(ttft.cold_seconds)
    assert ttft.hit_seconds is None
    assert ttft.slow_hits == 0


async def test_template_tokens_are_the_baseline_and_the_hit_is_faster() -> None:
    async with open_rig(timed()) as rig:
        result = await rig.probe("basic", "sim-cache-template")
    prime, repeat = result.requests
    assert (prime.cached_tokens, prime.hit) == (8, False)
    assert prime.prompt_tokens is not None
    assert repeat.cached_tokens == repeat.prompt_tokens == prime.prompt_tokens
    assert repeat.run_cached_tokens == prime.prompt_tokens - 8
    assert result.hit_ratio == 1.0
    assert not result.pollution
    ttft = result.ttft
    assert ttft.cold_seconds == pytest.approx(0.05 + 0.0002 * (prime.prompt_tokens - 8))
    assert ttft.hit_seconds == pytest.approx(0.05)  # nothing left to prefill
    assert ttft.no_faster == (None, False)


async def test_hits_no_faster_than_cold_are_shown_not_decided() -> None:
    # A server whose "cache" saves no prefill time: every first token after 0.05 s.
    flat = SimModel("sim-flat-ttft", prefill_seconds_per_token=0.0)
    async with open_rig(timed(flat)) as rig:
        result = await rig.probe("persistence", "sim-flat-ttft")
    assert result.verdict is Verdict.WORKS  # the witness never decides
    ttft = result.ttft
    assert ttft.cold_seconds == ttft.hit_seconds == pytest.approx(0.05)
    assert ttft.no_faster == (None, *[True] * 9)
    assert ttft.slow_hits == 9
    # Every consumer reads the same witness from the serialised result.
    data = result.to_dict()
    assert data["ttft"]["hits_no_faster"] == 9
    assert [r["ttft_no_faster"] for r in data["requests"]] == [None, *[True] * 9]


def _same_run_id(rig: SimRig, model: str, **kwargs: object) -> object:
    ctx = rig.context(model, **kwargs)  # type: ignore[arg-type]
    return dataclasses.replace(ctx, run_id_factory=lambda: "0123456789abcdef")


@pytest.mark.parametrize(
    ("model", "polluted"),
    [("sim-cache-ok", True), ("sim-cache-template", True), ("sim-cache-evicting", False)],
)
async def test_pollution_is_a_cold_request_served_past_the_baseline(
    rig: SimRig, model: str, polluted: bool
) -> None:
    """A run id used twice (a bug, or a cache that ignores it) makes the second run's cold
    request a cache hit: pollution, however many template tokens are shared."""
    ctx = _same_run_id(rig, model)
    first = await run_probe("basic", ctx)  # type: ignore[arg-type]
    second = await run_probe("basic", ctx)  # type: ignore[arg-type]
    assert not first.pollution
    assert second.pollution is polluted
    prime = second.requests[0]
    if polluted:
        # The polluted prime cannot lift the baseline over the repeat's hit.
        assert prime.cached_tokens is not None
        assert prime.cached_tokens > SHARED_PREFIX_CAP
        assert second.baseline_tokens == SHARED_PREFIX_CAP
        assert prime.hit is True
        assert second.verdict is Verdict.WORKS
    else:
        assert (prime.cached_tokens, second.verdict) == (8, Verdict.BROKEN)


async def test_a_block_hit_that_misses_the_prompt_tail_still_counts(rig: SimRig) -> None:
    # A prompt of ~1140 tokens: OpenAI-style 128-token blocks serve 1024 of it (~90 %).
    settings = ProbeSettings(margin=1.1, sizes={"tail": 1130})
    for probe in ("basic", "persistence", "prompt_sizes"):
        result = await rig.probe(probe, "sim-cache-blocks", settings=settings)
        assert result.verdict is Verdict.WORKS, probe
        warm = [r for r in result.requests if not r.cold]
        assert {r.cached_tokens for r in warm} == {1024}
        assert all(r.prompt_tokens and 1100 < r.prompt_tokens < 1152 for r in warm)
        assert all(r.hit for r in warm)
    basic = await rig.probe("basic", "sim-cache-blocks", settings=settings)
    repeat = basic.requests[1]
    assert repeat.prompt_tokens is not None
    assert basic.hit_ratio == pytest.approx(1024 / repeat.prompt_tokens)
    assert basic.hit_ratio is not None
    assert basic.hit_ratio < 0.93


LAZY = SimModel("sim-lazy", persist_after=2, granularity=64, min_cacheable_tokens=64)


@pytest.mark.parametrize("probe", ["basic", "persistence", "prompt_sizes"])
async def test_deepseek_style_warm_up(probe: str) -> None:
    """A prefix kept only from its second sending: the first repeat misses. With the
    adapter's two warm-up repeats (DeepSeek's default) that is not held against it."""
    async with open_rig(SimConfig(models=(LAZY,), latency_scale=0.0)) as rig:
        settings = ProbeSettings(sizes={"small": 1100, "large": 4000})
        warmed = await rig.probe(probe, "sim-lazy", warmup_repeats=2, settings=settings)
        assert warmed.verdict is Verdict.WORKS
        assert warmed.hit_ratio is not None
        assert warmed.hit_ratio > 0.9
        if probe == "persistence":
            assert warmed.first_miss_index is None
            assert [r.hit for r in warmed.requests[:3]] == [False, False, True]
        if probe == "basic":
            assert [r.label for r in warmed.requests] == ["prime", "repeat", "repeat 2"]
        hasty = await rig.probe(probe, "sim-lazy", warmup_repeats=1, settings=settings)
        expected = {"basic": Verdict.BROKEN, "prompt_sizes": Verdict.BROKEN}
        assert hasty.verdict is expected.get(probe, Verdict.FLAKY)
        assert not warmed.pollution
        assert not hasty.pollution


async def test_store_api_and_json_agree_and_old_rows_still_load(
    rig: SimRig, tmp_path: Path
) -> None:
    """The evidence (baseline, own cached tokens, TTFT witness) survives a real SQLite round
    trip, /api/runs shows what probe --json shows, and rows stored before it still load."""
    result = await rig.probe("persistence", "sim-cache-evicting")
    db = tmp_path / "runs.db"
    async with await Store.open(db, clock=rig.clock) as store:
        await store.record_run(result, spend_usd=0.0, savings_usd=0.0)
        (stored,) = await store.recent_runs()
    assert stored == result
    as_json, api = result.to_dict(), run_to_json(stored)
    assert api["baseline_tokens"] == as_json["baseline_tokens"] == 8
    assert api["run_cached_tokens"] == as_json["run_cached_tokens"] == 0
    assert api["cold_ttft_seconds"] == as_json["ttft"]["cold_seconds"]
    assert api["hits_no_faster"] == as_json["ttft"]["hits_no_faster"] == 0
    for shown, full in zip(api["requests"], as_json["requests"], strict=True):
        for key in ("hit", "baseline_tokens", "run_cached_tokens", "ttft_no_faster"):
            assert shown[key] == full[key]

    # A row written before the hit rule recorded its evidence.
    old = json.loads(json.dumps(as_json))
    for key in ("baseline_tokens", "run_cached_tokens", "ttft"):
        del old[key]
    for request in old["requests"]:
        for key in ("baseline_tokens", "run_cached_tokens", "ttft_no_faster"):
            del request[key]
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE probe_runs SET details = ?", (json.dumps(old),))
    async with await Store.open(db, clock=rig.clock) as store:
        (legacy,) = await store.recent_runs()
    assert legacy.baseline_tokens is None
    assert legacy.run_cached_tokens is None
    assert [r.cached_tokens for r in legacy.requests] == [8] * 10
    assert run_to_json(legacy)["baseline_tokens"] is None


async def test_a_fixed_baseline_overrides_the_learned_one(rig: SimRig) -> None:
    """hit_threshold_tokens, for a server known to share more before the run id than the
    cap allows: here 1 500 tokens, so a 1 100-token repeat of sim-cache-template is a miss
    and nothing reads as pollution."""
    learned = await rig.probe("basic", "sim-cache-template")
    fixed = await rig.probe(
        "basic", "sim-cache-template", settings=ProbeSettings(hit_threshold_tokens=1500)
    )
    assert learned.verdict is Verdict.WORKS
    assert fixed.baseline_tokens == 1500
    assert [r.baseline_tokens for r in fixed.requests] == [1500, 1500]
    assert fixed.verdict is Verdict.BROKEN
    assert not fixed.pollution
    assert fixed.hit_ratio is None  # nothing run-specific left to measure
