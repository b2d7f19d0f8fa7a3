"""HTTP basic auth against bcrypt hashes, with a verification cache and timing-safe misses.

Also the bcrypt hash format the config parser accepts, so both agree on it.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import re
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
        self._dummy: dict[int, bytes] = {10: _DUMMY_HASH_COST_10}
        self.verifications = 0  # bcrypt computations so far (tests assert on the cache)

    async def check(self, users: Mapping[str, str], authorization: str | None) -> bool:
        credentials = parse_basic_auth(authorization)
        if credentials is None:
            return False
        user, password = credentials
        hashed: str | None = None
        for name, candidate in users.items():  # no early exit: time does not depend on rank
            if hmac.compare_digest(name.encode("utf-8"), user):
                hashed = candidate
        key = (user, hashed or "", hashlib.sha256(password).digest())
        if hashed is not None and key in self._cache:
            self._cache.move_to_end(key)
            return True
        target = hashed.encode("ascii") if hashed else await self._dummy_hash(users)
        ok = await anyio.to_thread.run_sync(_checkpw, password, target, limiter=self._limiter)
        self.verifications += 1
        if not (ok and hashed is not None):
            return False
        self._cache[key] = None
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return True

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
