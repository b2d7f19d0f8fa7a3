"""The pass-through proxy: a raw ASGI app that forwards every request to one upstream.

What goes upstream: the method, the path (after the upstream's own path prefix), the query,
the body and every end-to-end header exactly as the client sent them, its ``Authorization``
or ``x-api-key`` included. The host always comes from the configuration, never from the
request. Hop-by-hop fields (RFC 9110 §7.6.1: ``Connection`` and the fields it lists,
``Keep-Alive``, ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``, ``Proxy-*``) belong to
each connection and are not forwarded; ``Host``, ``Content-Length`` and ``Expect`` are this
listener's to answer and are set anew for the upstream connection.

What comes back: the status, the end-to-end headers and the body bytes exactly as the
upstream sent them (still compressed if they were), each chunk passed on as soon as it
arrives, so server-sent events reach the client one by one. The proxy adds nothing, except
on the answers it gives itself (``x-llmcache-proxy-error``): 413 for a request over
``max_request_bytes``, 503 past ``max_concurrent`` requests, 502 when the upstream cannot be
reached and 504 when it does not answer in time. A stream that breaks or passes
``max_response_bytes`` after its headers went out is cut, so the client sees it fail.

Reading the usage, hashing the prefix and recording happen after each chunk has been sent
(and after the answer ended), and can only end in a counted recording error: the traffic
never waits for, or fails because of, the measurement. Credentials, prompts and answers are
never logged, stored or exported; log lines name the method, the path and the status only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio
from yarl import URL

from exporter.clock import Clock
from exporter.providers.base import ProviderAdapter
from exporter.proxy.prefix import CHARS_PER_TOKEN, PrefixHasher
from exporter.proxy.traffic import Observation, TrafficState
from exporter.proxy.usage import (
    CLIENT_CLOSED,
    NO_USAGE,
    PROXY_ERROR,
    UPSTREAM_ERROR,
    ResponseTap,
    family_of,
    is_chat,
    read_chat_request,
)

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]
Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
_NOT_TO_UPSTREAM = HOP_BY_HOP | {b"host", b"content-length", b"expect"}
PROXY_ERROR_HEADER = b"x-llmcache-proxy-error"


class StreamAborted(Exception):
    """Raised after the headers went out, so the server drops the connection (a truncated
    body must not look complete). Carries no detail; the server's log filter hides it."""


def end_to_end(headers: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes]) -> Headers:
    """``headers`` (names lower-cased) without ``drop`` and the fields ``Connection`` lists."""
    pairs = [(name.lower(), value) for name, value in headers]
    listed = {
        token.strip().lower()
        for name, value in pairs
        if name == b"connection"
        for token in value.split(b",")
    }
    return [(name, value) for name, value in pairs if name not in drop and name not in listed]


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    max_request_bytes: int = 32 * 1024 * 1024
    max_response_bytes: int = 256 * 1024 * 1024
    max_concurrent: int = 1024


