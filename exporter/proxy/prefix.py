"""Prefix churn: how often the cacheable prefix of real requests changes, without keeping prompts.

A provider caches the leading part of a prompt, in the order it renders it: tools, then the
system prompt, then the messages. Nothing shorter than its minimum cacheable length is cached
at all, so the first block of that length decides whether a request can hit. The *prefix* of
a request is therefore its tools and system prompt (the part an application means to keep
fixed) and, when those are shorter than the minimum, the leading messages up to the minimum.

Each part is serialised as the client sent it (key order kept, because providers cache the
rendered text and a reordered tool schema is a different prompt; ``cache_control`` markers
dropped, because they move between turns without changing the text) and hashed with a key
drawn at start-up, so no digest can be checked against a guessed prompt. A bounded set of
recent digests per model tells whether a prefix is new; when it is, the part that changed is
the first one, in cache order, whose digest is also new. Length is counted in characters of
the serialised text, about ``CHARS_PER_TOKEN`` per token: an estimate, since no tokenizer of
the provider is at hand, and only used to find where the first block ends.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

CHARS_PER_TOKEN = 4
PREFIX_PARTS = ("tools", "system", "messages")
_DIGEST_SIZE = 16
_SYSTEM_ROLES = frozenset({"system", "developer"})


@dataclass(frozen=True, slots=True)
class PrefixDigests:
    """Keyed digests of one request: of its tools, tools + system, and its whole prefix."""

    tools: bytes
    static: bytes
    prefix: bytes
    has_tools: bool
    has_system: bool


class PrefixHasher:
    """Digests of request prefixes; the key lives in memory only and differs per process."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else os.urandom(32)

    def digests(self, family: str, body: Any, min_chars: int) -> PrefixDigests | None:
        """The digests of a decoded chat request body; None if it has no prompt to cache
        (not a chat body, or shorter than ``min_chars`` in all)."""
        parts = _split(family, body)
        if parts is None:
            return None
        tools, system, messages = parts
        hasher = hashlib.blake2b(key=self._key, digest_size=_DIGEST_SIZE)
        hasher.update(b"t" + tools.encode())
        tools_digest = hasher.digest()
        hasher.update(b"s" + system.encode())
        static_digest = hasher.digest()
        length = len(tools) + len(system)
        if length < min_chars:  # messages are serialised only when the prefix reaches them
            for text in messages:
                piece = text[: min_chars - length]
                hasher.update(b"m" + piece.encode())
                length += len(piece)
                if length >= min_chars:
                    break
        if length < min_chars:
            return None
        return PrefixDigests(
            tools_digest, static_digest, hasher.digest(), bool(tools), bool(system)
        )


def _split(family: str, body: Any) -> tuple[str, str, Iterator[str]] | None:
    """(tools, system, messages one by one) as serialised text, in the provider's cache order."""
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    if family == "anthropic":
        tools = _dump(body["tools"]) if body.get("tools") else ""
        system = _dump(body["system"]) if body.get("system") else ""
        return tools, system, (_dump(m) for m in messages)
    declared = [body[k] for k in ("tools", "functions") if body.get(k)]
    tools = _dump(declared) if declared else ""
    lead = 0
    while (
        lead < len(messages)
        and isinstance(messages[lead], dict)
        and messages[lead].get("role") in _SYSTEM_ROLES
    ):
        lead += 1
    system = _dump(messages[:lead]) if lead else ""
    return tools, system, (_dump(m) for m in messages[lead:])


def _dump(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    # Copying the value without its markers costs more than this scan: only when needed.
    if '"cache_control"' not in text:
        return text
    return json.dumps(_unmarked(value), ensure_ascii=False, separators=(",", ":"))


def _unmarked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _unmarked(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_unmarked(v) for v in value]
    return value


class RecentDigests:
    """The last ``size`` distinct digests seen, least recently seen evicted first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def check_in(self, digest: bytes) -> bool:
        """Whether ``digest`` was among the recent ones; it is the most recent afterwards."""
        if digest in self._items:
            self._items.move_to_end(digest)
            return True
        self._items[digest] = None
        if len(self._items) > self._size:
            self._items.popitem(last=False)
        return False


class PrefixTracker:
    """The recent prefixes of one model; ``observe`` says which part changed, if any."""

    def __init__(self, size: int) -> None:
        self._tools = RecentDigests(size)
        self._static = RecentDigests(size)
        self._prefix = RecentDigests(size)

    def observe(self, digests: PrefixDigests) -> str | None:
        """None if the prefix was seen recently; else the first part (tools, system,
        messages) that is new too: an empty part cannot have changed."""
        known_tools = self._tools.check_in(digests.tools)
        known_static = self._static.check_in(digests.static)
        if self._prefix.check_in(digests.prefix):
            return None
        if not known_tools and digests.has_tools:
            return "tools"
        if not known_static and digests.has_system:
            return "system"
        return "messages"
