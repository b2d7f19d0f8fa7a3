"""The collector: the whole exposition rendered from state, series from start-up, semantics."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from exporter.budget import BudgetSnapshot, BudgetUsage
from exporter.hits import HitRule
from exporter.metrics import ExporterCollector, build_registry
from exporter.pricing import resolve_price
from exporter.results import ErrorType, ModelPrice, ProbeResult, RequestRecord, SizeOutcome, Verdict
from exporter.state import State
from tests.conftest import SimRig

NOW = 1_700_000_000.0


def samples(state: State, now: float = NOW) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    registry = build_registry(ExporterCollector(state, now=lambda: now))
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def get(s: dict, name: str, **labels: str) -> float | None:  # type: ignore[type-arg]
    return s.get((name, frozenset(labels.items())))


def configured() -> State:
    state = State()
    state.configure_provider(
        "p",
        probes=("basic", "ttl", "prompt_sizes"),
        intervals={"basic": 300.0, "ttl": 3600.0, "prompt_sizes": 600.0},
    )
    price = resolve_price(ModelPrice(input=1.0, output=4.0, cache_read=0.1), None)
    state.set_models("p", ["m"], {"m": price})
    return state


def record(
    label: str,
    *,
    cold: bool,
    prompt: int = 2000,
    cached: int | None = 0,
    ok: bool = True,
    ttft: float | None = 0.2,
    error: ErrorType = ErrorType.API_ERROR,
) -> RequestRecord:
    r = RequestRecord(
        label=label,
        cold=cold,
        attempts=1,
        status=200 if ok else 500,
        latency_seconds=0.3,
        ttft_seconds=ttft,
        completion_tokens=5,
    )
    if ok:
        r.prompt_tokens, r.cached_tokens = prompt, cached
        r.baseline_tokens = None if cached is None else 0
        r.hit = HitRule(0).is_hit(cached, prompt)
    else:
        r.error_type, r.error = error, "HTTP 500"
    return r


def result(
    probe: str, verdict: Verdict = Verdict.WORKS, *, model: str = "m", **fields: Any
) -> ProbeResult:
    """A run of ``probe`` for provider p that finished at NOW."""
    return ProbeResult(
        probe=probe,
        provider="p",
        model=model,
        run_id=f"{model}-{probe}",
        verdict=verdict,
        started_at=NOW,
        finished_at=NOW,
        **fields,
    )


def test_series_exist_from_start_up() -> None:
    s = samples(configured())
    for probe in ("basic", "ttl", "prompt_sizes"):
        assert get(s, "llmcache_probe_success", provider="p", model="m", probe=probe) == 0
        assert (
            get(
                s, "llmcache_probe_last_run_timestamp_seconds", provider="p", model="m", probe=probe
            )
            == 0
        )
        for outcome in ("success", "failure"):
            assert (
                get(
                    s,
                    "llmcache_probe_duration_seconds_count",
                    provider="p",
                    probe=probe,
                    outcome=outcome,
                )
                == 0
            )
    for outcome in ("success", "failure"):
        assert get(s, "llmcache_probe_runs_total", provider="p", model="m", outcome=outcome) == 0
        assert get(s, "llmcache_requests_total", provider="p", model="m", outcome=outcome) == 0
    # Every error type per provider from start-up; per model at the first error of a type.
    for kind in ("rate_limit", "timeout", "api_error", "bad_response", "budget"):
        assert get(s, "llmcache_provider_errors_total", provider="p", error_type=kind) == 0
    assert not [k for k in s if k[0] == "llmcache_errors_total"]
    assert get(s, "llmcache_prompt_tokens_total", provider="p", model="m") == 0
    assert get(s, "llmcache_provider_paused", provider="p", reason="balance") == 0
    assert get(s, "llmcache_probe_interval_seconds", provider="p", probe="ttl") == 3600
    assert get(s, "llmcache_request_duration_seconds_count", provider="p", cache="hit") == 0
    assert get(s, "llmcache_time_to_first_token_seconds_count", provider="p", cache="miss") == 0
    # No verdict yet: no caching_works series (absent, never a false 0); events most models
    # never see appear with the first one.
    first_use = (
        "llmcache_caching_works",
        "llmcache_cache_pollution_total",
        "llmcache_cache_write_tokens_total",
        "llmcache_model_unpriced",
        "llmcache_last_time_to_first_token_seconds",
    )
    assert not [k for k in s if k[0] in first_use]
    assert get(s, "llmcache_probe_runs_total", provider="p", model="m", outcome="skipped") is None


def test_a_probe_result_sets_gauges_and_counters() -> None:
    state = configured()
    result = ProbeResult(
        probe="basic",
        provider="p",
        model="m",
        run_id="r",
        verdict=Verdict.WORKS,
        started_at=NOW - 2,
        finished_at=NOW,
        duration_seconds=2.0,
        hit_ratio=0.96,
        requests=[
            record("prime", cold=True, ttft=0.6),
            record("repeat", cold=False, cached=1920, ttft=0.15),
        ],
    )
    state.observe_result(result)
    s = samples(state)
    assert get(s, "llmcache_caching_works", provider="p", model="m", probe="basic") == 1
    assert get(s, "llmcache_hit_ratio", provider="p", model="m", probe="basic", size="") == 0.96
    assert (
        get(s, "llmcache_probe_last_run_timestamp_seconds", provider="p", model="m", probe="basic")
        == NOW
    )
    assert get(s, "llmcache_prompt_tokens_total", provider="p", model="m") == 4000
    assert get(s, "llmcache_cached_tokens_total", provider="p", model="m") == 1920
    assert get(s, "llmcache_warm_requests_total", provider="p", model="m") == 1
    assert get(s, "llmcache_warm_request_hits_total", provider="p", model="m") == 1
    # spend: (2000 + 80) × $1 + 1920 × $0.1 + 10 × $4 per 1M; savings 1920 × $0.9 per 1M
    spend = get(s, "llmcache_spend_usd_total", provider="p", model="m")
    assert spend == pytest.approx((2080 * 1.0 + 1920 * 0.1 + 10 * 4.0) / 1e6)
    savings = get(s, "llmcache_savings_usd_total", provider="p", model="m")
    assert savings == pytest.approx(1920 * 0.9 / 1e6)
    # Latency histograms per provider (docs/metrics.md "Series per model"); the model's own
    # cold and warm figures are gauges of its last basic run.
    assert get(s, "llmcache_request_duration_seconds_count", provider="p", cache="hit") == 1
    assert (
        get(s, "llmcache_request_duration_seconds_bucket", provider="p", cache="miss", le="0.5")
        == 1
    )
    assert get(s, "llmcache_time_to_first_token_seconds_sum", provider="p", cache="hit") == 0.15
    ttft = "llmcache_last_time_to_first_token_seconds"
    assert get(s, ttft, provider="p", model="m", request="cold") == 0.6
    assert get(s, ttft, provider="p", model="m", request="warm") == 0.15
    assert (
        get(
            s, "llmcache_probe_duration_seconds_sum", provider="p", probe="basic", outcome="success"
        )
        == 2.0
    )
    assert get(s, "llmcache_probe_runs_total", provider="p", model="m", outcome="success") == 1
    assert get(s, "llmcache_cache_reporting_supported", provider="p", model="m") == 1


def test_restored_results_set_gauges_but_count_nothing() -> None:
    state = configured()
    result = ProbeResult(
        probe="basic",
        provider="p",
        model="m",
        run_id="r",
        verdict=Verdict.BROKEN,
        started_at=NOW - 2,
        finished_at=NOW,
        hit_ratio=0.0,
        requests=[record("prime", cold=True), record("repeat", cold=False, cached=0)],
    )
    state.observe_result(result, restored=True)
    s = samples(state)
    assert get(s, "llmcache_caching_works", provider="p", model="m", probe="basic") == 0
    assert get(s, "llmcache_requests_total", provider="p", model="m", outcome="success") == 0
    assert get(s, "llmcache_probe_runs_total", provider="p", model="m", outcome="success") == 0
    # The last run's figures are restored like the verdict.
    assert (
        get(s, "llmcache_last_time_to_first_token_seconds", provider="p", model="m", request="warm")
        == 0.2
    )


def test_ttl_sizes_and_failures() -> None:
    state = configured()
    state.observe_result(
        ProbeResult(
            probe="ttl",
            provider="p",
            model="m",
            run_id="t",
            verdict=Verdict.WORKS,
            started_at=NOW,
            finished_at=NOW,
            hit_ratio=0.5,
            ttl={1.0: True, 5.0: True, 10.0: False, 30.0: False},
        )
    )
    state.observe_result(
        ProbeResult(
            probe="prompt_sizes",
            provider="p",
            model="m",
            run_id="s",
            verdict=Verdict.PARTIAL,
            started_at=NOW,
            finished_at=NOW,
            hit_ratio=0.5,
            sizes={
                "small": SizeOutcome(1100, Verdict.BELOW_MINIMUM),
                "large": SizeOutcome(4000, Verdict.WORKS, 0.99, 4010),
            },
        )
    )
    state.observe_result(
        ProbeResult(
            probe="basic",
            provider="p",
            model="m",
            run_id="f",
            verdict=Verdict.ERROR,
            started_at=NOW,
            finished_at=NOW,
            error_type=ErrorType.API_ERROR,
            requests=[record("prime", cold=True, ok=False)],
        )
    )
    state.record_failures("p", "m", 5, NOW + 900)
    s = samples(state)
    assert get(s, "llmcache_ttl_hit", provider="p", model="m", delay_seconds="5") == 1
    assert get(s, "llmcache_ttl_hit", provider="p", model="m", delay_seconds="10") == 0
    assert get(s, "llmcache_ttl_max_hit_delay_seconds", provider="p", model="m") == 5
    assert (
        get(s, "llmcache_hit_ratio", provider="p", model="m", probe="prompt_sizes", size="large")
        == 0.99
    )
    assert (
        get(s, "llmcache_hit_ratio", provider="p", model="m", probe="prompt_sizes", size="small")
        is None
    )  # below the minimum: no ratio, not a 0
    assert get(s, "llmcache_errors_total", provider="p", model="m", error_type="api_error") == 1
    assert get(s, "llmcache_errors_total", provider="p", model="m", error_type="timeout") is None
    assert get(s, "llmcache_provider_errors_total", provider="p", error_type="api_error") == 1
    assert get(s, "llmcache_provider_errors_total", provider="p", error_type="timeout") == 0
    assert (
        get(
            s,
            "llmcache_probe_duration_seconds_count",
            provider="p",
            probe="basic",
            outcome="failure",
        )
        == 1
    )
    # The probes' own figures that are means of other series are not exported twice.
    assert get(s, "llmcache_hit_ratio", provider="p", model="m", probe="ttl", size="") is None
    assert (
        get(s, "llmcache_hit_ratio", provider="p", model="m", probe="prompt_sizes", size="") is None
    )
    assert get(s, "llmcache_probe_success", provider="p", model="m", probe="basic") == 0
    assert get(s, "llmcache_caching_works", provider="p", model="m", probe="basic") is None
    assert get(s, "llmcache_model_cooldown", provider="p", model="m") == 1
    assert (
        get(samples(state, now=NOW + 901), "llmcache_model_cooldown", provider="p", model="m") == 0
    )


def test_not_reported_is_not_zero_cached() -> None:
    state = configured()
    state.observe_result(
        ProbeResult(
            probe="basic",
            provider="p",
            model="m",
            run_id="n",
            verdict=Verdict.NOT_REPORTED,
            started_at=NOW,
            finished_at=NOW,
            requests=[
                record("prime", cold=True, cached=None),
                record("repeat", cold=False, cached=None),
            ],
        )
    )
    s = samples(state)
    assert get(s, "llmcache_caching_works", provider="p", model="m", probe="basic") is None
    assert get(s, "llmcache_cache_reporting_supported", provider="p", model="m") == 0
    assert get(s, "llmcache_warm_requests_total", provider="p", model="m") == 0
    assert get(s, "llmcache_request_duration_seconds_count", provider="p", cache="unknown") == 2


def test_openmetrics_rendering_is_valid() -> None:
    state = configured()
    registry = build_registry(ExporterCollector(state, now=lambda: NOW))
    text = generate_openmetrics(registry).decode()
    assert text.endswith("# EOF\n")
    assert "llmcache_probe_runs_total{" in text
    assert "_created" not in text.replace("process_start_time", "")


def test_rare_events_appear_with_the_first_one() -> None:
    state = configured()
    state.observe_result(result("basic", Verdict.SKIPPED))
    write = record("prime", cold=True)
    write.cache_write_tokens = 1800
    repeat = record("repeat", cold=False, cached=1920)
    state.observe_result(result("basic", pollution=True, requests=[write, repeat]))
    s = samples(state)
    assert get(s, "llmcache_probe_runs_total", provider="p", model="m", outcome="skipped") == 1
    assert get(s, "llmcache_cache_write_tokens_total", provider="p", model="m") == 1800
    assert get(s, "llmcache_cache_pollution_total", provider="p", model="m") == 1


def test_unpriced_exists_where_a_usd_budget_applies() -> None:
    state = configured()
    assert not [k for k in samples(state) if k[0] == "llmcache_model_unpriced"]
    usage = BudgetUsage(window="day", unit="usd", limit=1.0, used=0.0)
    state.set_budgets({"p": BudgetSnapshot("p", (usage,), exhausted=False)})
    assert get(samples(state), "llmcache_model_unpriced", provider="p", model="m") == 0
    state.set_unpriced("p", "m", True)
    assert get(samples(state), "llmcache_model_unpriced", provider="p", model="m") == 1
    state.set_budgets({})
    assert not [k for k in samples(state) if k[0] == "llmcache_model_unpriced"]


def test_per_model_histograms_switch() -> None:
    state = State(per_model_histograms=True)
    state.configure_provider("p", probes=("basic",), intervals={"basic": 300.0})
    state.set_models("p", ["m"], {})
    requests = [record("prime", cold=True), record("repeat", cold=False, cached=1920)]
    state.observe_result(result("basic", requests=requests))
    s = samples(state)
    name = "llmcache_time_to_first_token_seconds_count"
    assert get(s, name, provider="p", model="m", cache="hit") == 1
    assert get(s, name, provider="p", cache="hit") is None
    assert (
        get(s, "llmcache_request_duration_seconds_count", provider="p", model="m", cache="miss")
        == 1
    )


def full_state(models: int) -> State:
    """Every probe of the default configuration (4 prompt sizes, 4 TTL delays) run once for
    every model, with a price: the series a model has in the steady state."""
    state = State()
    probes = ("basic", "prompt_sizes", "partial", "persistence", "ttl")
    state.configure_provider("p", probes=probes, intervals=dict.fromkeys(probes, 600.0))
    price = resolve_price(ModelPrice(input=1.0, output=4.0, cache_read=0.1), None)
    names = [f"m{i}" for i in range(models)]
    state.set_models("p", names, dict.fromkeys(names, price))
    for name in names:
        for probe in probes:
            run = result(
                probe,
                model=name,
                hit_ratio=0.9,
                requests=[record("prime", cold=True), record("repeat", cold=False, cached=1920)],
            )
            if probe == "prompt_sizes":
                run.sizes = {
                    n: SizeOutcome(t, Verdict.WORKS, 0.9, t)
                    for n, t in (
                        ("small", 1100),
                        ("medium", 2000),
                        ("large", 4000),
                        ("xlarge", 8000),
                    )
                }
            if probe == "ttl":
                run.ttl = {1.0: True, 5.0: True, 10.0: True, 30.0: False}
            state.observe_result(run)
        state.set_reliability("p", name, 90.0)
    return state


def test_a_model_has_at_most_50_series() -> None:
    """The series budget of docs/metrics.md: 50 per model with every probe and a price."""
    s = samples(full_state(3))
    per_model = [k for k in s if k[0].startswith("llmcache_") and ("model", "m1") in k[1]]
    assert len(per_model) == 50


@pytest.mark.anyio
async def test_warm_counters_and_cache_label_follow_the_hit_rule(rig: SimRig) -> None:
    """Real runs against the simulator, scraped: the evicting server's template tokens are
    misses everywhere (SLO counters, latency and TTFT histograms), the template server's
    repeats are hits."""
    state = State(per_model_histograms=True)  # the cache label per model
    models = ["sim-cache-evicting", "sim-cache-template"]
    state.configure_provider(
        "sim", probes=("basic", "persistence"), intervals={"basic": 300.0, "persistence": 900.0}
    )
    state.set_models("sim", models, {})
    for model in models:
        for probe in ("basic", "persistence"):
            state.observe_result(await rig.probe(probe, model))
    s = samples(state)

    def count(name: str, model: str, **labels: str) -> float | None:
        return get(s, name, provider="sim", model=model, **labels)

    # basic: prime + 1 repeat; persistence: 1 cold + 9 warm. 2 cold, 10 warm per model.
    assert count("llmcache_warm_requests_total", "sim-cache-evicting") == 10
    assert count("llmcache_warm_request_hits_total", "sim-cache-evicting") == 0
    assert count("llmcache_warm_requests_total", "sim-cache-template") == 10
    assert count("llmcache_warm_request_hits_total", "sim-cache-template") == 10
    for histogram in ("llmcache_time_to_first_token_seconds", "llmcache_request_duration_seconds"):
        name = histogram + "_count"
        assert count(name, "sim-cache-evicting", cache="hit") == 0
        assert count(name, "sim-cache-evicting", cache="miss") == 12
        assert count(name, "sim-cache-template", cache="hit") == 10
        assert count(name, "sim-cache-template", cache="miss") == 2
    # Not pollution, and the raw token counter still shows what was reported (and billed).
    assert count("llmcache_cache_pollution_total", "sim-cache-evicting") is None
    assert count("llmcache_cached_tokens_total", "sim-cache-evicting") == 12 * 8
    assert count("llmcache_hit_ratio", "sim-cache-evicting", probe="basic", size="") == 0
    assert count("llmcache_hit_ratio", "sim-cache-evicting", probe="persistence", size="") == 0
    assert count("llmcache_caching_works", "sim-cache-evicting", probe="persistence") == 0
    assert count("llmcache_caching_works", "sim-cache-template", probe="persistence") == 1
