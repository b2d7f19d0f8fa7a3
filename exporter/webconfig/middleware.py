"""``WebConfigMiddleware``: the ASGI layer that applies the config in force to every request.

Fail closed on an invalid config (500), then the rate limit (429), then headers and basic auth.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exporter.webconfig.auth import BasicAuthenticator
from exporter.webconfig.models import RateLimit, WebConfigError
from exporter.webconfig.source import WebConfigSource

__all__ = ["WebConfigMiddleware"]

_INTERNAL_ERROR: Final = b"Internal Server Error"


class _TokenBucket:
    def __init__(self, limit: RateLimit, monotonic: Callable[[], float]) -> None:
        self.limit = limit
        self._monotonic = monotonic
        self._tokens = float(limit.burst)
        self._at = monotonic()

    def allow(self) -> bool:
        now = self._monotonic()
        refill = (now - self._at) / self.limit.interval  # interval > 0: zero disables the limit
        self._tokens = min(float(self.limit.burst), self._tokens + refill)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


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
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.source = source
        self.authenticator = authenticator or BasicAuthenticator()
        self._monotonic = monotonic
        self._bucket: _TokenBucket | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            config = self.source.current()
        except WebConfigError:
            # Detail is logged by the source; the client learns nothing about the file.
            await _plain(send, 500, _INTERNAL_ERROR, ())
            return
        authorization = _header(scope, b"authorization") if config.users else None
        # A credential that already passed skips the rate limit: an unauthenticated flood
        # must not make Prometheus' scrapes 429.
        known = bool(config.users) and self.authenticator.cached(config.users, authorization)
        if not known and not self._allow(config.rate_limit):
            await _plain(send, 429, b"Too Many Requests", ())
            return
        extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in config.headers.items()]
        if config.users and not known:
            client = scope.get("client")
            peer = str(client[0]) if client else None
            if not await self.authenticator.check(config.users, authorization, peer):
                await _plain(send, 401, b"Unauthorized", [*extra, (b"www-authenticate", b"Basic")])
                return
        if not extra:
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k for k, _ in extra}
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": [*kept, *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _allow(self, limit: RateLimit | None) -> bool:
        if limit is None:
            self._bucket = None
            return True
        if self._bucket is None or self._bucket.limit != limit:
            self._bucket = _TokenBucket(limit, self._monotonic)
        return self._bucket.allow()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            # latin-1 maps every byte; non-ASCII then fails base64 decoding, as it should.
            return bytes(value).decode("latin-1")
    return None


async def _plain(
    send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body) + 1).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body + b"\n"})
