"""Everything the simulator remembers: caches, balances, counters and the request log.

All mutation happens synchronously between awaits, so concurrent requests on the one
event loop never see a half-updated cache or balance.
"""

from __future__ import annotations

import hashlib
import random
import zlib
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Any

from exporter.clock import Clock
from exporter.simulator.cache import PrefixCache
from exporter.simulator.config import SimConfig
from exporter.simulator.models import DIEM_PER_USD, SimModel
from exporter.simulator.tokens import TokenizedPrompt


@dataclass(frozen=True, slots=True)
class Outcome:
    """What serving one prompt did: the numbers usage reports and billing charges."""

    prompt_tokens: int
    cached_tokens: int  # read from the cache (drives latency, even when not reported)
    cache_write_tokens: int
    completion_tokens: int

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass(frozen=True, slots=True)
class Charge:
    """A completion's price and how it was paid (DIEM first, then USD, as Venice debits)."""

    list_usd: float
    usd: float  # charged to the USD balance
    diem: float  # charged to the DIEM balance


@dataclass(slots=True)
class LogEntry:
    seq: int
    model: str
    api: str  # "openai" | "anthropic"
    status: int
    stream: bool
    time: float
    request_id: str
    model_seq: int | None = None  # the model's own chat request counter (drives 429s)
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None
    completion_tokens: int | None = None
    billed: bool = False
    cost_usd: float = 0.0
    cost_diem: float = 0.0
    fault: str | None = None
    # The W3C traceparent the request carried, as a tracing gateway logs it (capped).
    traceparent: str | None = None


@dataclass(slots=True)
class ModelStats:
    requests: int = 0
    responses: dict[str, int] = field(default_factory=dict)  # status -> count
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cost_diem: float = 0.0

    def add(self, entry: LogEntry) -> None:
        self.requests += 1
        key = str(entry.status)
        self.responses[key] = self.responses.get(key, 0) + 1
        if entry.billed:
            self.prompt_tokens += entry.prompt_tokens or 0
            self.cached_tokens += entry.cached_tokens or 0
            self.cache_write_tokens += entry.cache_write_tokens or 0
            self.completion_tokens += entry.completion_tokens or 0
            self.cost_usd += entry.cost_usd
            self.cost_diem += entry.cost_diem


