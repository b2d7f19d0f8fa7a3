"""A pass-through proxy in front of the real simulator, with a recorder between them.

The recorder is an ASGI wrapper around the simulator app: it keeps, for every request, what
the upstream received (method, path, query, headers, body) and what it sent back (status,
headers, every body chunk). Tests compare that with what a real client got through the
proxy. Everything runs on 127.0.0.1, ports picked by the OS.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from prometheus_client import CollectorRegistry

from exporter.asgi import BoundAddress, serve_asgi
from exporter.config.proxies import ProxyConfig
from exporter.proxy import ProxyHandle, TrafficCollector, TrafficState, serve_proxy
from exporter.proxy.forward import HOP_BY_HOP
from exporter.simulator.app import create_app
from exporter.simulator.config import SimConfig

Headers = list[tuple[bytes, bytes]]


@dataclass
class Seen:
    """One exchange as the upstream saw it."""

    method: str
    path: str
    raw_path: bytes
    query: bytes
    headers: Headers
    body: bytes = b""
    status: int | None = None
    response_headers: Headers = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    finished_at: float | None = None

    @property
    def response_body(self) -> bytes:
        return b"".join(self.chunks)

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


class Recorder:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[Seen] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = Seen(
            scope["method"],
            scope["path"],
            scope.get("raw_path") or b"",
            scope.get("query_string", b""),
            list(scope["headers"]),
        )
        self.seen.append(seen)

        async def recording_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                seen.body += message.get("body", b"")
            return message

        async def recording_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                seen.status = message["status"]
                seen.response_headers = [
                    (bytes(k).lower(), bytes(v)) for k, v in message["headers"]
                ]
            elif message["type"] == "http.response.body":
                seen.chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    seen.finished_at = time.monotonic()
            await send(message)

        await self.app(scope, recording_receive, recording_send)

    @property
    def last(self) -> Seen:
        return self.seen[-1]


@dataclass
class ProxyRig:
    upstream: BoundAddress
    recorder: Recorder
    state: TrafficState
    proxy: ProxyHandle
    sim_app: Any

    @property
    def url(self) -> str:
        """The proxy's root URL: a client's base URL is this plus the API's path (``/v1``)."""
        return self.proxy.url

    async def idle(self) -> None:
        """Wait (at most 10 s) until the proxy has recorded every request it took: it
        records after the last byte went to the client, so a client can be a moment ahead."""
        with anyio.fail_after(10):
            # Polling the state as the collector does; the proxy offers no event to wait on.
            while any(p.in_flight for p in self.state.snapshot()):  # noqa: ASYNC110
                await anyio.sleep(0.005)

    def registry(self) -> CollectorRegistry:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(TrafficCollector(self.state))
        return registry

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry().get_sample_value(name, labels)


def end_to_end(headers: Headers) -> Headers:
    return [(k.lower(), v) for k, v in headers if k.lower() not in HOP_BY_HOP]


@contextlib.asynccontextmanager
async def proxy_rig(
    sim_config: SimConfig | None = None,
    *,
    provider_type: str = "openai",
    wrap: Any = None,
    grace: float = 2.0,
    state: TrafficState | None = None,
    **proxy_options: Any,
) -> AsyncIterator[ProxyRig]:
    """Simulator (wrapped in a recorder, then in ``wrap`` if given) and a proxy before it.

    The upstream is the simulator's root URL, so clients use the proxy URL + ``/v1`` as
    their base URL, as they would with the simulator itself."""
    app = create_app(sim_config or SimConfig(latency_scale=0.0))
    recorder = Recorder(app)
    served = wrap(recorder) if wrap is not None else recorder
    traffic = state or TrafficState()
    # No Date header from the upstream's server either: what the recorder saw the app
    # send is then exactly what crossed the wire (plus framing).
    async with serve_asgi(
        served, host="127.0.0.1", port=0, date_header=False, graceful_timeout=1.0
    ) as upstream:
        config = ProxyConfig(
            name="sim",
            type=provider_type,
            listen="127.0.0.1:0",
            upstream=upstream.url,
            **proxy_options,
        )
        async with serve_proxy(config, state=traffic, grace=grace, trust_env=False) as proxy:
            yield ProxyRig(upstream, recorder, traffic, proxy, app)
