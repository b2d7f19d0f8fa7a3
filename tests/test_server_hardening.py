"""Issue 8 item 5 and the auth items of 8: idle connections, connection floods, repeated log
lines, and basic auth under a flood of bad guesses, over real sockets on 127.0.0.1."""

from __future__ import annotations

import base64
import logging
import time

import anyio
import bcrypt
import httpx
import pytest
from prometheus_client import CollectorRegistry

from exporter.asgi import RepeatFilter
from exporter.server import DependencyStatus, Readiness, create_app, serve
from exporter.webconfig import BasicAuthenticator, RateLimit, WebConfig

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _NoRuns:
    async def recent_runs(self, **_: object) -> list[object]:
        return []


def app(web_config: WebConfig | None = None, auth: BasicAuthenticator | None = None) -> object:
    return create_app(
        registry=CollectorRegistry(),
        runs=_NoRuns(),  # type: ignore[arg-type]
        readiness=lambda: Readiness.of(store=DependencyStatus(True)),
        reload=None,
        web_config=web_config,
        probe_names=("basic",),
        version="t",
        authenticator=auth,
    )


async def open_idle(port: int, count: int) -> list[anyio.abc.SocketStream]:
    return [await anyio.connect_tcp("127.0.0.1", port) for _ in range(count)]


async def test_a_connection_that_never_sends_a_request_is_closed() -> None:
    async with serve(app(), host="127.0.0.1", port=0, header_timeout=0.3) as address:
        (idle,) = await open_idle(address.port, 1)
        with anyio.fail_after(5), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await idle.receive()  # the server closes it: end of stream
        await idle.aclose()


async def test_idle_connections_beyond_the_limit_do_not_stop_scrapes() -> None:
    async with serve(app(), host="127.0.0.1", port=0, max_connections=20) as address:
        idle = await open_idle(address.port, 60)  # three times the limit, never sending
        try:
            async with httpx.AsyncClient(base_url=address.url, timeout=5.0) as client:
                answers = [(await client.get("/metrics")).status_code for _ in range(10)]
        finally:
            for stream in idle:
                await stream.aclose()
    assert answers == [200] * 10


def test_identical_log_lines_are_summarised() -> None:
    flt = RepeatFilter(window=60.0)

    def record(at: float) -> logging.LogRecord:
        r = logging.LogRecord(
            "asyncio",
            logging.ERROR,
            __file__,
            1,
            "socket.accept() out of system resource",
            None,
            None,
        )
        r.created = at
        return r

    kept = [r for r in (record(1000.0 + i * 0.01) for i in range(5000)) if flt.filter(r)]
    later = record(1061.0)
    assert len(kept) == 1
    assert flt.filter(later)
    assert later.getMessage().endswith("(4999 identical messages suppressed)")


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_a_flood_of_bad_guesses_neither_delays_nor_429s_a_valid_scrape() -> None:
    hashed = bcrypt.hashpw(b"right", bcrypt.gensalt(8)).decode()
    limit = RateLimit(interval=1.0, burst=5)
    config = WebConfig(basic_auth_users={"prometheus": hashed}, rate_limit=limit)
    auth = BasicAuthenticator()
    server = serve(app(config, auth), host="127.0.0.1", port=0, web_config=config)
    async with server as address, httpx.AsyncClient(base_url=address.url, timeout=30) as client:
        first = await client.get("/metrics", headers=basic("prometheus", "right"))
        assert first.status_code == 200
        statuses: list[int] = []

        async def guess(i: int) -> None:
            response = await client.get("/metrics", headers=basic("prometheus", f"bad{i}"))
            statuses.append(response.status_code)

        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(guess, i)
            await anyio.sleep(0.3)
            scrape = await client.get("/metrics", headers=basic("prometheus", "right"))
    # The rate limit is spent by the flood, yet the scrape passes: a credential that already
    # passed skips bcrypt, its queue and the rate limit.
    assert scrape.status_code == 200
    assert set(statuses) <= {401, 429}
    assert 429 in statuses  # the rate limit still holds the flood back


async def test_failures_take_as_long_for_unknown_users_as_for_known_ones() -> None:
    cheap = bcrypt.hashpw(b"x", bcrypt.gensalt(4)).decode()
    costly = bcrypt.hashpw(b"y", bcrypt.gensalt(10)).decode()
    users = {"cheap": cheap, "costly": costly}
    auth = BasicAuthenticator()
    await auth.check(users, basic("costly", "wrong")["Authorization"], "10.0.0.1")
    floor = auth._slowest  # the cost-10 check: every later failure is padded to at least this

    async def timed(user: str, client: str) -> float:
        started = time.monotonic()
        assert not await auth.check(users, basic(user, "wrong")["Authorization"], client)
        return time.monotonic() - started

    assert await timed("cheap", "10.0.0.2") >= floor  # a cost-4 hash alone takes ~1 ms
    assert await timed("nobody", "10.0.0.3") >= floor


async def test_a_flooding_client_queues_behind_itself_not_in_front_of_others() -> None:
    hashed = bcrypt.hashpw(b"right", bcrypt.gensalt(6)).decode()
    users = {"prometheus": hashed}
    auth = BasicAuthenticator()
    results: list[bool] = []

    async def guess(i: int) -> None:
        results.append(await auth.check(users, basic("prometheus", f"bad{i}")["Authorization"],
                                        "10.6.6.6"))  # fmt: skip

    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(guess, i)
        await anyio.sleep(0.05)
        assert await auth.check(users, basic("prometheus", "right")["Authorization"], "10.0.0.9")
    assert results == [False] * 40
    assert auth.refused_unverified > 0  # the flood's overflow never reached bcrypt
    assert auth.verifications < 40