class SimState:
    def __init__(self, config: SimConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.models = {m.name: m for m in config.models}
        self.reset()

    def reset(self) -> None:
        """Back to the state at start: empty caches, full balances, no history."""
        self.caches = {
            m.name: PrefixCache(
                min_cacheable_tokens=m.min_cacheable_tokens,
                granularity=m.granularity,
                ttl=m.ttl,
                capacity=m.capacity,
            )
            for m in self.config.models
        }
        # One stream per model, seeded from its name: its hit/miss sequence does not depend
        # on traffic to other models.
        self.rngs = {
            m.name: random.Random(self.config.seed * 1_000_003 + zlib.crc32(m.name.encode()))
            for m in self.config.models
        }
        self.model_seq = dict.fromkeys(self.models, 0)
        # Per model: how often each prompt was seen, for lazily persisting models.
        self.sightings: dict[str, OrderedDict[bytes, int]] = {m: OrderedDict() for m in self.models}
        self.balance_usd = float(self.config.balance_usd)
        self.balance_diem = float(self.config.balance_diem)
        self.seq = 0
        self.log: deque[LogEntry] = deque(maxlen=self.config.log_size)
        self.stats: dict[str, ModelStats] = {}
        self._window = -1
        self._window_requests = 0
        self._window_tokens = 0

    # -- sequencing -----------------------------------------------------------------------

    def next_seq(self) -> int:
        self.seq += 1
        self._roll_window()
        self._window_requests += 1
        return self.seq

    def next_model_seq(self, model: SimModel) -> int:
        self.model_seq[model.name] += 1
        return self.model_seq[model.name]

    def _roll_window(self) -> None:
        window = int(self.clock.time() // 60)
        if window != self._window:
            self._window, self._window_requests, self._window_tokens = window, 0, 0

    def ratelimit_remaining(self) -> tuple[int, int]:
        self._roll_window()
        return (
            max(0, self.config.requests_per_minute - self._window_requests),
            max(0, self.config.tokens_per_minute - self._window_tokens),
        )

    # -- caching --------------------------------------------------------------------------

    def serve(
        self,
        model: SimModel,
        prompt: TokenizedPrompt,
        *,
        anthropic: bool,
        breakpoints: tuple[int, ...] = (),
        max_tokens: int | None = None,
    ) -> Outcome:
        """Run ``prompt`` through the model's cache. ``anthropic`` selects breakpoint caching
        (only prefixes up to a ``cache_control`` marker) instead of automatic block caching."""
        cache = self.caches[model.name]
        now = self.clock.time()
        tokens = prompt.tokens
        completion = (
            model.output_tokens if max_tokens is None else min(model.output_tokens, max_tokens)
        )
        if anthropic:
            eligible = cache.eligible_breakpoints(breakpoints, len(tokens))
            full = eligible[-1] if eligible else 0

            def read() -> int:
                return cache.lookup_at(tokens, eligible, now)

            def write() -> None:
                cache.store_at(tokens, eligible, now)
        else:
            full = cache.cacheable_tokens(len(tokens))

            def read() -> int:
                return cache.lookup(tokens, now)

            def write() -> None:
                cache.store(tokens, now)

        if model.cache_mode == "evicting":
            # Other tenants' prompts went through since our last request and pushed ours out.
            cache.clear()
        if model.cache_mode == "broken":
            # Claims to write the prefix every time, never keeps it.
            cached = 0
        else:
            cached = read()
            flaky = cached and model.cache_mode == "flaky"
            if flaky and self.rngs[model.name].random() >= model.flaky_hit_rate:
                cached = 0  # served by a replica without the prefix
            if self._persists(model, tokens):
                write()
        written = max(0, full - cached)
        # The template precedes every prompt and is never evicted: always read from cache.
        shared = model.template_tokens
        return Outcome(len(tokens) + shared, cached + shared, written, completion)

    def _persists(self, model: SimModel, tokens: list[str]) -> bool:
        """Whether this sighting of the prompt makes the cache keep its prefix."""
        if model.persist_after <= 1:
            return True
        key = hashlib.blake2b("\x00".join(tokens).encode(), digest_size=16).digest()
        seen = self.sightings[model.name]
        seen[key] = count = seen.pop(key, 0) + 1
        while len(seen) > model.capacity:
            seen.popitem(last=False)
        return count >= model.persist_after

    # -- billing --------------------------------------------------------------------------

    def balance_headers(self) -> dict[str, str]:
        return {
            "x-venice-balance-usd": _money(self.balance_usd),
            "x-venice-balance-diem": _money(self.balance_diem),
        }

    @property
    def exhausted(self) -> bool:
        return self.balance_usd <= 0 and self.balance_diem <= 0

    def price(self, model: SimModel, outcome: Outcome) -> float:
        """List price in USD. Reads are discounted only where caching is offered and reported;
        writes cost the write price where there is one, else the input price."""
        read_price = model.price_cache_read if model.caches else None
        cached = outcome.cached_tokens if read_price is not None else 0
        read_price = read_price or 0.0
        write_price = (
            model.price_cache_write if model.price_cache_write is not None else model.price_input
        )
        written = min(outcome.cache_write_tokens, outcome.prompt_tokens - cached)
        plain = outcome.prompt_tokens - cached - written
        micro = (
            plain * model.price_input
            + cached * read_price
            + written * write_price
            + outcome.completion_tokens * model.price_output
        )
        return micro / 1_000_000

    def charge(self, model: SimModel, outcome: Outcome) -> Charge:
        """Debit the completion's price: from DIEM at DIEM_PER_USD, the rest from USD.
        The request that empties both balances is still served; the next one gets 402."""
        list_usd = self.price(model, outcome)
        due_diem = list_usd * DIEM_PER_USD
        from_diem = min(due_diem, max(self.balance_diem, 0.0))
        self.balance_diem -= from_diem
        rest_usd = list_usd - from_diem / DIEM_PER_USD
        from_usd = min(rest_usd, max(self.balance_usd, 0.0))
        self.balance_usd -= from_usd
        self._roll_window()
        self._window_tokens += outcome.prompt_tokens + outcome.completion_tokens
        return Charge(list_usd, from_usd, from_diem)

    # -- record ---------------------------------------------------------------------------

    def record(self, entry: LogEntry) -> None:
        self.log.append(entry)
        # Clients name models freely; counters stay bounded to the configured ones.
        key = entry.model if entry.model in self.models else "-"
        self.stats.setdefault(key, ModelStats()).add(entry)

    def stats_snapshot(self) -> dict[str, Any]:
        totals = ModelStats()
        for s in self.stats.values():
            totals.requests += s.requests
            for status, n in s.responses.items():
                totals.responses[status] = totals.responses.get(status, 0) + n
            totals.prompt_tokens += s.prompt_tokens
            totals.cached_tokens += s.cached_tokens
            totals.cache_write_tokens += s.cache_write_tokens
            totals.completion_tokens += s.completion_tokens
            totals.cost_usd += s.cost_usd
            totals.cost_diem += s.cost_diem
        return {
            "simulator": True,
            "models": {name: asdict(s) for name, s in sorted(self.stats.items())},
            "totals": asdict(totals),
            "balances": {"usd": self.balance_usd, "diem": self.balance_diem},
            "cache_entries": {name: len(c) for name, c in sorted(self.caches.items())},
            "model_seq": dict(sorted(self.model_seq.items())),
        }

    def log_entries(self, model: str | None, limit: int) -> list[dict[str, Any]]:
        entries = [e for e in self.log if model is None or e.model == model]
        return [asdict(e) for e in entries[-limit:]] if limit > 0 else []


def _money(value: float) -> str:
    # Venice sends balances as strings to avoid float surprises; rounding hides ours too.
    return f"{max(value, 0.0):.8f}".rstrip("0").rstrip(".") or "0"
