"""The ASGI layer applying the web config in force: headers, the rate limit and basic auth."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Final

import anyio
import anyio.to_thread
import bcrypt
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exporter.webconfig.models import RateLimit, WebConfigError, log
from exporter.webconfig.source import WebConfigSource

_FAILURE_WINDOW: Final = 60.0  # seconds a failure counts against its client
_SUSPECT_AFTER: Final = 3  # recent failures (or checks at once) that make a client a suspect
_SUSPECT_QUEUE: Final = 4  # suspect checks waiting at most; beyond, refused without bcrypt
_MAX_CLIENTS: Final = 4096  # clients remembered (bounded memory)
_CACHE_SIZE: Final = 256  # successful credentials remembered


class WebConfigMiddleware:
    """Applies the web config in force to every HTTP request in the toolkit's order: 500 if it
    does not load, the rate limit (429), basic auth on every path (401), then its headers."""

    def __init__(
        self, app: ASGIApp, *, source: WebConfigSource, authenticator: BasicAuthenticator
    ) -> None:
        self.app, self.source, self.authenticator = app, source, authenticator
        self._bucket: tuple[RateLimit, float, float] | None = None  # limit, tokens, at

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            config = self.source.current()
        except WebConfigError:  # logged by the source; the client learns nothing of the file
            await PlainTextResponse("Internal Server Error\n", 500)(scope, receive, send)
            return
        # latin-1, as starlette decodes it: non-ASCII then fails base64 decoding, as it should.
        authorization = Headers(scope=scope).get("authorization")
        # A credential that passed before skips the rate limit: a flood must not 429 scrapes.
        users, headers = config.basic_auth_users, config.http_server_config.headers
        known = self.authenticator.cached(users, authorization)
        peer = str(scope["client"][0]) if scope.get("client") else None
        if not known and not self._allow(config.rate_limit):
            await PlainTextResponse("Too Many Requests\n", 429)(scope, receive, send)
            return
        if users and not known and not await self.authenticator.check(users, authorization, peer):
            challenge = {**headers, "WWW-Authenticate": "Basic"}
            await PlainTextResponse("Unauthorized\n", 401, challenge)(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                MutableHeaders(scope=message).update(headers)
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _allow(self, limit: RateLimit) -> bool:
        """A token bucket of ``burst`` requests, refilled one per ``interval``."""
        if not limit.interval:
            return True
        now = time.monotonic()
        previous, tokens, at = self._bucket or (limit, limit.burst, now)
        if previous != limit:  # a new limit starts full
            tokens, at = limit.burst, now
        tokens = min(limit.burst, tokens + (now - at) / limit.interval)
        self._bucket = (limit, tokens - 1 if tokens >= 1 else tokens, now)
        return tokens >= 1


class BasicAuthenticator:
    """``Authorization: Basic`` against bcrypt hashes (docs/http.md, "Basic auth details" and
    "Hostile clients"): successes cached, failures padded, suspects on a queue of their own."""

    def __init__(self) -> None:
        self._cache: OrderedDict[tuple[bytes, str, bytes], None] = OrderedDict()  # successes
        self._limiter, self._suspect_limiter = anyio.CapacityLimiter(1), anyio.CapacityLimiter(1)
        self._suspects_waiting = 0
        # client -> (last check started, checks started minus successes in the window): a
        # check counts as a failure until it succeeds, so checks in flight count too.
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._slowest = 0.0
        self.verifications = 0  # bcrypt computations so far
        self.refused_unverified = 0  # failures answered without bcrypt (queue full, overlong)

    def cached(self, users: Mapping[str, str], authorization: str | None) -> bool:
        """A credential that already passed: no bcrypt, no queue, no rate limit."""
        key = _cache_key(users, parse_basic_auth(authorization))
        if key is None or key not in self._cache:
            return False
        self._cache.move_to_end(key)
        return True

    async def check(
        self, users: Mapping[str, str], authorization: str | None, client: str | None = None
    ) -> bool:
        """Verify a credential that ``cached()`` does not know (bcrypt, queued, padded)."""
        if (credentials := parse_basic_auth(authorization)) is None or not users:
            return False  # names no user: nothing to verify
        started, name, password = time.monotonic(), client or "?", credentials[1]
        key = _cache_key(users, credentials)
        # An unknown user costs what the costliest known one does ("$2b$10$…": cost at 4:6).
        target = (key[1] if key else max(users.values(), key=lambda h: h[4:6])).encode("ascii")
        suspect = self._count_failure(name, started) > _SUSPECT_AFTER
        # bcrypt 5 refuses passwords over 72 bytes; Go's fails them too.
        if (suspect and self._suspects_waiting >= _SUSPECT_QUEUE) or len(password) > 72:
            self.refused_unverified += 1
            return await self._failed(name, started)
        self._suspects_waiting += suspect
        try:
            limiter = self._suspect_limiter if suspect else self._limiter
            ok = await anyio.to_thread.run_sync(bcrypt.checkpw, password, target, limiter=limiter)
        finally:
            self._suspects_waiting -= suspect
        self.verifications += 1
        if not ok or key is None:
            return await self._failed(name, started)
        at, count = self._failures.pop(name, (started, 1))
        if count > 1:  # other checks of this client still count
            self._failures[name] = (at, count - 1)
        self._cache[key] = None
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return True

    def _count_failure(self, client: str, now: float) -> int:
        """Count a check starting as a failure; return the client's count in the window."""
        at, count = self._failures.pop(client, (now, 0))
        count = count + 1 if now - at < _FAILURE_WINDOW else 1
        self._failures[client] = (now, count)
        if len(self._failures) > _MAX_CLIENTS:
            self._failures.popitem(last=False)
        return count

    async def _failed(self, client: str, started: float) -> bool:
        count = self._failures.get(client, (started, 1))[1]
        # At most one line per client and minute reaches the log (exporter.asgi's filter).
        log.warning("web: basic auth failed for a client (%d failures in the last minute)", count)
        elapsed = time.monotonic() - started
        self._slowest = max(self._slowest, elapsed)
        await anyio.sleep(self._slowest - elapsed)
        return False


def _cache_key(
    users: Mapping[str, str], credentials: tuple[bytes, bytes] | None
) -> tuple[bytes, str, bytes] | None:
    """(user, hash, sha256 of the password) for a configured user, else None. Names are
    compared in constant time, with no early exit: time does not depend on rank."""
    if credentials is None:
        return None
    user, password = credentials
    hashed = [h for name, h in users.items() if hmac.compare_digest(name.encode("utf-8"), user)]
    return (user, hashed[0], hashlib.sha256(password).digest()) if hashed else None


def parse_basic_auth(header: str | None) -> tuple[bytes, bytes] | None:
    """(user, password) as bytes from an ``Authorization`` value, or None if not Basic."""
    scheme, _, encoded = (header or "").partition(" ")
    try:
        decoded = base64.b64decode(encoded.strip().encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None
    user, sep, password = decoded.partition(b":")
    return (user, password) if sep and scheme.lower() == "basic" else None
