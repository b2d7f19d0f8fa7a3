"""llmcache_price_usd_per_million_tokens: prices as gauges, so PromQL can price the user's traffic.

The gauges carry the rates the exporter itself bills with, so a figure computed in PromQL from
them equals the spend and savings counters for the same tokens.
"""

from __future__ import annotations

import pytest

from exporter.pricing import resolve_price
from exporter.results import ModelPrice, ProbeResult, Verdict
from exporter.state import State
from tests.test_metrics import NOW, get, record, samples

PRICE = "llmcache_price_usd_per_million_tokens"


def priced_state() -> State:
    state = State()
    state.configure_provider("p", probes=("basic",), intervals={"basic": 300.0})
    state.set_models(
        "p",
        ["configured", "published", "unpriced"],
        {
            # cache_write unset: writes are billed at the input price.
            "configured": resolve_price(ModelPrice(input=1.0, output=4.0, cache_read=0.1), None),
            # A Venice-style published price with a cache-write rate.
            "published": resolve_price(
                None, ModelPrice(input=3.0, output=15.0, cache_read=0.3, cache_write=3.75)
            ),
            "unpriced": resolve_price(None, None),
        },
    )
    return state


def test_every_priced_model_has_all_four_kinds_from_start_up() -> None:
    s = samples(priced_state())
    assert {
        kind: get(s, PRICE, provider="p", model="configured", kind=kind)
        for kind in ("input", "output", "cache_read", "cache_write")
    } == {"input": 1.0, "output": 4.0, "cache_read": 0.1, "cache_write": 1.0}
    assert get(s, PRICE, provider="p", model="published", kind="cache_write") == 3.75
    assert get(s, PRICE, provider="p", model="published", kind="cache_read") == 0.3


def test_a_model_without_any_price_has_no_gauge_rather_than_a_free_one() -> None:
    s = samples(priced_state())
    assert not [k for k in s if k[0] == PRICE and ("model", "unpriced") in k[1]]
    # The price table still says why: no source.
    assert (
        get(s, "llmcache_price_info", provider="p", model="unpriced", version="none", source="none")
        == 1
    )


def test_caching_not_offered_reads_as_no_discount() -> None:
    state = State()
    state.configure_provider("p", probes=("basic",), intervals={"basic": 300.0})
    state.set_models("p", ["m"], {"m": resolve_price(None, ModelPrice(input=2.0, output=8.0))})
    s = samples(state)
    assert get(s, PRICE, provider="p", model="m", kind="cache_read") == get(
        s, PRICE, provider="p", model="m", kind="input"
    )


def test_gauges_price_tokens_exactly_as_the_spend_and_savings_counters() -> None:
    state = priced_state()
    repeat = record("repeat", cold=False, prompt=2000, cached=1536)
    repeat.cache_write_tokens = 256
    state.observe_result(
        ProbeResult(
            probe="basic",
            provider="p",
            model="published",
            run_id="r",
            verdict=Verdict.WORKS,
            started_at=NOW - 1,
            finished_at=NOW,
            duration_seconds=1.0,
            hit_ratio=0.768,
            requests=[repeat],
        )
    )
    s = samples(state)

    def rate(kind: str) -> float:
        value = get(s, PRICE, provider="p", model="published", kind=kind)
        assert value is not None
        return value

    uncached = 2000 - 1536 - 256
    spend = (
        uncached * rate("input")
        + 1536 * rate("cache_read")
        + 256 * rate("cache_write")
        + 5 * rate("output")
    ) / 1e6
    savings = 1536 * (rate("input") - rate("cache_read")) / 1e6
    assert get(s, "llmcache_spend_usd_total", provider="p", model="published") == pytest.approx(
        spend
    )
    assert get(s, "llmcache_savings_usd_total", provider="p", model="published") == pytest.approx(
        savings
    )
