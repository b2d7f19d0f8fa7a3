"""Issue 8's hostile upstreams over real HTTP on 127.0.0.1: decompression bombs, a key echoed
in headers and bodies, a models endpoint dripping bytes, made-up rate-limit headers.

Memory and timing figures are measured by benchmarks/hardening; these tests check outcomes.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

import httpx
import pytest

from exporter.clock import SystemClock
from exporter.providers.base import RATELIMIT_RESOURCES, Prompt
from exporter.providers.openai import OpenAIAdapter
from exporter.results import ErrorType
from exporter.transport import RetryPolicy, Transport, TransportError
from tests.hostile_upstream import Reply, gzip_bomb, hostile_upstream

pytestmark = pytest.mark.anyio

KEY = "sk-MARKER-7f3a9c1e5b2d4f6a8c0e2b4d6f8a0c2e"
CAP = 1 << 20  # 1 MiB: the bomb inflates to 64 times that
BOMB = gzip_bomb(64 << 20)
USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 2,
    "prompt_tokens_details": {"cached_tokens": 0},
}
COMPLETION = {"id": "c1", "choices": [{"message": {"content": "ok"}}], "usage": USAGE}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def adapter(url: str) -> OpenAIAdapter:
    return OpenAIAdapter(base_url=url, api_key=KEY, stream=True)


async def complete(url: str, *, stream: bool, deadline: float = 5.0) -> Any:
    policy = RetryPolicy(attempts=1, timeout=deadline, max_body_bytes=CAP)
    async with httpx.AsyncClient() as client:
        transport = Transport(client, policy=policy, clock=SystemClock())
        a = adapter(url)
        request = a.chat_request("m", Prompt("run-1 sys", "hi"), stream=stream)
        return await transport.complete(a, request, stream=stream)


def sse(*events: dict[str, Any]) -> bytes:
    return (
        b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    )


@pytest.mark.parametrize(
    ("path", "headers", "body"),
    [
        ("json", [("Content-Type", "application/json"), ("Content-Encoding", "gzip, gzip")], BOMB),
        ("sse", [("Content-Type", "text/event-stream"), ("Content-Encoding", "gzip, gzip")], BOMB),
        ("json-single", [("Content-Type", "application/json"), ("Content-Encoding", "gzip")],
         gzip_bomb(64 << 20, layers=1)),
        ("sse-single", [("Content-Type", "text/event-stream"), ("Content-Encoding", "gzip")],
         gzip_bomb(64 << 20, layers=1)),
        ("unknown", [("Content-Type", "application/json"), ("Content-Encoding", "br")], b"x"),
    ],
)  # fmt: skip
async def test_decompression_bombs_are_refused(path: str, headers: list[tuple[str, str]],
                                               body: bytes) -> None:  # fmt: skip
    async with hostile_upstream(lambda *_: Reply(200, headers, body)) as up:
        exchange = await complete(up.url, stream=path.startswith("sse"))
    assert exchange.error_type is ErrorType.BAD_RESPONSE
    assert (
        "stacked content encodings" in exchange.error
        or "cap (inflated)" in exchange.error
        or "unsupported content encoding" in exchange.error
    ), exchange.error


async def test_bomb_in_an_error_body_and_a_models_listing() -> None:
    def script(method: str, path: str, headers: dict[str, str]) -> Reply:
        status = 500 if method == "POST" else 200
        headers = [("Content-Type", "application/json"), ("Content-Encoding", "gzip, gzip")]
        return Reply(status, headers, BOMB)

    async with hostile_upstream(script) as up:
        exchange = await complete(up.url, stream=False)
        async with httpx.AsyncClient() as client:
            transport = Transport(client, policy=RetryPolicy(attempts=1, max_body_bytes=CAP),
                                  clock=SystemClock())  # fmt: skip
            a = adapter(up.url)
            with pytest.raises(TransportError) as caught:
                await transport.get_json(a, a.models_request())
    assert exchange.error_type is ErrorType.API_ERROR
    assert exchange.error == "HTTP 500"  # the body was not read: no message, no memory
    assert caught.value.error_type is ErrorType.BAD_RESPONSE
    assert "stacked content encodings" in str(caught.value)


async def test_a_well_formed_gzip_answer_still_works() -> None:
    body = gzip.compress(json.dumps(COMPLETION).encode())
    headers = [("Content-Type", "application/json"), ("Content-Encoding", "gzip")]
    async with hostile_upstream(lambda *_: Reply(200, headers, body)) as up:
        exchange = await complete(up.url, stream=False)
        assert up.requests[0][2]["accept-encoding"] == "gzip, deflate"
    assert exchange.ok, exchange.error
    assert exchange.completion.usage.prompt_tokens == 1200


def leaks(*texts: object) -> list[str]:
    """Any run of 6 characters of the key in what the exchange kept."""
    found = []
    for text in texts:
        value = str(text)
        found += [value for i in range(len(KEY) - 5) if KEY[i : i + 6] in value]
    return found


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
async def test_an_echoed_key_never_survives_in_what_is_kept(stream: bool) -> None:
    # x-request-id echoes the key; a field holds it JSON-escaped so no byte replacement sees it.
    escaped = "".join(f"\\u{ord(c):04x}" for c in KEY)
    bad = json.dumps(COMPLETION).replace('"prompt_tokens": 1200', f'"prompt_tokens": "{escaped}"')
    event = {**COMPLETION, "usage": {**USAGE, "prompt_tokens": "__K__"}}
    body = sse(event).replace(b'"__K__"', f'"{escaped}"'.encode()) if stream else bad.encode()
    ctype = "text/event-stream" if stream else "application/json"
    headers = [("Content-Type", ctype), ("x-request-id", f"req-{KEY}-1")]
    async with hostile_upstream(lambda *_: Reply(200, headers, body)) as up:
        exchange = await complete(up.url, stream=stream)
    assert exchange.error_type is ErrorType.BAD_RESPONSE
    assert exchange.meta.request_id == "req-<redacted>-1"
    assert leaks(exchange.error, exchange.meta) == []


@pytest.mark.parametrize("cut", [5, 14, 30])
async def test_a_401_body_holding_the_key_leaves_no_piece_of_it(cut: int) -> None:
    # The message is cut at 300 characters; put the key across that boundary.
    message = "x" * (300 - cut) + f" invalid api key {KEY}"
    body = json.dumps({"error": {"message": message}}).encode()
    headers = [("Content-Type", "application/json"), ("www-authenticate", f"Bearer {KEY}")]
    async with hostile_upstream(lambda *_: Reply(401, headers, body)) as up:
        exchange = await complete(up.url, stream=False)
    assert exchange.error_type is ErrorType.AUTH
    assert leaks(exchange.error, exchange.meta) == []


async def test_a_dripping_models_endpoint_gives_up_at_the_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = [b" "] * 100 + [b"{}"]
    reply = Reply(200, [("Content-Type", "application/json"), ("Content-Length", "102")], body, 0.1)
    async with hostile_upstream(lambda *_: reply) as up, httpx.AsyncClient() as client:
        transport = Transport(client, policy=RetryPolicy(attempts=1, timeout=0.5),
                              clock=SystemClock())  # fmt: skip
        a = adapter(up.url)
        with pytest.raises(TransportError) as caught:
            await transport.get_json(a, a.models_request())
    # The drip would take 10 s and httpx's per-read timeout never trips: only the one
    # deadline from connect to last byte ends it, and the message says which fired.
    assert caught.value.error_type is ErrorType.TIMEOUT
    assert str(caught.value) == "timed out after 0.5s"
    assert "gave up after 0.5s (one deadline from connect to last byte)" in caplog.text


async def test_a_dripping_chat_answer_gives_up_at_the_timeout() -> None:
    body = [b" "] * 100 + [json.dumps(COMPLETION).encode()]
    length = str(100 + len(body[-1]))
    reply = Reply(
        200, [("Content-Type", "application/json"), ("Content-Length", length)], body, 0.1
    )
    async with hostile_upstream(lambda *_: reply) as up:
        exchange = await complete(up.url, stream=False, deadline=0.5)
    assert exchange.error_type is ErrorType.TIMEOUT
    assert exchange.error == "timed out after 0.5s (deadline)"


def test_made_up_ratelimit_headers_never_become_resources() -> None:
    headers = {f"x-ratelimit-remaining-{i:03d}-made-up": "5" for i in range(300)}
    headers |= {"x-ratelimit-remaining-requests": "10", "X-RateLimit-Remaining-Tokens": "900"}
    meta = adapter("http://127.0.0.1:1").parse_meta(headers)
    assert meta.ratelimit_remaining == {"requests": 10.0, "tokens": 900.0}
    assert set(meta.ratelimit_remaining) <= set(RATELIMIT_RESOURCES)
