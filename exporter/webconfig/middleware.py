"""``WebConfigMiddleware``: the ASGI layer that applies the config in force to every request."""

from __future__ import annotations

import time
from collections.abc import Mapping

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exporter.webconfig.auth import BasicAuthenticator
from exporter.webconfig.models import RateLimit, WebConfigError
from exporter.webconfig.source import WebConfigSource


class _TokenBucket:
    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self._tokens = float(limit.burst)
        self._at = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        refill = (now - self._at) / self.limit.interval  # never 0: that means no limit
        self._tokens = min(float(self.limit.burst), self._tokens + refill)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class WebConfigMiddleware:
    """Applies the web config in force to every HTTP request, before any endpoint runs.

    Order, as in the toolkit: a config that does not load → 500; rate limit → 429; then the
    configured headers go on every response (401s included) and basic auth is required on
    every path (the toolkit wraps the whole mux; /healthz is no exception).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        source: WebConfigSource,
        authenticator: BasicAuthenticator | None = None,
    ) -> None:
        self.app = app
        self.source = source
        self.authenticator = authenticator or BasicAuthenticator()
        self._bucket: _TokenBucket | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            config = self.source.current()
        except WebConfigError:  # logged by the source; the client learns nothing of the file
            await _plain(scope, receive, send, 500, "Internal Server Error")
            return
        # latin-1, as starlette decodes it: non-ASCII then fails base64 decoding, as it should.
        authorization = Headers(scope=scope).get("authorization")
        # A credential that already passed skips the rate limit: an unauthenticated flood
        # must not make Prometheus' scrapes 429.
        known = bool(config.users) and self.authenticator.cached(config.users, authorization)
        if not known and not self._allow(config.rate_limit):
            await _plain(scope, receive, send, 429, "Too Many Requests")
            return
        if config.users and not known:
            client = scope.get("client")
            peer = str(client[0]) if client else None
            if not await self.authenticator.check(config.users, authorization, peer):
                headers = {**config.headers, "WWW-Authenticate": "Basic"}
                await _plain(scope, receive, send, 401, "Unauthorized", headers)
                return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                headers = MutableHeaders(scope=message)
                for name, value in config.headers.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers if config.headers else send)

    def _allow(self, limit: RateLimit | None) -> bool:
        if limit is None:
            self._bucket = None
            return True
        if self._bucket is None or self._bucket.limit != limit:
            self._bucket = _TokenBucket(limit)
        return self._bucket.allow()


async def _plain(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    text: str,
    headers: Mapping[str, str] | None = None,
) -> None:
    await PlainTextResponse(text + "\n", status, headers)(scope, receive, send)
