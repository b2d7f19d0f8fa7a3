"""Reading usage from copies of answers: framing, encodings, caps, requests, the hit rule, the
traffic state's limits, and ``serve_proxies`` as the daemon uses it."""

from __future__ import annotations

import json
import zlib
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from exporter.config import load_config
from exporter.providers import adapter_class
from exporter.proxy import TrafficState, serve_proxies
from exporter.proxy.hits import TRAFFIC_BASELINE, traffic_hit
from exporter.proxy.traffic import Observation
from exporter.proxy.usage import (
    MAX_EVENT_BYTES,
    ChatRequest,
    ResponseTap,
    is_chat,
    read_chat_request,
)
from exporter.results import Completion, ModelPrice, Usage
from tests.proxy_rig import proxy_rig

USAGE = {
    "prompt_tokens": 2000,
    "completion_tokens": 5,
    "prompt_tokens_details": {"cached_tokens": 1920},
}
STREAMED = ChatRequest(None, "m", True, True)


def _tap(
    kind: str = "openai", content_type: str = "text/event-stream", encoding: str = ""
) -> ResponseTap:
    adapter = adapter_class(kind)(base_url="http://127.0.0.1:1", api_key=None)
    return ResponseTap(
        adapter, content_type=content_type, content_encoding=encoding, max_bytes=1 << 20
    )


def _events(*chunks: dict[str, Any]) -> bytes:
    return (
        b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    )


def test_events_split_anywhere_are_framed_whole() -> None:
    body = _events(
        {"choices": [{"delta": {"content": "Hi"}}]},
        {"choices": [], "usage": USAGE},
    ).replace(b"\n", b"\r\n")
    tap = _tap()
    outputs = [tap.feed(body[i : i + 7]) for i in range(0, len(body), 7)]
    assert any(outputs)  # the chunk that completed the content event said so
    result = tap.finish(STREAMED)
    assert result.outcome == "success"
    assert result.completion is not None
    assert result.completion.usage == Usage(2000, 1920, None, 5)


def test_a_last_event_without_its_blank_line_still_counts() -> None:
    tap = _tap()
    tap.feed(b'data: {"choices": [], "usage": ' + json.dumps(USAGE).encode() + b"}")
    assert tap.finish(STREAMED).outcome == "success"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "deflate-raw"])
