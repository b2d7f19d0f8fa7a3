"""Bad upstream input never crashes a probe: every case ends in a categorised error.

Malformed JSON, HTML pages, missing usage, impossible numbers, truncated streams, in-band
errors, 50 MB bodies, slow servers and closed ports, all over real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import socket
import tracemalloc
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from exporter.asgi import serve_asgi
from exporter.clock import FakeClock, SystemClock
from exporter.probes import ProbeContext, run_probe
from exporter.prompts import PromptFactory
from exporter.providers.openai import OpenAIAdapter
from exporter.results import ErrorType, Verdict
from exporter.simulator.config import SimConfig
from exporter.simulator.models import SimModel
from exporter.simulator.server import serve_simulator
from exporter.transport import RetryPolicy, Transport, iter_sse
from tests.conftest import SimRig

pytestmark = pytest.mark.anyio


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(latency_scale=0.0).with_fault_models()


# fault model -> (error type, attempts): unparseable answers are not retried (the same
# request would get the same answer); server errors are.
FAULTS = {
    "sim-fault-html": (ErrorType.API_ERROR, 3),
    "sim-fault-bad-json": (ErrorType.BAD_RESPONSE, 1),
    "sim-fault-missing-usage": (ErrorType.BAD_RESPONSE, 1),
    "sim-fault-cached-exceeds-prompt": (ErrorType.BAD_RESPONSE, 1),
    "sim-fault-negative-tokens": (ErrorType.BAD_RESPONSE, 1),
    "sim-fault-absurd-tokens": (ErrorType.BAD_RESPONSE, 1),
    "sim-fault-truncated-stream": (ErrorType.BAD_RESPONSE, 1),
    "sim-fault-stream-error": (ErrorType.API_ERROR, 3),
}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize("model", sorted(FAULTS))
async def test_bad_answers_are_categorised(rig: SimRig, model: str, stream: bool) -> None:
    result = await rig.probe("basic", model, stream=stream)
    expected_type, attempts = FAULTS[model]
    assert result.verdict is Verdict.ERROR
    assert result.error_type is expected_type, result.error
    (prime,) = result.requests
    assert prime.attempts == attempts
    assert prime.error
    assert "\n" not in prime.error
    assert len(prime.error) < 400
    assert result.caching_works is None
    assert result.hit_ratio is None


async def test_specific_messages(rig: SimRig) -> None:
    messages = {}
    for model in (
        "sim-fault-cached-exceeds-prompt",
        "sim-fault-negative-tokens",
        "sim-fault-absurd-tokens",
        "sim-fault-missing-usage",
        "sim-fault-truncated-stream",
        "sim-fault-html",
    ):
        result = await rig.probe("basic", model)
        messages[model] = result.requests[0].error
    assert "exceed prompt tokens" in messages["sim-fault-cached-exceeds-prompt"]
    assert "negative" in messages["sim-fault-negative-tokens"]
    assert "implausibly large" in messages["sim-fault-absurd-tokens"]
    assert "usage" in messages["sim-fault-missing-usage"]
    assert "without usage" in messages["sim-fault-truncated-stream"]
    assert messages["sim-fault-html"] == "HTTP 502: HTML error page"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_fifty_megabyte_body_is_refused_with_bounded_memory(
    rig: SimRig, stream: bool
) -> None:
    ctx = rig.context("sim-fault-huge-body", stream=stream)
    tracemalloc.start()
    try:
        result = await run_probe("basic", ctx)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.error_type is ErrorType.BAD_RESPONSE
    assert "cap" in (result.error or "")
    # The client stops reading at the 4 MiB cap; the peak includes the simulator (same
    # process) generating its chunks. Far below the 50 MB that was offered.
    assert peak < 16 * 1024 * 1024, peak


async def test_timeouts_are_categorised_and_retried() -> None:
    config = SimConfig(models=(SimModel("slow", fault="slow", slow_seconds=5.0),), latency_scale=1)
    policy = RetryPolicy(attempts=2, backoff=0.01, backoff_max=0.01, timeout=0.2)
    async with serve_simulator(config) as sim, httpx.AsyncClient() as client:
        clock = SystemClock()
        ctx = ProbeContext(
            provider="sim",
            model="slow",
            adapter=OpenAIAdapter(base_url=sim.base_url, api_key=None),
            transport=Transport(client, policy=policy, clock=clock),
            prompts=PromptFactory(),
            clock=clock,
        )
        result = await run_probe("basic", ctx)
    assert result.error_type is ErrorType.TIMEOUT
    assert result.requests[0].attempts == 2


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_connection_refused_is_categorised() -> None:
    clock = FakeClock()
    async with httpx.AsyncClient() as client:
        ctx = ProbeContext(
            provider="down",
            model="m",
            adapter=OpenAIAdapter(base_url=f"http://127.0.0.1:{_closed_port()}/v1", api_key="k"),
            transport=Transport(
                client, policy=RetryPolicy(backoff=0.5, backoff_max=8), clock=clock
            ),
            prompts=PromptFactory(),
            clock=clock,
        )
        result = await run_probe("basic", ctx)
    assert result.error_type is ErrorType.CONNECTION
    assert result.requests[0].attempts == 3
    assert clock.sleeps == [0.5, 1.0]


async def test_probe_deadline_keeps_the_evidence() -> None:
    config = SimConfig(models=(SimModel("slow", fault="slow", slow_seconds=5.0),), latency_scale=1)
    async with serve_simulator(config) as sim, httpx.AsyncClient() as client:
        clock = SystemClock()
        ctx = ProbeContext(
            provider="sim",
            model="slow",
            adapter=OpenAIAdapter(base_url=sim.base_url, api_key=None),
            transport=Transport(client, policy=RetryPolicy(timeout=30), clock=clock),
            prompts=PromptFactory(),
            clock=clock,
        )
        result = await run_probe("basic", ctx, deadline=0.3)
    assert result.verdict is Verdict.ERROR
    assert result.error_type is ErrorType.TIMEOUT
    assert result.error == "probe deadline of 0.3s exceeded"
    assert [r.label for r in result.requests] == ["prime"]
    assert result.requests[0].error_type is ErrorType.TIMEOUT  # counted as a failed request


SECRET = "sk-live-0123456789abcdef"


async def _echo_key(request: Request) -> Response:
    # A careless upstream that repeats the credential it was sent in its error message.
    auth = request.headers.get("authorization", "")
    return JSONResponse({"error": {"message": f"invalid key {auth}"}}, status_code=401)


async def test_an_upstream_echoing_the_key_does_not_leak_it() -> None:
    app = Starlette(routes=[Route("/v1/chat/completions", _echo_key, methods=["POST"])])
    clock = FakeClock()
    async with serve_asgi(app, host="127.0.0.1", port=0) as addr, httpx.AsyncClient() as client:
        ctx = ProbeContext(
            provider="p",
            model="m",
            adapter=OpenAIAdapter(base_url=addr.url + "/v1", api_key=SECRET),
            transport=Transport(client, clock=clock),
            prompts=PromptFactory(),
            clock=clock,
        )
        result = await run_probe("basic", ctx)
    assert result.error_type is ErrorType.AUTH
    assert result.requests[0].attempts == 1  # 401 is never retried
    assert SECRET not in str(result.to_dict())
    assert "<redacted>" in (result.error or "")


class _Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk


async def _events(chunks: list[bytes], limit: int = 1 << 20) -> list[tuple[str | None, str]]:
    response = httpx.Response(200, stream=_Chunks(chunks))
    return [event async for event in iter_sse(response, limit)]


async def test_sse_parsing_across_chunk_boundaries() -> None:
    body = b'event: a\r\ndata: {"x":\r\ndata: 1}\r\n\r\n: keep-alive\n\ndata: [DONE]'
    for split in range(1, len(body)):
        events = await _events([body[:split], body[split:]])
        assert events == [("a", '{"x":\n1}'), (None, "[DONE]")], split


async def test_sse_stream_over_the_cap_is_refused() -> None:
    from exporter.providers.base import BadResponse

    with pytest.raises(BadResponse, match="cap"):
        await _events([b"data: " + b"x" * 2000], limit=1000)


async def test_each_retry_wait_is_announced_with_its_reason() -> None:
    """``on_wait`` hears of every wait before a retry, just before the clock sleeps it: the
    server's Retry-After after a 429, our own backoff after a 500 (what probe's live
    output says while it waits)."""
    models = (
        SimModel("every-2nd", ratelimit_period=2, retry_after=1.0),
        SimModel("failing", fault="error"),
    )
    policy = RetryPolicy(attempts=2, backoff=0.25, backoff_max=0.25, timeout=10.0)
    clock = FakeClock()
    told: list[tuple[float, str]] = []
    config = SimConfig(models=models, latency_scale=0.0)
    async with serve_simulator(config) as sim, httpx.AsyncClient() as client:
        transport = Transport(
            client, policy=policy, clock=clock, on_wait=lambda s, why: told.append((s, why))
        )
        results = []
        for model in ("every-2nd", "failing"):
            ctx = ProbeContext(
                provider="sim",
                model=model,
                adapter=OpenAIAdapter(base_url=sim.base_url, api_key=None),
                transport=transport,
                prompts=PromptFactory(),
                clock=clock,
            )
            results.append(await run_probe("basic", ctx))
    throttled, failed = results
    # Each request of every-2nd is refused once, then served after the Retry-After.
    assert [r.attempts for r in throttled.requests] == [2, 2]
    assert throttled.error_type is None
    # The failing prime: one backoff, then the run ends.
    assert failed.error_type is ErrorType.API_ERROR
    assert told == [(1.0, "retry_after"), (1.0, "retry_after"), (0.25, "backoff")]
    assert clock.sleeps == [1.0, 1.0, 0.25]  # told first, then slept: the same waits
