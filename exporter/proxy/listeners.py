"""Running the configured proxies: one listener and one upstream client per ``[[proxies]]``.

``serve_proxies`` is the daemon's whole integration: it registers the traffic collector into
the exporter's registry and serves every listener until the context exits. Closing stops
accepting at once on every listener together, lets streams in flight finish for up to the
shutdown grace, then cuts the rest. Listeners and their settings are read at start-up; a
configuration reload does not change them.
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import httpx
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry

from exporter.asgi import BoundAddress, serve_asgi
from exporter.clock import Clock, SystemClock
from exporter.config import Config, ProviderConfig
from exporter.config.proxies import ProxyConfig
from exporter.exits import listen_error
from exporter.providers import adapter_class
from exporter.proxy.collector import TrafficCollector
from exporter.proxy.forward import ProxyApp, ProxyLimits, StreamAborted
from exporter.proxy.prefix import PrefixHasher
from exporter.proxy.traffic import TrafficState
from exporter.results import ModelPrice

log = logging.getLogger(__name__)
# Idle upstream connections kept for reuse per proxy (more are opened as traffic needs).
KEEPALIVE_CONNECTIONS = 64


@dataclass(frozen=True, slots=True)
class ProxyHandle:
    name: str
    provider: str
    address: BoundAddress
    app: ProxyApp

    @property
    def url(self) -> str:
        return self.address.url


class _HideAbortedStreams(logging.Filter):
    """uvicorn logs any exception that ends an ASGI call with its traceback; a stream the
    proxy cut on purpose (upstream broke off, response too large) is counted, not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, StreamAborted)


_FILTER = _HideAbortedStreams()


def _no_cookies() -> http.cookiejar.CookieJar:
    """Upstream cookies belong to the client that received them; the proxy keeps none."""
    return http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


def upstream_client(proxy: ProxyConfig, *, trust_env: bool = True) -> httpx.AsyncClient:
    """The proxy's own client: a pool as large as the concurrency limit, so a slow upstream
    answer never makes another request wait for a connection."""
    return httpx.AsyncClient(
        limits=httpx.Limits(
            max_connections=proxy.max_concurrent,
            max_keepalive_connections=min(KEEPALIVE_CONNECTIONS, proxy.max_concurrent),
        ),
        timeout=httpx.Timeout(
            connect=proxy.connect_timeout,
            read=proxy.read_timeout,
            write=proxy.read_timeout,
            pool=proxy.connect_timeout,
        ),
        follow_redirects=False,
        trust_env=trust_env,
        cookies=_no_cookies(),
    )


def build_app(
    proxy: ProxyConfig,
    *,
    state: TrafficState,
    client: httpx.AsyncClient,
    shared: ProviderConfig | None = None,
    clock: Clock | None = None,
    hasher: PrefixHasher | None = None,
) -> ProxyApp:
    """The application of one proxy, its provider declared in ``state``."""
    min_cacheable = proxy.min_cacheable_tokens
    if min_cacheable is None and shared is not None:
        min_cacheable = shared.min_cacheable_tokens
    adapter = adapter_class(proxy.type)(
        base_url=proxy.upstream, api_key=None, min_cacheable_tokens=min_cacheable
    )

    def price_for(model: str) -> ModelPrice | None:
        own = proxy.price_for(model)
        return own if own is not None or shared is None else shared.price_for(model)

    state.configure(
        proxy.provider,
        proxy=proxy.name,
        api_type=proxy.type,
        max_models=proxy.max_models,
        prefix_memory=proxy.prefix_memory,
        price_for=price_for,
    )
    return ProxyApp(
        provider=proxy.provider,
        provider_type=proxy.type,
        upstream=proxy.upstream,
        adapter=adapter,
        client=client,
        state=state,
        clock=clock or SystemClock(),
        limits=ProxyLimits(
            max_request_bytes=proxy.max_request_bytes,
            max_response_bytes=proxy.max_response_bytes,
            max_concurrent=proxy.max_concurrent,
        ),
        hasher=hasher,
    )


class ProxyListenError(Exception):
    """A proxy listener could not bind its address; the message is one line for the user."""

    @classmethod
    def find(cls, exc: BaseException) -> ProxyListenError | None:
        """This error, itself or inside (nested) exception groups."""
        if isinstance(exc, cls):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                if (found := cls.find(inner)) is not None:
                    return found
        return None


@contextlib.asynccontextmanager
async def serve_proxy(
    proxy: ProxyConfig,
    *,
    state: TrafficState,
    grace: float,
    shared: ProviderConfig | None = None,
    clock: Clock | None = None,
    trust_env: bool = True,
    hasher: PrefixHasher | None = None,
) -> AsyncIterator[ProxyHandle]:
    """Serve one proxy until the context exits; port 0 picks a free port."""
    logging.getLogger("uvicorn.error").addFilter(_FILTER)
    async with upstream_client(proxy, trust_env=trust_env) as client:
        app = build_app(
            proxy, state=state, client=client, shared=shared, clock=clock, hasher=hasher
        )
        async with contextlib.AsyncExitStack() as stack:
            try:
                # date_header=False: the Date the client sees is the upstream's, not a second.
                address = await stack.enter_async_context(
                    serve_asgi(
                        app,
                        host=proxy.host,
                        port=proxy.port,
                        graceful_timeout=grace,
                        date_header=False,
                    )
                )
            except OSError as exc:
                where = listen_error(proxy.host, proxy.port, exc)
                raise ProxyListenError(f"proxies.{proxy.name}.listen: {where}") from None
            log.info("proxy %s on %s forwards to %s", proxy.name, address.url, proxy.upstream)
            yield ProxyHandle(proxy.name, proxy.provider, address, app)


@contextlib.asynccontextmanager
async def serve_proxies(
    config: Config,
    registry: CollectorRegistry,
    *,
    state: TrafficState | None = None,
    clock: Clock | None = None,
) -> AsyncIterator[list[ProxyHandle]]:
    """Register the traffic collector and serve every configured proxy (none: nothing runs)."""
    traffic = state or TrafficState()
    if not config.proxies:
        yield []
        return
    registry.register(TrafficCollector(traffic))
    shared = {p.name: p for p in config.providers}
    grace = config.scheduler.shutdown_grace
    stop = anyio.Event()

    async def run(proxy: ProxyConfig, *, task_status: TaskStatus[ProxyHandle]) -> None:
        async with serve_proxy(
            proxy, state=traffic, grace=grace, shared=shared.get(proxy.provider), clock=clock
        ) as handle:
            task_status.started(handle)
            await stop.wait()

    async with anyio.create_task_group() as tg:
        handles = [await tg.start(run, proxy) for proxy in config.proxies]
        try:
            yield handles
        finally:
            stop.set()  # every listener drains at once, each within the grace
