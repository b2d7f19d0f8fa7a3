"""Running the configured proxies: one listener and one upstream client per ``[[proxies]]``.

``serve_proxies`` is the daemon's whole integration: it registers the traffic collector into
the exporter's registry and serves every listener until the context exits. Closing stops
accepting at once on every listener together, lets streams in flight finish for up to the
shutdown grace, then cuts the rest. Listeners and their settings are read at start-up; a
configuration reload does not change them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import anyio
from aiohttp.helpers import get_env_proxy_for_url
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry
from yarl import URL

from exporter.asgi import BoundAddress, serve_asgi
from exporter.clock import Clock, SystemClock
from exporter.config import Config, ProviderConfig
from exporter.config.proxies import ProxyConfig
from exporter.exits import listen_error
from exporter.providers import adapter_class
from exporter.proxy.collector import TrafficCollector
from exporter.proxy.forward import EnvProxy, ProxyApp, ProxyLimits, StreamAborted
from exporter.proxy.prefix import PrefixHasher
from exporter.proxy.traffic import TrafficState
from exporter.results import ModelPrice

log = logging.getLogger(__name__)
# Seconds an idle upstream connection is kept for reuse (aiohttp's default is 15).
KEEPALIVE_SECONDS = 30.0
# Header lines the upstream may send, in bytes (aiohttp's default, 8190, is tighter than
# what h11 and the SDKs accept).
MAX_HEADER_LINE = 64 * 1024
# What the upstream client adds by itself unless told not to: the client's own headers go
# upstream, and none of the proxy's.
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")


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


def upstream_client(proxy: ProxyConfig) -> aiohttp.ClientSession:
    """The proxy's own client: a pool as large as the concurrency limit, so a slow upstream
    answer never makes another request wait for a connection.

    aiohttp rather than httpx (the probes' client): httpcore's pool polls every idle
    connection's socket on each request, which at 32 requests in flight cost the proxy
    more than all its other work together (docs/benchmarks.md), and aiohttp parses
    answers in C. It adds nothing of its own: no default headers, no decompression, no
    cookies kept, no redirects followed (``ProxyApp`` passes ``allow_redirects=False``)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=proxy.max_concurrent, limit_per_host=0, keepalive_timeout=KEEPALIVE_SECONDS
        ),
        timeout=aiohttp.ClientTimeout(
            total=None,
            # Waiting for a pooled connection and connecting; then silence between bytes.
            connect=proxy.connect_timeout,
            sock_read=proxy.read_timeout,
        ),
        skip_auto_headers=_NO_AUTO_HEADERS,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        # The environment's HTTP proxy is looked up once (env_proxy); aiohttp's trust_env
        # would also add ~/.netrc credentials to requests, and the client's key is the only one.
        trust_env=False,
        max_line_size=MAX_HEADER_LINE,
        max_field_size=MAX_HEADER_LINE,
    )


def env_proxy(upstream: str, *, trust_env: bool = True) -> EnvProxy:
    """The HTTP proxy ``HTTPS_PROXY`` / ``HTTP_PROXY`` name for ``upstream`` (unless
    ``NO_PROXY`` excludes it), as the probes' client honours them."""
    if not trust_env:
        return EnvProxy()
    try:
        url, auth = get_env_proxy_for_url(URL(upstream))
    except LookupError:
        return EnvProxy()
    return EnvProxy(url, auth)


def build_app(
    proxy: ProxyConfig,
    *,
    state: TrafficState,
    client: aiohttp.ClientSession,
    shared: ProviderConfig | None = None,
    clock: Clock | None = None,
    hasher: PrefixHasher | None = None,
    trust_env: bool = True,
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
        via=env_proxy(proxy.upstream, trust_env=trust_env),
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
    async with upstream_client(proxy) as client:
        app = build_app(
            proxy,
            state=state,
            client=client,
            shared=shared,
            clock=clock,
            hasher=hasher,
            trust_env=trust_env,
        )
        async with contextlib.AsyncExitStack() as stack:
            try:
                # date_header=False: the Date the client sees is the upstream's, not a second.
                # httptools: the proxy parses every request of the traffic it carries.
                address = await stack.enter_async_context(
                    serve_asgi(
                        app,
                        host=proxy.host,
                        port=proxy.port,
                        graceful_timeout=grace,
                        date_header=False,
                        parser="httptools",
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
