"""The official openai and anthropic SDKs talk to the simulator through the proxy.

What each SDK received is what the upstream sent (bodies byte for byte, the same SSE events
in the same order), what the upstream received is what the SDK sent, and the traffic
counters equal the usage the SDKs saw. Upstream errors reach the SDK unchanged.
"""

from __future__ import annotations

import json
import time
from contextlib import AsyncExitStack
from typing import Any

import anthropic
import httpx
import openai
import pytest

from exporter.simulator.config import SimConfig
from exporter.simulator.models import DEFAULT_MODELS
from tests.conftest import EVERY_4TH
from tests.proxy_rig import ProxyRig, end_to_end, proxy_rig

pytestmark = pytest.mark.anyio

KEY = "sk-proxy-test-key-0001"
SYSTEM = "You are a careful assistant. " * 300  # ~1,500 simulator tokens: cacheable
MODEL = "sim-cache-ok"
PRICES = {MODEL: {"input": 1.0, "output": 4.0, "cache_read": 0.1}}


class Sent:
    """The requests an SDK put on the wire (an httpx event hook)."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> None:
        self.requests.append(request)


def _openai(rig: ProxyRig, sent: Sent) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(trust_env=False, event_hooks={"request": [sent]})
    return openai.AsyncOpenAI(
        base_url=rig.url + "/v1", api_key=KEY, max_retries=0, http_client=http
    )


def _anthropic(rig: ProxyRig) -> anthropic.AsyncAnthropic:
    # This SDK brings its own HTTP client (not httpx); the request it sent is read back
    # from each response.
    return anthropic.AsyncAnthropic(base_url=rig.url, api_key=KEY, max_retries=0)


def _messages(user: str = "Say hi.") -> list[Any]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def _assert_request_forwarded(sent: Any, rig: ProxyRig) -> None:
    seen = rig.recorder.last
    assert seen.method == sent.method
    assert seen.raw_path == sent.url.raw_path.split(b"?")[0]
    assert seen.query == sent.url.query
    assert seen.body == sent.content
    # Every end-to-end header as the SDK sent it (its key included), in order; Host names
    # the upstream, never the proxy the SDK thought it talked to.
    ours = [(k.lower(), v) for k, v in sent.headers.raw if k.lower() != b"host"]
    theirs = [(k, v) for k, v in seen.headers if k != b"host"]
    assert theirs == end_to_end(ours)
    assert seen.header(b"host") == f"127.0.0.1:{rig.upstream.port}".encode()
    assert (b"authorization", f"Bearer {KEY}".encode()) in seen.headers or (
        b"x-api-key",
        KEY.encode(),
    ) in seen.headers


def _assert_response_forwarded(response: Any, rig: ProxyRig, body: bytes) -> None:
    seen = rig.recorder.last
    assert response.status_code == seen.status
    assert body == seen.response_body
    # The upstream's headers, unchanged and in order; only framing (hop-by-hop) differs.
    assert end_to_end(response.headers.raw) == end_to_end(seen.response_headers)


def _sse_data(body: bytes) -> list[Any]:
    events = []
    for block in body.decode().split("\n\n"):
        data = [line[5:].strip() for line in block.splitlines() if line.startswith("data:")]
        if data and data[0] != "[DONE]":
            events.append(json.loads("\n".join(data)))
    return events


async def test_openai_sdk_json_answers_are_byte_identical_and_counted() -> None:
    async with proxy_rig(prices=PRICES) as rig, AsyncExitStack() as stack:
        sent = Sent()
        client = await stack.enter_async_context(_openai(rig, sent))
        usages = []
        for _ in range(3):  # a cold request, then two repeats that hit
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=_messages(), max_tokens=5
            )
            body = await raw.http_response.aread()
            _assert_request_forwarded(sent.requests[-1], rig)
            _assert_response_forwarded(raw.http_response, rig, body)
            completion = raw.parse()
            assert completion.choices[0].message.content
            usages.append(completion.usage)
        await rig.idle()

    prompt = sum(u.prompt_tokens for u in usages)
    cached = sum(u.prompt_tokens_details.cached_tokens for u in usages)
    completion_tokens = sum(u.completion_tokens for u in usages)
    assert cached > 0
    labels = {"provider": "sim", "model": MODEL}
    assert rig.sample("llmcache_traffic_prompt_tokens_total", **labels) == prompt
    assert rig.sample("llmcache_traffic_cached_tokens_total", **labels) == cached
    assert rig.sample("llmcache_traffic_completion_tokens_total", **labels) == completion_tokens
    assert rig.sample("llmcache_traffic_requests_total", outcome="success", **labels) == 3
    assert rig.sample("llmcache_traffic_cache_requests_total", cache="miss", **labels) == 1
    assert rig.sample("llmcache_traffic_cache_requests_total", cache="hit", **labels) == 2
    # The proxy's price table: uncached × 1 + cached × 0.1 + completion × 4, per million.
    spend = ((prompt - cached) * 1.0 + cached * 0.1 + completion_tokens * 4.0) / 1e6
    assert rig.sample("llmcache_traffic_spend_usd_total", **labels) == pytest.approx(spend)
    savings = cached * (1.0 - 0.1) / 1e6
    assert rig.sample("llmcache_traffic_savings_usd_total", **labels) == pytest.approx(savings)
    assert rig.sample("llmcache_traffic_recording_errors_total", provider="sim") == 0
    assert rig.sample("llmcache_traffic_in_flight_requests", provider="sim") == 0


async def test_openai_sdk_stream_gets_the_upstream_events_in_order_as_they_come() -> None:
    # 20 ms between tokens: events must reach the SDK while the upstream still streams.
    config = SimConfig(latency_scale=1.0)
    async with proxy_rig(config) as rig, AsyncExitStack() as stack:
        sent = Sent()
        client = await stack.enter_async_context(_openai(rig, sent))
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=_messages(),
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = []
        first_content_at = None
        async for chunk in stream:
            if first_content_at is None and chunk.choices and chunk.choices[0].delta.content:
                first_content_at = time.monotonic()
            chunks.append(chunk.to_dict())
        await rig.idle()
        _assert_request_forwarded(sent.requests[-1], rig)
        seen = rig.recorder.last

    assert chunks == _sse_data(seen.response_body)
    assert len(chunks) >= 7  # role, 5 words, finish, usage
    assert first_content_at is not None
    assert seen.finished_at is not None
    assert first_content_at < seen.finished_at  # not buffered until the end
    usage = chunks[-1]["usage"]
    labels = {"provider": "sim", "model": MODEL}
    assert rig.sample("llmcache_traffic_prompt_tokens_total", **labels) == usage["prompt_tokens"]
    assert rig.sample("llmcache_traffic_completion_tokens_total", **labels) == 5
    assert rig.sample("llmcache_traffic_requests_total", outcome="success", **labels) == 1
    assert (
        rig.sample(
            "llmcache_traffic_time_to_first_token_seconds_count", provider="sim", cache="miss"
        )
        == 1
    )


async def test_a_stream_without_include_usage_is_forwarded_as_is_and_counted_no_usage() -> None:
    async with proxy_rig() as rig, AsyncExitStack() as stack:
        sent = Sent()
        client = await stack.enter_async_context(_openai(rig, sent))
        stream = await client.chat.completions.create(
            model=MODEL, messages=_messages(), max_tokens=5, stream=True
        )
        chunks = [chunk.to_dict() async for chunk in stream]
        await rig.idle()
        seen = rig.recorder.last

    # The proxy did not add stream_options: the request and the events are the client's.
    assert b"stream_options" not in seen.body
    assert chunks == _sse_data(seen.response_body)
    assert all("usage" not in c or c["usage"] is None for c in chunks)
    labels = {"provider": "sim", "model": MODEL}
    assert rig.sample("llmcache_traffic_requests_total", outcome="no_usage", **labels) == 1
    assert rig.sample("llmcache_traffic_prompt_tokens_total", **labels) == 0
    assert (
        rig.sample(
            "llmcache_traffic_request_duration_seconds_count", provider="sim", cache="unreported"
        )
        == 1
    )


def _anthropic_request() -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 5,
        "system": [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "Say hi."}],
    }


async def test_anthropic_sdk_json_and_stream_through_the_proxy() -> None:
    async with proxy_rig(provider_type="anthropic") as rig, AsyncExitStack() as stack:
        client = await stack.enter_async_context(_anthropic(rig))
        raw = await client.messages.with_raw_response.create(**_anthropic_request())
        body = await raw.http_response.aread()
        _assert_request_forwarded(raw.http_response.request, rig)
        _assert_response_forwarded(raw.http_response, rig, body)
        first = (await raw.parse()).usage

        stream = await client.messages.create(**_anthropic_request(), stream=True)
        events = [event.to_dict() async for event in stream]
        await rig.idle()
        _assert_request_forwarded(stream.response.request, rig)
        seen = rig.recorder.last

    # The SDK yields every event but the keep-alive pings.
    assert events == [e for e in _sse_data(seen.response_body) if e["type"] != "ping"]
    assert events[0]["type"] == "message_start"
    start = events[0]["message"]["usage"]
    delta = next(e for e in events if e["type"] == "message_delta")["usage"]
    assert start["cache_read_input_tokens"] > 0  # the second request read the system prompt

    # Anthropic's input_tokens excludes cache reads and writes; the counters hold the whole.
    def whole(u: Any) -> int:
        return int(
            u["input_tokens"] + u["cache_read_input_tokens"] + u["cache_creation_input_tokens"]
        )

    expected_prompt = whole(first.to_dict()) + whole(start)
    labels = {"provider": "sim", "model": MODEL}
    assert rig.sample("llmcache_traffic_prompt_tokens_total", **labels) == expected_prompt
    assert rig.sample("llmcache_traffic_cached_tokens_total", **labels) == (
        first.cache_read_input_tokens + start["cache_read_input_tokens"]
    )
    assert rig.sample("llmcache_traffic_cache_write_tokens_total", **labels) == (
        first.cache_creation_input_tokens + start["cache_creation_input_tokens"]
    )
    assert rig.sample("llmcache_traffic_completion_tokens_total", **labels) == (
        first.output_tokens + delta["output_tokens"]
    )
    assert rig.sample("llmcache_traffic_requests_total", outcome="success", **labels) == 2
    assert rig.sample("llmcache_traffic_cache_requests_total", cache="hit", **labels) == 1


@pytest.mark.parametrize(
    ("model", "status", "error"),
    [
        ("no-such-model", 404, openai.NotFoundError),
        ("sim-error", 500, openai.InternalServerError),
        ("sim-every-4th", 429, openai.RateLimitError),
    ],
)
async def test_upstream_errors_reach_the_sdk_unchanged(
    model: str, status: int, error: type[openai.APIStatusError]
) -> None:
    models = (*DEFAULT_MODELS, EVERY_4TH)
    async with (
        proxy_rig(SimConfig(latency_scale=0.0, models=models)) as rig,
        AsyncExitStack() as stack,
    ):
        client = await stack.enter_async_context(_openai(rig, Sent()))
        with pytest.raises(error) as caught:
            await client.chat.completions.create(model=model, messages=_messages())
        await rig.idle()
        seen = rig.recorder.last

    response = caught.value.response
    assert response.status_code == status == seen.status
    assert response.content == seen.response_body
    assert end_to_end(response.headers.raw) == end_to_end(seen.response_headers)
    if status == 429:
        assert response.headers["retry-after"] == "1"
    # Counted under the model the request named (an unknown one too: it is a plausible label).
    assert (
        rig.sample(
            "llmcache_traffic_requests_total", provider="sim", model=model, outcome="upstream_error"
        )
        == 1
    )


async def test_an_html_error_page_reaches_the_client_unchanged() -> None:
    async with proxy_rig(SimConfig(latency_scale=0.0).with_fault_models()) as rig:
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.post(
                rig.url + "/v1/chat/completions",
                json={"model": "sim-fault-html", "messages": _messages()},
            )
        await rig.idle()
        seen = rig.recorder.last
    assert response.status_code == 502 == seen.status
    assert response.content == seen.response_body
    assert response.headers["content-type"].startswith("text/html")
    assert "x-llmcache-proxy-error" not in response.headers  # the upstream's page, not ours
