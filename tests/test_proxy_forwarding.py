"""The proxy as an HTTP intermediary: what it forwards, what it refuses, and never being in
the way (limits, timeouts, slow peers, broken answers, recording failures, shutdown).

Real sockets on 127.0.0.1 throughout: the simulator (behind a recorder) as the upstream,
httpx or a raw socket as the client.
"""

from __future__ import annotations

import gzip
import json
import time
from typing import Any

import anyio
import httpx
import pytest
from starlette.middleware.gzip import GZipMiddleware

from exporter.asgi import serve_asgi
from exporter.config.proxies import ProxyConfig
from exporter.proxy import TrafficState, serve_proxy
from exporter.proxy.traffic import Observation
from exporter.simulator.config import SimConfig
from exporter.simulator.models import DEFAULT_MODELS, SimModel
from tests.proxy_rig import end_to_end, proxy_rig

pytestmark = pytest.mark.anyio

SYSTEM = "Answer briefly and precisely. " * 300
CHAT = {
    "model": "sim-cache-ok",
    "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}],
}
STREAM = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
FAULTS = SimConfig(latency_scale=0.0).with_fault_models()


def _client(**options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=30, **options)


def _count(rig: Any, outcome: str, model: str = "sim-cache-ok") -> float | None:
    return rig.sample(
        "llmcache_traffic_requests_total", provider="sim", model=model, outcome=outcome
    )


async def test_method_path_query_body_and_end_to_end_headers_go_upstream_unchanged() -> None:
    body = json.dumps(CHAT, indent=1).encode()  # formatting kept, not re-serialised
    headers = [
        ("Authorization", "Bearer sk-abc"),
        ("X-Custom", "one"),
        ("X-Custom", "two"),
        ("Content-Type", "application/json"),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "dropped: Connection lists it"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Proxy-Authorization", "Basic for-the-proxy-not-the-upstream"),
    ]
    async with proxy_rig() as rig, _client() as client:
        response = await client.post(
            rig.url + "/v1/chat/completions?api-version=2024-10-01&x=%2Fa%20b",
            content=body,
            headers=headers,
        )
        await rig.idle()
        seen = rig.recorder.last
    assert response.status_code == 200
    assert seen.method == "POST"
    assert seen.raw_path == b"/v1/chat/completions"
    assert seen.query == b"api-version=2024-10-01&x=%2Fa%20b"
    assert seen.body == body
    names = [k for k, _ in seen.headers]
    for dropped in (b"x-hop", b"keep-alive", b"te", b"proxy-authorization", b"connection"):
        assert dropped not in names
    assert [v for k, v in seen.headers if k == b"x-custom"] == [b"one", b"two"]
    assert (b"authorization", b"Bearer sk-abc") in seen.headers
    assert seen.header(b"host") == f"127.0.0.1:{rig.upstream.port}".encode()
    assert seen.header(b"content-length") == str(len(body)).encode()


async def test_the_upstream_path_prefix_is_kept_and_other_paths_pass_through() -> None:
    async with proxy_rig() as rig, _client() as client:
        # The recorder sits at the upstream root; a Venice-style prefix would be joined too.
        models = await client.get(rig.url + "/v1/models")
        await rig.idle()
        assert models.status_code == 200
        assert models.content == rig.recorder.last.response_body
        assert rig.recorder.last.raw_path == b"/v1/models"
    assert rig.sample("llmcache_traffic_passthrough_requests_total", provider="sim") == 1


async def test_a_prefixed_upstream_joins_its_path_before_the_request_path() -> None:
    upstream_seen: list[bytes] = []

    async def upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            upstream_seen.append(scope["raw_path"])
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    async with serve_asgi(upstream, host="127.0.0.1", port=0) as address:
        config = ProxyConfig(
            name="p", type="venice", listen="127.0.0.1:0", upstream=address.url + "/api/v1"
        )
        async with (
            serve_proxy(config, state=TrafficState(), grace=1, trust_env=False) as proxy,
            _client() as client,
        ):
            response = await client.get(proxy.url + "/models?type=text")
    assert response.status_code == 204
    assert upstream_seen == [b"/api/v1/models"]