class ProxyApp:
    """One listener's application: forwards to ``upstream`` and records into ``state``."""

    def __init__(
        self,
        *,
        provider: str,
        provider_type: str,
        upstream: str,
        adapter: ProviderAdapter,
        client: aiohttp.ClientSession,
        state: TrafficState,
        clock: Clock,
        limits: ProxyLimits | None = None,
        min_cacheable_for: Callable[[str], int] | None = None,
        hasher: PrefixHasher | None = None,
        via: EnvProxy | None = None,
    ) -> None:
        self.provider = provider
        self.provider_type = provider_type
        self._family = family_of(provider_type)
        base = URL(upstream)
        self._origin = str(base.origin())
        self._prefix = base.raw_path.rstrip("/")
        self._via = via or EnvProxy()
        self._adapter = adapter
        self._client = client
        self._state = state
        self._clock = clock
        self._limits = limits or ProxyLimits()
        self._min_cacheable_for = min_cacheable_for or adapter.min_cacheable_for
        self._hasher = hasher or PrefixHasher()
        self._active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no websockets; lifespan is off
        if self._active >= self._limits.max_concurrent:
            await _answer(send, 503, "proxy_busy", "too many requests in flight at the proxy")
            busy = _Exchange(chat=is_chat(self.provider_type, scope["method"], scope["path"]))
            busy.outcome = PROXY_ERROR
            self._record(busy, b"")  # the body was not read: counted under model "other"
            return
        self._active += 1
        self._state.request_started(self.provider)
        try:
            await self._handle(scope, receive, send)
        finally:
            self._active -= 1
            self._state.request_ended(self.provider)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        if not raw_path.startswith(b"/"):
            # Absolute-form targets would name a host; the upstream is fixed by configuration.
            await _answer(send, 400, "bad_target", "request target must be a path")
            return
        method: str = scope["method"]
        exchange = _Exchange(chat=is_chat(self.provider_type, method, scope["path"]))
        body = await self._read_body(scope, receive, exchange)
        if body is None:
            if not exchange.disconnected:
                await _answer(
                    send, 413, "request_too_large", "request body exceeds the proxy's limit"
                )
            self._record(exchange, b"")
            return
        query: bytes = scope.get("query_string", b"")
        headers = _as_text(end_to_end(scope["headers"], _NOT_TO_UPSTREAM))
        try:
            target = (raw_path + (b"?" + query if query else b"")).decode("ascii")
        except UnicodeDecodeError:
            headers = None
        if headers is None:
            # The upstream client writes text; bytes it cannot carry unchanged are refused.
            await _answer(send, 400, "bad_request", "request target or header is not text")
            exchange.outcome = PROXY_ERROR
            self._record(exchange, b"")
            return
        has_body = bool(body) or any(
            name in (b"content-length", b"transfer-encoding") for name, _ in scope["headers"]
        )
        request = _Upstream(
            method,
            # encoded=True: the path and query go as the client wrote them, not normalised.
            URL(self._origin + self._prefix + target, encoded=True),
            headers,
            body if has_body else None,
        )
        try:
            with anyio.CancelScope() as forwarding:
                # A bare task, not a task group: this runs for every request, and a task
                # group costs five times as much (docs/benchmarks.md). It only waits, and
                # is cancelled as soon as the forwarding ends, however it ends.
                watcher = asyncio.get_running_loop().create_task(
                    _watch_disconnect(receive, forwarding, exchange)
                )
                try:
                    await self._forward(request, send, exchange)
                finally:
                    watcher.cancel()
            if exchange.complete:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            # Also on cancellation (shutdown past the grace): every request is counted once.
            self._record(exchange, body)
            log.debug("%s %s -> %s", method, scope["path"], exchange.status)
        if exchange.aborted:
            raise StreamAborted

    async def _forward(self, request: _Upstream, send: Send, exchange: _Exchange) -> None:
        start = exchange.start = self._clock.monotonic()
        try:
            response = await self._client.request(
                request.method,
                request.url,
                headers=request.headers,
                data=request.body,
                allow_redirects=False,
                proxy=self._via.url,
                proxy_auth=self._via.auth,
            )
        except TimeoutError:  # connecting, waiting for a pooled connection, or the headers
            exchange.outcome = PROXY_ERROR
            await _answer(send, 504, "upstream_timeout", "the upstream did not answer in time")
            return
        except (aiohttp.ClientError, OSError) as exc:
            exchange.outcome = PROXY_ERROR
            # The exception text may carry the URL (and a query-string key): name its class.
            log.warning("upstream request failed: %s", type(exc).__name__)
            await _answer(send, 502, "upstream_unreachable", "the upstream could not be reached")
            return
        try:
            exchange.status = response.status
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": end_to_end(response.raw_headers, HOP_BY_HOP),
                }
            )
            tap = self._tap(exchange, response)
            sent = 0
            limit = self._limits.max_response_bytes
            # Each chunk as it arrived, de-chunked but not decoded (auto_decompress is off).
            async for chunk in response.content.iter_any():
                arrived = self._clock.monotonic()
                sent += len(chunk)
                if sent > limit:
                    exchange.outcome, exchange.aborted = PROXY_ERROR, True
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if tap is not None and tap.feed(chunk) and exchange.ttft is None:
                    exchange.ttft = arrived - start
            exchange.latency = self._clock.monotonic() - start
            exchange.complete = True
        except (aiohttp.ClientError, TimeoutError):
            exchange.outcome, exchange.aborted = PROXY_ERROR, True  # upstream broke off
        finally:
            # An answer read to its end gives its connection back to the pool; one the
            # client left (or shutdown cut) closes it, so no half-read answer is reused.
            if exchange.complete:
                response.release()
            else:
                response.close()

    def _tap(self, exchange: _Exchange, response: aiohttp.ClientResponse) -> ResponseTap | None:
        if not exchange.chat:
            return None
        if response.status >= 400:
            exchange.outcome = UPSTREAM_ERROR
            return None
        try:
            exchange.tap = ResponseTap(
                self._adapter,
                content_type=response.headers.get("content-type", ""),
                content_encoding=response.headers.get("content-encoding", ""),
                max_bytes=self._limits.max_response_bytes,
            )
        except Exception:
            log.exception("setting up the usage tap failed (the request is unaffected)")
            self._recording_error()
            return None
        return exchange.tap

    async def _read_body(self, scope: Scope, receive: Receive, exchange: _Exchange) -> bytes | None:
        """The whole request body; None past the limit (after draining a bounded amount of
        what was sent, so the client reads the 413) or when the client left."""
        limit = self._limits.max_request_bytes
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        too_large = declared.isdigit() and int(declared) > limit
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                exchange.disconnected = True
                exchange.outcome = CLIENT_CLOSED
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            too_large = too_large or size > limit
            if not too_large:
                chunks.append(chunk)
            if not message.get("more_body", False) or size > 2 * limit:
                break
        if too_large:
            exchange.outcome = PROXY_ERROR
            return None
        return b"".join(chunks)

    # -- recording: never raises ------------------------------------------------------------

    def _record(self, exchange: _Exchange, body: bytes) -> None:
        try:
            if not exchange.chat:
                self._state.passthrough(self.provider)
                return
            request = read_chat_request(self.provider_type, body)
            outcome = exchange.outcome
            completion = None
            if outcome is None and exchange.complete and exchange.tap is not None:
                result = exchange.tap.finish(request)
                outcome, completion = result.outcome, result.completion
                if exchange.tap.broken:
                    self._recording_error()
            elif outcome is None:
                outcome = CLIENT_CLOSED if exchange.disconnected else PROXY_ERROR
                if exchange.complete:
                    outcome = NO_USAGE  # the tap could not be set up; the answer went through
            prefix = None
            if request.model is not None and request.body is not None:
                min_chars = CHARS_PER_TOKEN * self._min_cacheable_for(request.model)
                prefix = self._hasher.digests(self._family, request.body, min_chars)
            self._state.record(
                Observation(
                    self.provider,
                    request.model,
                    outcome,
                    completion,
                    exchange.latency,
                    exchange.ttft,
                    prefix,
                )
            )
        except Exception:
            log.exception("recording a proxied request failed (the request was unaffected)")
            self._recording_error()

    def _recording_error(self) -> None:
        # Only a plain-data update under the state's lock: nothing here can fail but a bug.
        self._state.recording_error(self.provider)


