"""HTTP basic auth against bcrypt hashes, with a verification cache and timing-safe misses.

Also the bcrypt hash format the config parser accepts, so both agree on it.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Mapping
from typing import Final

import anyio
import anyio.to_thread
import bcrypt

__all__ = ["BCRYPT_HASH", "BasicAuthenticator", "parse_basic_auth"]

# $2a$/$2b$/$2y$ are the variants both Go's and Python's bcrypt verify; cost 04-31.
BCRYPT_HASH: Final = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")

# Verified against when the user name is unknown, so an unknown user costs as much as a wrong
# password (no user enumeration by timing). The toolkit's own: bcrypt("fakepassword"), cost 10.
_DUMMY_HASH_COST_10: Final = b"$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi"
_FAILURE_WINDOW: Final = 60.0  # seconds a failure counts against its client
_SUSPECT_AFTER: Final = 3  # failures in the window that move a client to the suspect queue
_SUSPECT_QUEUE: Final = 4  # suspect checks waiting at most; beyond, refused without bcrypt
_MAX_CLIENTS: Final = 4096  # clients remembered (bounded memory)

log = logging.getLogger("exporter.webconfig")


class BasicAuthenticator:
    """Checks ``Authorization: Basic`` against bcrypt hashes, cheaply after the first time.

    * User names are compared with ``hmac.compare_digest`` against every configured user.
    * An unknown user is verified against a dummy hash of the same cost, so the answer takes
      as long as for a known user with a wrong password.
    * Successful checks are cached by (user, hash, sha256(password)), bounded, so bcrypt's
      cost is paid once per credential, as in the toolkit. Failures are not cached: a cache
      of wrong passwords would be unbounded attacker-controlled memory.
    * bcrypt runs in a worker thread, one at a time (the toolkit serialises it too), so it
      neither blocks the event loop nor lets a flood of bad passwords take every core.
    """

    def __init__(self, *, cache_size: int = 256) -> None:
        self._cache: collections.OrderedDict[tuple[bytes, str, bytes], None] = (
            collections.OrderedDict()
        )
        self._cache_size = cache_size
        self._limiter = anyio.CapacityLimiter(1)
        # Clients that failed recently verify on their own, short queue: a flood of bad
        # guesses waits behind itself, never in front of Prometheus' first login.
        self._suspect_limiter = anyio.CapacityLimiter(1)
        self._suspect_waiting = 0
        self._inflight: collections.Counter[str] = collections.Counter()
        self._failures: collections.OrderedDict[str, tuple[float, int]] = collections.OrderedDict()
        self._slowest = 0.0  # the longest bcrypt check so far: every failure takes as long
        self._dummy: dict[int, bytes] = {10: _DUMMY_HASH_COST_10}
        self.verifications = 0  # bcrypt computations so far (tests assert on the cache)
        self.refused_unverified = 0  # failures answered without bcrypt (queue full)

    def cached(self, users: Mapping[str, str], authorization: str | None) -> bool:
        """A credential that already passed: no bcrypt, no queue, no rate limit."""
        credentials = parse_basic_auth(authorization)
        if credentials is None:
            return False
        key, hashed = self._key(users, *credentials)
        if hashed is None or key not in self._cache:
            return False
        self._cache.move_to_end(key)
        return True

    def _key(
        self, users: Mapping[str, str], user: bytes, password: bytes
    ) -> tuple[tuple[bytes, str, bytes], str | None]:
        hashed: str | None = None
        for name, candidate in users.items():  # no early exit: time does not depend on rank
            if hmac.compare_digest(name.encode("utf-8"), user):
                hashed = candidate
        return (user, hashed or "", hashlib.sha256(password).digest()), hashed

    async def check(
        self, users: Mapping[str, str], authorization: str | None, client: str | None = None
    ) -> bool:
        if self.cached(users, authorization):
            return True
        credentials = parse_basic_auth(authorization)
        started = time.monotonic()
        if credentials is None:
            return False
        key, hashed = self._key(users, *credentials)
        target = hashed.encode("ascii") if hashed else await self._dummy_hash(users)
        name = client or "?"
        # Recent failures, or several checks at once: Prometheus sends one at a time.
        busy = self._recent_failures(name, started) + self._inflight[name]
        suspect = busy >= _SUSPECT_AFTER
        if suspect and self._suspect_waiting >= _SUSPECT_QUEUE:
            self.refused_unverified += 1
            return await self._failed(client, started)
        self._suspect_waiting += suspect
        self._inflight[name] += 1
        try:
            limiter = self._suspect_limiter if suspect else self._limiter
            ok = await anyio.to_thread.run_sync(_checkpw, credentials[1], target, limiter=limiter)
        finally:
            self._suspect_waiting -= suspect
            self._inflight[name] -= 1
            if not self._inflight[name]:
                del self._inflight[name]
        self.verifications += 1
        if not (ok and hashed is not None):
            return await self._failed(client, started)
        self._cache[key] = None
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return True

    def _recent_failures(self, client: str | None, now: float) -> int:
        at, count = self._failures.get(client or "?", (0.0, 0))
        return count if now - at < _FAILURE_WINDOW else 0

    async def _failed(self, client: str | None, started: float) -> bool:
        name = client or "?"
        count = self._recent_failures(name, started) + 1
        self._failures[name] = (started, count)
        self._failures.move_to_end(name)
        while len(self._failures) > _MAX_CLIENTS:
            self._failures.popitem(last=False)
        # One line per client and minute at most (the repeat filter of exporter.asgi).
        log.warning("web: basic auth failed for a client (%d failures in the last minute)", count)
        elapsed = time.monotonic() - started
        self._slowest = max(self._slowest, elapsed)
        # Every failure takes as long as the slowest check seen: unknown users, cheap
        # hashes and refused guesses all look alike from outside.
        await anyio.sleep(max(0.0, self._slowest - elapsed))
        return False

    async def _dummy_hash(self, users: Mapping[str, str]) -> bytes:
        # Match the most expensive configured cost so "unknown user" is never the fast answer.
        costs = [int(m.group(1)) for h in users.values() if (m := BCRYPT_HASH.fullmatch(h))]
        cost = max(costs, default=10)
        if cost not in self._dummy:
            self._dummy[cost] = await anyio.to_thread.run_sync(
                _hash_dummy, cost, limiter=self._limiter
            )
        return self._dummy[cost]


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # bcrypt 5 refuses passwords over 72 bytes; Go's fails them too
        return False


def _hash_dummy(cost: int) -> bytes:
    return bcrypt.hashpw(b"not a password of anyone", bcrypt.gensalt(cost))


def parse_basic_auth(header: str | None) -> tuple[bytes, bytes] | None:
    """(user, password) as bytes from an ``Authorization`` value, or None if not Basic."""
    if not header:
        return None
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = base64.b64decode(encoded.strip().encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return user, password