def test_compressed_json_is_decoded_for_the_tap(encoding: str) -> None:
    raw = json.dumps({"choices": [], "usage": USAGE}).encode()
    if encoding == "gzip":
        packed = zlib.compress(raw, wbits=16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        packed = zlib.compress(raw)
    else:
        packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        packed = packer.compress(raw) + packer.flush()
    tap = _tap(content_type="application/json", encoding=encoding.replace("-raw", ""))
    for i in range(0, len(packed), 5):
        tap.feed(packed[i : i + 5])
    assert tap.finish(ChatRequest(None, "m", False, False)).outcome == "success"


def test_unknown_encodings_and_oversized_events_end_the_tap_not_the_answer() -> None:
    brotli = _tap(content_type="application/json", encoding="br")
    assert brotli.feed(b"\x8b\x03") is False
    assert brotli.finish(STREAMED).outcome == "bad_response"
    huge = _tap()
    huge.feed(b"data: " + b"x" * (MAX_EVENT_BYTES + 1))
    assert huge.finish(STREAMED).outcome == "bad_response"
    bomb = _tap(content_type="application/json", encoding="gzip")
    bomb.feed(zlib.compress(b"0" * (40 << 20), wbits=16 + zlib.MAX_WBITS))  # 40 MiB of zeros
    assert bomb.finish(STREAMED).outcome == "bad_response"


def test_anthropic_streams_and_in_band_errors() -> None:
    tap = _tap("anthropic")
    start = {
        "type": "message_start",
        "message": {
            "id": "m1",
            "usage": {
                "input_tokens": 10,
                "output_tokens": 1,
                "cache_read_input_tokens": 2000,
                "cache_creation_input_tokens": 0,
            },
        },
    }
    tap.feed(b"event: message_start\n" + _events(start)[: -len(b"data: [DONE]\n\n")])
    tap.feed(
        b'event: message_delta\ndata: {"type": "message_delta", "usage": {"output_tokens": 7}}\n\n'
    )
    result = tap.finish(STREAMED)
    assert result.completion is not None
    assert result.completion.usage == Usage(2010, 2000, 0, 7)
    error = _tap("anthropic")
    error.feed(
        b'event: error\ndata: {"type": "error", "error": '
        b'{"type": "overloaded_error", "message": "busy"}}\n\n'
    )
    assert error.finish(STREAMED).outcome == "upstream_error"


def test_requests_are_read_for_their_flags_only() -> None:
    body = json.dumps({"model": "m", "stream": True, "stream_options": {"include_usage": True}})
    assert read_chat_request("openai", body.encode()).usage_requested
    assert not read_chat_request("openai", b'{"model": "m", "stream": true}').usage_requested
    assert read_chat_request("venice", b'{"model": "m", "stream": true}').usage_requested
    assert read_chat_request("openai", b"not json") == ChatRequest(None, None, False, False)
    assert read_chat_request("openai", b"[1]").model is None
    assert is_chat("anthropic", "POST", "/v1/messages")
    assert not is_chat("anthropic", "POST", "/v1/messages/count_tokens")
    assert is_chat("venice", "POST", "/api/v1/chat/completions/")
    assert not is_chat("openai", "GET", "/v1/chat/completions")


def test_the_hit_rule_for_traffic() -> None:
    assert traffic_hit(Usage(2000, None, None, 1)) is None
    assert traffic_hit(Usage(2000, TRAFFIC_BASELINE, None, 1)) is False  # the template only
    # Beyond the 64-token baseline, at least half of the remaining 1,936: 968 tokens.
    assert traffic_hit(Usage(2000, 64 + 968, None, 1)) is True
    assert traffic_hit(Usage(2000, 64 + 967, None, 1)) is False
    assert traffic_hit(Usage(100, 90, None, 1)) is True


def test_state_prices_model_labels_and_shared_providers() -> None:
    state = TrafficState()
    price = ModelPrice(2.0, 8.0, 0.5)
    state.configure(
        "p", proxy="a", api_type="openai", max_models=5, prefix_memory=8, price_for=lambda m: None
    )
    state.configure(
        "p", proxy="b", api_type="openai", max_models=1, prefix_memory=8, price_for=lambda m: price
    )
    usage = Usage(1000, 800, None, 10)
    state.record(Observation("p", "gpt-x", "success", Completion(usage, cost={"usd": 9.0})))
    state.record(Observation("p", "bad label with spaces", "success", Completion(usage)))
    state.record(Observation("p", "gpt-y", "no_usage"))
    (snap,) = state.snapshot()
    assert snap.proxies == {"a": "openai", "b": "openai"}
    assert set(snap.models) == {"gpt-x", "other"}  # the tighter cap of the two proxies: 1
    x = snap.models["gpt-x"]
    assert x.spend_usd == pytest.approx((200 * 2.0 + 800 * 0.5 + 10 * 8.0) / 1e6)  # price wins
    assert x.savings_usd == pytest.approx(800 * 1.5 / 1e6)
    assert snap.models["other"].requests["no_usage"] == 1
    assert snap.duration["hit"].counts == [0] * len(snap.duration["hit"].counts)


def test_without_a_price_the_provider_reported_cost_is_the_spend() -> None:
    state = TrafficState()
    state.configure(
        "p", proxy="a", api_type="venice", max_models=5, prefix_memory=8, price_for=lambda m: None
    )
    state.record(
        Observation("p", "m", "success", Completion(Usage(10, 0, None, 1), cost={"usd": 0.25}))
    )
    (snap,) = state.snapshot()
    assert snap.models["m"].spend_usd == 0.25
    assert snap.models["m"].savings_usd == 0.0


@pytest.mark.anyio
async def test_serve_proxies_registers_the_collector_and_serves_every_listener(
    tmp_path: Any,
) -> None:
    async with proxy_rig() as rig:  # only for its upstream
        path = tmp_path / "c.toml"
        path.write_text(
            f'[[providers]]\nname = "sim"\ntype = "openai"\nbase_url = "{rig.upstream.url}/v1"\n'
            'api_key_env = ""\n'
            + "".join(
                f'[[proxies]]\nname = "{name}"\ntype = "openai"\nlisten = "127.0.0.1:0"\n'
                f'provider = "sim"\nupstream = "{rig.upstream.url}"\n'
                for name in ("a", "b")
            )
        )
        config = load_config(path, env={})
        registry = CollectorRegistry(auto_describe=False)
        async with (
            serve_proxies(config, registry) as handles,
            httpx.AsyncClient(trust_env=False) as client,
        ):
            assert [h.name for h in handles] == ["a", "b"]
            for handle in handles:
                response = await client.get(handle.url + "/v1/models")
                assert response.status_code == 200
        # Both proxies share provider "sim": one set of series, both proxies listed.
        assert (
            registry.get_sample_value(
                "llmcache_traffic_passthrough_requests_total", {"provider": "sim"}
            )
            == 2
        )
        for name in ("a", "b"):
            labels = {"proxy": name, "provider": "sim", "type": "openai"}
            assert registry.get_sample_value("llmcache_traffic_proxy_info", labels) == 1
        without = load_config(path, env={"PCE_PROXIES": "[]"})
        empty = CollectorRegistry(auto_describe=False)
        async with serve_proxies(without, empty) as none:
            assert none == []
        assert empty.get_sample_value("llmcache_traffic_proxy_info", labels) is None