@dataclass(frozen=True, slots=True)
class EnvProxy:
    """The HTTP proxy (``HTTPS_PROXY`` / ``NO_PROXY``) the upstream is reached through, if
    any: the upstream is fixed, so this is read once, not per request."""

    url: URL | None = None
    auth: aiohttp.BasicAuth | None = None


@dataclass(frozen=True, slots=True)
class _Upstream:
    method: str
    url: URL
    headers: list[tuple[str, str]]
    body: bytes | None


def _as_text(headers: Headers) -> list[tuple[str, str]] | None:
    """Header fields as text for the upstream client, which writes UTF-8: ASCII (every
    header an SDK sends) and UTF-8 go byte for byte; other bytes give None."""
    try:
        return [(name.decode("ascii"), value.decode("utf-8")) for name, value in headers]
    except UnicodeDecodeError:
        return None


class _Exchange:
    """What one forwarded request came to, filled in as it goes."""

    __slots__ = (
        "aborted",
        "chat",
        "complete",
        "disconnected",
        "latency",
        "outcome",
        "start",
        "status",
        "tap",
        "ttft",
    )

    def __init__(self, *, chat: bool) -> None:
        self.chat = chat
        self.start = 0.0
        self.aborted = False
        self.status: int | None = None
        self.outcome: str | None = None
        self.tap: ResponseTap | None = None
        self.latency: float | None = None
        self.ttft: float | None = None
        self.complete = False
        self.disconnected = False


async def _watch_disconnect(
    receive: Receive, scope: anyio.CancelScope, exchange: _Exchange
) -> None:
    """Cancel the forwarding when the client goes away (the request body is already read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            exchange.disconnected = True
            scope.cancel()
            return


async def _answer(send: Send, status: int, code: str, message: str) -> None:
    """An answer of the proxy's own, marked as such, in a shape both API families parse."""
    body = (
        b'{"error":{"type":"proxy_error","code":"'
        + code.encode()
        + b'","message":"'
        + message.encode()
        + b' (prompt-cache-exporter proxy)"}}'
    )
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (PROXY_ERROR_HEADER, code.encode()),
    ]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