async def _raw_exchange(port: int, request: bytes) -> bytes:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    answer = b""
    async with stream:
        await stream.send(request)
        with anyio.fail_after(10):
            try:
                while True:
                    answer += await stream.receive()
            except anyio.EndOfStream:
                pass
    return answer


async def test_a_target_naming_another_host_is_refused() -> None:
    async with proxy_rig() as rig:
        answer = await _raw_exchange(
            rig.proxy.address.port,
            b"GET http://evil.example/steal HTTP/1.1\r\nHost: evil.example\r\n"
            b"Connection: close\r\n\r\n",
        )
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"x-llmcache-proxy-error: bad_target" in answer
    assert rig.recorder.seen == []


async def test_a_header_the_upstream_client_cannot_carry_unchanged_is_refused() -> None:
    async with proxy_rig() as rig:
        answer = await _raw_exchange(
            rig.proxy.address.port,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Latin: caf\xe9\r\n"
            b"Content-Length: 2\r\nConnection: close\r\n\r\n{}",
        )
        await rig.idle()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"x-llmcache-proxy-error: bad_request" in answer
    assert rig.recorder.seen == []
    assert _count(rig, "proxy_error", "other") == 1


async def test_the_environment_http_proxy_carries_the_upstream_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[bytes, bytes | None]] = []

    async def forward_proxy(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = next((v for k, v in scope["headers"] if k == b"host"), None)
            seen.append((scope["raw_path"], host))
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    async with serve_asgi(forward_proxy, host="127.0.0.1", port=0) as address:
        for name in ("NO_PROXY", "no_proxy", "http_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", address.url)
        config = ProxyConfig(
            name="p", type="openai", listen="127.0.0.1:0", upstream="http://upstream.invalid/v1"
        )
        async with (
            serve_proxy(config, state=TrafficState(), grace=1) as proxy,
            _client() as client,
        ):
            response = await client.get(proxy.url + "/models")
    assert response.status_code == 204
    # Absolute-form, as HTTP proxies are asked; the upstream's name resolved by the proxy.
    assert seen == [(b"http://upstream.invalid/v1/models", b"upstream.invalid")]


async def test_a_stream_is_forwarded_byte_for_byte() -> None:
    async with proxy_rig(SimConfig(latency_scale=0.2)) as rig, _client() as client:
        async with client.stream("POST", rig.url + "/v1/chat/completions", json=STREAM) as r:
            got = b"".join([chunk async for chunk in r.aiter_raw()])
            headers = r.headers.raw
        await rig.idle()
        seen = rig.recorder.last
    assert got == seen.response_body
    assert end_to_end(headers) == end_to_end(seen.response_headers)
    assert got.endswith(b"data: [DONE]\n\n")


async def test_compressed_answers_pass_compressed_and_their_usage_is_read() -> None:
    def gzipped(app: Any) -> Any:
        return GZipMiddleware(app, minimum_size=10)

    async with proxy_rig(wrap=gzipped) as rig, _client() as client:
        async with client.stream(
            "POST",
            rig.url + "/v1/chat/completions",
            json=CHAT,
            headers={"Accept-Encoding": "gzip"},
        ) as response:
            wire = b"".join([chunk async for chunk in response.aiter_raw()])
            encoding = response.headers["content-encoding"]
        await rig.idle()
    assert encoding == "gzip"
    usage = json.loads(gzip.decompress(wire))["usage"]
    assert (
        rig.sample("llmcache_traffic_prompt_tokens_total", provider="sim", model="sim-cache-ok")
        == usage["prompt_tokens"]
    )
    assert _count(rig, "success") == 1


@pytest.mark.parametrize(
    ("model", "stream", "outcome"),
    [
        ("sim-fault-bad-json", False, "bad_response"),
        ("sim-fault-bad-json", True, "bad_response"),
        ("sim-fault-missing-usage", False, "no_usage"),
        ("sim-fault-absurd-tokens", False, "bad_response"),
        ("sim-fault-negative-tokens", True, "bad_response"),
        ("sim-fault-cached-exceeds-prompt", False, "bad_response"),
        ("sim-fault-truncated-stream", True, "bad_response"),
        ("sim-fault-stream-error", True, "upstream_error"),
        ("sim-fault-stream-error", False, "upstream_error"),
    ],
)
async def test_bad_answers_reach_the_client_unchanged_and_are_counted(
    model: str, stream: bool, outcome: str
) -> None:
    body = {**(STREAM if stream else CHAT), "model": model}
    async with proxy_rig(FAULTS) as rig, _client() as client:
        async with client.stream("POST", rig.url + "/v1/chat/completions", json=body) as r:
            got = b"".join([chunk async for chunk in r.aiter_raw()])
        await rig.idle()
        assert got == rig.recorder.last.response_body
    assert _count(rig, outcome, model) == 1
    assert rig.sample("llmcache_traffic_recording_errors_total", provider="sim") == 0


async def test_a_request_over_the_limit_gets_413_and_never_reaches_the_upstream() -> None:
    async with proxy_rig(max_request_bytes=4096) as rig, _client() as client:
        response = await client.post(rig.url + "/v1/chat/completions", json=CHAT)
        await rig.idle()
    assert response.status_code == 413
    assert response.headers["x-llmcache-proxy-error"] == "request_too_large"
    assert response.json()["error"]["type"] == "proxy_error"
    assert rig.recorder.seen == []
    assert _count(rig, "proxy_error", "other") == 1


async def test_an_answer_over_the_limit_is_cut_so_the_client_sees_it_fail() -> None:
    async with proxy_rig(FAULTS, max_response_bytes=256 * 1024) as rig, _client() as client:
        body = {**CHAT, "model": "sim-fault-huge-body"}
        async with client.stream("POST", rig.url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                await r.aread()
        await rig.idle()
    assert _count(rig, "proxy_error", "sim-fault-huge-body") == 1


async def test_an_unreachable_upstream_gives_502_and_a_silent_one_504() -> None:
    dead = ProxyConfig(name="d", type="openai", listen="127.0.0.1:0", upstream="http://127.0.0.1:9")
    state = TrafficState()
    async with serve_proxy(dead, state=state, grace=1, trust_env=False) as proxy, _client() as c:
        response = await c.post(proxy.url + "/v1/chat/completions", json=CHAT)
    assert response.status_code == 502
    assert response.headers["x-llmcache-proxy-error"] == "upstream_unreachable"
    assert "127.0.0.1:9" not in response.text  # no upstream details in the answer

    async with proxy_rig(FAULTS, read_timeout="300ms") as rig, _client() as client:
        started = time.monotonic()
        response = await client.post(
            rig.url + "/v1/chat/completions", json={**CHAT, "model": "sim-fault-slow"}
        )
        assert time.monotonic() - started < 10
        await rig.idle()
    assert response.status_code == 504
    assert response.headers["x-llmcache-proxy-error"] == "upstream_timeout"
    assert _count(rig, "proxy_error", "sim-fault-slow") == 1


async def test_a_slow_upstream_and_a_slow_client_do_not_hold_up_anyone_else() -> None:
    async with (
        proxy_rig(FAULTS) as rig,
        _client() as client,
        _client() as other,
        anyio.create_task_group() as tg,
    ):
        # One request hangs upstream (45 s), one client never reads its 50 MiB answer.
        slow = {**CHAT, "model": "sim-fault-slow"}
        tg.start_soon(lambda: client.post(rig.url + "/v1/chat/completions", json=slow))
        huge = {**CHAT, "model": "sim-fault-huge-body"}
        async with client.stream("POST", rig.url + "/v1/chat/completions", json=huge) as r:
            assert r.status_code == 200  # headers in; the body is left unread
            with anyio.fail_after(15):
                for _ in range(10):
                    fast = await other.post(rig.url + "/v1/chat/completions", json=CHAT)
                    assert fast.status_code == 200
            tg.cancel_scope.cancel()
    assert _count(rig, "success") == 10


async def test_past_max_concurrent_the_proxy_answers_503_at_once() -> None:
    async with (
        proxy_rig(FAULTS, max_concurrent=1) as rig,
        _client() as c1,
        _client() as c2,
        anyio.create_task_group() as tg,
    ):
        slow = {**CHAT, "model": "sim-fault-slow"}
        tg.start_soon(lambda: c1.post(rig.url + "/v1/chat/completions", json=slow))
        with anyio.fail_after(10):
            while not rig.recorder.seen:  # noqa: ASYNC110 - the upstream has the slow one
                await anyio.sleep(0.01)
        busy = await c2.post(rig.url + "/v1/chat/completions", json=CHAT)
        tg.cancel_scope.cancel()
    assert busy.status_code == 503
    assert busy.headers["x-llmcache-proxy-error"] == "proxy_busy"
    assert busy.headers["retry-after"] == "1"
    assert _count(rig, "proxy_error", "other") == 1


async def test_a_client_leaving_mid_stream_is_counted_and_frees_its_slot() -> None:
    slow_tokens = tuple(
        m.replace(output_tokens=50, output_token_seconds=0.05) if m.name == "sim-cache-ok" else m
        for m in DEFAULT_MODELS
    )
    async with proxy_rig(SimConfig(models=slow_tokens, latency_scale=1.0)) as rig:
        async with (
            _client() as client,
            client.stream("POST", rig.url + "/v1/chat/completions", json=STREAM) as r,
        ):
            async for chunk in r.aiter_raw():
                if b'"content":"Simulated"' in chunk:
                    break  # leave after the first token
        await rig.idle()
    assert _count(rig, "client_closed") == 1
    assert rig.sample("llmcache_traffic_in_flight_requests", provider="sim") == 0


async def test_closing_waits_for_streams_in_flight_up_to_the_grace() -> None:
    def slow(tokens: int) -> tuple[SimModel, ...]:
        return tuple(
            m.replace(output_tokens=tokens, output_token_seconds=0.1)
            if m.name == "sim-cache-ok"
            else m
            for m in DEFAULT_MODELS
        )

    async def stream_while_closing(tokens: int, grace: float) -> tuple[bytes, bool]:
        got = b""
        broken = False
        config = SimConfig(models=slow(tokens), latency_scale=1.0)
        async with anyio.create_task_group() as tg, proxy_rig(config, grace=grace) as rig:
            opened = anyio.Event()

            async def read() -> None:
                nonlocal got, broken
                async with _client() as client:
                    url = rig.url + "/v1/chat/completions"
                    try:
                        async with client.stream("POST", url, json=STREAM) as response:
                            opened.set()
                            async for chunk in response.aiter_raw():
                                got += chunk
                    except httpx.HTTPError:
                        broken = True

            tg.start_soon(read)
            await opened.wait()
            await anyio.sleep(0.3)
            # Leaving proxy_rig closed the proxy (it waited up to the grace), then the upstream.
        return got, broken

    # 10 tokens × 0.1 s fit in a 3 s grace: the stream ends whole.
    got, broken = await stream_while_closing(10, 3.0)
    assert not broken
    assert got.endswith(b"data: [DONE]\n\n")
    # 100 tokens × 0.1 s do not fit in 1 s: the stream is cut, visibly.
    got, broken = await stream_while_closing(100, 1.0)
    assert broken or not got.endswith(b"data: [DONE]\n\n")


async def test_traffic_flows_when_recording_fails() -> None:
    class Broken(TrafficState):
        def record(self, obs: Observation) -> None:
            raise RuntimeError("simulated recording failure")

    state = Broken()
    async with proxy_rig(state=state) as rig, _client() as client:
        for body in (CHAT, STREAM):
            response = await client.post(rig.url + "/v1/chat/completions", json=body)
            assert response.status_code == 200
            assert response.content == rig.recorder.last.response_body
        await rig.idle()
    assert rig.sample("llmcache_traffic_recording_errors_total", provider="sim") == 2


async def test_models_past_the_cap_fold_into_other() -> None:
    async with proxy_rig(max_models=2) as rig, _client() as client:
        for model in ("sim-cache-ok", "sim-cache-write", "sim-cache-broken", "sim-cache-flaky"):
            await client.post(rig.url + "/v1/chat/completions", json={**CHAT, "model": model})
        await rig.idle()
    assert _count(rig, "success", "sim-cache-ok") == 1
    assert _count(rig, "success", "sim-cache-write") == 1
    assert _count(rig, "success", "other") == 2
    assert _count(rig, "success", "sim-cache-broken") is None
