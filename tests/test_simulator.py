"""The simulator over real HTTP on 127.0.0.1: caching rules, APIs, faults, billing, evidence.

Timing is controlled with FakeClock and latency_scale=0; the only real-latency test shows
that a warm request's first token comes sooner than a cold one's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from exporter.clock import FakeClock
from exporter.simulator import (
    DEFAULT_MODELS,
    FAULT_MODELS,
    SimConfig,
    SimConfigError,
    SimModel,
    SimulatorHandle,
    chat_token_count,
    chat_tokens,
    count_tokens,
    load_sim_config,
    serve_simulator,
)
from exporter.simulator import cli as simulator_cli
from exporter.simulator.cache import PrefixCache
from exporter.simulator.models import FAULTS

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- helpers ----------------------------------------------------------------------------------

# [system, user "hi"]: 4 + system + 4 + 1 + 3 tokens.
_FIXED = 12


def messages(total: int, nonce: str = "run1", user: str = "hi") -> list[dict[str, Any]]:
    """An OpenAI messages list whose prompt is exactly ``total`` tokens (user "hi")."""
    body = total - _FIXED - (count_tokens(user) - 1)
    assert body >= 1
    system = " ".join([nonce] + [f"w{i % 50}" for i in range(body - 1)])
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def fast(**changes: Any) -> SimConfig:
    return dataclasses.replace(SimConfig(latency_scale=0.0), **changes)


def with_models(*models: SimModel, **changes: Any) -> SimConfig:
    return fast(models=(*DEFAULT_MODELS, *models), **changes)


@contextlib.asynccontextmanager
async def running(
    config: SimConfig | None = None, clock: FakeClock | None = None, wait: float = 10.0
) -> AsyncIterator[tuple[SimulatorHandle, httpx.AsyncClient]]:
    async with (
        serve_simulator(config or fast(), clock=clock) as sim,
        httpx.AsyncClient(base_url=sim.url, timeout=wait) as client,
    ):
        yield sim, client


async def chat(
    client: httpx.AsyncClient, model: str, msgs: list[dict[str, Any]], **extra: Any
) -> httpx.Response:
    return await client.post(
        "/v1/chat/completions", json={"model": model, "messages": msgs, **extra}
    )


async def cached_of(client: httpx.AsyncClient, model: str, msgs: list[dict[str, Any]]) -> int:
    response = await chat(client, model, msgs)
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


async def sse_data(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> tuple[httpx.Response, list[str]]:
    """POST and collect the ``data:`` payloads of a server-sent event stream."""
    async with client.stream("POST", path, json=body) as response:
        data = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
    return response, data


def anthropic_body(
    system: Any, user: str = "hi", *, max_tokens: int = 8, **extra: Any
) -> dict[str, Any]:
    return {
        "model": "sim-cache-ok",
        "max_tokens": max_tokens,
        "system": system,
        "messages": [{"role": "user", "content": user}],
        **extra,
    }


def long_text(words: int, nonce: str = "sys") -> str:
    return " ".join([nonce] + [f"w{i % 50}" for i in range(words - 1)])


# -- tokens -----------------------------------------------------------------------------------


def test_count_tokens_counts_words_and_punctuation() -> None:
    assert count_tokens("Hello, world!") == 4
    assert count_tokens("") == 0
    assert count_tokens("it's 3.5 km") == 7  # it ' s 3 . 5 km
    assert count_tokens("  spaced\n\tout  ") == 2


def test_chat_token_count_adds_message_overhead() -> None:
    one = [{"role": "user", "content": "Hello, world!"}]
    assert chat_token_count(one) == 4 + 4 + 3
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hello,"}, {"type": "text", "text": "world!"}],
        }
    ]
    assert chat_token_count(parts) == chat_token_count(one)
    assert chat_tokens(one)[:3] == ["<|im_start|>", "<|user|>", "<|im_sep|>"]
    for total in (20, 1023, 1100, 4000):
        assert chat_token_count(messages(total)) == total


# -- the prefix cache on its own --------------------------------------------------------------


def test_prefix_cache_blocks_ttl_and_lru() -> None:
    cache = PrefixCache(min_cacheable_tokens=8, granularity=4, ttl=10.0, capacity=3)
    tokens = [f"t{i}" for i in range(14)]
    assert cache.lookup(tokens, 0.0) == 0
    assert cache.store(tokens, 0.0) == 12  # three full blocks
    assert cache.lookup(tokens, 5.0) == 12
    assert cache.lookup(tokens[:9], 5.0) == 8  # shared prefix, in whole blocks
    assert cache.lookup(tokens[:7], 5.0) == 0  # below the minimum
    assert cache.store(tokens, 6.0) == 0  # nothing new
    assert cache.lookup(tokens, 15.9) == 12  # refreshed at 6.0 (and by the hit at 5.0)
    assert cache.lookup(tokens, 26.0) == 0  # 10 s after the last touch
    other = [f"o{i}" for i in range(8)]
    cache.store(tokens, 30.0)
    cache.store(other, 31.0)  # capacity 3: evicts the oldest blocks of ``tokens``
    assert cache.lookup(tokens, 32.0) == 0
    assert cache.lookup(other, 32.0) == 8


def test_prefix_cache_breakpoints_are_exact_prefixes() -> None:
    cache = PrefixCache(min_cacheable_tokens=5, granularity=4, ttl=10.0)
    tokens = [f"t{i}" for i in range(20)]
    assert cache.lookup_at(tokens, [7, 13], 0.0) == 0
    assert cache.store_at(tokens, [3, 7, 13], 0.0) == 13  # 3 is below the minimum
    assert cache.lookup_at(tokens, [13], 1.0) == 13
    changed = [*tokens[:10], "x", *tokens[11:]]
    assert cache.lookup_at(changed, [7, 13], 1.0) == 7  # only the earlier marker still matches
    assert cache.lookup(tokens, 1.0) == 0  # breakpoint entries are not block entries


# -- OpenAI-style automatic caching -----------------------------------------------------------


async def test_prime_then_repeat_reports_whole_blocks() -> None:
    async with running() as (_, client):
        msgs = messages(1100)
        first = await chat(client, "sim-cache-ok", msgs)
        assert first.json()["usage"] == {
            "prompt_tokens": 1100,
            "completion_tokens": 5,
            "total_tokens": 1105,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
        assert await cached_of(client, "sim-cache-ok", msgs) == 1024
        assert await cached_of(client, "sim-cache-ok", msgs) == 1024

        big = messages(4000, nonce="run2")
        assert await cached_of(client, "sim-cache-ok", big) == 0
        assert await cached_of(client, "sim-cache-ok", big) == 3968  # 31 blocks of 128

        # A longer prompt sharing the first prompt's prefix reads that prefix's blocks.
        longer = messages(1100)
        longer[1]["content"] = "hi " + " ".join(["more"] * 300)
        assert await cached_of(client, "sim-cache-ok", longer) == 1024


async def test_below_minimum_never_caches_and_minimum_does() -> None:
    async with running() as (_, client):
        short = messages(1023)
        for _ in range(3):
            assert await cached_of(client, "sim-cache-ok", short) == 0
        exact = messages(1024, nonce="exact")
        assert await cached_of(client, "sim-cache-ok", exact) == 0
        assert await cached_of(client, "sim-cache-ok", exact) == 1024


async def test_ttl_expiry_with_fake_clock() -> None:
    clock = FakeClock()
    async with running(clock=clock) as (_, client):
        hit = messages(1200, nonce="hit")
        await chat(client, "sim-cache-ok", hit)
        clock.advance(299)
        assert await cached_of(client, "sim-cache-ok", hit) == 1152

        miss = messages(1200, nonce="miss")
        await chat(client, "sim-cache-ok", miss)
        clock.advance(301)
        assert await cached_of(client, "sim-cache-ok", miss) == 0

        # A hit refreshes the entry: 400 s after the prime, but 200 s after the last use.
        refresh = messages(1200, nonce="refresh")
        await chat(client, "sim-cache-ok", refresh)
        clock.advance(200)
        assert await cached_of(client, "sim-cache-ok", refresh) == 1152
        clock.advance(200)
        assert await cached_of(client, "sim-cache-ok", refresh) == 1152

        short = messages(1200, nonce="short")
        await chat(client, "sim-cache-short-ttl", short)
        clock.advance(2)
        assert await cached_of(client, "sim-cache-short-ttl", short) == 1152
        clock.advance(4)
        assert await cached_of(client, "sim-cache-short-ttl", short) == 0


async def test_broken_and_no_fields_models() -> None:
    async with running() as (_, client):
        msgs = messages(2000)
        for _ in range(3):
            assert await cached_of(client, "sim-cache-broken", msgs) == 0
        for _ in range(2):
            usage = (await chat(client, "sim-no-cache-fields", msgs)).json()["usage"]
            assert usage == {"prompt_tokens": 2000, "completion_tokens": 5, "total_tokens": 2005}


async def test_template_tokens_are_cached_on_every_request_cold_ones_included() -> None:
    async with running() as (sim, client):
        first = messages(1500, nonce="alpha")
        # The very first request: only the 8 template tokens, which every prompt shares.
        body = (await chat(client, "sim-cache-template", first)).json()
        assert body["usage"]["prompt_tokens"] == 1508
        assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 8}
        # Token-granular: the repeat is served whole, template included.
        assert await cached_of(client, "sim-cache-template", first) == 1508
        # Another prompt shares the template and the system message's three opening markers.
        assert await cached_of(client, "sim-cache-template", messages(1500, nonce="beta")) == 11
        # A shorter prompt whose system text is the head of the first one's shares all of it
        # (template, 3 markers, 1188 words) up to its own end-of-message marker.
        same_head = messages(1200, nonce="alpha", user="bye")
        assert await cached_of(client, "sim-cache-template", same_head) == 8 + 3 + 1188
        log = sim.state.log_entries("sim-cache-template", 10)
        assert [e["prompt_tokens"] for e in log] == [1508, 1508, 1508, 1208]


async def test_an_evicting_server_only_ever_serves_the_template() -> None:
    clock = FakeClock()
    async with running(fast(latency_scale=1.0), clock) as (_, client):
        msgs = messages(1500)
        assert [await cached_of(client, "sim-cache-evicting", msgs) for _ in range(3)] == [8] * 3
        # Every request prefills all 1500 tokens but the template's: warm ones take exactly
        # as long as the cold one (a plain response waits for its 5 output tokens too).
        assert clock.sleeps == pytest.approx([0.05 + 0.0002 * 1500 + 0.01 * 4] * 3)


async def test_the_blocks_model_serves_whole_blocks_above_1024() -> None:
    async with running() as (_, client):
        for total, warm in ((1000, 0), (1151, 1024), (1152, 1152), (2100, 2048)):
            msgs = messages(total, nonce=f"n{total}")
            assert await cached_of(client, "sim-cache-blocks", msgs) == 0
            assert await cached_of(client, "sim-cache-blocks", msgs) == warm


async def test_lazy_persistence_keeps_a_prefix_from_its_second_sending() -> None:
    lazy = SimModel("sim-lazy", persist_after=2, granularity=64, min_cacheable_tokens=64)
    async with running(with_models(lazy)) as (_, client):
        msgs = messages(1500)
        assert [await cached_of(client, "sim-lazy", msgs) for _ in range(4)] == [0, 0, 1472, 1472]
        # Another prompt starts over; the first one stays kept.
        other = messages(1500, nonce="other")
        assert await cached_of(client, "sim-lazy", other) == 0
        assert await cached_of(client, "sim-lazy", msgs) == 1472


async def test_anthropic_template_tokens_are_cache_reads() -> None:
    template = SimModel("sim-tpl", template_tokens=8, min_cacheable_tokens=1024)
    async with running(with_models(template)) as (_, client):
        body = anthropic_body(
            [{"type": "text", "text": long_text(1100), "cache_control": {"type": "ephemeral"}}]
        )
        body["model"] = "sim-tpl"
        cold = (await client.post("/v1/messages", json=body)).json()["usage"]
        warm = (await client.post("/v1/messages", json=body)).json()["usage"]
        assert cold["cache_read_input_tokens"] == 8
        assert cold["cache_creation_input_tokens"] == 1103  # 3 markers + 1100 words
        assert warm["cache_read_input_tokens"] == 8 + 1103
        # Whole prompt = template + system message (1100 words, 4 markers) + user "hi"
        # (1 word, 4 markers) + reply priming (3), as input + read + creation.
        whole = sum(cold[k] for k in ("input_tokens", "cache_read_input_tokens"))
        assert whole + cold["cache_creation_input_tokens"] == 8 + 1104 + 5 + 3


async def _flaky_sequence(seed: int, tries: int = 40) -> list[bool]:
    async with running(fast(seed=seed)) as (_, client):
        msgs = messages(1500)
        assert await cached_of(client, "sim-cache-flaky", msgs) == 0
        return [await cached_of(client, "sim-cache-flaky", msgs) > 0 for _ in range(tries)]


async def test_flaky_model_is_seeded_and_hits_about_half_the_time() -> None:
    first = await _flaky_sequence(42)
    again = await _flaky_sequence(42)
    assert first == again
    assert 12 <= sum(first) <= 28
    assert first != await _flaky_sequence(7)


async def test_cache_write_reporting_and_pricing() -> None:
    async with running() as (sim, client):
        msgs = messages(1300)
        first = (await chat(client, "sim-cache-write", msgs)).json()
        assert first["usage"]["prompt_tokens_details"] == {
            "cached_tokens": 0,
            "cache_creation_input_tokens": 1280,
        }
        # 20 plain input at $3, 1280 written at $3.75, 5 output at $15 per million tokens.
        expected = (20 * 3.0 + 1280 * 3.75 + 5 * 15.0) / 1e6
        assert first["cost"]["diem"] == pytest.approx(expected)
        assert first["cost"]["usd"] == 0.0
        second = (await chat(client, "sim-cache-write", msgs)).json()
        assert second["usage"]["prompt_tokens_details"] == {
            "cached_tokens": 1280,
            "cache_creation_input_tokens": 0,
        }
        assert second["cost"]["diem"] == pytest.approx((20 * 3.0 + 1280 * 0.3 + 5 * 15.0) / 1e6)
        stats = sim.state.stats_snapshot()["models"]["sim-cache-write"]
        assert stats["cached_tokens"] == 1280
        assert stats["cache_write_tokens"] == 1280


async def test_max_tokens_limits_the_completion() -> None:
    async with running() as (_, client):
        body = (await chat(client, "sim-cache-ok", messages(20), max_tokens=2)).json()
        assert body["usage"]["completion_tokens"] == 2
        assert body["choices"][0]["message"]["content"] == "Simulated reply"
        body = (await chat(client, "sim-cache-ok", messages(20), max_completion_tokens=3)).json()
        assert body["usage"]["completion_tokens"] == 3


# -- streaming --------------------------------------------------------------------------------


async def test_streaming_with_include_usage() -> None:
    async with running() as (_, client):
        body = {
            "model": "sim-cache-ok",
            "messages": messages(1100),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        response, data = await sse_data(client, "/v1/chat/completions", body)
        assert response.headers["content-type"].startswith("text/event-stream")
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        contents = [c["choices"][0]["delta"].get("content") for c in chunks[1:6]]
        assert "".join(contents) == "Simulated reply from the prompt"
        assert chunks[6]["choices"][0]["finish_reason"] == "stop"
        last = chunks[-1]
        assert last["choices"] == []
        assert last["usage"]["prompt_tokens"] == 1100
        assert last["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        assert set(last["cost"]) == {"usd", "diem"}
        assert all(c["usage"] is None for c in chunks[:-1])

        _, data = await sse_data(client, "/v1/chat/completions", body)
        assert json.loads(data[-2])["usage"]["prompt_tokens_details"]["cached_tokens"] == 1024


async def test_streaming_without_include_usage_sends_no_usage() -> None:
    async with running() as (_, client):
        body = {"model": "sim-cache-ok", "messages": messages(30), "stream": True}
        _, data = await sse_data(client, "/v1/chat/completions", body)
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert len(chunks) == 7  # role, five tokens, finish
        assert all("usage" not in c and c["choices"] for c in chunks)


async def test_time_to_first_token_follows_uncached_prefill_exactly() -> None:
    clock = FakeClock()
    config = SimConfig(latency_scale=1.0)
    async with running(config, clock) as (_, client):
        body = {"model": "sim-cache-ok", "messages": messages(2000), "stream": True}
        for _ in range(2):
            await sse_data(client, "/v1/chat/completions", body)
        cold, warm = 0.05 + 0.0002 * 2000, 0.05 + 0.0002 * (2000 - 1920)
        assert clock.sleeps == pytest.approx([cold, *[0.01] * 4, warm, *[0.01] * 4])


async def test_warm_first_token_arrives_sooner_in_real_time() -> None:
    slow_prefill = SimModel(
        "sim-slow-prefill", base_latency=0.0, prefill_seconds_per_token=0.0001, output_tokens=1
    )
    async with running(with_models(slow_prefill, latency_scale=1.0)) as (_, client):
        body = {"model": "sim-slow-prefill", "messages": messages(4000), "stream": True}

        async def ttft() -> float:
            start = time.perf_counter()
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if '"content":"Simulated"' in line:
                        return time.perf_counter() - start
            raise AssertionError("no content token")

        cold = await ttft()  # about 0.4 s of simulated prefill
        warm = await ttft()  # about 0.003 s
        assert warm < cold / 2


# -- Anthropic Messages -----------------------------------------------------------------------


async def test_anthropic_without_markers_caches_nothing() -> None:
    async with running() as (_, client):
        body = anthropic_body(long_text(2000))
        for _ in range(2):
            usage = (await client.post("/v1/messages", json=body)).json()["usage"]
            assert usage["cache_read_input_tokens"] == 0
            assert usage["cache_creation_input_tokens"] == 0
            assert usage["input_tokens"] == 4 + 2000 + 4 + 1 + 3


async def test_anthropic_system_marker_reads_the_system_prefix() -> None:
    async with running() as (sim, client):
        system = [{"type": "text", "text": long_text(2000), "cache_control": {"type": "ephemeral"}}]
        prefix = 3 + 2000  # start, role, separator and the system text
        first = await client.post("/v1/messages", json=anthropic_body(system, "first question"))
        assert first.status_code == 200
        body = first.json()
        assert body["type"] == "message"
        assert body["id"].startswith("msg_sim_")
        assert body["stop_reason"] == "end_turn"
        assert body["content"] == [{"type": "text", "text": "Simulated reply from the prompt"}]
        usage = body["usage"]
        total = prefix + 1 + 4 + 2 + 3
        assert usage["cache_creation_input_tokens"] == prefix
        assert usage["cache_read_input_tokens"] == 0
        assert usage["input_tokens"] == total - prefix
        assert usage["output_tokens"] == 5  # the model's output_tokens, under max_tokens 8

        second = await client.post("/v1/messages", json=anthropic_body(system, "another one here"))
        usage = second.json()["usage"]
        assert usage["cache_read_input_tokens"] == prefix
        assert usage["cache_creation_input_tokens"] == 0
        assert usage["input_tokens"] == (prefix + 1 + 4 + 3 + 3) - prefix
        assert sim.state.log[-1].api == "anthropic"


async def test_anthropic_automatic_caching_and_streaming_events() -> None:
    async with running() as (_, client):
        body = anthropic_body(long_text(1500), cache_control={"type": "ephemeral"}, stream=True)
        content_end = 3 + 1500 + 1 + 3 + 1  # system message, then user content "hi"
        for read, creation in ((0, content_end), (content_end, 0)):
            events: list[tuple[str, dict[str, Any]]] = []
            async with client.stream("POST", "/v1/messages", json=body) as response:
                name = ""
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        name = line[len("event: ") :]
                    elif line.startswith("data: "):
                        events.append((name, json.loads(line[len("data: ") :])))
            names = [n for n, _ in events]
            assert names[:3] == ["message_start", "content_block_start", "ping"]
            assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
            assert names.count("content_block_delta") == 5
            start = events[0][1]["message"]["usage"]
            assert start["cache_read_input_tokens"] == read
            assert start["cache_creation_input_tokens"] == creation
            assert start["output_tokens"] == 1
            final = events[-2][1]["usage"]
            assert final["output_tokens"] == 5
            assert final["input_tokens"] + read + creation == content_end + 1 + 3


async def test_anthropic_marker_below_minimum_and_request_errors() -> None:
    async with running() as (_, client):
        system = [{"type": "text", "text": "short", "cache_control": {"type": "ephemeral"}}]
        for _ in range(2):
            usage = (await client.post("/v1/messages", json=anthropic_body(system))).json()["usage"]
            assert (usage["cache_read_input_tokens"], usage["cache_creation_input_tokens"]) == (
                0,
                0,
            )

        too_many = [dict(system[0]) for _ in range(5)]
        response = await client.post("/v1/messages", json=anthropic_body(too_many))
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert "maximum of 4" in response.json()["error"]["message"]

        no_max = anthropic_body("x")
        del no_max["max_tokens"]
        response = await client.post("/v1/messages", json=no_max)
        assert response.status_code == 400
        assert "max_tokens" in response.json()["error"]["message"]

        response = await client.post("/v1/messages", json={**anthropic_body("x"), "model": "nope"})
        assert response.status_code == 404
        assert response.json() == {
            "type": "error",
            "error": {
                "type": "not_found_error",
                "message": "model 'nope' does not exist (simulator)",
            },
        }


# -- errors, rate limits, balance, auth -------------------------------------------------------


async def test_error_model_answers_500() -> None:
    async with running() as (sim, client):
        for _ in range(2):
            response = await chat(client, "sim-error", messages(20))
            assert response.status_code == 500
            assert response.json()["error"]["type"] == "server_error"
            assert "x-venice-balance-usd" in response.headers
        assert sim.state.stats_snapshot()["models"]["sim-error"]["responses"] == {"500": 2}
        assert sim.state.balance_diem == 10.0  # errors are not billed


async def _throttled_statuses(client: httpx.AsyncClient, model: str, count: int) -> list[int]:
    """The statuses of ``count`` chat requests; every 429 says Retry-After: 1 and why."""
    statuses = []
    for _ in range(count):
        response = await chat(client, model, messages(20))
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "rate_limit_exceeded"
    return statuses


async def test_ratelimit_period_serves_every_nth_request() -> None:
    every_4th = SimModel("sim-every-4th", ratelimit_period=4, retry_after=1.0)
    async with running(with_models(every_4th)) as (sim, client):
        statuses = await _throttled_statuses(client, "sim-every-4th", 8)
        assert statuses == [429, 429, 429, 200, 429, 429, 429, 200]
        log = [(e["model_seq"], e["status"]) for e in sim.state.log_entries("sim-every-4th", 3)]
        assert log == [(6, 429), (7, 429), (8, 200)]


async def test_ratelimited_model_throttles_a_seeded_third() -> None:
    async def statuses(seed: int) -> list[int]:
        async with running(fast(seed=seed)) as (_, client):
            return await _throttled_statuses(client, "sim-ratelimited", 90)

    first = await statuses(42)
    assert set(first) == {200, 429}
    assert 20 <= first.count(429) <= 40  # a third of 90, give or take the draw
    assert await statuses(42) == first  # the same seed, the same sequence
    assert await statuses(7) != first


async def test_balance_headers_fall_as_tokens_are_billed() -> None:
    async with running(fast(balance_usd=5.0, balance_diem=0.002)) as (sim, client):
        msgs = messages(1100)
        first = await chat(client, "sim-cache-ok", msgs)
        assert first.headers["x-venice-balance-diem"] == "0.002"
        assert first.headers["x-venice-balance-usd"] == "5"
        cost1 = (1100 * 1.0 + 5 * 4.0) / 1e6
        assert first.json()["cost"] == {"diem": pytest.approx(cost1), "usd": 0.0}

        second = await chat(client, "sim-cache-ok", msgs)
        assert float(second.headers["x-venice-balance-diem"]) == pytest.approx(0.002 - cost1)
        cost2 = (76 * 1.0 + 1024 * 0.1 + 5 * 4.0) / 1e6
        assert second.json()["cost"]["diem"] == pytest.approx(cost2)

        # DIEM is spent first; once it runs out the rest comes from USD.
        for _ in range(10):
            await chat(client, "sim-cache-ok", msgs)
        last = await chat(client, "sim-cache-ok", msgs)
        assert last.headers["x-venice-balance-diem"] == "0"
        assert float(last.headers["x-venice-balance-usd"]) < 5.0
        totals = sim.state.stats_snapshot()["totals"]
        spent = totals["cost_usd"] + totals["cost_diem"]
        assert spent == pytest.approx(cost1 + 12 * cost2)
        assert sim.state.balance_usd == pytest.approx(5.0 + 0.002 - spent)


async def test_exhausted_balance_answers_402_and_is_not_billed() -> None:
    async with running(fast(balance_usd=0.000001, balance_diem=0.0)) as (sim, client):
        served = await chat(client, "sim-cache-ok", messages(20))
        assert served.status_code == 200  # the request that empties the balance is served
        for _ in range(2):
            refused = await chat(client, "sim-cache-ok", messages(20))
            assert refused.status_code == 402
            assert refused.json() == {"error": "Insufficient balance"}
            assert refused.headers["x-venice-balance-usd"] == "0"
        anthropic = await client.post("/v1/messages", json=anthropic_body("x"))
        assert anthropic.status_code == 402
        assert anthropic.json()["error"]["type"] == "billing_error"
        stats = sim.state.stats_snapshot()["models"]["sim-cache-ok"]
        assert stats["responses"] == {"200": 1, "402": 3}
        assert stats["prompt_tokens"] == 20


async def test_api_key_is_required_when_configured() -> None:
    async with running(fast(api_key="sim-secret")) as (_, client):
        msgs = messages(20)
        assert (await chat(client, "sim-cache-ok", msgs)).status_code == 401
        wrong = await client.post(
            "/v1/chat/completions",
            json={"model": "sim-cache-ok", "messages": msgs},
            headers={"Authorization": "Bearer nope"},
        )
        assert wrong.status_code == 401
        assert wrong.json()["error"]["type"] == "authentication_error"
        for headers in ({"Authorization": "Bearer sim-secret"}, {"x-api-key": "sim-secret"}):
            ok = await client.post(
                "/v1/chat/completions",
                json={"model": "sim-cache-ok", "messages": msgs},
                headers=headers,
            )
            assert ok.status_code == 200
        anthropic = await client.post("/v1/messages", json=anthropic_body("x"))
        assert anthropic.status_code == 401
        assert anthropic.json()["error"]["type"] == "authentication_error"
        ok = await client.post(
            "/v1/messages", json=anthropic_body("x"), headers={"x-api-key": "sim-secret"}
        )
        assert ok.status_code == 200


# -- fault models -----------------------------------------------------------------------------


def _fault_config(**changes: Any) -> SimConfig:
    models = tuple(m.replace(huge_body_bytes=3 * 1024 * 1024) for m in FAULT_MODELS)
    return fast(models=(*DEFAULT_MODELS, *models), **changes)


def test_every_fault_has_a_model() -> None:
    names = {m.fault for m in FAULT_MODELS} | {"error"}
    assert names == set(FAULTS)
    assert not {m.name for m in FAULT_MODELS} & {m.name for m in DEFAULT_MODELS}


async def test_fault_html() -> None:
    async with running(_fault_config()) as (_, client):
        response = await chat(client, "sim-fault-html", messages(20))
        assert response.status_code == 502
        assert response.headers["content-type"].startswith("text/html")
        assert "<html>" in response.text


async def test_fault_bad_json() -> None:
    async with running(_fault_config()) as (_, client):
        response = await chat(client, "sim-fault-bad-json", messages(20))
        assert response.status_code == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(response.text)
        body = {"model": "sim-fault-bad-json", "messages": messages(20), "stream": True}
        _, data = await sse_data(client, "/v1/chat/completions", body)
        assert data[-1] == "[DONE]"
        with pytest.raises(json.JSONDecodeError):
            json.loads(data[-2])


async def test_fault_missing_usage() -> None:
    async with running(_fault_config()) as (_, client):
        body = (await chat(client, "sim-fault-missing-usage", messages(20))).json()
        assert "usage" not in body
        assert body["choices"][0]["message"]["content"]
        stream = {
            "model": "sim-fault-missing-usage",
            "messages": messages(20),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        _, data = await sse_data(client, "/v1/chat/completions", stream)
        assert data[-1] == "[DONE]"
        assert all(json.loads(d).get("usage") is None for d in data[:-1])


@pytest.mark.parametrize(
    ("model", "check"),
    [
        (
            "sim-fault-cached-exceeds-prompt",
            lambda u: u["prompt_tokens_details"]["cached_tokens"] > u["prompt_tokens"],
        ),
        ("sim-fault-negative-tokens", lambda u: u["prompt_tokens"] < 0),
        ("sim-fault-absurd-tokens", lambda u: u["prompt_tokens"] == 10**12),
    ],
)
async def test_faulty_usage_figures(model: str, check: Any) -> None:
    async with running(_fault_config()) as (sim, client):
        response = await chat(client, model, messages(20))
        assert response.status_code == 200
        assert check(response.json()["usage"])
        assert sim.state.balance_diem == 10.0  # faulty answers are not billed


async def test_fault_truncated_stream() -> None:
    async with running(_fault_config()) as (_, client):
        body = {
            "model": "sim-fault-truncated-stream",
            "messages": messages(20),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        response, data = await sse_data(client, "/v1/chat/completions", body)
        assert response.status_code == 200
        assert "[DONE]" not in data
        chunks = [json.loads(d) for d in data]
        assert all(c["usage"] is None and c["choices"][0]["finish_reason"] is None for c in chunks)
        plain = await chat(client, "sim-fault-truncated-stream", messages(20))
        with pytest.raises(json.JSONDecodeError):
            json.loads(plain.text)


async def test_fault_huge_body_streams_without_end() -> None:
    size = 3 * 1024 * 1024
    async with running(_fault_config()) as (_, client):
        received = 0
        body = {"model": "sim-fault-huge-body", "messages": messages(20)}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_bytes():
                received += len(chunk)
        assert size <= received <= size + 1024
        streamed = 0
        async with client.stream(
            "POST", "/v1/chat/completions", json={**body, "stream": True}
        ) as response:
            async for chunk in response.aiter_bytes():
                streamed += len(chunk)
        assert streamed >= size


async def test_fault_huge_body_default_is_fifty_megabytes() -> None:
    async with running(fast().with_fault_models()) as (_, client):
        received = 0
        body = {"model": "sim-fault-huge-body", "messages": messages(20)}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for chunk in response.aiter_bytes():
                received += len(chunk)
        assert received >= 50 * 1024 * 1024


async def test_fault_stream_error_is_in_band() -> None:
    async with running(_fault_config()) as (_, client):
        body = {"model": "sim-fault-stream-error", "messages": messages(20), "stream": True}
        response, data = await sse_data(client, "/v1/chat/completions", body)
        assert response.status_code == 200
        assert data[-1] == "[DONE]"
        assert json.loads(data[-2])["error"]["code"] == "model_overloaded"
        plain = await chat(client, "sim-fault-stream-error", messages(20))
        assert plain.status_code == 200
        assert "error" in plain.json()

        anthropic = {**anthropic_body("x", stream=True), "model": "sim-fault-stream-error"}
        _, data = await sse_data(client, "/v1/messages", anthropic)
        assert json.loads(data[-1])["error"]["type"] == "overloaded_error"


async def test_fault_slow_waits_on_the_clock() -> None:
    clock = FakeClock()
    async with running(_fault_config(), clock) as (_, client):
        response = await chat(client, "sim-fault-slow", messages(20))
        assert response.status_code == 200
        assert 45.0 in clock.sleeps


async def test_fault_slow_times_out_a_client_and_the_server_carries_on() -> None:
    async with running(_fault_config(), wait=0.3) as (sim, client):
        with pytest.raises(httpx.ReadTimeout):
            await chat(client, "sim-fault-slow", messages(20))
        assert (await chat(client, "sim-cache-ok", messages(20))).status_code == 200
        assert sim.state.log[-1].model == "sim-cache-ok"


async def test_anthropic_faults() -> None:
    async with running(_fault_config()) as (_, client):
        for model, status in (("sim-error", 500), ("sim-fault-html", 502)):
            response = await client.post(
                "/v1/messages", json={**anthropic_body("x"), "model": model}
            )
            assert response.status_code == status
        response = await client.post(
            "/v1/messages", json={**anthropic_body("x"), "model": "sim-fault-absurd-tokens"}
        )
        assert response.json()["usage"]["input_tokens"] == 10**12
        response = await client.post(
            "/v1/messages", json={**anthropic_body("x"), "model": "sim-fault-missing-usage"}
        )
        assert "usage" not in response.json()


async def test_anthropic_fault_streams_and_bodies() -> None:
    def body(model: str, *, stream: bool = True) -> dict[str, Any]:
        return {**anthropic_body("x", stream=stream), "model": model}

    async with running(_fault_config()) as (_, client):
        _, data = await sse_data(client, "/v1/messages", body("sim-fault-bad-json"))
        with pytest.raises(json.JSONDecodeError):
            json.loads(data[-1])
        _, data = await sse_data(client, "/v1/messages", body("sim-fault-truncated-stream"))
        kinds = [json.loads(d)["type"] for d in data]
        assert kinds[-1] == "content_block_delta"
        assert "message_delta" not in kinds
        _, data = await sse_data(client, "/v1/messages", body("sim-fault-missing-usage"))
        events = [json.loads(d) for d in data]
        assert all("usage" not in e and "usage" not in e.get("message", {}) for e in events)
        for model in ("sim-fault-bad-json", "sim-fault-truncated-stream"):
            plain = await client.post("/v1/messages", json=body(model, stream=False))
            with pytest.raises(json.JSONDecodeError):
                json.loads(plain.text)
        plain = await client.post("/v1/messages", json=body("sim-fault-stream-error", stream=False))
        assert plain.json()["error"]["type"] == "overloaded_error"
        plain = await client.post(
            "/v1/messages", json=body("sim-fault-negative-tokens", stream=False)
        )
        assert plain.json()["usage"]["input_tokens"] < 0
        for stream in (False, True):
            received = 0
            async with client.stream(
                "POST", "/v1/messages", json=body("sim-fault-huge-body", stream=stream)
            ) as response:
                async for chunk in response.aiter_bytes():
                    received += len(chunk)
            assert received >= 3 * 1024 * 1024


async def test_anthropic_broken_and_no_fields_models() -> None:
    marked = [{"type": "text", "text": long_text(1500), "cache_control": {"type": "ephemeral"}}]
    async with running() as (_, client):
        for _ in range(2):
            body = {**anthropic_body(marked), "model": "sim-cache-broken"}
            usage = (await client.post("/v1/messages", json=body)).json()["usage"]
            assert usage["cache_read_input_tokens"] == 0
            assert usage["cache_creation_input_tokens"] == 3 + 1500
        for _ in range(2):
            body = {**anthropic_body(marked), "model": "sim-no-cache-fields"}
            usage = (await client.post("/v1/messages", json=body)).json()["usage"]
            assert usage == {"input_tokens": 4 + 1500 + 4 + 1 + 3, "output_tokens": 5}


# -- bad requests -----------------------------------------------------------------------------


async def test_oversized_body_gets_413() -> None:
    async with running(fast(max_body_bytes=1024)) as (_, client):
        response = await chat(client, "sim-cache-ok", messages(400))
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
    async with running() as (_, client):  # the default 8 MiB cap, over a real 9 MiB body
        body = json.dumps({"model": "sim-cache-ok", "messages": [], "pad": "x" * (9 << 20)})
        response = await client.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 413
        assert (await chat(client, "sim-cache-ok", messages(20))).status_code == 200


_OK_MSGS = [{"role": "user", "content": "x"}]


def _anthropic(**fields: Any) -> dict[str, Any]:
    return {"model": "sim-cache-ok", "max_tokens": 5, "messages": _OK_MSGS, **fields}


def _block(**fields: Any) -> list[dict[str, Any]]:
    return [{"type": "text", "text": "x", **fields}]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"model": "sim-cache-ok"}', "messages"),
        (b'{"model": "sim-cache-ok", "messages": [5]}', "messages[0] must be an object"),
        (b'{"model": "sim-cache-ok", "messages": [{"content": "x"}]}', "messages[0].role"),
        (b'{"model": "sim-cache-ok", "messages": [{"role": "user", "content": 5}]}', "content"),
        (b'{"model": "sim-cache-ok", "messages": [{"role": "user", "content": [5]}]}', "type"),
        (
            b'{"model": "sim-cache-ok", "messages": [{"role": "user", "content": '
            b'[{"type": "text", "text": 5}]}]}',
            "text must be a string",
        ),
        (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', "model"),
        (
            b'{"model": "sim-cache-ok", "messages": [{"role": "user"}], "max_tokens": 0}',
            "max_tokens",
        ),
        (b'{"model": "sim-cache-ok", "messages": [{"role": "user"}], "stream": "yes"}', "stream"),
        (
            b'{"model": "sim-cache-ok", "messages": [{"role": "user"}], "stream_options": 1}',
            "stream_options",
        ),
    ],
)
async def test_malformed_requests_get_400(content: bytes, message: str) -> None:
    async with running() as (sim, client):
        response = await client.post("/v1/chat/completions", content=content)
        assert response.status_code == 400
        assert message in response.json()["error"]["message"]
        assert sim.state.log[-1].status == 400


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([1], "JSON object"),
        ({"max_tokens": 5, "messages": _OK_MSGS}, "model"),
        (_anthropic(system=5), "system must be a string or an array"),
        (_anthropic(system=[{"type": "image"}]), "must be text in system"),
        (_anthropic(system=[5]), "system[0] must be an object with a type"),
        (_anthropic(system=_block(text=5)), "system[0].text must be a string"),
        (_anthropic(system=_block(cache_control={"type": "forever"})), "cache_control"),
        (_anthropic(cache_control="yes"), "request.cache_control"),
        (_anthropic(messages=[]), "messages"),
        (_anthropic(messages=[{"role": "system", "content": "x"}]), "user or assistant"),
        (_anthropic(messages=[{"role": "user", "content": None}]), "content"),
        (_anthropic(stream="yes"), "stream"),
    ],
)
async def test_malformed_anthropic_requests_get_400(body: Any, message: str) -> None:
    async with running() as (_, client):
        response = await client.post("/v1/messages", json=body)
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert message in response.json()["error"]["message"]


async def test_anthropic_content_blocks_and_markers_on_non_text_blocks() -> None:
    async with running() as (_, client):
        image = {"type": "image", "source": {}, "cache_control": {"type": "ephemeral"}}
        body = _anthropic(
            system=long_text(1500),
            messages=[{"role": "user", "content": [{"type": "text", "text": "a b"}, image]}],
        )
        usages = [(await client.post("/v1/messages", json=body)).json()["usage"] for _ in range(2)]
        prefix = 4 + 1500 + 3 + 2  # the image carries no tokens but ends the marked prefix
        assert usages[0]["cache_creation_input_tokens"] == prefix
        assert usages[1]["cache_read_input_tokens"] == prefix


async def test_unknown_model_and_unknown_path() -> None:
    async with running() as (sim, client):
        response = await chat(client, "gpt-nope", messages(20))
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found"
        # Counters stay bounded whatever model names clients send.
        assert sim.state.stats_snapshot()["models"]["-"]["responses"] == {"404": 1}
        assert sim.state.log[-1].model == "gpt-nope"
        missing = await client.get("/v1/nothing")
        assert missing.status_code == 404
        assert missing.headers["x-simulator"] == "prompt-cache-exporter"


# -- listing, landing page, evidence endpoints ------------------------------------------------


async def test_models_listing_is_venice_shaped_and_labelled() -> None:
    async with running() as (_, client):
        listing = (await client.get("/v1/models")).json()
        assert listing["object"] == "list"
        by_id = {m["id"]: m for m in listing["data"]}
        assert set(by_id) == {m.name for m in DEFAULT_MODELS}
        assert all(m["owned_by"] == "simulator" and m["object"] == "model" for m in by_id.values())
        assert by_id["sim-cache-ok"]["model_spec"]["pricing"] == {
            "input": {"usd": 1.0, "diem": 1.0},
            "output": {"usd": 4.0, "diem": 4.0},
            "cache_input": {"usd": 0.1, "diem": 0.1},
        }
        assert "cache_input" not in by_id["sim-no-cache-fields"]["model_spec"]["pricing"]
        assert by_id["sim-cache-write"]["model_spec"]["pricing"]["cache_write"]["usd"] == 3.75
        assert (await client.get("/api/v1/models")).json() == listing
    async with running(fast().with_fault_models()) as (_, client):
        ids = {m["id"] for m in (await client.get("/v1/models")).json()["data"]}
        assert {m.name for m in FAULT_MODELS} <= ids


async def test_landing_page_and_headers_say_simulator() -> None:
    async with running() as (_, client):
        page = await client.get("/")
        assert "SIMULATOR" in page.text
        assert "not a real LLM provider" in page.text
        assert page.headers["x-simulator"] == "prompt-cache-exporter"
        response = await chat(client, "sim-cache-ok", messages(20))
        for header in (
            "x-simulator",
            "x-request-id",
            "x-venice-balance-usd",
            "x-venice-balance-diem",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-remaining-tokens",
        ):
            assert header in response.headers
        assert response.headers["x-ratelimit-remaining-requests"] == "999"


async def test_stats_log_and_reset() -> None:
    async with running() as (_, client):
        msgs = messages(1100)
        await chat(client, "sim-cache-ok", msgs)
        await chat(client, "sim-cache-ok", msgs, stream=True)
        await chat(client, "sim-error", msgs)
        stats = (await client.get("/sim/stats")).json()
        ok = stats["models"]["sim-cache-ok"]
        assert ok["requests"] == 2
        assert ok["responses"] == {"200": 2}
        assert (ok["prompt_tokens"], ok["cached_tokens"], ok["completion_tokens"]) == (
            2200,
            1024,
            10,
        )
        assert stats["totals"]["requests"] == 3
        assert stats["totals"]["responses"] == {"200": 2, "500": 1}
        assert stats["balances"]["usd"] == 100.0

        log = (await client.get("/sim/log", params={"model": "sim-cache-ok"})).json()["entries"]
        assert [(e["seq"], e["stream"], e["cached_tokens"]) for e in log] == [
            (1, False, 0),
            (2, True, 1024),
        ]
        assert log[0]["api"] == "openai"
        assert log[0]["prompt_tokens"] == 1100
        last = (await client.get("/sim/log", params={"limit": "1"})).json()["entries"]
        assert [(e["model"], e["status"]) for e in last] == [("sim-error", 500)]
        assert (await client.get("/sim/log", params={"limit": "x"})).status_code == 400

        assert (await client.post("/sim/reset")).json() == {"reset": True}
        stats = (await client.get("/sim/stats")).json()
        assert stats["models"] == {}
        assert stats["balances"] == {"usd": 100.0, "diem": 10.0}
        assert (await client.get("/sim/log")).json()["entries"] == []
        assert await cached_of(client, "sim-cache-ok", msgs) == 0  # caches cleared too


# -- configuration and command line -----------------------------------------------------------


def test_load_sim_config_overrides_and_adds_models(tmp_path: Path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text(
        "seed = 7\nbalance_usd = 1.5\nwith_fault_models = true\n"
        '[[models]]\nname = "sim-cache-ok"\nttl = 10\n'
        '[[models]]\nname = "my-model"\nmin_cacheable_tokens = 256\ngranularity = 64\n'
        '[[models]]\nname = "sim-fault-slow"\nslow_seconds = 2.5\n'
        '[[models]]\nname = "sim-cache-write"\nprice_cache_read = false\n'
    )
    config = load_sim_config(path)
    assert config.seed == 7
    assert config.balance_usd == 1.5
    ok = config.model("sim-cache-ok")
    assert ok is not None
    assert (ok.ttl, ok.min_cacheable_tokens) == (10, 1024)
    mine = config.model("my-model")
    assert mine is not None
    assert (mine.min_cacheable_tokens, mine.granularity) == (256, 64)
    slow = config.model("sim-fault-slow")
    assert slow is not None
    assert (slow.fault, slow.slow_seconds) == ("slow", 2.5)
    assert config.model("sim-fault-html") is not None
    write = config.model("sim-cache-write")
    assert write is not None
    assert (write.price_cache_read, write.caches) == (None, False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sead = 1\n", "unknown key 'sead'"),
        ('[[models]]\nname = "x"\nttll = 3\n', "models[0]: unknown key 'ttll'"),
        ("[[models]]\nttl = 3\n", "models[0]: name is required"),
        ('[[models]]\nname = "x"\ncache_mode = "sometimes"\n', "cache_mode must be one of"),
        ('[[models]]\nname = "x"\nttl = "3"\n', "ttl must be a positive number"),
        (
            '[[models]]\nname = "x"\ntemplate_tokens = -8\n',
            "template_tokens must be a non-negative integer",
        ),
        ('[[models]]\nname = "x"\npersist_after = 0\n', "persist_after must be a positive integer"),
        ("balance_usd = -1\n", "balance_usd must be a non-negative number"),
        ("seed = [", "not valid TOML"),
        ('api_key_env = "PCE_TEST_SURELY_UNSET"\n', "PCE_TEST_SURELY_UNSET is not set"),
    ],
)
def test_load_sim_config_rejects_bad_input_in_one_line(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "sim.toml"
    path.write_text(text)
    with pytest.raises(SimConfigError) as info:
        load_sim_config(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


def _cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    simulator_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_builds_config_from_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_TEST_KEY", "k1")
    args = _cli_args(
        "--seed",
        "9",
        "--latency-scale",
        "0",
        "--with-fault-models",
        "--api-key-env",
        "SIM_TEST_KEY",
        "--balance-usd",
        "2",
        "--balance-diem",
        "0",
    )
    config = simulator_cli.build_config(args)
    assert (config.seed, config.latency_scale, config.api_key) == (9, 0.0, "k1")
    assert (config.balance_usd, config.balance_diem) == (2.0, 0.0)
    assert config.model("sim-fault-huge-body") is not None
    assert "k1" not in repr(config)
    assert simulator_cli.build_config(_cli_args()).model("sim-fault-html") is None

    monkeypatch.delenv("SIM_TEST_KEY")
    with pytest.raises(SimConfigError, match="SIM_TEST_KEY is not set"):
        simulator_cli.build_config(args)


async def test_cli_run_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert await simulator_cli.run(_cli_args("--listen", "nonsense")) == 2
    assert "--listen must be HOST:PORT" in capsys.readouterr().err

    async with anyio.create_task_group() as tg:
        codes: list[int] = []

        async def serve() -> None:
            codes.append(await simulator_cli.run(_cli_args("--listen", "127.0.0.1:0")))

        tg.start_soon(serve)
        out = ""
        for _ in range(500):
            out += capsys.readouterr().out
            if "listening on" in out:
                break
            await anyio.sleep(0.01)
        assert "SIMULATOR — not a real LLM provider; listening on http://127.0.0.1:" in out
        os.kill(os.getpid(), signal.SIGTERM)
    assert codes == [0]
    assert "simulator stopped" in capsys.readouterr().out


def test_cli_runs_until_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "SIM_TEST_KEY": "k"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exporter.simulator",
            "--port",
            "0",
            "--latency-scale",
            "0",
            "--with-fault-models",
            "--api-key-env",
            "SIM_TEST_KEY",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert "SIMULATOR — not a real LLM provider" in banner
        url = banner.split("listening on ")[1].split()[0]
        response = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "sim-fault-html", "messages": messages(20)},
            headers={"x-api-key": "k"},
            timeout=10,
        )
        assert response.status_code == 502
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_cli_rejects_bad_config_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("nope = 1\n")
    done = subprocess.run(
        [sys.executable, "-m", "exporter.simulator", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().endswith("unknown key 'nope'")
    assert "Traceback" not in done.stderr


def test_model_validation() -> None:
    with pytest.raises(ValueError, match="granularity"):
        SimModel("x", granularity=0)
    with pytest.raises(ValueError, match="fault"):
        SimModel("x", fault="explode")
    with pytest.raises(SimConfigError, match="duplicate"):
        SimConfig(models=(SimModel("a"), SimModel("a")))
