"""HTTP basic auth against bcrypt hashes: cached successes, timing-safe failures, back-off."""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import logging
import time
from collections.abc import Mapping
from typing import Final

import anyio
import anyio.to_thread
import bcrypt

from exporter.webconfig.models import BCRYPT_HASH

# Verified against when the user name is unknown, so an unknown user costs as much as a wrong
# password (no user enumeration by timing). The toolkit's own: bcrypt("fakepassword"), cost 10.
_DUMMY_HASH_COST_10: Final = b"$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi"
_FAILURE_WINDOW: Final = 60.0  # seconds a failure counts against its client
_SUSPECT_AFTER: Final = 3  # recent failures (or checks at once) that make a client a suspect
_SUSPECT_QUEUE: Final = 4  # suspect checks waiting at most; beyond, refused without bcrypt
_MAX_CLIENTS: Final = 4096  # clients remembered (bounded memory)

log = logging.getLogger("exporter.webconfig")
_CacheKey = tuple[bytes, str, bytes]


class BasicAuthenticator:
    """Checks ``Authorization: Basic`` against bcrypt hashes, cheaply after the first time.

    * User names are compared in constant time with every configured user; an unknown user is
      verified against a dummy hash of the highest configured cost.
    * Successes are cached by (user, hash, sha256(password)), bounded, so bcrypt's cost is paid
      once per credential, as in the toolkit. Failures are not: that cache would be unbounded
      attacker-controlled memory.
    * bcrypt runs in a worker thread, one check at a time (the toolkit serialises it too).
      Clients that failed recently, or send several checks at once (Prometheus sends one), wait
      in a separate short queue, so a flood of bad guesses waits behind itself, never in front
      of a valid first login; beyond that queue they are refused without bcrypt.
    * Every failure is logged and takes as long as the slowest check so far, so unknown users,
      cheap hashes and refused guesses look alike from outside.
    """

    def __init__(self, *, cache_size: int = 256) -> None:
        self._cache: collections.OrderedDict[_CacheKey, None] = collections.OrderedDict()
        self._cache_size = cache_size
        self._limiter = anyio.CapacityLimiter(1)
        self._suspect_limiter = anyio.CapacityLimiter(1)
        self._suspects_waiting = 0
        self._inflight: collections.Counter[str] = collections.Counter()
        self._failures: collections.OrderedDict[str, tuple[float, int]] = collections.OrderedDict()
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
        credentials = parse_basic_auth(authorization)
        if credentials is None:  # names no user: nothing to verify
            return False
        started, name = time.monotonic(), client or "?"
        key, hashed = _cache_key(users, *credentials)
        target = hashed.encode("ascii") if hashed else await self._dummy_hash(users)
        suspect = self._recent_failures(name, started) + self._inflight[name] >= _SUSPECT_AFTER
        if suspect and self._suspects_waiting >= _SUSPECT_QUEUE:
            self.refused_unverified += 1
            return await self._failed(name, started)
        limiter = self._suspect_limiter if suspect else self._limiter
        self._suspects_waiting += suspect
        self._inflight[name] += 1
        try:
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
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return True

    def _recent_failures(self, client: str, now: float) -> int:
        at, count = self._failures.get(client, (0.0, 0))
        return count if now - at < _FAILURE_WINDOW else 0

    async def _failed(self, client: str, started: float) -> bool:
        count = self._recent_failures(client, started) + 1
        self._failures[client] = (started, count)
        self._failures.move_to_end(client)
        while len(self._failures) > _MAX_CLIENTS:
            self._failures.popitem(last=False)
        # At most one line per client and minute reaches the log (exporter.asgi's filter).
        log.warning("web: basic auth failed for a client (%d failures in the last minute)", count)
        elapsed = time.monotonic() - started
        self._slowest = max(self._slowest, elapsed)
        await anyio.sleep(self._slowest - elapsed)
        return False

    async def _dummy_hash(self, users: Mapping[str, str]) -> bytes:
        costs = [int(m.group(1)) for h in users.values() if (m := BCRYPT_HASH.fullmatch(h))]
        cost = max(costs, default=10)
        if cost not in self._dummy:
            self._dummy[cost] = await anyio.to_thread.run_sync(
                _hash_dummy, cost, limiter=self._limiter
            )
        return self._dummy[cost]


def _cache_key(
    users: Mapping[str, str], user: bytes, password: bytes
) -> tuple[_CacheKey, str | None]:
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


def _hash_dummy(cost: int) -> bytes:
    return bcrypt.hashpw(b"not a password of anyone", bcrypt.gensalt(cost))


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
