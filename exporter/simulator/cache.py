"""A per-model prompt-prefix cache that behaves like the providers' KV caches, observably.

Two ways in, matching the two caching styles the exporter must judge:

* automatic (OpenAI and most OpenAI-compatible APIs): the prompt is cut into fixed blocks
  of ``granularity`` tokens; each block is keyed by a hash chained over every block before
  it, so a key stands for a whole prefix. A hit is the longest run of leading blocks still
  present, reported only when it reaches ``min_cacheable_tokens`` (OpenAI: 0, or 1024 and
  up in 128-token steps).
* breakpoints (Anthropic ``cache_control``): entries are exact prefixes ending where the
  caller put a marker; a read is the longest marked prefix stored earlier.

Entries expire ``ttl`` seconds after their last use, and the least recently used entries
go first once ``capacity`` is reached. Time is passed in (``now``), so a fake clock makes
every expiry exact.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence

_ROOT = b"prompt-cache-simulator"


def _digest(previous: bytes, tokens: Sequence[str], tag: bytes) -> bytes:
    h = hashlib.blake2b(previous, digest_size=16)
    h.update(tag)
    for token in tokens:
        # Length-prefixed so no two different token sequences hash the same bytes.
        raw = token.encode("utf-8")
        h.update(len(raw).to_bytes(4, "big"))
        h.update(raw)
    return h.digest()


class PrefixCache:
    def __init__(
        self,
        *,
        min_cacheable_tokens: int = 1024,
        granularity: int = 128,
        ttl: float = 300.0,
        capacity: int = 100_000,
    ) -> None:
        if granularity < 1:
            raise ValueError("granularity must be at least 1")
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.min_cacheable_tokens = min_cacheable_tokens
        self.granularity = granularity
        self.ttl = ttl
        self.capacity = capacity
        # key -> expiry time; order is least recently used first.
        self._entries: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    # -- automatic (block) caching --------------------------------------------------------

    def cacheable_tokens(self, prompt_tokens: int) -> int:
        """How much of a prompt of this length ``store`` covers: its full blocks, or 0 when
        the prompt (or its full blocks) fall short of the minimum."""
        if prompt_tokens < self.min_cacheable_tokens:
            return 0
        covered = prompt_tokens // self.granularity * self.granularity
        return covered if covered >= self.min_cacheable_tokens else 0

    def lookup(self, tokens: Sequence[str], now: float) -> int:
        """Cached prefix length for ``tokens``: 0, or at least the minimum in block steps."""
        if len(tokens) < self.min_cacheable_tokens:
            return 0
        matched: list[bytes] = []
        for key in self._block_keys(tokens):
            if not self._alive(key, now):
                break
            matched.append(key)
        cached = len(matched) * self.granularity
        if cached < self.min_cacheable_tokens:
            return 0
        self._touch(matched, now)
        return cached

    def store(self, tokens: Sequence[str], now: float) -> int:
        """Store every full block of the prompt; returns the tokens in newly stored blocks."""
        covered = self.cacheable_tokens(len(tokens))
        if not covered:
            return 0
        keys = self._block_keys(tokens)[: covered // self.granularity]
        return self._put(keys, now) * self.granularity

    def _block_keys(self, tokens: Sequence[str]) -> list[bytes]:
        keys: list[bytes] = []
        previous = _ROOT
        g = self.granularity
        for start in range(0, len(tokens) - g + 1, g):
            previous = _digest(previous, tokens[start : start + g], b"B")
            keys.append(previous)
        return keys

    # -- breakpoint caching ---------------------------------------------------------------

    def eligible_breakpoints(self, ends: Iterable[int], prompt_tokens: int) -> list[int]:
        """Breakpoints whose prefix is long enough to be cached, ascending, without repeats."""
        return sorted(
            {e for e in ends if self.min_cacheable_tokens <= e <= prompt_tokens and e > 0}
        )

    def lookup_at(self, tokens: Sequence[str], ends: Iterable[int], now: float) -> int:
        """The longest prefix ending at one of ``ends`` that is stored; 0 if none."""
        eligible = self.eligible_breakpoints(ends, len(tokens))
        for end in reversed(eligible):
            key = self._prefix_key(tokens, end)
            if self._alive(key, now):
                self._touch([key], now)
                return end
        return 0

    def store_at(self, tokens: Sequence[str], ends: Iterable[int], now: float) -> int:
        """Store the prefixes ending at ``ends``; returns the longest one stored (0 if none)."""
        eligible = self.eligible_breakpoints(ends, len(tokens))
        self._put([self._prefix_key(tokens, end) for end in eligible], now)
        return eligible[-1] if eligible else 0

    def _prefix_key(self, tokens: Sequence[str], end: int) -> bytes:
        full = end // self.granularity
        blocks = self._block_keys(tokens[: full * self.granularity])
        previous = blocks[-1] if blocks else _ROOT
        # Tagged apart from block keys: an exact prefix and a block run are different entries.
        return _digest(previous, tokens[full * self.granularity : end], b"P")

    # -- entry bookkeeping ----------------------------------------------------------------

    def _alive(self, key: bytes, now: float) -> bool:
        expiry = self._entries.get(key)
        if expiry is None:
            return False
        if expiry <= now:
            del self._entries[key]
            return False
        return True

    def _touch(self, keys: Iterable[bytes], now: float) -> None:
        for key in keys:
            self._entries[key] = now + self.ttl
            self._entries.move_to_end(key)

    def _put(self, keys: Iterable[bytes], now: float) -> int:
        """Insert or refresh ``keys``; returns how many were not present (or had expired)."""
        new = 0
        for key in keys:
            if not self._alive(key, now):
                new += 1
            self._entries[key] = now + self.ttl
            self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return new
