"""The ASGI layer applying the web config in force: headers, the rate limit and basic auth."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping
from typing import Final

import anyio
import anyio.to_thread
import bcrypt
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exporter.webconfig.models import BCRYPT_HASH, RateLimit, WebConfigError
from exporter.webconfig.source import WebConfigSource

log = logging.getLogger("exporter.webconfig")

# Verified against when the user name is unknown, so an unknown user costs as much as a wrong
# password (no user enumeration by timing). The toolkit's own: bcrypt("fakepassword"), cost 10.
_DUMMY_HASH_COST_10: Final = b"$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi"
_FAILURE_WINDOW: Final = 60.0  # seconds a failure counts against its client
_SUSPECT_AFTER: Final = 3  # recent failures (or checks at once) that make a client a suspect
_SUSPECT_QUEUE: Final = 4  # suspect checks waiting at most; beyond, refused without bcrypt
_MAX_CLIENTS: Final = 4096  # clients remembered (bounded memory)
_CacheKey = tuple[bytes, str, bytes]


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
        self.app, self.source = app, source
        self.authenticator = authenticator or BasicAuthenticator()
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
        # A credential that already passed skips the rate limit: an unauthenticated flood
        # must not make Prometheus' scrapes 429.
        known = bool(config.users) and self.authenticator.cached(config.users, authorization)
        if not known and not self._allow(config.rate_limit):
            await PlainTextResponse("Too Many Requests\n", 429)(scope, receive, send)
            return
        if config.users and not known:
            peer = str(scope["client"][0]) if scope.get("client") else None
            if not await self.authenticator.check(config.users, authorization, peer):
                headers = {**config.headers, "WWW-Authenticate": "Basic"}
                await PlainTextResponse("Unauthorized\n", 401, headers)(scope, receive, send)
                return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                MutableHeaders(scope=message).update(config.headers)
            await send(message)

        await self.app(scope, receive, send_with_headers if config.headers else send)

    def _allow(self, limit: RateLimit | None) -> bool:
        """A token bucket of ``burst`` requests, refilled one per ``interval``."""
        if limit is None:
            self._bucket = None
            return True
        now = time.monotonic()
        previous, tokens, at = self._bucket or (limit, float(limit.burst), now)
        if previous != limit:  # a new limit starts full
            tokens, at = float(limit.burst), now
        tokens = min(float(limit.burst), tokens + (now - at) / limit.interval)
        allowed = tokens >= 1.0
        self._bucket = (limit, tokens - 1.0 if allowed else tokens, now)
        return allowed


class BasicAuthenticator:
    """Checks ``Authorization: Basic`` against bcrypt hashes, cheaply after the first time.

    Successes are cached (bcrypt's cost is paid once per credential); failures are not, take
    as long as the slowest check so far, and clients that keep failing wait in a short queue
    of their own (docs/http.md, "Basic auth details" and "Hostile clients").
    """

    def __init__(self, *, cache_size: int = 256) -> None:
        self._cache: OrderedDict[_CacheKey, None] = OrderedDict()
        self._cache_size = cache_size
        # bcrypt runs in a worker thread, one check at a time (the toolkit serialises it too);
        # suspects on their own limiter, so a flood waits behind itself.
        self._limiter, self._suspect_limiter = anyio.CapacityLimiter(1), anyio.CapacityLimiter(1)
        self._suspects_waiting = 0
        self._inflight: Counter[str] = Counter()
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()  # at, count
        self._slowest = 0.0
        self._dummy: dict[int, bytes] = {10: _DUMMY_HASH_COST_10}
        self.verifications = 0  # bcrypt computations so far
        self.refused_unverified = 0  # failures answered without bcrypt (suspect queue full)

    def cached(self, users: Mapping[str, str], authorization: str | None) -> bool:
        """A credential that already passed: no bcrypt, no queue, no rate limit."""
        credentials = parse_basic_auth(authorization)
        if credentials is None:
            return False
        key, hashed = _cache_key(users, *credentials)
        if hashed is None or key not in self._cache:
            return False
        self._cache.move_to_end(key)
        return True

    async def check(
        self, users: Mapping[str, str], authorization: str | None, client: str | None = None
    ) -> bool:
        if self.cached(users, authorization):
            return True
        if (credentials := parse_basic_auth(authorization)) is None:
            return False  # names no user: nothing to verify
        started, name = time.monotonic(), client or "?"
        key, hashed = _cache_key(users, *credentials)
        target = hashed.encode("ascii") if hashed else await self._dummy_hash(users)
        suspect = self._recent_failures(name, started) + self._inflight[name] >= _SUSPECT_AFTER
        if suspect and self._suspects_waiting >= _SUSPECT_QUEUE:
            self.refused_unverified += 1
            return await self._failed(name, started)
        self._suspects_waiting += suspect
        self._inflight[name] += 1
        try:
            limiter = self._suspect_limiter if suspect else self._limiter
            ok = await anyio.to_thread.run_sync(_checkpw, credentials[1], target, limiter=limiter)
        finally:
            self._suspects_waiting -= suspect
            self._inflight[name] -= 1
            if not self._inflight[name]:
                del self._inflight[name]
        self.verifications += 1
        if not ok or hashed is None:
            return await self._failed(name, started)
        self._cache[key] = None
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return True

    def _recent_failures(self, client: str, now: float) -> int:
        at, count = self._failures.get(client, (0.0, 0))
        return count if now - at < _FAILURE_WINDOW else 0

    async def _failed(self, client: str, started: float) -> bool:
        count = self._recent_failures(client, started) + 1
        self._failures[client] = (started, count)
        self._failures.move_to_end(client)
        if len(self._failures) > _MAX_CLIENTS:
            self._failures.popitem(last=False)
        # At most one line per client and minute reaches the log (exporter.asgi's filter).
        log.warning("web: basic auth failed for a client (%d failures in the last minute)", count)
        # Every failure takes as long as the slowest check so far: unknown users, cheap
        # hashes and refused guesses look alike from outside.
        elapsed = time.monotonic() - started
        self._slowest = max(self._slowest, elapsed)
        await anyio.sleep(self._slowest - elapsed)
        return False

    async def _dummy_hash(self, users: Mapping[str, str]) -> bytes:
        """A hash of the highest configured cost: an unknown user costs as much as a known one."""
        costs = [int(m.group(1)) for h in users.values() if (m := BCRYPT_HASH.fullmatch(h))]
        if (cost := max(costs, default=10)) not in self._dummy:
            salt = bcrypt.gensalt(cost)
            self._dummy[cost] = await anyio.to_thread.run_sync(
                bcrypt.hashpw, b"not a password of anyone", salt, limiter=self._limiter
            )
        return self._dummy[cost]


def _cache_key(
    users: Mapping[str, str], user: bytes, password: bytes
) -> tuple[_CacheKey, str | None]:
    """The success-cache key and the user's hash; names compared in constant time."""
    hashed: str | None = None
    for name, candidate in users.items():  # no early exit: time does not depend on rank
        if hmac.compare_digest(name.encode("utf-8"), user):
            hashed = candidate
    return (user, hashed or "", hashlib.sha256(password).digest()), hashed


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # bcrypt 5 refuses passwords over 72 bytes; Go's fails them too
        return False


def parse_basic_auth(header: str | None) -> tuple[bytes, bytes] | None:
    """(user, password) as bytes from an ``Authorization`` value, or None if not Basic."""
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = base64.b64decode(encoded.strip().encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None
    user, sep, password = decoded.partition(b":")
    return (user, password) if sep else None
